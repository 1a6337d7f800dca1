"""The records the VLM data pipeline passes between its steps."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class LabeledImage:
    """One image of a dataset with what its label files say about it.

    `diagnoses` holds the dataset's labels in RetinalGPT's words, e.g. {"dr_grade": "2",
    "glaucoma": "yes", "macular_edema": "no", "diagnosis": "hypertensive retinopathy"};
    empty when the dataset has no diagnostic labels (a segmentation set).
    """

    dataset: str
    image_id: str  # unique within the dataset
    path: Path
    diagnoses: dict[str, str] = field(default_factory=dict)
