"""What a decoder hands to the pipeline, and the pixel conversions decoders share."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shared.findings import Laterality


@dataclass(frozen=True, eq=False)
class DecodedImage:
    """Full-frame 8-bit RGB plus what the container said about it."""

    rgb: np.ndarray  # uint8, H x W x 3, C-contiguous, EXIF orientation applied
    bit_depth: int  # per channel, as stored
    source_mode: str  # PIL mode or DICOM PhotometricInterpretation
    dicom_modality: str = ""
    pixel_size_um: float | None = None  # from DICOM (Imager)PixelSpacing
    laterality: Laterality | None = None


def scale_to_uint8(values: np.ndarray, max_value: float) -> np.ndarray:
    """Map 0..max_value linearly onto 0..255, rounding (65535 -> 255, 257*k -> k exactly).

    Scaling by the nominal range (not the data's min/max) keeps brightness comparable between
    images; values outside the range are clipped.
    """
    if values.dtype == np.uint8 and max_value == 255:
        return values
    scaled = values.astype(np.float32)
    scaled *= np.float32(255.0 / max_value)
    scaled += np.float32(0.5)
    np.clip(scaled, 0, 255, out=scaled)
    return scaled.astype(np.uint8)


def gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.repeat(gray[:, :, np.newaxis], 3, axis=2))


def composite_on_black(color: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Premultiply by alpha: transparent pixels become black background, like the FOV border."""
    weighted = color.astype(np.uint16) * alpha[:, :, np.newaxis].astype(np.uint16)
    return ((weighted + 127) // 255).astype(np.uint8)
