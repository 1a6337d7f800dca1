"""Dataset adapters for vessel and artery/vein training and evaluation.

Every adapter returns `Sample`s: paths plus how to read each label, so nothing is loaded until
needed. Label conventions (read_* functions):
- vessel: bool H x W;
- artery/vein: uint8 H x W, 0 background, 1 artery, 2 vein, 3 crossing/uncertain (RITE and
  LES-AV store exactly this; AVRDB's colours are mapped to it);
- FOV: bool H x W, from the dataset's masks where it has them, else by threshold (STARE, AVRDB).

Splits (fixed, stated here and recorded in the manifest):
- training: DRIVE training 21-40 (vessels + RITE A/V), STARE first 10 ids in sorted order
  (im0001-im0139), LES-AV training (11), AVRDB (5);
- reporting: DRIVE test 01-20, STARE last 10 ids (im0162-im0324), LES-AV test (11), RITE test
  (20, on the DRIVE test images).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

DEFAULT_ROOT = Path(__file__).resolve().parents[2].parent / "shared" / "datasets"
STARE_TRAIN_COUNT = 10
_STARE_FOV_LEVEL = 35  # red level between STARE's black border (< 20) and the retina (> 60)


@dataclass(frozen=True)
class Sample:
    dataset: str
    image_id: str
    image: Path
    vessel: Path | None = None  # binary vessel label
    av: Path | None = None  # A/V label map (RITE / LES-AV coding) or AVRDB colour labels
    av_colour: bool = False  # av is an AVRDB colour image
    fov: Path | None = None  # FOV mask; None: threshold the image


def drive(root: Path, split: str) -> list[Sample]:
    """DRIVE `training` or `test`, with RITE's A/V labels paired by file name."""
    folder = root / "DRIVE" / split
    suffix = "training" if split == "training" else "test"
    samples = []
    for image in sorted((folder / "images").glob("*.tif")):
        number = image.stem.split("_")[0]
        samples.append(
            Sample(
                dataset="DRIVE",
                image_id=number,
                image=image,
                vessel=folder / "1st_manual" / f"{number}_manual1.gif",
                av=root / "RITE" / split / "1st_manual" / f"{number}_{suffix}.png",
                fov=folder / "mask" / f"{number}_{suffix}_mask.gif",
            )
        )
    return samples


def drive_second_observer(root: Path, image_id: str) -> Path:
    return root / "DRIVE" / "test" / "2nd_manual" / f"{image_id}_manual2.gif"


def stare(root: Path, split: str) -> list[Sample]:
    """STARE with labels-ah; `training` = first 10 ids in sorted order, `test` = the rest."""
    images = sorted((root / "STARE" / "stare-images").glob("im*.png"))
    chosen = images[:STARE_TRAIN_COUNT] if split == "training" else images[STARE_TRAIN_COUNT:]
    return [
        Sample(
            dataset="STARE",
            image_id=image.stem,
            image=image,
            vessel=root / "STARE" / "labels-ah" / f"{image.stem}.ah.png",
        )
        for image in chosen
    ]


def les_av(root: Path, split: str) -> list[Sample]:
    folder = root / "LES-AV" / split
    return [
        Sample(
            dataset="LES-AV",
            image_id=image.stem,
            image=image,
            av=folder / "1st_manual" / image.name,
            fov=folder / "mask" / f"{image.stem}_mask.gif",
        )
        for image in sorted((folder / "images").glob("*.png"), key=lambda path: int(path.stem))
    ]


def avrdb(root: Path) -> list[Sample]:
    folder = root / "AVRDB"
    return [
        Sample(
            dataset="AVRDB",
            image_id=image.stem,
            image=image,
            av=folder / "av-labels" / f"{image.stem}--av.png",
            av_colour=True,
        )
        for image in sorted((folder / "images").glob("*.jpg"))
    ]


def training_samples(root: Path) -> list[Sample]:
    """DRIVE training (+RITE), STARE first 10, LES-AV training, AVRDB."""
    return [
        *drive(root, "training"),
        *stare(root, "training"),
        *les_av(root, "training"),
        *avrdb(root),
    ]


def read_rgb(sample: Sample) -> np.ndarray:
    with Image.open(sample.image) as image:
        return np.asarray(image.convert("RGB"))


def read_vessel(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        # Palette indices, not colours: DRIVE's 2nd_manual is a 0/1 palette image whose
        # index 0 is not black.
        values = np.asarray(image if image.mode in ("L", "P", "1") else image.convert("L"))
    return values > 0


def read_av(sample: Sample) -> np.ndarray | None:
    if sample.av is None:
        return None
    with Image.open(sample.av) as image:
        if not sample.av_colour:
            return np.asarray(image.convert("L")).astype(np.uint8)
        red, green, blue = (np.asarray(image.convert("RGB")) > 127).transpose(2, 0, 1)
    labels = np.zeros(red.shape, np.uint8)
    labels[red & ~blue] = 1
    labels[blue & ~red] = 2
    labels[green | (red & blue)] = 3
    return labels


def read_fov(sample: Sample, rgb: np.ndarray) -> np.ndarray:
    if sample.fov is not None:
        with Image.open(sample.fov) as image:
            return np.asarray(image.convert("L")) > 0
    return threshold_fov(rgb)


def threshold_fov(rgb: np.ndarray) -> np.ndarray:
    """Largest bright region of the smoothed red channel, holes filled, edge eroded 2 px."""
    red = ndimage.gaussian_filter(rgb[:, :, 0].astype(np.float32), 2.0)
    labels, count = ndimage.label(red > _STARE_FOV_LEVEL)
    if count == 0:
        return np.zeros(red.shape, bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    region = ndimage.binary_fill_holes(labels == int(sizes.argmax()))
    return ndimage.binary_erosion(region, iterations=2)
