"""Optic disc and cup segmentation (inference), in two stages.

1. Locate: a small U-Net sees the whole FOV-cropped photograph, padded to a square and shrunk
   to `LOCATOR_SIDE` px, and predicts a disc mask; its strongest blob gives the disc centre,
   an approximate diameter and the confidence. Working on the whole image at low resolution
   keeps this stage cheap and independent of the camera's resolution.
2. Segment: a square of `CROP_DD` disc diameters around that centre, cut from the full-resolution
   image and resized to `SEGMENTER_SIDE` px, goes through a second U-Net with two sigmoid
   outputs (disc, cup). Scaling the crop by the located diameter makes the disc the same size
   in pixels for every camera. The logits are resized back to the crop's original pixels and
   pasted into input-size masks; the cup is kept inside the disc.

Both networks are `VesselUNet` (nets.py) with other widths and outputs. Weights load with a
verified sha256 (model_files.py). When the locator's strongest blob is weaker than
`MIN_LOCATOR_PEAK`, the result says that no disc was found rather than guessing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

from services.analysis.engine.model_files import ModelFiles, load_verified
from services.analysis.engine.nets import VesselUNet
from services.analysis.engine.runtime import cpu_has_bf16

WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"
LOCATOR_WEIGHTS = WEIGHTS_DIR / "disc_locator.safetensors"
SEGMENTER_WEIGHTS = WEIGHTS_DIR / "disc_cup.safetensors"
LOCATOR_TASK = "optic-disc-localisation"
SEGMENTER_TASK = "optic-disc-cup-segmentation"

LOCATOR_SIDE = 256
LOCATOR_WIDTHS = (8, 16, 32, 64, 128)
SEGMENTER_SIDE = 192
SEGMENTER_WIDTHS = (16, 32, 64, 128, 256)
CROP_DD = 2.5  # segmenter crop side in disc diameters: room for a locator error of ~0.5 DD
DISC, CUP = 0, 1  # segmenter output channels
MIN_LOCATOR_PEAK = 0.5
# A disc narrower than 3 % or wider than 45 % of the image side is not a disc.
MIN_DD_FRACTION, MAX_DD_FRACTION = 0.03, 0.45
_VALID_LEVEL = 0.02  # pixels darker than this (sum of RGB in 0-1) are padding or outside the FOV


@dataclass(frozen=True)
class SquareGrid:
    """A photograph padded (centred) to a square, then scaled by `scale` to `side` px."""

    offset_x: int
    offset_y: int
    scale: float
    side: int

    def to_input(self, x: float, y: float) -> tuple[float, float]:
        """Grid coordinates (pixel centres at +0.5) -> input image coordinates."""
        return x / self.scale - self.offset_x, y / self.scale - self.offset_y


def square_image(rgb: np.ndarray, side: int) -> tuple[np.ndarray, SquareGrid]:
    """uint8 H x W (x C) -> uint8 side x side (x C), antialiased shrink, zero padding."""
    height, width = rgb.shape[:2]
    box = max(height, width)
    offset_x, offset_y = (box - width) // 2, (box - height) // 2
    image = Image.fromarray(rgb).crop((-offset_x, -offset_y, box - offset_x, box - offset_y))
    return np.asarray(image.resize((side, side), Image.BILINEAR)), SquareGrid(
        offset_x, offset_y, side / box, side
    )


def crop_box(center: tuple[float, float], side: float) -> tuple[int, int, int, int]:
    """Integer (x0, y0, x1, y1) of a square of `side` px centred on `center` (may overhang)."""
    size = max(8, round(side))
    x0 = round(center[0] - size / 2)
    y0 = round(center[1] - size / 2)
    return x0, y0, x0 + size, y0 + size


def crop_resized(rgb: np.ndarray, box: tuple[int, int, int, int], side: int) -> np.ndarray:
    """The box (zero-padded where it overhangs) resized to side x side, antialiased."""
    return np.asarray(Image.fromarray(rgb).crop(box).resize((side, side), Image.BILINEAR))


def standardize(images: torch.Tensor) -> torch.Tensor:
    """B x 3 x H x W in 0-1 -> per-image, per-channel z-scores over the non-black pixels.

    This removes most camera differences in exposure and white balance; padding stays at 0.
    """
    valid = (images.sum(dim=1, keepdim=True) > _VALID_LEVEL).float()
    count = valid.sum(dim=(2, 3), keepdim=True).clamp_min(1.0)
    mean = (images * valid).sum(dim=(2, 3), keepdim=True) / count
    var = (((images - mean) * valid) ** 2).sum(dim=(2, 3), keepdim=True) / count
    return (images - mean) / var.sqrt().clamp_min(1e-3) * valid


def to_batch(images: np.ndarray) -> torch.Tensor:
    """uint8 (B x) H x W x 3 -> standardized float B x 3 x H x W."""
    tensor = torch.from_numpy(np.array(images)).float().div_(255.0)
    if tensor.ndim == 3:
        tensor = tensor[None]
    return standardize(tensor.permute(0, 3, 1, 2).contiguous())


def locator_net() -> VesselUNet:
    return VesselUNet(in_channels=3, widths=LOCATOR_WIDTHS, classes=1)


def segmenter_net() -> VesselUNet:
    return VesselUNet(in_channels=3, widths=SEGMENTER_WIDTHS, classes=2)


@dataclass(frozen=True)
class DiscLocation:
    """The locator's answer, in input image pixels."""

    center: tuple[float, float]  # x, y
    diameter: float
    confidence: float  # peak disc probability of the chosen blob


def blob_location(prob: np.ndarray, grid: SquareGrid) -> DiscLocation | None:
    """Strongest connected blob above 0.5 -> centre (probability-weighted) and diameter.

    The diameter is that of a circle of the blob's area: less sensitive to a ragged edge than
    the bounding box. None when no blob reaches MIN_LOCATOR_PEAK or its size is implausible.
    """
    labels, count = ndimage.label(prob > 0.5)
    if count == 0:
        return None
    index = np.arange(1, count + 1)
    peaks = np.asarray(ndimage.maximum(prob, labels, index))
    masses = np.asarray(ndimage.sum(prob, labels, index))
    best = int(np.argmax(masses)) + 1
    peak = float(peaks[best - 1])
    if peak < MIN_LOCATOR_PEAK:
        return None
    weights = np.where(labels == best, prob, 0.0)
    rows, cols = np.nonzero(weights)
    total = weights[rows, cols].sum()
    cy = float((rows * weights[rows, cols]).sum() / total) + 0.5
    cx = float((cols * weights[rows, cols]).sum() / total) + 0.5
    diameter_grid = 2.0 * np.sqrt((labels == best).sum() / np.pi)
    if not MIN_DD_FRACTION <= diameter_grid / grid.side <= MAX_DD_FRACTION:
        return None
    return DiscLocation(grid.to_input(cx, cy), diameter_grid / grid.scale, peak)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component, holes filled (a disc or cup is one solid region)."""
    labels, count = ndimage.label(mask, structure=np.ones((3, 3), bool))
    if count <= 1:
        return ndimage.binary_fill_holes(mask)
    sizes = np.bincount(labels.ravel())[1:]
    return ndimage.binary_fill_holes(labels == int(np.argmax(sizes)) + 1)


def paste_masks(
    logits: torch.Tensor, box: tuple[int, int, int, int], height: int, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """2 x s x s segmenter logits -> disc and cup bool masks of the input size."""
    x0, y0, x1, y1 = box
    side = x1 - x0
    full = torch.nn.functional.interpolate(
        logits[None].float(), size=(side, side), mode="bilinear", align_corners=False
    )[0]
    inside = (full > 0).numpy()
    disc_crop = largest_component(inside[DISC])
    cup_crop = largest_component(inside[CUP] & disc_crop) & disc_crop
    disc = np.zeros((height, width), bool)
    cup = np.zeros((height, width), bool)
    ix0, iy0, ix1, iy1 = max(0, x0), max(0, y0), min(width, x1), min(height, y1)
    if ix1 > ix0 and iy1 > iy0:
        rows = slice(iy0 - y0, iy1 - y0)
        cols = slice(ix0 - x0, ix1 - x0)
        disc[iy0:iy1, ix0:ix1] = disc_crop[rows, cols]
        cup[iy0:iy1, ix0:ix1] = cup_crop[rows, cols]
    return disc, cup


def vertical_extent(mask: np.ndarray) -> int:
    """Number of rows between the mask's top and bottom pixel (inclusive); 0 when empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    return int(rows[-1] - rows[0] + 1) if rows.size else 0


@dataclass(frozen=True)
class DiscResult:
    """Disc and cup on the input image's pixel grid."""

    found: bool
    reason: str  # why not found, or "ok"
    disc: np.ndarray  # bool H x W
    cup: np.ndarray  # bool H x W, inside disc
    center: tuple[float, float] | None  # x, y of the segmented disc's bounding-box centre
    confidence: float

    @property
    def vertical_cdr(self) -> float | None:
        disc_height = vertical_extent(self.disc)
        return vertical_extent(self.cup) / disc_height if disc_height else None


def _not_found(height: int, width: int, reason: str, confidence: float) -> DiscResult:
    empty = np.zeros((height, width), bool)
    return DiscResult(False, reason, empty, empty.copy(), None, confidence)


def _bbox_center(mask: np.ndarray) -> tuple[float, float]:
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return (cols[0] + cols[-1] + 1) / 2.0, (rows[0] + rows[-1] + 1) / 2.0


class DiscSegmenter:
    """The loaded locator and disc/cup networks, ready to run on FOV-cropped photographs."""

    def __init__(
        self,
        locator_weights: Path = LOCATOR_WEIGHTS,
        segmenter_weights: Path = SEGMENTER_WEIGHTS,
        bf16: bool | None = None,
    ) -> None:
        self.locator_files = load_verified(locator_weights)
        self.segmenter_files = load_verified(segmenter_weights)
        self.locator = _build(locator_net(), self.locator_files, LOCATOR_TASK)
        self.segmenter = _build(segmenter_net(), self.segmenter_files, SEGMENTER_TASK)
        self.bf16 = cpu_has_bf16() if bf16 is None else bf16
        self.segmenter_side = int(
            self.segmenter_files.manifest["architecture"].get("input_side", SEGMENTER_SIDE)
        )

    @classmethod
    def from_nets(
        cls, locator: VesselUNet, segmenter: VesselUNet, bf16: bool, segmenter_side: int
    ) -> DiscSegmenter:
        """Wrap networks in memory (training-time evaluation), skipping the weight files."""
        self = cls.__new__(cls)
        self.locator, self.segmenter, self.bf16 = locator.eval(), segmenter.eval(), bf16
        self.segmenter_side = segmenter_side
        return self

    def _run(self, net: VesselUNet, batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=self.bf16):
            return net(batch.contiguous(memory_format=torch.channels_last)).float()

    def locate(self, rgb: np.ndarray) -> DiscLocation | None:
        small, grid = square_image(rgb, LOCATOR_SIDE)
        prob = torch.sigmoid(self._run(self.locator, to_batch(small)))[0, 0].numpy()
        return blob_location(prob, grid)

    def analyse(self, rgb: np.ndarray) -> DiscResult:
        """Disc and cup of an FOV-cropped uint8 RGB image (as `shared.imaging.ingest` gives)."""
        height, width = rgb.shape[:2]
        location = self.locate(rgb)
        if location is None:
            return _not_found(height, width, "no disc found: the locator is not confident", 0.0)
        box = crop_box(location.center, CROP_DD * location.diameter)
        crop = crop_resized(rgb, box, self.segmenter_side)
        logits = self._run(self.segmenter, to_batch(crop))[0]
        disc, cup = paste_masks(logits, box, height, width)
        if not disc.any():
            return _not_found(
                height, width, "no disc found: the segmenter found none", location.confidence
            )
        return DiscResult(True, "ok", disc, cup, _bbox_center(disc), location.confidence)


def _build(net: VesselUNet, files: ModelFiles, task: str) -> VesselUNet:
    if files.manifest["task"] != task:
        raise ValueError(f"{files.label} is a {files.manifest['task']} model, not {task}")
    net.load_state_dict({key: value.float() for key, value in files.state.items()})
    return net.eval().to(memory_format=torch.channels_last)
