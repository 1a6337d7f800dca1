"""Admission of a batch's uploads: image files and zip archives in, stored files and rows out.

Every input becomes one row (NewImage). An image is written to `<batch folder>/<position>`:
the name is generated, so no name from an upload or an archive is ever a path here. Zip
members are read in memory with caps and never extracted by name; each of these is refused
with a reason instead (state `skipped`): absolute paths and `..` components (zip-slip),
symlinks and other non-regular members, encrypted members, members past the size cap or the
compression-ratio cap (zip bombs), archives inside the archive, and a second file with a name
already seen. A file whose bytes are no image format (the ingestion sniffer's verdict) fails
at once with the ingestion code; everything else is left to the worker's full ingestion.
Uncompressed bytes over the batch's total cap, or more images than its cap, refuse the whole
batch (BatchRefused).
"""

from __future__ import annotations

import hashlib
import re
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from services.gateway.store import ImageState, NewImage
from shared.imaging import ImageRejected, RejectCode
from shared.imaging.sniff import sniff_format

ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a local file header, or an empty archive
# Containers that are archives, not images: refused inside an archive (one level only).
_ARCHIVE_MAGIC = (*ZIP_MAGIC, b"\x1f\x8b", b"7z\xbc\xaf\x27\x1c", b"Rar!\x1a\x07", b"BZh")
_TAR_MAGIC_OFFSET = 257
_DRIVE = re.compile(r"^[A-Za-z]:")


@dataclass(frozen=True)
class Limits:
    max_member_bytes: int  # one image (the gateway's upload cap)
    max_total_bytes: int  # every image of the batch, uncompressed
    max_images: int
    max_compression_ratio: float


class BatchRefused(Exception):
    """The whole batch is refused (HTTP 413): `code` is the problem code."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


def _file_name(position: int) -> str:
    return f"{position:06d}"


def image_path(batch_dir: Path, batch_id: str, position: int) -> Path:
    """Where the bytes of a batch's image are kept (the gateway writes, workers read)."""
    return batch_dir / batch_id / _file_name(position)


def _is_archive(data: bytes) -> bool:
    tar = data[_TAR_MAGIC_OFFSET : _TAR_MAGIC_OFFSET + 5] == b"ustar"
    return data.startswith(_ARCHIVE_MAGIC) or tar


def _unsafe_name(name: str) -> tuple[str, str] | None:
    """(code, detail) when a member's name would escape the folder it is extracted to."""
    normalized = name.replace("\\", "/")
    if normalized.startswith("/") or _DRIVE.match(normalized):
        return "absolute_path", "the archive member has an absolute path"
    if ".." in PurePosixPath(normalized).parts:
        return "unsafe_path", "the archive member's path leaves the archive ('..')"
    return None


class _Admitter:
    def __init__(self, folder: Path, limits: Limits) -> None:
        self.folder = folder
        self.limits = limits
        self.images: list[NewImage] = []
        self.names: set[str] = set()
        self.total_bytes = 0

    def _row(self, name: str, state: ImageState, code: str, detail: str) -> None:
        self.images.append(NewImage(len(self.images), name, state, None, code, detail))

    def skip(self, name: str, code: str, detail: str) -> None:
        self._row(name, ImageState.SKIPPED, code, detail)

    def _count(self, name: str) -> bool:
        """Counts the input; False (and a skipped row) when its name was seen before."""
        if len(self.images) >= self.limits.max_images:
            raise BatchRefused(
                "too-many-images", f"a batch holds at most {self.limits.max_images} files"
            )
        if name in self.names:
            self.skip(name, "duplicate_name", "an earlier file of the batch has this name")
            return False
        self.names.add(name)
        return True

    def add_file(self, name: str, data: bytes, inside_archive: bool) -> None:
        """A counted input's bytes: stored and queued, or refused with a reason."""
        self.total_bytes += len(data)
        if self.total_bytes > self.limits.max_total_bytes:
            raise BatchRefused(
                "batch-too-large",
                f"the batch's files exceed {self.limits.max_total_bytes // 2**20} MiB",
            )
        if inside_archive and _is_archive(data):
            self.skip(name, "nested_archive", "archives inside an archive are not opened")
            return
        try:
            if not data:
                raise ImageRejected(RejectCode.EMPTY, "the file is empty")
            sniff_format(data)
        except ImageRejected as error:
            self._row(name, ImageState.FAILED, error.code, error.detail)
            return
        position = len(self.images)
        (self.folder / _file_name(position)).write_bytes(data)
        digest = hashlib.sha256(data).hexdigest()
        self.images.append(NewImage(position, name, ImageState.QUEUED, digest))

    def add_upload(self, name: str, stream: BinaryIO) -> None:
        head = stream.read(len(ZIP_MAGIC[0]))
        stream.seek(0)
        if head.startswith(ZIP_MAGIC):
            self.add_archive(name, stream)
            return
        if not self._count(name):
            return
        data = stream.read(self.limits.max_member_bytes + 1)
        if len(data) > self.limits.max_member_bytes:
            cap = self.limits.max_member_bytes // 2**20
            self.skip(name, "too_large_bytes", f"the file exceeds {cap} MiB")
            return
        self.add_file(name, data, inside_archive=False)

    def add_archive(self, name: str, stream: BinaryIO) -> None:
        try:
            archive = zipfile.ZipFile(stream)
        except (zipfile.BadZipFile, OSError) as error:
            if self._count(name):
                self.skip(name, "corrupt_archive", f"the zip archive cannot be read: {error}")
            return
        with archive:
            for member in archive.infolist():
                if not member.is_dir():
                    self.add_member(archive, member)

    def add_member(self, archive: zipfile.ZipFile, member: zipfile.ZipInfo) -> None:
        name = member.filename
        unsafe = _unsafe_name(name)
        kind = stat.S_IFMT(member.external_attr >> 16)  # 0: the archiver did not say
        if not self._count(name):
            return
        if unsafe is not None:
            self.skip(name, *unsafe)
        elif kind == stat.S_IFLNK:
            self.skip(name, "symlink", "the archive member is a symbolic link")
        elif kind not in (0, stat.S_IFREG):
            self.skip(name, "not_a_file", "the archive member is not a regular file")
        elif member.flag_bits & 0x1:
            self.skip(name, "encrypted", "the archive member is encrypted")
        elif member.file_size > self.limits.max_member_bytes:
            cap = self.limits.max_member_bytes // 2**20
            self.skip(name, "too_large_bytes", f"the member exceeds {cap} MiB uncompressed")
        elif member.file_size > self.limits.max_compression_ratio * max(member.compress_size, 1):
            ratio = self.limits.max_compression_ratio
            self.skip(name, "compression_ratio", f"the member expands more than {ratio:g}x")
        else:
            try:
                # zipfile stops at the declared size, so the caps above bound what is read.
                data = archive.read(member)
            except (zipfile.BadZipFile, NotImplementedError, OSError) as error:
                self.skip(name, "corrupt_archive", f"the member cannot be read: {error}")
                return
            self.add_file(name, data, inside_archive=True)


def admit(uploads: list[tuple[str, BinaryIO]], folder: Path, limits: Limits) -> list[NewImage]:
    """Store the images of `uploads` (name, stream) under `folder`; one row per input."""
    folder.mkdir(parents=True, exist_ok=True)
    admitter = _Admitter(folder, limits)
    for name, stream in uploads:
        admitter.add_upload(name, stream)
    return admitter.images
