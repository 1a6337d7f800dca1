"""Content sniffing: the format is decided by magic bytes, never by a file name or MIME type."""

from __future__ import annotations

import re
from enum import StrEnum

from shared.imaging.errors import ImageRejected, RejectCode


class ImageFormat(StrEnum):
    """Accepted containers; the value is what ImageInfo.format reports."""

    JPEG = "JPEG"
    PNG = "PNG"
    TIFF = "TIFF"
    WEBP = "WEBP"
    BMP = "BMP"
    DICOM = "DICOM"


_DICOM_PREAMBLE = 128
# Explicit-VR codes a preamble-less DICOM may start with after its first tag.
_DICOM_VRS = frozenset(
    b"AE AS AT CS DA DS DT FL FD IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL "
    b"UN UR US UT UV".split()
)
# Formats worth naming in the refusal, so a caller knows what they sent.
_KNOWN_OTHERS: tuple[tuple[bytes, str], ...] = (
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"%PDF", "PDF"),
    (b"PK\x03\x04", "ZIP"),
    (b"\x1f\x8b", "gzip"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
    (b"\xff\x4f\xff\x51", "JPEG 2000 codestream"),
    (b"\xff\x0a", "JPEG XL"),
    (b"8BPS", "Photoshop"),
)
_ACCEPTED = "send JPEG, PNG, TIFF, WebP, BMP or DICOM"
_HEIF = re.compile(rb"^....ftyp(heic|heix|hevc|mif1|avif)", re.DOTALL)


def sniff_format(data: bytes) -> ImageFormat:
    """Return the container format of `data` or raise ImageRejected("unsupported_format")."""
    fmt = _match_magic(data)
    if fmt is not None:
        return fmt
    raise ImageRejected(RejectCode.UNSUPPORTED_FORMAT, _describe_unknown(data))


def _match_magic(data: bytes) -> ImageFormat | None:
    if data.startswith(b"\xff\xd8\xff"):
        return ImageFormat.JPEG
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return ImageFormat.PNG
    if data.startswith((b"II*\x00", b"MM\x00*")):
        return ImageFormat.TIFF
    if len(data) >= 12 and data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        return ImageFormat.WEBP
    if data.startswith(b"BM") and len(data) >= 18:
        return ImageFormat.BMP
    if data[_DICOM_PREAMBLE : _DICOM_PREAMBLE + 4] == b"DICM":
        return ImageFormat.DICOM
    if looks_like_bare_dicom(data):
        return ImageFormat.DICOM
    return None


def looks_like_bare_dicom(data: bytes) -> bool:
    """A DICOM data set without the 128-byte preamble (as some old archives write it).

    Accepted only when it starts with a little-endian tag of group 0002 (file meta) or 0008
    (identification) followed by either an explicit VR or an implicit length that fits the
    data: this is what pydicom's `force=True` would parse, without letting it guess on
    arbitrary bytes.
    """
    if len(data) < 8 or data[:2] not in (b"\x02\x00", b"\x08\x00"):
        return False
    if data[4:6] in _DICOM_VRS:
        return True
    implicit_length = int.from_bytes(data[4:8], "little")
    return 0 < implicit_length <= len(data) - 8 and data[3] == 0


def _describe_unknown(data: bytes) -> str:
    for magic, name in _KNOWN_OTHERS:
        if data.startswith(magic):
            return f"{name} is not an accepted image format; {_ACCEPTED}"
    if _HEIF.match(data):
        return f"HEIF/AVIF is not an accepted image format; {_ACCEPTED}"
    head = data[:512].lstrip().lower()
    if head.startswith((b"<", b"{", b"[")) or _is_mostly_text(data[:512]):
        return "the content is text (HTML, SVG, JSON or similar), not an image"
    return "the content does not start with the signature of any accepted image format"


def _is_mostly_text(head: bytes) -> bool:
    if not head:
        return False
    printable = sum(32 <= b < 127 or b in (9, 10, 13) for b in head)
    return printable / len(head) > 0.95
