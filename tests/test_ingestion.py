"""Image ingestion (shared.imaging): bad inputs refused with their code, good ones normalised.

Every input is generated here (no files committed). The real-photo FOV checks read
../shared/datasets beside the checkout and skip when it is absent.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import struct
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import convert_color_space, get_decoder
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    generate_uid,
)
from scipy import ndimage

from shared.findings import CalibrationSource, Laterality
from shared.imaging import (
    ImageRejected,
    IngestedImage,
    IngestLimits,
    RejectCode,
    detect_field_of_view,
    ingest,
)
from tests.conftest import DATASETS

OP_8BIT = "1.2.840.10008.5.1.4.1.1.77.1.5.1"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
DISC_COLOR = (200, 110, 60)

# --------------------------------------------------------------------------- synthetic inputs


def fundus(
    height: int = 240,
    width: int = 320,
    *,
    radius: float | None = None,
    center: tuple[float, float] | None = None,
    color: tuple[int, int, int] = DISC_COLOR,
    texture: bool = True,
) -> np.ndarray:
    """A bright disc (with mild texture) on black: the simplest image with a field of view."""
    cy, cx = center if center is not None else (height / 2, width / 2)
    radius = radius if radius is not None else 0.45 * min(height, width)
    yy, xx = np.ogrid[:height, :width]
    inside = (yy + 0.5 - cy) ** 2 + (xx + 0.5 - cx) ** 2 <= radius**2
    disc = np.broadcast_to(np.asarray(color, np.int16), (height, width, 3))
    if texture:
        noise = np.random.default_rng(7).integers(-8, 9, size=(height, width, 1), dtype=np.int16)
        disc = np.clip(disc + noise, 0, 255)
    return np.where(inside[:, :, np.newaxis], disc, 0).astype(np.uint8)


def encode(array: np.ndarray, fmt: str, mode: str | None = None, **options: object) -> bytes:
    image = Image.fromarray(array)
    if mode is not None:
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def png_from_header(width: int, height: int, bit_depth: int = 8, color_type: int = 2) -> bytes:
    """A tiny PNG whose IHDR claims any size: a few bytes of IDAT, no real pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + png_chunk(b"IEND", b"")
    )


def png_rgb16(array: np.ndarray) -> bytes:
    """16-bit RGB PNG (Pillow cannot write one): filter byte 0 + big-endian samples per row."""
    height, width, _ = array.shape
    rows = array.astype(">u2").view(np.uint8).reshape(height, width * 6)
    raw = np.concatenate([np.zeros((height, 1), np.uint8), rows], axis=1).tobytes()
    ihdr = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(raw))
        + png_chunk(b"IEND", b"")
    )


def animated(fmt: str) -> bytes:
    first = Image.fromarray(fundus())
    second = Image.fromarray(fundus(color=(90, 200, 60)))
    buffer = io.BytesIO()
    first.save(buffer, fmt, save_all=True, append_images=[second], **_lossless(fmt))
    return buffer.getvalue()


def _lossless(fmt: str) -> dict[str, object]:
    return {"lossless": True} if fmt == "WEBP" else {}


def truncated(data: bytes, fraction: float = 0.6) -> bytes:
    return data[: int(len(data) * fraction)]


def jpeg_scan_start(data: bytes) -> int:
    sos = data.index(b"\xff\xda")
    return sos + 2 + int.from_bytes(data[sos + 2 : sos + 4], "big")


def jpeg_markers_in_scan() -> bytes:
    """Valid headers; entropy-coded data replaced by SOF markers (libjpeg gives up)."""
    data = bytearray(encode(fundus(), "JPEG"))
    start = jpeg_scan_start(bytes(data))
    data[start : start + 400] = b"\xff\xc0" * 200
    return bytes(data)


def jpeg_undefined_huffman_table() -> bytes:
    data = bytearray(encode(fundus(), "JPEG"))
    sos = data.index(b"\xff\xda")
    data[sos + 6] = 0x33  # first component uses DC/AC tables 3, never defined
    return bytes(data)


def png_bad_header_crc() -> bytes:
    data = bytearray(encode(fundus(), "PNG"))
    data[29] ^= 0xFF  # last CRC byte of IHDR (8 signature + 4 length + 4 type + 13 data)
    return bytes(data)


def png_corrupt_idat() -> bytes:
    """IDAT with a valid CRC but a broken zlib stream."""
    width, height = 200, 150
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", b"\x78\x9c" + bytes(range(256)) * 4)
        + png_chunk(b"IEND", b"")
    )


def bmp_header(width: int, height: int, *, dib_size: int = 40) -> bytes:
    dib = struct.pack("<IiiHHIIiiII", dib_size, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    body = dib + b"\x00" * 64
    return b"BM" + struct.pack("<IHHI", 14 + len(body), 0, 0, 54) + body


def float_tiff() -> bytes:
    return encode(fundus().astype(np.float32)[:, :, 0], "TIFF")


def multipage_tiff() -> bytes:
    buffer = io.BytesIO()
    pages = [Image.fromarray(fundus()), Image.fromarray(fundus(color=(150, 90, 40)))]
    pages[0].save(buffer, "TIFF", save_all=True, append_images=pages[1:])
    return buffer.getvalue()


def webp_garbage() -> bytes:
    payload = b"VP8 " + struct.pack("<I", 200) + bytes(range(200))
    return b"RIFF" + struct.pack("<I", 4 + len(payload)) + b"WEBP" + payload


def dicom(
    pixels: np.ndarray | None = None,
    *,
    modality: str | None = "OP",
    sop_class: str = OP_8BIT,
    photometric: str | None = None,
    bits_stored: int | None = None,
    syntax: str = ExplicitVRLittleEndian,
    pixel_data: bytes | None = None,
    encapsulated: bool = False,
    preamble: bool = True,
    **attributes: object,
) -> bytes:
    """A minimal DICOM object around `pixels` (patient name set, to check it never leaks)."""
    pixels = fundus() if pixels is None else pixels
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "PID-SECRET-42"
    if modality is not None:
        ds.Modality = modality
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.SamplesPerPixel = 3 if pixels.ndim == 3 else 1
    ds.PhotometricInterpretation = photometric or ("RGB" if pixels.ndim == 3 else "MONOCHROME2")
    bits_allocated = pixels.dtype.itemsize * 8
    ds.BitsAllocated = bits_allocated
    ds.BitsStored = bits_stored or bits_allocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    if pixels.ndim == 3:
        ds.PlanarConfiguration = 0
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    if pixel_data is not False:
        ds.PixelData = pixels.tobytes() if pixel_data is None else pixel_data
        if encapsulated:
            ds["PixelData"].VR = "OB"
            ds["PixelData"].is_undefined_length = True
    buffer = io.BytesIO()
    if preamble and UID(syntax).is_private:
        ds.save_as(buffer, enforce_file_format=True, implicit_vr=False, little_endian=True)
    elif preamble:
        ds.save_as(buffer, enforce_file_format=True)
    else:
        del ds.file_meta
        ds.save_as(buffer, implicit_vr=True, little_endian=True)
    return buffer.getvalue()


def dicom_without_pixels() -> bytes:
    return dicom(pixel_data=False)  # type: ignore[arg-type]


def dicom_compressed_garbage(syntax: str) -> bytes:
    return dicom(
        syntax=syntax, pixel_data=encapsulate([b"\x00\x01garbage" * 40]), encapsulated=True
    )


def undecodable_code(syntax: str) -> str:
    """What garbage in `syntax` yields here: refused outright unless a decoder is installed."""
    if get_decoder(syntax).is_available:
        return RejectCode.CORRUPT
    return RejectCode.DICOM_UNSUPPORTED_TRANSFER_SYNTAX


def dicom_bomb() -> bytes:
    return dicom(fundus(), pixel_data=b"\x00" * 64, Rows=60000, Columns=60000)


def dicom_multiframe() -> bytes:
    frames = np.stack([fundus(), fundus()])
    return dicom(frames[0], pixel_data=frames.tobytes(), NumberOfFrames=2)


def dicom_truncated() -> bytes:
    data = dicom()
    return data[: len(data) - 5000]


def dicom_garbage_after_magic() -> bytes:
    return b"\x00" * 128 + b"DICM" + bytes(range(256)) * 3


def black_with_spot() -> bytes:
    image = np.zeros((240, 320, 3), np.uint8)
    image[100:110, 150:160] = 255
    return encode(image, "PNG")


SMALL_BYTES = IngestLimits(max_bytes=1000)

BAD_INPUTS = [
    pytest.param(lambda: b"", RejectCode.EMPTY, None, id="zero-bytes"),
    pytest.param(lambda: b"\x13\x37\x42", RejectCode.UNSUPPORTED_FORMAT, None, id="three-bytes"),
    pytest.param(lambda: b"fundus photo attached\n" * 20, "unsupported_format", None, id="text"),
    pytest.param(lambda: b"%PDF-1.7\n%\xe2\xe3\n1 0 obj", "unsupported_format", None, id="pdf"),
    pytest.param(
        lambda: b"PK\x03\x04\x14\x00" + b"\x00" * 40, "unsupported_format", None, id="zip"
    ),
    pytest.param(lambda: encode(fundus(), "GIF"), "unsupported_format", None, id="gif"),
    pytest.param(
        lambda: b"<!DOCTYPE html><html><body><img src=x></body></html>",
        "unsupported_format",
        None,
        id="html",
    ),
    pytest.param(
        lambda: b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"></svg>',
        "unsupported_format",
        None,
        id="svg",
    ),
    pytest.param(
        lambda: b"junk" + encode(fundus(), "JPEG"), "unsupported_format", None, id="jpeg-not-at-0"
    ),
    pytest.param(
        lambda: b"\x00\x00\x00\x1cftypheic" + b"\x00" * 64, "unsupported_format", None, id="heic"
    ),
    pytest.param(lambda: truncated(encode(fundus(), "JPEG")), "truncated", None, id="jpeg-cut"),
    pytest.param(lambda: truncated(encode(fundus(), "PNG")), "truncated", None, id="png-cut"),
    pytest.param(lambda: truncated(encode(fundus(), "TIFF")), "truncated", None, id="tiff-cut"),
    pytest.param(
        lambda: truncated(encode(fundus(), "WEBP", quality=90)), "truncated", None, id="webp-cut"
    ),
    pytest.param(lambda: truncated(encode(fundus(), "BMP")), "truncated", None, id="bmp-cut"),
    pytest.param(lambda: encode(fundus(), "PNG")[:33], "truncated", None, id="png-header-only"),
    pytest.param(lambda: b"\xff\xd8\xff", "truncated", None, id="jpeg-soi-only"),
    pytest.param(jpeg_markers_in_scan, "corrupt", None, id="jpeg-corrupt-scan"),
    pytest.param(jpeg_undefined_huffman_table, "corrupt", None, id="jpeg-bad-sos"),
    pytest.param(png_bad_header_crc, "corrupt", None, id="png-bad-crc"),
    pytest.param(png_corrupt_idat, "corrupt", None, id="png-bad-zlib"),
    pytest.param(webp_garbage, "corrupt", None, id="webp-garbage"),
    pytest.param(
        lambda: b"II*\x00" + struct.pack("<I", 0xFFFFFF00) + b"\x00" * 32,
        "corrupt",
        None,
        id="tiff-ifd-past-end",
        marks=pytest.mark.filterwarnings("ignore:Corrupt EXIF data"),
    ),
    pytest.param(lambda: bmp_header(300, 200, dib_size=0x7FFFFFFF), "corrupt", None, id="bmp-dib"),
    pytest.param(lambda: bmp_header(100_000, 100_000), "too_many_pixels", None, id="bmp-bomb"),
    pytest.param(lambda: png_from_header(1, 1), "too_small", None, id="png-1x1"),
    pytest.param(lambda: encode(fundus(100, 100), "PNG"), "too_small", None, id="png-100px"),
    pytest.param(lambda: png_from_header(30000, 30000), "too_many_pixels", None, id="png-bomb"),
    pytest.param(lambda: png_from_header(10000, 8000), "too_many_pixels", None, id="png-80mp"),
    pytest.param(lambda: png_from_header(13000, 200), "side_too_long", None, id="png-long-side"),
    pytest.param(
        lambda: encode(fundus(), "PNG"), "too_large_bytes", SMALL_BYTES, id="over-max-bytes"
    ),
    pytest.param(lambda: animated("PNG"), "animated", None, id="apng"),
    pytest.param(lambda: animated("WEBP"), "animated", None, id="animated-webp"),
    pytest.param(multipage_tiff, "multi_frame", None, id="multipage-tiff"),
    pytest.param(float_tiff, "unsupported_pixel_format", None, id="float-tiff"),
    pytest.param(
        lambda: encode(np.zeros((240, 320, 3), np.uint8), "PNG"),
        "no_field_of_view",
        None,
        id="all-black",
    ),
    pytest.param(black_with_spot, "no_field_of_view", None, id="tiny-bright-spot"),
    pytest.param(dicom_without_pixels, "dicom_no_pixels", None, id="dicom-no-pixels"),
    pytest.param(
        lambda: dicom(modality="CT", sop_class=CT_IMAGE),
        "dicom_wrong_modality",
        None,
        id="dicom-ct",
    ),
    pytest.param(
        lambda: dicom(modality=None, sop_class=CT_IMAGE),
        "dicom_wrong_modality",
        None,
        id="dicom-no-modality-ct-class",
    ),
    pytest.param(
        lambda: dicom_compressed_garbage(JPEGLSLossless),
        undecodable_code(JPEGLSLossless),
        None,
        id="dicom-jpeg-ls",
    ),
    pytest.param(
        lambda: dicom_compressed_garbage(JPEG2000Lossless),
        undecodable_code(JPEG2000Lossless),
        None,
        id="dicom-jpeg2000-garbage",
    ),
    pytest.param(
        lambda: dicom(syntax="1.3.6.1.4.1.99999.1.2"),
        "dicom_unsupported_transfer_syntax",
        None,
        id="dicom-private-syntax",
    ),
    pytest.param(dicom_bomb, "too_many_pixels", None, id="dicom-rows-columns-bomb"),
    pytest.param(dicom_multiframe, "multi_frame", None, id="dicom-multiframe"),
    pytest.param(dicom_truncated, "truncated", None, id="dicom-cut"),
    pytest.param(dicom_garbage_after_magic, "corrupt", None, id="dicom-garbage"),
    pytest.param(
        lambda: b"\x08\x00\x05\x00CS" + bytes(range(200)),
        "corrupt",
        None,
        id="bare-dicom-junk",
        marks=pytest.mark.filterwarnings("ignore::UserWarning"),
    ),
]


@pytest.mark.parametrize(("make", "code", "limits"), BAD_INPUTS)
def test_bad_input_is_rejected_with_its_code(
    make: Callable[[], bytes], code: str, limits: IngestLimits | None
) -> None:
    data = make()
    with pytest.raises(ImageRejected) as caught:  # any other exception type fails the test
        ingest(data, limits=limits or IngestLimits())
    assert caught.value.code == code, caught.value.detail
    assert isinstance(caught.value.detail, str) and len(caught.value.detail) > 10
    for secret in ("Doe", "PID-SECRET"):  # DICOM patient attributes never echoed
        assert secret not in caught.value.detail


def test_bad_input_corpus_is_large_enough() -> None:
    assert len(BAD_INPUTS) >= 30


MUTATION_SEEDS = {
    "JPEG": lambda: encode(fundus(), "JPEG"),
    "PNG": lambda: encode(fundus(), "PNG"),
    "TIFF": lambda: encode(fundus(), "TIFF"),
    "WEBP": lambda: encode(fundus(), "WEBP"),
    "BMP": lambda: encode(fundus(), "BMP"),
    "DICOM": lambda: dicom(),
}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("fmt", sorted(MUTATION_SEEDS))
def test_mutated_inputs_raise_only_image_rejected(fmt: str) -> None:
    """Random header damage, scattered damage and cut-outs: decoded or refused, never a crash."""
    seed = MUTATION_SEEDS[fmt]()
    rng = np.random.default_rng(sum(map(ord, fmt)))
    for round_ in range(30):
        data = bytearray(seed)
        if round_ % 3 == 0:
            for _ in range(rng.integers(1, 20)):
                data[rng.integers(0, min(len(data), 400))] = rng.integers(0, 256)
        elif round_ % 3 == 1:
            for _ in range(rng.integers(1, 50)):
                data[rng.integers(0, len(data))] = rng.integers(0, 256)
        else:
            start = int(rng.integers(0, len(data)))
            del data[start : start + int(rng.integers(1, 500))]
        try:
            result = ingest(bytes(data))
        except ImageRejected as rejected:
            assert rejected.code in set(RejectCode)
        else:
            assert_normalised(result)


def test_header_bomb_is_refused_before_decoding() -> None:
    data = png_from_header(30000, 30000)
    start = time.perf_counter()
    with pytest.raises(ImageRejected) as caught:
        ingest(data)
    assert caught.value.code == RejectCode.TOO_MANY_PIXELS
    assert time.perf_counter() - start < 0.5


@pytest.mark.parametrize("value", [0.0, -3.0, float("nan"), float("inf"), 5000.0])
def test_invalid_request_pixel_size(value: float) -> None:
    with pytest.raises(ImageRejected) as caught:
        ingest(encode(fundus(), "PNG"), pixel_size_um=value)
    assert caught.value.code == RejectCode.INVALID_PIXEL_SIZE


def test_rejection_is_picklable_and_codes_are_stable() -> None:
    error = pickle.loads(pickle.dumps(ImageRejected(RejectCode.TRUNCATED, "cut short")))
    assert (error.code, error.detail) == ("truncated", "cut short")
    assert len({code.value for code in RejectCode}) == len(RejectCode)
    assert {"empty", "too_large_bytes", "unsupported_format", "truncated", "corrupt"} <= {
        code.value for code in RejectCode
    }


def test_limits_validate_and_are_frozen() -> None:
    with pytest.raises(ValueError):
        IngestLimits(max_pixels=0)
    limits = IngestLimits()
    assert (limits.max_bytes, limits.max_pixels) == (50 * 1024 * 1024, 50_000_000)
    assert (limits.min_side, limits.max_side) == (128, 12_000)
    with pytest.raises(ValueError):
        limits.min_side = 1  # type: ignore[misc]


# --------------------------------------------------------------------------- good inputs


def assert_normalised(result: IngestedImage) -> None:
    assert result.rgb.dtype == np.uint8
    assert result.rgb.ndim == 3 and result.rgb.shape[2] == 3
    assert result.rgb.flags.c_contiguous


def crop_origin(result: IngestedImage) -> tuple[int, int]:
    fov = result.info.field_of_view
    assert fov is not None
    return fov.crop_x0, fov.crop_y0


def test_jpeg_is_decoded_cropped_and_described() -> None:
    image = fundus(240, 320)
    data = encode(image, "JPEG", quality=95)
    result = ingest(data)
    assert_normalised(result)
    info = result.info
    assert info.content_sha256 == hashlib.sha256(data).hexdigest()
    assert (info.format, info.width, info.height, info.bit_depth) == ("JPEG", 320, 240, 8)
    assert info.source_mode == "RGB"
    assert info.calibration is not None and info.calibration.source is None
    fov = info.field_of_view
    assert fov is not None
    assert fov.center_x == pytest.approx(160, abs=2) and fov.center_y == pytest.approx(120, abs=2)
    assert fov.radius == pytest.approx(108, rel=0.02)
    assert (fov.crop_x0, fov.crop_x1) == pytest.approx((52, 268), abs=3)
    assert result.rgb.shape[:2] == (fov.crop_y1 - fov.crop_y0, fov.crop_x1 - fov.crop_x0)
    assert fov.coverage == pytest.approx(np.pi / 4, abs=0.03)
    assert np.abs(result.rgb[108, 108].astype(int) - DISC_COLOR).max() < 20


@pytest.mark.parametrize("mode", ["RGB", "L", "P", "RGBA", "LA"])
def test_png_modes_become_rgb(mode: str) -> None:
    image = fundus()
    result = ingest(encode(image, "PNG", mode=mode))
    assert_normalised(result)
    assert result.info.source_mode == mode
    assert result.info.bit_depth == 8
    expected = np.asarray(Image.fromarray(image).convert(mode).convert("RGB"))
    x0, y0 = crop_origin(result)
    center = result.rgb[120 - y0, 160 - x0].astype(int)
    assert np.abs(center - expected[120, 160]).max() <= 3
    if mode in ("L", "LA"):
        assert np.all(result.rgb[..., 0] == result.rgb[..., 1])


def test_alpha_is_composited_on_black() -> None:
    """A white background that is fully transparent must read as the dark FOV border."""
    image = fundus()
    inside = image.any(axis=2)
    rgba = np.dstack([np.where(inside[..., None], image, 255), np.where(inside, 255, 0)])
    result = ingest(encode(rgba.astype(np.uint8), "PNG"))
    assert result.info.source_mode == "RGBA"
    assert result.rgb[0, 0].tolist() == [0, 0, 0]
    assert result.info.field_of_view is not None
    assert result.info.field_of_view.radius == pytest.approx(108, rel=0.02)


def test_png_16bit_grey_is_scaled_not_clipped() -> None:
    grey = fundus()[:, :, 0].astype(np.uint16) * 257  # 257*k -> exactly k
    grey[120, 160] = 257 * 201
    result = ingest(encode(grey, "PNG"))
    assert result.info.bit_depth == 16
    assert result.info.source_mode.startswith("I")
    x0, y0 = crop_origin(result)
    assert result.rgb[120 - y0, 160 - x0].tolist() == [201, 201, 201]


def test_png_16bit_rgb_reports_16_bits() -> None:
    image = fundus().astype(np.uint16) * 257
    image[120, 160] = (257 * 10, 257 * 128, 65535)
    result = ingest(png_rgb16(image))
    assert result.info.bit_depth == 16
    x0, y0 = crop_origin(result)
    assert result.rgb[120 - y0, 160 - x0].tolist() == [10, 128, 255]


def test_tiff_16bit_is_scaled_exactly() -> None:
    grey = fundus()[:, :, 0].astype(np.uint16) * 257
    grey[120, 160] = 257 * 77
    result = ingest(encode(grey, "TIFF"))
    assert (result.info.format, result.info.bit_depth) == ("TIFF", 16)
    x0, y0 = crop_origin(result)
    assert result.rgb[120 - y0, 160 - x0].tolist() == [77, 77, 77]


def test_cmyk_jpeg_is_converted() -> None:
    result = ingest(encode(fundus(), "JPEG", mode="CMYK", quality=95))
    assert result.info.source_mode == "CMYK"
    x0, y0 = crop_origin(result)
    assert np.abs(result.rgb[120 - y0, 160 - x0].astype(int) - DISC_COLOR).max() < 25


def test_exif_orientation_is_applied() -> None:
    """Orientation 6: stored 320x240, displayed 240x320 rotated 90° clockwise."""
    image = fundus(240, 320)
    image[60:76, 120:136] = (20, 230, 20)  # marker near the stored top of the disc
    exif = Image.Exif()
    exif[0x0112] = 6
    result = ingest(encode(image, "JPEG", quality=95, exif=exif.tobytes()))
    assert (result.info.width, result.info.height) == (240, 320)
    x0, y0 = crop_origin(result)
    # Stored (x, y) is displayed at (H - 1 - y, x) after a clockwise quarter turn.
    marker_x, marker_y = 240 - 1 - 68, 128
    assert result.rgb[marker_y - y0, marker_x - x0].tolist() == pytest.approx([20, 230, 20], abs=25)
    assert result.rgb[128 - y0, 68 - x0].tolist() != pytest.approx([20, 230, 20], abs=25)


@pytest.mark.parametrize(
    ("fmt", "options"), [("WEBP", {"lossless": True}), ("BMP", {}), ("TIFF", {})]
)
def test_lossless_formats_round_trip(fmt: str, options: dict[str, object]) -> None:
    image = fundus()
    result = ingest(encode(image, fmt, **options))
    assert result.info.format == fmt
    x0, y0 = crop_origin(result)
    height, width = result.rgb.shape[:2]
    assert np.array_equal(result.rgb, image[y0 : y0 + height, x0 : x0 + width])


def test_mpo_jpeg_uses_its_primary_image() -> None:
    """Stereo cameras and phones attach images to a JPEG (MPO): frame 0 is the photograph."""
    buffer = io.BytesIO()
    second = Image.fromarray(fundus(color=(20, 200, 30)))
    Image.fromarray(fundus()).save(buffer, "MPO", save_all=True, append_images=[second])
    result = ingest(buffer.getvalue())
    assert result.info.format == "JPEG"
    x0, y0 = crop_origin(result)
    assert np.abs(result.rgb[120 - y0, 160 - x0].astype(int) - DISC_COLOR).max() < 20


def test_format_is_sniffed_from_content_not_name(tmp_path: Path) -> None:
    misnamed = tmp_path / "photo.jpg"
    misnamed.write_bytes(encode(fundus(), "PNG"))
    assert ingest(misnamed.read_bytes()).info.format == "PNG"


def test_dicom_op_rgb_with_pixel_spacing() -> None:
    data = dicom(fundus(), PixelSpacing=[0.0065, 0.0070], ImageLaterality="L")
    result = ingest(data)
    info = result.info
    assert (info.format, info.dicom_modality, info.source_mode) == ("DICOM", "OP", "RGB")
    assert (info.width, info.height, info.bit_depth) == (320, 240, 8)
    assert info.calibration is not None
    assert info.calibration.source == CalibrationSource.DICOM
    assert info.calibration.pixel_size_um == pytest.approx(6.5)  # row spacing, mm -> µm
    assert info.laterality == Laterality.LEFT
    x0, y0 = crop_origin(result)
    height, width = result.rgb.shape[:2]
    assert np.array_equal(result.rgb, fundus()[y0 : y0 + height, x0 : x0 + width])


def test_request_pixel_size_wins_over_dicom() -> None:
    result = ingest(dicom(fundus(), PixelSpacing=[0.0065, 0.0065]), pixel_size_um=11.0)
    assert result.info.calibration is not None
    assert result.info.calibration.source == CalibrationSource.REQUEST
    assert result.info.calibration.pixel_size_um == 11.0


def test_dicom_monochrome2_and_monochrome1() -> None:
    grey = fundus()[:, :, 0]
    plain = ingest(dicom(grey, Laterality="R"))
    assert (plain.info.source_mode, plain.info.laterality) == ("MONOCHROME2", Laterality.RIGHT)
    inverted = ingest(dicom(255 - grey, photometric="MONOCHROME1"))
    assert inverted.info.source_mode == "MONOCHROME1"
    assert np.array_equal(plain.rgb, inverted.rgb)
    assert np.all(plain.rgb[..., 0] == plain.rgb[..., 2])


def test_dicom_12bit_monochrome_uses_bits_stored() -> None:
    grey = (fundus()[:, :, 0].astype(np.int32) * 4095 // 255).astype(np.uint16)
    grey[120, 160] = 4095
    result = ingest(dicom(grey, bits_stored=12))
    assert result.info.bit_depth == 12
    x0, y0 = crop_origin(result)
    assert result.rgb[120 - y0, 160 - x0].tolist() == [255, 255, 255]


def test_dicom_secondary_capture_with_imager_spacing() -> None:
    data = dicom(
        fundus(), modality="SC", sop_class=SECONDARY_CAPTURE, ImagerPixelSpacing=[0.01, 0.01]
    )
    result = ingest(data)
    assert result.info.dicom_modality == "SC"
    assert result.info.calibration is not None
    assert result.info.calibration.pixel_size_um == pytest.approx(10.0)


def test_dicom_ybr_full_is_converted_to_rgb() -> None:
    image = fundus()
    ybr = convert_color_space(image, "RGB", "YBR_FULL")
    result = ingest(dicom(ybr, photometric="YBR_FULL"))
    x0, y0 = crop_origin(result)
    assert np.abs(result.rgb[120 - y0, 160 - x0].astype(int) - image[120, 160]).max() <= 2


def test_dicom_jpeg_baseline_is_decoded() -> None:
    image = fundus()
    jpeg = encode(image, "JPEG", quality=95, subsampling=0)
    data = dicom(
        image,
        syntax=JPEGBaseline8Bit,
        photometric="YBR_FULL_422",
        pixel_data=encapsulate([jpeg]),
        encapsulated=True,
    )
    if not get_decoder(UID(JPEGBaseline8Bit)).is_available:
        pytest.skip("no JPEG decoder for pydicom here")
    result = ingest(data)
    x0, y0 = crop_origin(result)
    assert np.abs(result.rgb[120 - y0, 160 - x0].astype(int) - image[120, 160]).max() < 12


def test_dicom_without_preamble_is_read() -> None:
    data = dicom(fundus(), preamble=False)
    assert data[128:132] != b"DICM"
    result = ingest(data)
    assert result.info.format == "DICOM"
    assert result.info.dicom_modality == "OP"


def test_dicom_implicit_vr_file() -> None:
    result = ingest(dicom(fundus(), syntax=ImplicitVRLittleEndian))
    assert result.info.format == "DICOM"


# --------------------------------------------------------------------------- field of view


def test_clipped_disc_keeps_its_true_radius() -> None:
    """Top and bottom cut by the frame (as IDRiD): the radius comes from the horizontal extent."""
    image = fundus(300, 480, radius=190, center=(150, 240))
    result = ingest(encode(image, "PNG"))
    fov = result.info.field_of_view
    assert fov is not None
    assert fov.radius == pytest.approx(190, rel=0.01)
    assert (fov.center_x, fov.center_y) == pytest.approx((240, 150), abs=2)
    assert (fov.crop_y0, fov.crop_y1) == (0, 300)
    assert fov.crop_x0 == pytest.approx(50, abs=2)


def test_bright_everywhere_is_the_whole_image() -> None:
    """An already-cropped fundus (no dark border) is not rejected: the FOV is the image."""
    rng = np.random.default_rng(3)
    image = np.clip(rng.normal(150, 20, (200, 260, 3)), 0, 255).astype(np.uint8)
    result = ingest(encode(image, "PNG"))
    fov = result.info.field_of_view
    assert fov is not None
    assert (fov.crop_x0, fov.crop_y0, fov.crop_x1, fov.crop_y1) == (0, 0, 260, 200)
    assert fov.coverage == 1.0
    assert result.rgb.shape == (200, 260, 3)


def test_flat_white_image_is_left_to_quality_grading() -> None:
    result = ingest(encode(np.full((200, 200, 3), 255, np.uint8), "PNG"))
    assert result.rgb.shape == (200, 200, 3)


def test_fov_detection_is_fast_on_a_full_size_photo() -> None:
    image = fundus(2848, 4288, radius=1700, center=(1424, 2000), texture=False)
    detect_field_of_view(image)  # warm-up (imports, caches)
    start = time.perf_counter()
    estimate = detect_field_of_view(image)
    elapsed = time.perf_counter() - start
    assert estimate.radius == pytest.approx(1700, rel=0.01)
    assert elapsed < 0.15


# --------------------------------------------------------------------------- real photographs


def needs(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"dataset not available: {path}")
    return path


def reference_circle(mask: np.ndarray) -> tuple[float, float, float]:
    """Centre and radius of a FOV mask from its widest rows (valid when top/bottom are cut)."""
    widths = mask.sum(axis=1)
    rows = np.flatnonzero(widths >= widths.max() - 1)
    cols = np.flatnonzero(mask[rows].any(axis=0))
    return (cols[0] + cols[-1] + 1) / 2, rows.mean() + 0.5, widths.max() / 2


def assert_matches(image: np.ndarray, mask: np.ndarray) -> None:
    estimate = detect_field_of_view(image)
    ref_x, ref_y, ref_radius = reference_circle(mask)
    width = image.shape[1]
    assert abs(estimate.center_x - ref_x) < 0.02 * width
    assert abs(estimate.center_y - ref_y) < 0.02 * width
    assert estimate.radius == pytest.approx(ref_radius, rel=0.03)


def test_fov_matches_drive_reference_masks() -> None:
    folder = needs(DATASETS / "DRIVE" / "training")
    images = sorted((folder / "images").glob("*.tif"))
    assert images
    for path in images:
        mask_path = folder / "mask" / path.name.replace(".tif", "_mask.gif")
        mask = np.asarray(Image.open(mask_path).convert("L")) > 127
        assert_matches(np.asarray(Image.open(path).convert("RGB")), mask)


def test_fov_matches_les_av_reference_masks() -> None:
    folder = needs(DATASETS / "LES-AV" / "training")
    for path in sorted((folder / "images").glob("*.png"))[:3]:
        mask = np.asarray(Image.open(folder / "mask" / f"{path.stem}_mask.gif").convert("L")) > 127
        assert_matches(np.asarray(Image.open(path).convert("RGB")), mask)


@pytest.mark.parametrize(
    ("relative", "red_threshold"),
    [
        ("IDRiD-seg/images/IDRiD_01.jpg", 40),  # a dim halo (~20) rings this camera's FOV
        ("Drishti-GS1/Training/Images/drishtiGS_017.jpg", 12),  # vignetted, dark periphery
    ],
)
def test_fov_on_clipped_real_photographs(relative: str, red_threshold: int) -> None:
    """No FOV masks here: the reference is the largest region above a fixed red threshold."""
    path = needs(DATASETS / relative)
    result = ingest(path.read_bytes())
    assert result.info.format == "JPEG"
    full = np.asarray(Image.open(path).convert("RGB"))
    labels, _ = ndimage.label(full[:, :, 0] > red_threshold)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    assert_matches(full, labels == sizes.argmax())
    fov = result.info.field_of_view
    assert fov is not None and fov.coverage > 0.7
