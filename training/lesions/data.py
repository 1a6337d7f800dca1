"""IDRiD lesion data on the lesion network's working grid (services/lesion/engine/preprocess).

Two sources under ../shared/datasets:
- IDRiD-seg: IDRiD_01..20 at full size (4288 x 2848) with one colour mask each. Colours are
  additive where lesions overlap, so each type is read from the channel pattern rather than an
  exact colour: MA white (R, G, B), HE red (R, not G), EX blue (B, not R+G), SE green (G, not
  R). The optic disc (yellow: R+G, not B) is not a lesion and is dropped.
- IDRiD-seg-512: the same 54 training images cropped to their field of view's width and
  letterboxed into 512 x 512 squares, with per-lesion JPEG masks that hold the photograph's
  pixels inside the lesions (`load_lowres` reads them). Only IDRiD_21..54 are used (01..20 are
  the full-size images: using both would leak held-out images into training). They are
  enlarged back to the photographs' scale and put on the same grid; they are blurry there, and
  their MA masks mean nothing at 512 px, so MA is not trained on them (`ma_valid` False).
- Negatives: photographs from other cameras with no lesion labels (DRIVE training, LES-AV),
  trained as lesion-free so the network learns what normal anatomy looks like beyond IDRiD's
  camera. DRIVE says 7 of its 40 photographs show mild early DR without naming them, so a few
  of its tiles may hold an unlabelled lesion. Drishti-GS1 and DRIVE test stay out: the bench
  counts lesions found on them (an unseen camera, and unseen photographs of a seen one).
Targets on the grid are area fractions (0-255) of the full-size masks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from services.lesion.engine.preprocess import (
    INPUT_CHANNELS,
    WORK_FOV_DIAMETER,
    WorkGrid,
    resample,
    standardise,
)
from shared.imaging.fov import detect_field_of_view

DEFAULT_ROOT = Path(os.environ.get("RETINAL_DATASETS", "../shared/datasets"))
FULL_IDS = tuple(f"IDRiD_{i:02d}" for i in range(1, 21))
LOWRES_IDS = tuple(f"IDRiD_{i:02d}" for i in range(21, 55))
# IDRiD-seg-512 (load_lowres): the side its squares are restored to, and the level of a mask
# pixel's brightest channel above which it is a lesion. Against the full-size masks of
# IDRiD_01..20 (bench/lesion_masks_512.py) this gives Dice HE 0.91, EX 0.84, SE 0.94, where
# the grey level above 127, used before, gave HE 0.02, EX 0.52 and SE 0.44.
LOWRES_SIDE = 3412
LOWRES_MASK_LEVEL = 60
CACHE_VERSION = 2  # raised whenever a loader's output changes, so old caches are not read
LOWRES_SUFFIXES = ("MA", "HE", "EX", "SE")  # channel order of the network
FOLDS = 4
NEGATIVE_FOLDERS = ("DRIVE/training/images", "LES-AV/training/images", "LES-AV/test/images")
PHOTO_SUFFIXES = {".tif", ".png", ".jpg"}


def fold_ids(fold: int) -> tuple[str, ...]:
    """Held-out full-size images of a fold: IDRiD_{fold+1}, +4, +8, ... (5 per fold)."""
    return tuple(image for i, image in enumerate(FULL_IDS) if i % FOLDS == fold)


def decode_colour_mask(rgb: np.ndarray) -> np.ndarray:
    """H x W x 3 colour mask -> bool 4 x H x W (MA, HE, EX, SE); the optic disc is dropped."""
    r, g, b = (rgb[..., c] > 127 for c in range(3))
    white = r & g & b
    return np.stack([white, r & ~g, b & ~(r & g), g & ~r])


@dataclass(frozen=True)
class GridImage:
    """One training image on the working grid."""

    image_id: str
    inputs: np.ndarray  # float16 6 x h x w, the network input (preprocess.standardise)
    targets: np.ndarray  # uint8 4 x h x w, lesion area fraction x 255
    fov: np.ndarray  # bool h x w
    ma_valid: bool  # False: the MA channel carries no usable labels


def on_grid(
    rgb: np.ndarray, masks: np.ndarray, image_id: str, ma_valid: bool, grid_scale: float = 1.0
) -> GridImage:
    """The image and masks on the working grid, or on one `grid_scale` times as fine."""
    grid = WorkGrid.around(detect_field_of_view(rgb), rgb.shape[1], rgb.shape[0])
    grid = grid.rescaled(grid_scale)
    fov = grid.fov_mask()
    inputs = standardise(resample(rgb, grid), fov, grid.fov_radius).astype(np.float16)
    targets = np.stack([resample(m.astype(np.uint8) * 255, grid) for m in masks])
    return GridImage(image_id, inputs, targets * fov, fov, ma_valid)


def load_full(image_id: str, root: Path = DEFAULT_ROOT) -> tuple[np.ndarray, np.ndarray]:
    """Full-size RGB and bool 4 x H x W masks of one IDRiD-seg image."""
    folder = root / "IDRiD-seg"
    rgb = np.asarray(Image.open(folder / "images" / f"{image_id}.jpg").convert("RGB"))
    colours = np.asarray(Image.open(folder / "masks" / f"{image_id}.png").convert("RGB"))
    return rgb, decode_colour_mask(colours)


def brightest_channel(path: Path) -> np.ndarray:
    """uint8 H x W: each pixel's brightest colour channel in an IDRiD-seg-512 mask file."""
    return np.asarray(Image.open(path).convert("RGB")).max(axis=2)


def load_lowres(image_id: str, root: Path = DEFAULT_ROOT) -> tuple[np.ndarray, np.ndarray]:
    """An IDRiD-seg-512 image and its masks, at the full-size photographs' scale.

    Each 512-px square is the photograph cropped to its FOV's width (about 3,410 of 4,288 px,
    as IDRiD_03 and 17 show) and letterboxed with black bars, so a uniform resize to
    LOWRES_SIDE restores its scale and shape. Its "masks" are the photograph's own pixels
    inside the lesions and black elsewhere, so a lesion pixel is one whose brightest channel
    exceeds LOWRES_MASK_LEVEL: a dark haemorrhage is dim in grey, and a grey threshold at 128
    missed most of them.
    """
    folder = root / "IDRiD-seg-512" / "images" / "jpg"
    size = (LOWRES_SIDE, LOWRES_SIDE)
    image = Image.open(folder / f"{image_id}.jpg").convert("RGB")
    rgb = np.asarray(image.resize(size, Image.Resampling.BICUBIC))
    planes = []
    for suffix in LOWRES_SUFFIXES:
        path = folder / f"{image_id}_{suffix}.jpg"
        if path.is_file():
            brightest = Image.fromarray(brightest_channel(path))
            mask = brightest.resize(size, Image.Resampling.BILINEAR)
            planes.append(np.asarray(mask) > LOWRES_MASK_LEVEL)
        else:  # no lesion of that type in the image
            planes.append(np.zeros(size, dtype=bool))
    return rgb, np.stack(planes)


def negative_ids(root: Path = DEFAULT_ROOT) -> list[str]:
    """The negatives' paths relative to `root`; empty where those datasets are absent."""
    return [
        str(path.relative_to(root))
        for folder in NEGATIVE_FOLDERS
        if (root / folder).is_dir()
        for path in sorted((root / folder).iterdir())
        if path.suffix.lower() in PHOTO_SUFFIXES
    ]


def load_negative(image_id: str, root: Path = DEFAULT_ROOT) -> tuple[np.ndarray, np.ndarray]:
    """A photograph without lesions and its all-false masks."""
    rgb = np.asarray(Image.open(root / image_id).convert("RGB"))
    return rgb, np.zeros((len(LOWRES_SUFFIXES), *rgb.shape[:2]), dtype=bool)


LOADERS = {"full": load_full, "lowres": load_lowres, "negative": load_negative}


def cached(image_id: str, kind: str, root: Path, cache: Path, grid_scale: float = 1.0) -> GridImage:
    """The grid image of one `LOADERS` kind (on_grid), from `cache` when it was prepared
    before (decoding is the slow part)."""
    name = image_id.replace("/", "_")
    diameter = f"{WORK_FOV_DIAMETER}" if grid_scale == 1.0 else f"{WORK_FOV_DIAMETER}x{grid_scale}"
    path = cache / f"{kind}-v{CACHE_VERSION}-{diameter}-{INPUT_CHANNELS}ch-{name}.npz"
    if path.is_file():
        with np.load(path) as data:
            return GridImage(
                image_id, data["inputs"], data["targets"], data["fov"], bool(data["ma_valid"])
            )
    rgb, masks = LOADERS[kind](image_id, root)
    image = on_grid(rgb, masks, image_id, ma_valid=kind != "lowres", grid_scale=grid_scale)
    cache.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.npz")  # runs in parallel share the cache
    np.savez(
        partial,
        inputs=image.inputs,
        targets=image.targets,
        fov=image.fov,
        ma_valid=image.ma_valid,
    )
    partial.replace(path)
    return image
