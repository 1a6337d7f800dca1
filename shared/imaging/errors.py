"""Why an input image was refused: one stable code per reason, defined here and nowhere else.

The codes are part of the public contract: the REST gateway maps each to an RFC 9457
problem type (HTTP 4xx), gRPC services answer INVALID_ARGUMENT with the code in the details,
and batch result tables store it. Never rename a code; add new ones instead.
"""

from __future__ import annotations

from enum import StrEnum


class RejectCode(StrEnum):
    """Machine-readable reason for refusing an image (the value is the wire string)."""

    EMPTY = "empty"
    """Zero bytes were received."""
    TOO_LARGE_BYTES = "too_large_bytes"
    """The upload is larger than IngestLimits.max_bytes."""
    UNSUPPORTED_FORMAT = "unsupported_format"
    """The magic bytes are not JPEG, PNG, TIFF, WebP, BMP or DICOM (GIF is refused too)."""
    UNSUPPORTED_PIXEL_FORMAT = "unsupported_pixel_format"
    """A known container holding pixels we cannot turn into RGB (float samples, 32-bit, ...)."""
    TRUNCATED = "truncated"
    """The file ends before its image data does."""
    CORRUPT = "corrupt"
    """The file claims a format but its structure or compressed data is broken."""
    TOO_MANY_PIXELS = "too_many_pixels"
    """Width x height exceeds IngestLimits.max_pixels (decompression-bomb guard)."""
    SIDE_TOO_LONG = "side_too_long"
    """Width or height exceeds IngestLimits.max_side."""
    TOO_SMALL = "too_small"
    """Width or height (or the field-of-view crop) is below IngestLimits.min_side."""
    ANIMATED = "animated"
    """An animation (APNG, animated WebP): a fundus photograph is one frame."""
    MULTI_FRAME = "multi_frame"
    """A multi-page TIFF or multi-frame DICOM: send one image per request."""
    DICOM_NO_PIXELS = "dicom_no_pixels"
    """A DICOM object without Pixel Data (a report, a structured document, ...)."""
    DICOM_WRONG_MODALITY = "dicom_wrong_modality"
    """A DICOM image that is not a photograph (CT, MR, OCT, ...)."""
    DICOM_UNSUPPORTED_TRANSFER_SYNTAX = "dicom_unsupported_transfer_syntax"
    """A DICOM transfer syntax for which no decoder is installed."""
    NO_FIELD_OF_VIEW = "no_field_of_view"
    """No retinal field of view was found (black image, tiny bright area)."""
    INVALID_PIXEL_SIZE = "invalid_pixel_size"
    """The pixel size given with the request is not a positive finite number."""


class ImageRejected(Exception):
    """The input cannot be analysed.

    `code` is stable and machine-readable; `detail` is a sentence for humans that says what
    was wrong. Neither ever contains image content or DICOM patient attributes.
    """

    def __init__(self, code: RejectCode | str, detail: str) -> None:
        self.code: RejectCode = RejectCode(code)  # a str: compares equal to "empty"
        self.detail: str = detail
        super().__init__(f"{self.code}: {detail}")

    def __reduce__(self) -> tuple[type[ImageRejected], tuple[str, str]]:
        # Keeps the exception picklable (Celery ships task errors between processes).
        return (type(self), (self.code, self.detail))
