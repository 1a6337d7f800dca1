"""Image ingestion shared by every entry point (REST gateway, CLI, batch worker).

    from shared.imaging import ingest, IngestLimits, IngestedImage, ImageRejected
    ingested = ingest(data, limits=IngestLimits(), pixel_size_um=None)

`ingest` sniffs the format from magic bytes, refuses bad input with `ImageRejected(code,
detail)` (codes in `RejectCode`), decodes to 8-bit RGB, applies EXIF orientation and crops to
the detected field of view.
"""

from shared.imaging.errors import ImageRejected, RejectCode
from shared.imaging.fov import FovEstimate, detect_field_of_view
from shared.imaging.ingest import IngestedImage, ingest
from shared.imaging.limits import DEFAULT_LIMITS, IngestLimits
from shared.imaging.sniff import ImageFormat

__all__ = [
    "DEFAULT_LIMITS",
    "FovEstimate",
    "ImageFormat",
    "ImageRejected",
    "IngestLimits",
    "IngestedImage",
    "RejectCode",
    "detect_field_of_view",
    "ingest",
]
