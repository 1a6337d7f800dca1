"""Images for the quality model: real fundus photographs and non-fundus photographs.

Fundus photographs come from every folder of ../shared/datasets (curated research sets:
taken as gradable before degradation). Non-fundus photographs are the sample images that
ship inside scikit-image (no download); `skimage.data.retina` is a fundus and is excluded.
The split is by image, fixed by name, so held-out figures never see a training image.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from skimage import data as skdata
from tqdm import tqdm

from services.analysis.engine.quality import to_square
from shared.imaging import ImageRejected, ingest

FUNDUS_FOLDERS = (
    "DRIVE/training/images",
    "DRIVE/test/images",
    "STARE/stare-images",
    "LES-AV/training/images",
    "LES-AV/test/images",
    "AVRDB/images",
    "IDRiD-seg/images",
    "Drishti-GS1/Training/Images",
)
NON_FUNDUS_TRAIN = (
    "astronaut",
    "camera",
    "chelsea",
    "immunohistochemistry",
    "colorwheel",
    "logo",
    "text",
    "moon",
    "horse",
    "coins",
    "grass",
    "gravel",
)
NON_FUNDUS_HELD_OUT = ("coffee", "rocket", "clock", "brick", "page", "hubble_deep_field")
HELD_OUT_FRACTION = 0.2


@dataclass(frozen=True)
class QualityImages:
    fundus: dict[str, np.ndarray]  # id -> to_square image (uint8)
    non_fundus: dict[str, np.ndarray]


def is_held_out(image_id: str) -> bool:
    """A stable 20 % of images by a hash of their id (independent of folder order)."""
    digest = hashlib.sha256(image_id.encode()).digest()
    return digest[0] < 256 * HELD_OUT_FRACTION


def load_fundus(root: Path) -> dict[str, np.ndarray]:
    paths = [
        path
        for folder in FUNDUS_FOLDERS
        for path in sorted((root / folder).glob("*"))
        if path.is_file()
    ]
    images: dict[str, np.ndarray] = {}
    for path in tqdm(paths, desc="fundus images", unit="img"):
        try:
            rgb = ingest(path.read_bytes()).rgb
        except ImageRejected:
            continue
        images[f"{path.parent.relative_to(root)}/{path.stem}"] = to_square(rgb)
    return images


def _as_rgb(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    if image.shape[2] == 4:
        image = image[..., :3]
    return image.astype(np.uint8)


def load_non_fundus(names: tuple[str, ...]) -> dict[str, np.ndarray]:
    return {name: to_square(_as_rgb(getattr(skdata, name)())) for name in names}


def load_split(root: Path) -> tuple[QualityImages, QualityImages]:
    """(training images, held-out images)."""
    fundus = load_fundus(root)
    return (
        QualityImages(
            fundus={k: v for k, v in fundus.items() if not is_held_out(k)},
            non_fundus=load_non_fundus(NON_FUNDUS_TRAIN),
        ),
        QualityImages(
            fundus={k: v for k, v in fundus.items() if is_held_out(k)},
            non_fundus=load_non_fundus(NON_FUNDUS_HELD_OUT),
        ),
    )
