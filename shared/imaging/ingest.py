"""The one entry point every caller uses: bytes in, a validated, FOV-cropped RGB image out."""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass

import numpy as np

from shared.findings import Calibration, CalibrationSource, ImageInfo
from shared.imaging.dicom import decode_dicom
from shared.imaging.errors import ImageRejected, RejectCode
from shared.imaging.fov import FovEstimate, detect_field_of_view
from shared.imaging.limits import DEFAULT_LIMITS, IngestLimits
from shared.imaging.normalize import DecodedImage
from shared.imaging.raster import decode_raster
from shared.imaging.sniff import ImageFormat, sniff_format

logger = logging.getLogger(__name__)

MAX_REQUEST_PIXEL_SIZE_UM = 1000.0  # a fundus pixel is ~5-15 µm; 1 mm means a unit mistake


@dataclass(frozen=True, eq=False)
class IngestedImage:
    """The analysable image: `rgb` is uint8 H x W x 3, C-contiguous, cropped to the FOV.

    `info` describes the original upload (its size is before the crop; the crop box and FOV
    circle are in original pixels, after EXIF orientation).
    """

    rgb: np.ndarray
    info: ImageInfo


def ingest(
    data: bytes,
    *,
    limits: IngestLimits = DEFAULT_LIMITS,
    pixel_size_um: float | None = None,
) -> IngestedImage:
    """Sniff, validate, decode, orient, convert to 8-bit RGB and crop to the field of view.

    Raises ImageRejected (and nothing else for bad input) with a stable `code`.

    Decisions (see also raster.py, dicom.py, fov.py):
    - Animated PNG/WebP are refused ("animated"); multi-page TIFF and multi-frame DICOM are
      refused ("multi_frame"): a fundus photograph is one frame, and picking one silently
      could analyse the wrong eye or a thumbnail. GIF is refused ("unsupported_format"):
      palette-quantised to 256 colours, it is not a diagnostic photograph.
    - Calibration: an explicit `pixel_size_um` from the request wins over DICOM
      PixelSpacing (the caller may know the camera better than a PACS export does);
      otherwise DICOM PixelSpacing/ImagerPixelSpacing; otherwise none (lengths in pixels).
    - 16-bit samples are scaled by their nominal range (value * 255 / 65535, rounded);
      Pillow reads 16-bit RGB PNG/TIFF as their high byte. bit_depth reports the stored depth.
    - Alpha is composited on black (transparent = outside the field of view).
    """
    data = _check_bytes(data, limits)
    request_pixel_size = _check_pixel_size(pixel_size_um)
    fmt = sniff_format(data)
    decoded = _decode(data, fmt, limits)
    height, width = decoded.rgb.shape[:2]
    fov = detect_field_of_view(decoded.rgb)
    rgb = _crop(decoded.rgb, fov, limits)
    info = ImageInfo(
        content_sha256=hashlib.sha256(data).hexdigest(),
        format=fmt.value,
        width=width,
        height=height,
        bit_depth=decoded.bit_depth,
        source_mode=decoded.source_mode,
        calibration=_calibration(request_pixel_size, decoded),
        field_of_view=fov.to_model(),
        laterality=decoded.laterality,
        dicom_modality=decoded.dicom_modality,
    )
    logger.debug("ingested %s %dx%d, crop %s", fmt.value, width, height, fov.crop)
    return IngestedImage(rgb=rgb, info=info)


def _check_bytes(data: bytes, limits: IngestLimits) -> bytes:
    if isinstance(data, bytearray | memoryview):
        data = bytes(data)
    if not isinstance(data, bytes):
        raise TypeError(f"ingest() takes bytes, not {type(data).__name__}")
    if not data:
        raise ImageRejected(RejectCode.EMPTY, "the upload is empty (0 bytes)")
    if len(data) > limits.max_bytes:
        raise ImageRejected(
            RejectCode.TOO_LARGE_BYTES,
            f"the upload is {len(data):,} bytes; the limit is {limits.max_bytes:,}",
        )
    return data


def _check_pixel_size(pixel_size_um: float | None) -> float | None:
    if pixel_size_um is None:
        return None
    try:
        value = float(pixel_size_um)
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and 0 < value <= MAX_REQUEST_PIXEL_SIZE_UM):
        raise ImageRejected(
            RejectCode.INVALID_PIXEL_SIZE,
            f"pixel_size_um must be a number in (0, {MAX_REQUEST_PIXEL_SIZE_UM:g}] µm",
        )
    return value


def _decode(data: bytes, fmt: ImageFormat, limits: IngestLimits) -> DecodedImage:
    if fmt is ImageFormat.DICOM:
        return decode_dicom(data, limits)
    return decode_raster(data, fmt, limits)


def _crop(rgb: np.ndarray, fov: FovEstimate, limits: IngestLimits) -> np.ndarray:
    x0, y0, x1, y1 = fov.crop
    if min(x1 - x0, y1 - y0) < limits.min_side:
        raise ImageRejected(
            RejectCode.TOO_SMALL,
            f"the field of view is only {x1 - x0}x{y1 - y0} px; at least {limits.min_side} "
            "px per side is needed",
        )
    return np.ascontiguousarray(rgb[y0:y1, x0:x1])


def _calibration(request_pixel_size: float | None, decoded: DecodedImage) -> Calibration:
    if request_pixel_size is not None:
        return Calibration(source=CalibrationSource.REQUEST, pixel_size_um=request_pixel_size)
    if decoded.pixel_size_um is not None:
        return Calibration(source=CalibrationSource.DICOM, pixel_size_um=decoded.pixel_size_um)
    return Calibration()
