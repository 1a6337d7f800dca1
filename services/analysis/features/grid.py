"""The masks measured and the canonical grid they are measured on."""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
from PIL import Image

from services.analysis.features.skeleton import BoolArray

CANONICAL_SIZE = 912  # AutoMorph's grid


@dataclass(frozen=True)
class MaskSet:
    """Segmentation masks of one image, all of one (H, W) shape, in that image's pixels.

    `vessel` is required (it may be empty); a mask left as None was not segmented, and its
    features come out as None. `fovea` is (x, y) in pixels, when known. Masks are best cropped
    to the field of view's bounding square, as the pipeline does (AutoMorph's M0 crop).
    """

    vessel: BoolArray
    artery: BoolArray | None = None
    vein: BoolArray | None = None
    disc: BoolArray | None = None
    cup: BoolArray | None = None
    fovea: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        shape = np.shape(self.vessel)
        if len(shape) != 2 or 0 in shape:
            raise ValueError(f"masks must be non-empty 2-D arrays, got shape {shape}")
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "fovea" or value is None:
                continue
            if np.shape(value) != shape:
                raise ValueError(f"{f.name} mask has shape {np.shape(value)}, expected {shape}")
            object.__setattr__(self, f.name, np.asarray(value, dtype=bool))

    @property
    def shape(self) -> tuple[int, int]:
        return self.vessel.shape


@dataclass(frozen=True)
class CanonicalGrid:
    """Pads an (H, W) image to a centred square, then scales it to size x size.

    Pixel centres map as x_c = (x + pad_x + 0.5) * scale - 0.5 (and likewise y), so the
    grid's pixels are those of the original image, resampled; nothing is cropped.
    """

    size: int
    scale: float  # canonical px per original px
    pad_x: int
    pad_y: int
    side: int  # the padded square's side, original px

    @classmethod
    def for_shape(cls, shape: tuple[int, int], size: int = CANONICAL_SIZE) -> CanonicalGrid:
        height, width = shape
        side = max(height, width)
        return cls(size, size / side, (side - width) // 2, (side - height) // 2, side)

    def to_canonical(self, x: float, y: float) -> tuple[float, float]:
        return (
            (x + self.pad_x + 0.5) * self.scale - 0.5,
            (y + self.pad_y + 0.5) * self.scale - 0.5,
        )

    def resample(self, mask: BoolArray) -> BoolArray:
        """The mask on the grid: bilinear (area-averaging when shrinking), then > half."""
        height, width = mask.shape
        square = np.zeros((self.side, self.side), dtype=np.uint8)
        square[self.pad_y : self.pad_y + height, self.pad_x : self.pad_x + width] = mask
        if self.side == self.size:
            return square.astype(bool)
        image = Image.fromarray(square * np.uint8(255))
        resized = image.resize((self.size, self.size), Image.Resampling.BILINEAR)
        return np.asarray(resized) >= 128
