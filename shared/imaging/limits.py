"""Size limits applied to every input, and the check made on the header before decoding."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from shared.imaging.errors import ImageRejected, RejectCode

MIB = 1024 * 1024


class IngestLimits(BaseModel):
    """Refuse inputs outside these bounds (all checked before pixels are decoded)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_bytes: int = Field(default=50 * MIB, gt=0, description="largest upload, in bytes")
    max_pixels: int = Field(default=50_000_000, gt=0, description="largest width x height")
    min_side: int = Field(default=128, gt=0, description="shortest allowed width or height")
    max_side: int = Field(default=12_000, gt=0, description="longest allowed width or height")


DEFAULT_LIMITS = IngestLimits()


def check_dimensions(width: int, height: int, limits: IngestLimits) -> None:
    """Refuse a size read from a header, before any pixel buffer is allocated."""
    if width <= 0 or height <= 0:
        raise ImageRejected(RejectCode.CORRUPT, f"the header declares a {width}x{height} image")
    if width * height > limits.max_pixels:
        raise ImageRejected(
            RejectCode.TOO_MANY_PIXELS,
            f"{width}x{height} is {width * height:,} pixels; the limit is {limits.max_pixels:,}",
        )
    if max(width, height) > limits.max_side:
        raise ImageRejected(
            RejectCode.SIDE_TOO_LONG,
            f"{width}x{height} has a side longer than {limits.max_side} px",
        )
    if min(width, height) < limits.min_side:
        raise ImageRejected(
            RejectCode.TOO_SMALL,
            f"{width}x{height} has a side shorter than {limits.min_side} px",
        )
