"""Batch admission: files and zip archives in; stored images, or each refusal with its reason.

No processes: admission is the gateway's code run on the uploads, checked on disk.
"""

from __future__ import annotations

import io
import stat
import zipfile
from pathlib import Path

import pytest

from services.gateway.batches.admission import BatchRefused, Limits, admit, image_path
from services.gateway.store import ImageState
from tests.conftest import fundus_png

LIMITS = Limits(
    max_member_bytes=1_000_000,
    max_total_bytes=5_000_000,
    max_images=50,
    max_compression_ratio=100,
)


def _zip(members: list[tuple[zipfile.ZipInfo | str, bytes]]) -> io.BytesIO:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for info, data in members:
            archive.writestr(info, data)
    buffer.seek(0)
    return buffer


def _member(name: str, mode: int) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.external_attr = mode << 16
    info.compress_type = zipfile.ZIP_DEFLATED
    return info


def _encrypted(archive: io.BytesIO, name: str) -> io.BytesIO:
    """The archive with `name`'s central directory entry flagged as encrypted (zipfile
    cannot write encrypted members)."""
    data = bytearray(archive.getvalue())
    start = 0
    while (start := data.find(b"PK\x01\x02", start + 1)) != -1:
        length = int.from_bytes(data[start + 28 : start + 30], "little")
        if data[start + 46 : start + 46 + length] == name.encode():
            data[start + 8] |= 0x1
    return io.BytesIO(bytes(data))


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


@pytest.mark.filterwarnings("ignore:Duplicate name")
def test_an_archive_s_unsafe_members_are_skipped_with_reasons_and_nothing_leaves_the_folder(
    tmp_path: Path,
) -> None:
    good = fundus_png()
    bomb = b"\0" * 900_000  # under the size cap, but 1000x smaller compressed
    archive = _zip(
        [
            ("eyes/left.png", good),
            ("../../escaped.png", good),
            ("/etc/absolute.png", good),
            ("C:\\windows\\drive.png", good),
            (_member("link.png", stat.S_IFLNK | 0o777), b"/etc/passwd"),
            (_member("fifo.png", stat.S_IFIFO | 0o644), b""),
            ("secret.png", good),
            ("bomb.bmp", bomb),
            ("inner.zip", _zip([("x.png", good)]).getvalue()),
            ("inner.tar.gz", b"\x1f\x8b\x08\x00" + b"\x00" * 64),
            ("notes.txt", b"patient notes, not an image"),
            ("empty.png", b""),
            ("eyes/left.png", fundus_png(300)),  # the same name again
            ("eyes/right.png", fundus_png(280)),
        ]
    )
    batch = tmp_path / "batches" / "b1"
    images = admit([("upload.zip", _encrypted(archive, "secret.png"))], batch, LIMITS)
    outcome = {(image.name, image.state, image.error_code) for image in images}
    assert outcome == {
        ("eyes/left.png", ImageState.QUEUED, None),
        ("../../escaped.png", ImageState.SKIPPED, "unsafe_path"),
        ("/etc/absolute.png", ImageState.SKIPPED, "absolute_path"),
        ("C:\\windows\\drive.png", ImageState.SKIPPED, "absolute_path"),
        ("link.png", ImageState.SKIPPED, "symlink"),
        ("fifo.png", ImageState.SKIPPED, "not_a_file"),
        ("secret.png", ImageState.SKIPPED, "encrypted"),
        ("bomb.bmp", ImageState.SKIPPED, "compression_ratio"),
        ("inner.zip", ImageState.SKIPPED, "nested_archive"),
        ("inner.tar.gz", ImageState.SKIPPED, "nested_archive"),
        ("notes.txt", ImageState.FAILED, "unsupported_format"),
        ("empty.png", ImageState.FAILED, "empty"),
        ("eyes/left.png", ImageState.SKIPPED, "duplicate_name"),
        ("eyes/right.png", ImageState.QUEUED, None),
    }
    assert [image.position for image in images] == list(range(len(images)))
    assert all(image.error_detail for image in images if image.state != ImageState.QUEUED)
    queued = [image for image in images if image.state == ImageState.QUEUED]
    # Only the two images were written, under generated names, inside the batch's folder.
    assert _files(tmp_path) == {
        str(image_path(Path("batches"), "b1", image.position)) for image in queued
    }
    assert image_path(tmp_path / "batches", "b1", queued[0].position).read_bytes() == good


def test_plain_files_are_stored_and_a_zip_among_them_is_opened(tmp_path: Path) -> None:
    images = admit(
        [
            ("a.png", io.BytesIO(fundus_png())),
            ("more.zip", _zip([("b.png", fundus_png(300))])),
            ("c.txt", io.BytesIO(b"hello")),
            ("big.png", io.BytesIO(b"\x89PNG\r\n\x1a\n" + b"\0" * 1_000_000)),
        ],
        tmp_path / "b2",
        LIMITS,
    )
    assert [(i.name, i.state, i.error_code) for i in images] == [
        ("a.png", ImageState.QUEUED, None),
        ("b.png", ImageState.QUEUED, None),
        ("c.txt", ImageState.FAILED, "unsupported_format"),
        ("big.png", ImageState.SKIPPED, "too_large_bytes"),
    ]
    assert len(_files(tmp_path)) == 2


def test_a_broken_zip_is_refused_with_its_reason(tmp_path: Path) -> None:
    images = admit([("broken.zip", io.BytesIO(b"PK\x03\x04 not really"))], tmp_path, LIMITS)
    assert [(i.state, i.error_code) for i in images] == [(ImageState.SKIPPED, "corrupt_archive")]


@pytest.mark.parametrize(
    ("limits", "code"),
    [
        (Limits(1_000_000, 150_000, 50, 100), "batch-too-large"),
        (Limits(1_000_000, 5_000_000, 3, 100), "too-many-images"),
    ],
)
def test_past_the_batch_caps_the_whole_batch_is_refused(
    tmp_path: Path, limits: Limits, code: str
) -> None:
    archive = _zip([(f"{i}.png", fundus_png(256 + i) + bytes(40_000)) for i in range(5)])
    with pytest.raises(BatchRefused) as refused:
        admit([("many.zip", archive)], tmp_path, limits)
    assert refused.value.code == code
