"""Model cards (retinal.v1.ModelCard) from the JSON manifests beside the weights."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from prometheus_client import Gauge

from protos.retinal.v1 import common_pb2

MODEL_INFO = Gauge(
    "retinal_model_info",
    "A model this service serves (value 1), with its version and weights' sha256",
    ["service", "name", "version", "sha256"],
)


def _numbers(tree: Any, prefix: str = "") -> Iterator[tuple[str, float]]:
    """Flatten nested metrics to dotted names, keeping numbers only."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _numbers(value, f"{prefix}{key}.")
    elif isinstance(tree, int | float) and not isinstance(tree, bool):
        yield prefix.rstrip("."), float(tree)


def model_card(manifest: dict[str, Any]) -> common_pb2.ModelCard:
    data = manifest.get("training_data", "")
    return common_pb2.ModelCard(
        name=manifest["name"],
        version=manifest["version"],
        sha256=manifest["sha256"],
        task=manifest.get("task", ""),
        training_data=data if isinstance(data, str) else json.dumps(data),
        metrics=dict(_numbers(manifest.get("metrics", {}))),
        license=manifest.get("license", ""),
    )


def export_model_info(service: str, manifests: list[dict[str, Any]]) -> None:
    """Publish the served models on the service's /metrics (`retinal_model_info`)."""
    for manifest in manifests:
        MODEL_INFO.labels(service, manifest["name"], manifest["version"], manifest["sha256"]).set(1)
