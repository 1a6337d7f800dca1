"""DICOM ophthalmic photographs (and secondary captures of them) through pydicom.

Decisions:
- Accepted: Modality OP (Ophthalmic Photography 8/16 bit), SC and OT (secondary capture: older
  fundus cameras and PACS exports), XC (external-camera photography). A data set without
  Modality is accepted when its SOP class is one of those photographic classes. Everything
  else (CT, MR, OPT/OCT, ...) is refused with "dicom_wrong_modality".
- Multi-frame objects (stereo pairs, sequences) are refused with "multi_frame": one request
  is one image, so the caller chooses the frame rather than us guessing.
- Compressed transfer syntaxes are decoded when pydicom has a decoder for them (JPEG baseline
  and JPEG 2000 through Pillow, RLE natively); others (JPEG-LS, JPEG lossless, HTJ2K without
  pylibjpeg/GDCM, private syntaxes) are refused with "dicom_unsupported_transfer_syntax".
- Greyscale: Rescale and Window Center/Width are applied when present (pydicom's modality LUT
  and windowing), then the nominal value range is mapped to 0..255; MONOCHROME1 is inverted.
- Calibration: PixelSpacing, else ImagerPixelSpacing, row spacing (mm) x 1000 -> µm/pixel.

Patient attributes are never read, logged or echoed: only image-description tags are touched.
"""

from __future__ import annotations

import io
import logging
import math

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import read_dataset
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_windowing, get_decoder
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from shared.findings import Laterality
from shared.imaging.errors import ImageRejected, RejectCode
from shared.imaging.limits import IngestLimits, check_dimensions
from shared.imaging.normalize import DecodedImage, gray_to_rgb, scale_to_uint8

logger = logging.getLogger(__name__)

ACCEPTED_MODALITIES = frozenset({"OP", "SC", "OT", "XC"})
PHOTOGRAPHIC_SOP_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.77.1.5.1",  # Ophthalmic Photography 8 Bit Image
        "1.2.840.10008.5.1.4.1.1.77.1.5.2",  # Ophthalmic Photography 16 Bit Image
        "1.2.840.10008.5.1.4.1.1.77.1.4",  # VL Photographic Image
        "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image
        "1.2.840.10008.5.1.4.1.1.7.2",  # Multi-frame Grayscale Byte SC Image
        "1.2.840.10008.5.1.4.1.1.7.3",  # Multi-frame Grayscale Word SC Image
        "1.2.840.10008.5.1.4.1.1.7.4",  # Multi-frame True Color SC Image
    }
)
_COLOR_INTERPRETATIONS = frozenset({"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT"})
_MONOCHROME = frozenset({"MONOCHROME1", "MONOCHROME2"})
_LATERALITY = {"L": Laterality.LEFT, "R": Laterality.RIGHT}
_PREAMBLE_END = 132  # 128-byte preamble + "DICM"


def decode_dicom(data: bytes, limits: IngestLimits) -> DecodedImage:
    """Decode a single-frame photographic DICOM into 8-bit RGB plus its calibration."""
    has_preamble = data[128:_PREAMBLE_END] == b"DICM"
    if has_preamble:
        _refuse_unparseable_transfer_syntax(data)
    ds = _read(data, has_preamble)
    try:
        return _decode_dataset(ds, limits)
    except (ImageRejected, MemoryError):
        raise
    except Exception as exc:  # an element pydicom parsed but cannot convert, for instance
        logger.debug("DICOM header interpretation failed: %s", type(exc).__name__)
        raise ImageRejected(
            RejectCode.CORRUPT, f"the DICOM header cannot be interpreted ({type(exc).__name__})"
        ) from None


def _decode_dataset(ds: Dataset, limits: IngestLimits) -> DecodedImage:
    _check_is_image_object(ds)
    modality = _check_modality(ds)
    _check_has_pixels(ds)
    rows, columns, frames, samples = _geometry(ds)
    if frames > 1:
        raise ImageRejected(
            RejectCode.MULTI_FRAME,
            f"the DICOM object has {frames} frames; send each frame as its own image",
        )
    check_dimensions(columns, rows, limits)
    syntax = _transfer_syntax(ds)
    _check_decoder(syntax)
    _check_native_length(ds, syntax, rows * columns * samples)
    rgb, bit_depth, source_mode = _to_rgb(_pixel_array(ds), ds)
    return DecodedImage(
        rgb=rgb,
        bit_depth=bit_depth,
        source_mode=source_mode,
        dicom_modality=modality,
        pixel_size_um=_pixel_size_um(ds),
        laterality=_laterality(ds),
    )


def _refuse_unparseable_transfer_syntax(data: bytes) -> None:
    """A private/unknown syntax leaves the body unreadable: say so instead of "corrupt"."""
    try:
        meta = read_dataset(
            io.BytesIO(data[_PREAMBLE_END:]),
            is_implicit_VR=False,  # file meta is always explicit VR little endian
            is_little_endian=True,
            stop_when=lambda tag, _vr, _length: tag.group != 2,
        )
        syntax = meta.get("TransferSyntaxUID")
    except Exception:
        return  # dcmread will classify the damage
    if syntax and not UID(str(syntax)).is_transfer_syntax:
        raise ImageRejected(
            RejectCode.DICOM_UNSUPPORTED_TRANSFER_SYNTAX,
            f"transfer syntax {_safe(str(syntax), 64)} is not a known DICOM transfer syntax",
        )


def _read(data: bytes, has_preamble: bool) -> Dataset:
    # force=True only for preamble-less data that sniffing already found to start like DICOM.
    try:
        return pydicom.dcmread(io.BytesIO(data), force=not has_preamble)
    except EOFError:
        raise ImageRejected(
            RejectCode.TRUNCATED, "the DICOM file ends inside a data element"
        ) from None
    except Exception as exc:
        # pydicom's messages may quote element values: log and report the exception type only.
        logger.debug("DICOM parsing failed: %s", type(exc).__name__)
        raise ImageRejected(
            RejectCode.CORRUPT, f"the DICOM data set cannot be parsed ({type(exc).__name__})"
        ) from None


def _check_is_image_object(ds: Dataset) -> None:
    """pydicom parses arbitrary bytes into some data set; a real object names its class."""
    if "SOPClassUID" not in ds and "Modality" not in ds:
        raise ImageRejected(
            RejectCode.CORRUPT,
            "the DICOM data set has neither SOP Class UID nor Modality: not a DICOM object",
        )


def _check_modality(ds: Dataset) -> str:
    modality = _safe(str(ds.get("Modality", "") or ""), 16).strip().upper()
    if modality in ACCEPTED_MODALITIES:
        return modality
    sop_class = str(ds.get("SOPClassUID", "") or "")
    if not modality and sop_class in PHOTOGRAPHIC_SOP_CLASSES:
        return ""
    shown = modality or "(none)"
    raise ImageRejected(
        RejectCode.DICOM_WRONG_MODALITY,
        f"modality {shown} is not a fundus photograph; accepted modalities: "
        f"{', '.join(sorted(ACCEPTED_MODALITIES))}",
    )


def _check_has_pixels(ds: Dataset) -> None:
    if "PixelData" not in ds or not ds.PixelData:
        raise ImageRejected(
            RejectCode.DICOM_NO_PIXELS, "the DICOM object has no Pixel Data (7FE0,0010) element"
        )


def _geometry(ds: Dataset) -> tuple[int, int, int, int]:
    """Rows, Columns, NumberOfFrames, SamplesPerPixel from the header (no pixels decoded)."""
    try:
        rows = int(ds.Rows)
        columns = int(ds.Columns)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
    except (AttributeError, TypeError, ValueError):
        raise ImageRejected(
            RejectCode.CORRUPT, "the DICOM image pixel description (Rows/Columns) is incomplete"
        ) from None
    if samples not in (1, 3):
        raise ImageRejected(
            RejectCode.UNSUPPORTED_PIXEL_FORMAT, f"{samples} samples per pixel (expected 1 or 3)"
        )
    return rows, columns, frames, samples


def _transfer_syntax(ds: Dataset) -> UID:
    """The syntax the pixels are encoded in; inferred from the encoding for bare data sets."""
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if syntax:
        return UID(str(syntax))
    implicit, little = ds.original_encoding
    if implicit:
        inferred = ImplicitVRLittleEndian
    else:
        inferred = ExplicitVRLittleEndian if little else ExplicitVRBigEndian
    if meta is None:
        ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = inferred
    return inferred


def _check_decoder(syntax: UID) -> None:
    name = syntax.name if syntax.is_transfer_syntax else _safe(str(syntax), 64)
    try:
        available = get_decoder(syntax).is_available
    except NotImplementedError:
        available = False
    if not available:
        raise ImageRejected(
            RejectCode.DICOM_UNSUPPORTED_TRANSFER_SYNTAX,
            f"pixel data encoded as {name} ({syntax}) cannot be decoded here; "
            "re-export as uncompressed, JPEG baseline or JPEG 2000",
        )


def _check_native_length(ds: Dataset, syntax: UID, samples_per_frame: int) -> None:
    """Uncompressed pixel data shorter than Rows x Columns x samples means a cut file."""
    if syntax.is_compressed:
        return
    bits_allocated = int(ds.get("BitsAllocated", 8) or 8)
    expected = math.ceil(samples_per_frame * bits_allocated / 8)
    if len(ds.PixelData) < expected:
        raise ImageRejected(
            RejectCode.TRUNCATED,
            f"the DICOM pixel data holds {len(ds.PixelData):,} of {expected:,} bytes",
        )


def _pixel_array(ds: Dataset) -> np.ndarray:
    try:
        return np.asarray(ds.pixel_array)
    except EOFError:
        raise ImageRejected(RejectCode.TRUNCATED, "the DICOM pixel data ends early") from None
    except Exception as exc:
        logger.debug("DICOM pixel decoding failed: %s", type(exc).__name__)
        raise ImageRejected(
            RejectCode.CORRUPT, f"the DICOM pixel data cannot be decoded ({type(exc).__name__})"
        ) from None


def _to_rgb(pixels: np.ndarray, ds: Dataset) -> tuple[np.ndarray, int, str]:
    interpretation = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    bits_stored = int(ds.get("BitsStored", ds.get("BitsAllocated", 8)) or 8)
    if interpretation in _COLOR_INTERPRETATIONS and pixels.ndim == 3:
        # pydicom's default (non-raw) decoding already converted YBR_* to RGB.
        return _scale_unsigned(pixels, bits_stored), bits_stored, interpretation
    if interpretation in _MONOCHROME and pixels.ndim == 2:
        return (
            gray_to_rgb(_monochrome_to_uint8(pixels, ds, bits_stored)),
            bits_stored,
            interpretation,
        )
    if interpretation == "PALETTE COLOR" and pixels.ndim == 2:
        rgb = apply_color_lut(pixels, ds)
        lut_max = 255 if rgb.dtype == np.uint8 else 65535
        return np.ascontiguousarray(scale_to_uint8(rgb, lut_max)), bits_stored, interpretation
    raise ImageRejected(
        RejectCode.UNSUPPORTED_PIXEL_FORMAT,
        f"photometric interpretation {_safe(interpretation, 20) or '(none)'} with "
        f"{pixels.ndim - 1 if pixels.ndim == 3 else 1}-sample pixels is not supported",
    )


def _scale_unsigned(pixels: np.ndarray, bits_stored: int) -> np.ndarray:
    if pixels.dtype.kind == "i":  # signed photos are unusual: shift to the unsigned range
        pixels = pixels.astype(np.int64) + 2 ** (bits_stored - 1)
    return np.ascontiguousarray(scale_to_uint8(pixels, 2**bits_stored - 1))


def _monochrome_to_uint8(pixels: np.ndarray, ds: Dataset, bits_stored: int) -> np.ndarray:
    low, high = _value_range(ds, bits_stored, signed=pixels.dtype.kind == "i")
    values = pixels.astype(np.float64)
    if "RescaleSlope" in ds and "RescaleIntercept" in ds:
        values = apply_modality_lut(values, ds)
    if "WindowCenter" in ds and "WindowWidth" in ds:
        values = apply_windowing(values, ds)  # output spans the same (rescaled) range
    gray = scale_to_uint8(values - low, high - low)
    if ds.PhotometricInterpretation == "MONOCHROME1":  # 0 is white in MONOCHROME1
        gray = 255 - gray
    return gray


def _value_range(ds: Dataset, bits_stored: int, *, signed: bool) -> tuple[float, float]:
    """Nominal range of stored values after Rescale Slope/Intercept (as pydicom's windowing)."""
    low, high = (
        (-(2 ** (bits_stored - 1)), 2 ** (bits_stored - 1) - 1)
        if signed
        else (0, 2**bits_stored - 1)
    )
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    ends = sorted((low * slope + intercept, high * slope + intercept))
    if ends[1] <= ends[0]:
        return 0.0, 1.0
    return ends[0], ends[1]


def _pixel_size_um(ds: Dataset) -> float | None:
    """Row spacing in µm from PixelSpacing, else ImagerPixelSpacing; None when absent or absurd."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(keyword)
        if not value:
            continue
        try:
            row_spacing_mm = float(value[0] if isinstance(value, MultiValue | list) else value)
        except (TypeError, ValueError, IndexError):
            continue
        if math.isfinite(row_spacing_mm) and 0 < row_spacing_mm < 10:
            return row_spacing_mm * 1000.0
        logger.warning("ignoring implausible DICOM %s", keyword)
    return None


def _laterality(ds: Dataset) -> Laterality | None:
    for keyword in ("ImageLaterality", "Laterality"):
        value = str(ds.get(keyword, "") or "").strip().upper()
        if value in _LATERALITY:
            return _LATERALITY[value]
    return None


def _safe(text: str, limit: int) -> str:
    """Printable ASCII only, bounded: for echoing header codes (never patient data) in details."""
    return "".join(ch for ch in text[:limit] if 32 <= ord(ch) < 127)
