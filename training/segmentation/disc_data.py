"""Optic disc / cup data: Drishti-GS1 (disc + cup, 4 experts) and IDRiD-seg (disc only).

Everything is read from ../shared/datasets and reduced once to a cache under var/ (never
committed): per image a locator sample (the FOV-cropped photograph as the service receives it,
squared and shrunk to LOCATOR_SIDE, with its disc mask) and, for Drishti, a segmenter canvas
(CANVAS_DD disc diameters around the true disc, CANVAS_SIDE px, with the soft maps). Training
then only resamples these small arrays, which is what makes thousands of steps affordable on
a CPU. Augmentation is batched affine resampling plus photometric jitter, in torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F

from services.analysis.engine.disc import (
    CROP_DD,
    LOCATOR_SIDE,
    crop_box,
    square_image,
)
from shared.imaging.ingest import ingest

DRISHTI = Path("Drishti-GS1/Training")
IDRID = Path("IDRiD-seg")
CANVAS_DD = 5.0  # canvas side in disc diameters: room for scale, shift and rotation jitter
CANVAS_SIDE = 480
MAJORITY = 128  # soft-map level of 2 of 4 experts
FOLDS = 5
FOLD_SEED = 2026


@dataclass(frozen=True)
class DrishtiCase:
    """One Drishti-GS1 training image and its ground truth (original pixel grid)."""

    image_id: str
    image_path: Path
    disc_soft: np.ndarray  # uint8 H x W, 0/64/128/191/255
    cup_soft: np.ndarray
    expert_cdr: float  # mean of the experts' vertical CDRs


def drishti_ids(datasets: Path) -> list[str]:
    return sorted(path.stem for path in (datasets / DRISHTI / "Images").glob("*.jpg"))


def read_drishti(datasets: Path, image_id: str) -> DrishtiCase:
    gt = datasets / DRISHTI / "GT" / image_id
    soft = gt / "SoftMap"
    values = (gt / f"{image_id}_cdrValues.txt").read_text().split()
    return DrishtiCase(
        image_id=image_id,
        image_path=datasets / DRISHTI / "Images" / f"{image_id}.jpg",
        disc_soft=np.asarray(Image.open(soft / f"{image_id}_ODsegSoftmap.png").convert("L")),
        cup_soft=np.asarray(Image.open(soft / f"{image_id}_cupsegSoftmap.png").convert("L")),
        expert_cdr=float(np.mean([float(value) for value in values])),
    )


def folds(ids: list[str], count: int = FOLDS, seed: int = FOLD_SEED) -> list[list[str]]:
    """A fixed, seeded partition of the ids into `count` folds (each sorted)."""
    order = np.random.default_rng(seed).permutation(len(ids))
    return [sorted(ids[i] for i in order[k::count]) for k in range(count)]


def idrid_disc(datasets: Path, number: int) -> tuple[Path, np.ndarray]:
    """IDRiD image path and its optic disc mask (yellow: red and green high, blue low)."""
    name = f"IDRiD_{number:02d}"
    mask = np.asarray(Image.open(datasets / IDRID / "masks" / f"{name}.png").convert("RGB"))
    disc = (mask[..., 0] > 127) & (mask[..., 1] > 127) & (mask[..., 2] < 128)
    return datasets / IDRID / "images" / f"{name}.jpg", disc


def disc_geometry(disc: np.ndarray) -> tuple[tuple[float, float], float]:
    """Bounding-box centre (x, y) and diameter (larger side) of a disc mask."""
    rows = np.flatnonzero(disc.any(axis=1))
    cols = np.flatnonzero(disc.any(axis=0))
    center = ((cols[0] + cols[-1] + 1) / 2.0, (rows[0] + rows[-1] + 1) / 2.0)
    return center, float(max(rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1))


def locator_sample(image_path: Path, disc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The ingested (FOV-cropped) photograph and its disc mask, squared to LOCATOR_SIDE."""
    ingested = ingest(image_path.read_bytes())
    fov = ingested.info.field_of_view
    x0, y0, x1, y1 = fov.crop_x0, fov.crop_y0, fov.crop_x1, fov.crop_y1
    image, _ = square_image(ingested.rgb, LOCATOR_SIDE)
    mask, _ = square_image(disc[y0:y1, x0:x1].astype(np.uint8) * 255, LOCATOR_SIDE)
    return image, mask


def segmenter_canvas(case: DrishtiCase) -> tuple[np.ndarray, np.ndarray]:
    """CANVAS_DD disc diameters around the true disc: RGB and the 2 soft maps, CANVAS_SIDE px."""
    center, diameter = disc_geometry(case.disc_soft >= MAJORITY)
    box = crop_box(center, CANVAS_DD * diameter)
    size = (CANVAS_SIDE, CANVAS_SIDE)
    rgb = Image.open(case.image_path).convert("RGB").crop(box).resize(size, Image.BILINEAR)
    maps = [
        Image.fromarray(m).crop(box).resize(size, Image.BILINEAR)
        for m in (case.disc_soft, case.cup_soft)
    ]
    return np.asarray(rgb), np.stack([np.asarray(m) for m in maps])


def build_cache(datasets: Path, path: Path) -> None:
    """Decode every image once and save the small training arrays (a few tens of MB)."""
    ids = drishti_ids(datasets)
    loc_images, loc_masks, canvases, soft_maps, cdrs = [], [], [], [], []
    for image_id in ids:
        case = read_drishti(datasets, image_id)
        image, mask = locator_sample(case.image_path, case.disc_soft >= MAJORITY)
        canvas, maps = segmenter_canvas(case)
        loc_images.append(image)
        loc_masks.append(mask)
        canvases.append(canvas)
        soft_maps.append(maps)
        cdrs.append(case.expert_cdr)
    idrid_images, idrid_masks = [], []
    for number in range(1, 21):
        image_path, disc = idrid_disc(datasets, number)
        image, mask = locator_sample(image_path, disc)
        idrid_images.append(image)
        idrid_masks.append(mask)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(
        path,
        drishti_ids=np.array(ids),
        drishti_loc_images=np.stack(loc_images),
        drishti_loc_masks=np.stack(loc_masks),
        canvases=np.stack(canvases),
        soft_maps=np.stack(soft_maps),
        expert_cdr=np.array(cdrs),
        idrid_loc_images=np.stack(idrid_images),
        idrid_loc_masks=np.stack(idrid_masks),
    )


def _rotation_scale(
    batch: int, generator: torch.Generator, zoom: tuple[float, float], degrees: float
) -> torch.Tensor:
    """B x 2 x 2 random rotation * log-uniform scale * random horizontal flip."""
    log_lo, log_hi = math.log(zoom[0]), math.log(zoom[1])
    scale = torch.exp(torch.rand(batch, generator=generator) * (log_hi - log_lo) + log_lo)
    angle = (torch.rand(batch, generator=generator) * 2 - 1) * math.radians(degrees)
    flip = torch.where(torch.rand(batch, generator=generator) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    return torch.stack([torch.stack([cos * flip, -sin], 1), torch.stack([sin * flip, cos], 1)], 1)


def warp(
    images: torch.Tensor, targets: torch.Tensor, theta: torch.Tensor, side: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Resample images (B x 3) and targets (B x T) through affine grids to side x side."""
    grid = F.affine_grid(theta, [theta.shape[0], 1, side, side], align_corners=False)
    stacked = torch.cat([images, targets], dim=1)
    out = F.grid_sample(stacked, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out[:, :3], out[:, 3:]


def photometric(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Gamma, per-channel gain and a little noise: other cameras, exposures and compressions."""
    batch = images.shape[0]
    gamma = torch.exp((torch.rand(batch, 1, 1, 1, generator=generator) * 2 - 1) * 0.4)
    gain = 1 + (torch.rand(batch, 3, 1, 1, generator=generator) * 2 - 1) * 0.15
    noise = torch.randn(images.shape, generator=generator) * 0.01
    valid = images.sum(dim=1, keepdim=True) > 0.02
    return ((images.clamp_min(0) ** gamma) * gain + noise).clamp(0, 1) * valid


def locator_batch(
    images: torch.Tensor, masks: torch.Tensor, batch: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random whole-image views: zoom 0.6-1.4, rotation +-30 deg, shift +-25 %, flips.

    The wide zoom and shift put discs at the image border and at STARE/DRIVE-like sizes
    (~10 % of the image), which Drishti (large, central discs) never shows."""
    pick = torch.randint(len(images), (batch,), generator=generator)
    theta = torch.zeros(batch, 2, 3)
    theta[:, :, :2] = _rotation_scale(batch, generator, (1 / 1.4, 1 / 0.6), 30.0)
    theta[:, :, 2] = (torch.rand(batch, 2, generator=generator) * 2 - 1) * 0.5
    image, target = warp(images[pick], masks[pick], theta, LOCATOR_SIDE)
    return photometric(image, generator), target


def segmenter_batch(
    canvases: torch.Tensor, maps: torch.Tensor, batch: int, side: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random crops as the locator would give them: side CROP_DD * DD * (0.75-1.33), the
    centre off by up to 0.35 DD (the locator's error), rotation +-15 deg, horizontal flips."""
    pick = torch.randint(len(canvases), (batch,), generator=generator)
    theta = torch.zeros(batch, 2, 3)
    theta[:, :, :2] = _rotation_scale(batch, generator, (0.75, 1.33), 15.0) * (CROP_DD / CANVAS_DD)
    shift = (torch.rand(batch, 2, generator=generator) * 2 - 1) * 0.35
    theta[:, :, 2] = shift * (2.0 / CANVAS_DD)
    image, target = warp(canvases[pick], maps[pick], theta, side)
    return photometric(image, generator), target
