"""Model weight files with a JSON manifest beside them (`<name>.safetensors` + `<name>.json`).

A service verifies the weights' sha256 against the manifest before it builds a network from
them, and refuses to start on a mismatch: a truncated copy or a swapped file must never serve.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from shared import findings

_REQUIRED = ("name", "version", "sha256", "task")


class ModelIntegrityError(RuntimeError):
    """The weights file is missing, unreadable or does not match its manifest."""


@dataclass(frozen=True)
class ModelFiles:
    """A manifest read from disk and the verified tensors of its weights file."""

    manifest: dict[str, Any]
    state: dict[str, torch.Tensor]

    @property
    def label(self) -> str:
        return f"{self.manifest['name']}@{self.manifest['version']}"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def model_version(manifest: dict[str, Any]) -> findings.ModelVersion:
    """What the findings record of a loaded model: its name, version and weights' sha256."""
    return findings.ModelVersion(
        name=manifest["name"], version=manifest["version"], sha256=manifest["sha256"]
    )


def manifest_path(weights: Path) -> Path:
    return weights.with_suffix(".json")


def load_verified(weights: Path) -> ModelFiles:
    """Read `<name>.json`, check the sha256 of `<name>.safetensors`, then load the tensors."""
    manifest_file = manifest_path(weights)
    if not weights.is_file() or not manifest_file.is_file():
        raise ModelIntegrityError(f"model files missing: need {weights} and {manifest_file}")
    manifest = json.loads(manifest_file.read_text())
    missing = [key for key in _REQUIRED if key not in manifest]
    if missing:
        raise ModelIntegrityError(f"{manifest_file} lacks {', '.join(missing)}")
    actual = sha256_of(weights)
    if actual != manifest["sha256"]:
        raise ModelIntegrityError(
            f"checksum mismatch for {weights}: the manifest says sha256 {manifest['sha256']}, "
            f"the file has {actual}; refusing to load"
        )
    return ModelFiles(manifest=manifest, state=load_file(str(weights)))


def save_with_manifest(
    state: dict[str, torch.Tensor], weights: Path, manifest: dict[str, Any]
) -> dict[str, Any]:
    """Write the tensors, then the manifest with their sha256; returns the manifest written."""
    weights.parent.mkdir(parents=True, exist_ok=True)
    save_file({key: value.contiguous() for key, value in state.items()}, str(weights))
    written = {**manifest, "sha256": sha256_of(weights), "bytes": weights.stat().st_size}
    manifest_path(weights).write_text(json.dumps(written, indent=2) + "\n")
    return written


def quantised_path(weights: Path) -> Path:
    """`<name>.int8.onnx` beside `<name>.safetensors`."""
    return weights.with_suffix(".int8.onnx")


def quantised_model(weights: Path, manifest: dict[str, Any]) -> bytes:
    """The int8 ONNX model the manifest names (its `int8` entry), verified: its own sha256, and
    the sha256 of the weights it was quantised from, which must be the manifest's."""
    entry = manifest.get("int8")
    if entry is None:
        raise ModelIntegrityError(f"{manifest_path(weights)} names no int8 model")
    path = weights.parent / entry["file"]
    if not path.is_file():
        raise ModelIntegrityError(f"int8 model missing: {path}")
    model = path.read_bytes()
    actual = hashlib.sha256(model).hexdigest()
    if actual != entry["sha256"]:
        raise ModelIntegrityError(
            f"checksum mismatch for {path}: the manifest says sha256 {entry['sha256']}, "
            f"the file has {actual}; refusing to load"
        )
    if entry["source_sha256"] != manifest["sha256"]:
        raise ModelIntegrityError(
            f"{path} was quantised from other weights (sha256 {entry['source_sha256']}) than "
            f"{weights.name}; quantise again (python -m training.quantise)"
        )
    return model


def save_quantised(weights: Path, model: bytes, details: dict[str, Any]) -> dict[str, Any]:
    """Write `<name>.int8.onnx` and record it, with `details`, in the weights' manifest."""
    path = quantised_path(weights)
    path.write_bytes(model)
    manifest_file = manifest_path(weights)
    manifest = json.loads(manifest_file.read_text())
    manifest["int8"] = {
        "file": path.name,
        "sha256": hashlib.sha256(model).hexdigest(),
        "bytes": len(model),
        "source_sha256": manifest["sha256"],
        **details,
    }
    manifest_file.write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
