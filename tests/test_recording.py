"""Committed manifests record run settings without any machine's folders."""

from __future__ import annotations

import json
from pathlib import Path

from training.recording import REPO, shown

MANIFESTS = sorted(
    [*REPO.glob("services/*/weights/*.json"), *REPO.glob("training/*/weights/*.json")]
)


def test_paths_are_shown_relative_to_the_checkout() -> None:
    assert shown(REPO / "services/lesion/weights/lesion-unet.safetensors") == (
        "services/lesion/weights/lesion-unet.safetensors"
    )
    assert shown(Path("../shared/datasets")) == "../shared/datasets"  # outside: as given
    assert shown([REPO / "var/a.jsonl", 3]) == ["var/a.jsonl", 3]
    assert shown(0.5) == 0.5


def _strings(value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for item in value.values() for s in _strings(item)]
    if isinstance(value, list):
        return [s for item in value for s in _strings(item)]
    return []


def test_no_committed_manifest_names_an_absolute_path() -> None:
    assert len(MANIFESTS) >= 5
    for path in MANIFESTS:
        absolute = [s for s in _strings(json.loads(path.read_text())) if s.startswith("/")]
        assert not absolute, f"{path.relative_to(REPO)}: {absolute}"
