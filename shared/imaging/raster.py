"""JPEG, PNG, TIFF, WebP and BMP through Pillow, with every size check before pixels exist.

Pillow's `Image.open` reads only the header, so dimensions and frame counts are checked
against the limits before `load()` allocates anything. Pillow's own bomb guard
(`Image.MAX_IMAGE_PIXELS`, raising `DecompressionBombError` above twice that) is left at its
default, which is looser than ours, and its error is mapped to "too_many_pixels". Truncated
files are refused: `ImageFile.LOAD_TRUNCATED_IMAGES` is never enabled.
"""

from __future__ import annotations

import io
import logging

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from shared.imaging.errors import ImageRejected, RejectCode
from shared.imaging.limits import IngestLimits, check_dimensions
from shared.imaging.normalize import (
    DecodedImage,
    composite_on_black,
    gray_to_rgb,
    scale_to_uint8,
)
from shared.imaging.sniff import ImageFormat

logger = logging.getLogger(__name__)

# Bits per channel for modes whose header depth we do not read directly.
_MODE_BITS = {"1": 1, "I;16": 16, "I;16L": 16, "I;16B": 16, "I;16N": 16, "I": 32, "F": 32}
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_UINT16_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


def decode_raster(data: bytes, fmt: ImageFormat, limits: IngestLimits) -> DecodedImage:
    """Decode a raster container into 8-bit RGB, refusing bombs, animations and damage."""
    image = _open(data, fmt)
    with image:
        _refuse_multiple_frames(image, data, fmt)
        check_dimensions(image.width, image.height, limits)
        bit_depth = _stored_bit_depth(image, data, fmt)
        source_mode = image.mode
        _load(image, data, fmt)
        oriented = _apply_exif_orientation(image)
        rgb = _to_rgb(oriented, bit_depth)
    return DecodedImage(rgb=rgb, bit_depth=bit_depth, source_mode=source_mode)


def _open(data: bytes, fmt: ImageFormat) -> Image.Image:
    # `formats=` stops Pillow from trying other plugins on bytes we already identified.
    try:
        return Image.open(io.BytesIO(data), formats=[fmt.value])
    except Image.DecompressionBombError as exc:
        raise ImageRejected(RejectCode.TOO_MANY_PIXELS, _bomb_detail(exc)) from None
    except MemoryError:
        raise
    except Exception as exc:
        raise _decode_failure(exc, data, fmt) from None


def _bomb_detail(exc: Exception) -> str:
    # Pillow's message states the pixel count and its limit; nothing from the image content.
    return f"the header declares too many pixels ({exc})"


def _refuse_multiple_frames(image: Image.Image, data: bytes, fmt: ImageFormat) -> None:
    """A fundus photograph is one frame: refuse rather than silently pick one.

    Exception: a JPEG carrying an MPO extension (stereo cameras, phones' gain maps) is one
    photograph with attachments; its primary image (frame 0) is used.
    """
    try:
        # `is_animated` is read from the header (TIFF: the first IFD's next offset), unlike
        # `n_frames`, which walks a TIFF's whole IFD chain.
        if not getattr(image, "is_animated", False) or fmt is ImageFormat.JPEG:
            return
        frames = None if fmt is ImageFormat.TIFF else int(getattr(image, "n_frames", 2))
    except Exception as exc:  # a broken IFD chain or animation header
        raise _decode_failure(exc, data, fmt) from None
    if frames is None:
        raise ImageRejected(
            RejectCode.MULTI_FRAME,
            "the TIFF has more than one page; send each page as its own image",
        )
    raise ImageRejected(
        RejectCode.ANIMATED,
        f"the {fmt.value} is an animation of {frames} frames; a fundus photograph is one frame",
    )


def _stored_bit_depth(image: Image.Image, data: bytes, fmt: ImageFormat) -> int:
    """Bits per channel as stored (Pillow reduces 16-bit RGB to 8 bits on reading)."""
    if fmt is ImageFormat.PNG and len(data) > 24:
        return data[24]  # IHDR bit depth: 8-byte signature, 4 length, 4 type, 4 width, 4 height
    if fmt is ImageFormat.TIFF:
        bits = getattr(image, "tag_v2", {}).get(258)  # BitsPerSample
        if isinstance(bits, tuple) and bits:
            return int(max(bits))
        if isinstance(bits, int):
            return bits
    if fmt is ImageFormat.JPEG:
        return int(getattr(image, "bits", 8))
    return _MODE_BITS.get(image.mode, 8)


def _load(image: Image.Image, data: bytes, fmt: ImageFormat) -> None:
    try:
        image.load()
    except Image.DecompressionBombError as exc:
        raise ImageRejected(RejectCode.TOO_MANY_PIXELS, _bomb_detail(exc)) from None
    except MemoryError:
        raise
    except Exception as exc:
        raise _decode_failure(exc, data, fmt) from None


def _apply_exif_orientation(image: Image.Image) -> Image.Image:
    # A malformed EXIF block should not cost the photograph: keep the stored orientation.
    try:
        if image.getexif().get(ExifTags.Base.Orientation, 1) in (None, 1):
            return image  # nothing to do: spare exif_transpose's full copy
        oriented = ImageOps.exif_transpose(image)
    except Exception as exc:
        logger.warning(
            "EXIF orientation unreadable (%s); stored orientation kept", type(exc).__name__
        )
        return image
    return oriented if oriented is not None else image


def _to_rgb(image: Image.Image, bit_depth: int) -> np.ndarray:
    mode = image.mode
    if mode == "RGB":
        return np.ascontiguousarray(np.asarray(image))
    if mode in ("L", "1"):
        return gray_to_rgb(np.asarray(image.convert("L")))
    if mode in _UINT16_MODES or (mode == "I" and bit_depth <= 16):
        return gray_to_rgb(scale_to_uint8(np.asarray(image), 2**bit_depth - 1))
    if mode in ("I", "F"):
        raise ImageRejected(
            RejectCode.UNSUPPORTED_PIXEL_FORMAT,
            f"{bit_depth}-bit {'floating-point' if mode == 'F' else 'integer'} samples are not "
            "a photograph; send 8- or 16-bit RGB or greyscale",
        )
    if mode in _ALPHA_MODES or (mode == "P" and "transparency" in image.info):
        rgba = np.asarray(image.convert("RGBA"))
        return composite_on_black(rgba[:, :, :3], rgba[:, :, 3])
    return _convert_generic(image)


def _convert_generic(image: Image.Image) -> np.ndarray:
    """P, CMYK (Adobe-inverted JPEGs are handled by Pillow), YCbCr and the like."""
    try:
        return np.ascontiguousarray(np.asarray(image.convert("RGB")))
    except (ValueError, OSError) as exc:
        raise ImageRejected(
            RejectCode.UNSUPPORTED_PIXEL_FORMAT,
            f"pixels in mode {image.mode} cannot be converted to RGB ({type(exc).__name__})",
        ) from None


def _decode_failure(exc: Exception, data: bytes, fmt: ImageFormat) -> ImageRejected:
    """Truncated when the container is visibly cut short, else corrupt.

    Where the container records its own end (PNG IEND, JPEG EOI, BMP/WebP sizes) that
    decides; for TIFF, the decoder's "truncated"/EOF report does.
    """
    logger.debug("%s decoding failed: %s", fmt.value, type(exc).__name__)
    complete = _container_complete(data, fmt)
    if complete is None:
        cut = isinstance(exc, EOFError) or "truncated" in str(exc).lower()
    else:
        cut = not complete
    if cut:
        return ImageRejected(
            RejectCode.TRUNCATED, f"the {fmt.value} file ends before its image data is complete"
        )
    reason = "" if isinstance(exc, UnidentifiedImageError) else f": {str(exc)[:120]}"
    return ImageRejected(
        RejectCode.CORRUPT, f"the {fmt.value} data cannot be decoded ({type(exc).__name__}{reason})"
    )


def _container_complete(data: bytes, fmt: ImageFormat) -> bool | None:
    """Whether the file reaches the end its container declares; None when it declares none."""
    if fmt is ImageFormat.PNG:
        return b"IEND" in data[-64:]
    if fmt is ImageFormat.JPEG:
        return data.rstrip(b"\x00\r\n ").endswith(b"\xff\xd9")
    if fmt is ImageFormat.WEBP:
        return int.from_bytes(data[4:8], "little") + 8 <= len(data)
    if fmt is ImageFormat.BMP:
        declared = int.from_bytes(data[2:6], "little")  # 0 in some writers: unknown
        return declared <= len(data) if declared else None
    return None  # TIFF has no overall length
