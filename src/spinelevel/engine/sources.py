"""Where a file's bytes live: a plain file, a member of a zip or tar archive read in place, or an
instance on a DICOMweb server.

Archive members are never extracted to disk and their names are never used as paths: a member is
addressed by the archive path plus its name (zip) or byte offset (tar). A DICOMweb instance is
addressed by the service's base URL (never with credentials) plus
``studies/<uid>/series/<uid>/instances/<uid>``, so its label is its WADO-RS URL; it is retrieved
with the connection settings it carries (engine/dicomweb.py), in whichever process reads it.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import threading
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from spinelevel.engine.dicomweb import DicomwebConnection

__all__ = ["Source", "read_source", "tar_compression"]

SourceKind = Literal["file", "zip", "tar", "dicomweb"]


@dataclass(frozen=True, slots=True)
class Source:
    """The address of one input file."""

    # Filesystem path of the file, or of the archive that holds it; dicomweb: the service's base URL.
    path: str
    # "file", "zip", "tar" or "dicomweb".
    kind: SourceKind = "file"
    # Member name inside the archive (informational for tar; the key for zip); dicomweb:
    # "studies/<uid>/series/<uid>/instances/<uid>".
    member: str | None = None
    # Tar only: byte offset of the member's data in the uncompressed tar stream.
    offset: int = 0
    # Tar only: member size in bytes.
    size: int = 0
    # dicomweb only: how to reach the server (timeouts, CA file, retries; no credentials).
    remote: DicomwebConnection | None = None

    @property
    def label(self) -> str:
        """How the file is named in outputs: the path, ``archive::member``, or the WADO-RS URL."""
        if self.kind == "dicomweb":
            return f"{self.path}/{self.member}"
        return self.path if self.member is None else f"{self.path}::{self.member}"


def tar_compression(path: str) -> str:
    """'gz', 'bz2', 'xz' or '' for a tar archive, sniffed from its first bytes."""
    with open(path, "rb") as fh:
        magic = fh.read(6)
    if magic[:2] == b"\x1f\x8b":
        return "gz"
    if magic[:3] == b"BZh":
        return "bz2"
    if magic == b"\xfd7zXZ\x00":
        return "xz"
    return ""


class _HandleCache:
    """A few open archive handles per process, so reading many members does not reopen them.

    Compressed tar streams only seek forward cheaply; callers read members in offset order.
    """

    def __init__(self, capacity: int = 8) -> None:
        self._capacity = capacity
        self._handles: OrderedDict[tuple[str, str], object] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str], opener):  # noqa: ANN001 - internal
        with self._lock:
            handle = self._handles.pop(key, None)
            if handle is None:
                handle = opener()
            self._handles[key] = handle
            while len(self._handles) > self._capacity:
                _, old = self._handles.popitem(last=False)
                old.close()
            return handle

    def drop(self, key: tuple[str, str]) -> None:
        with self._lock:
            handle = self._handles.pop(key, None)
        if handle is not None:
            handle.close()


# Open archive handles of this process (a cache, not a setting).
_HANDLES = _HandleCache()


def _open_tar_stream(path: str) -> IO[bytes]:
    comp = tar_compression(path)
    if comp == "gz":
        return gzip.open(path, "rb")
    if comp == "bz2":
        return bz2.open(path, "rb")
    if comp == "xz":
        return lzma.open(path, "rb")
    return open(path, "rb")


def read_source(src: Source, max_bytes: int) -> bytes:
    """All bytes of one input file.

    Raises:
        OSError: unreadable, or larger than ``max_bytes``.
        RemoteReadError: a DICOMweb instance could not be retrieved (after retries).
    """
    if src.kind == "dicomweb":
        from spinelevel.engine.dicomweb import read_instance

        return read_instance(src, max_bytes)
    if src.kind == "file":
        with open(src.path, "rb") as fh:
            # read() sizes its buffer by the file (read(max_bytes + 1) would allocate the limit, 2 GiB
            # by default, for every slice); the limit is checked on the size first and the bytes after
            if os.fstat(fh.fileno()).st_size > max_bytes:
                raise OSError(f"file is over the {max_bytes}-byte limit")
            data = fh.read()
    elif src.kind == "zip":
        assert src.member is not None
        key = (src.path, "zip")
        zf: zipfile.ZipFile = _HANDLES.get(key, lambda: zipfile.ZipFile(src.path))
        info = zf.getinfo(src.member)
        if info.file_size > max_bytes:
            raise OSError(f"member is {info.file_size} bytes, over the {max_bytes}-byte limit")
        with zf.open(info) as fh:
            data = fh.read(max_bytes + 1)
    else:
        if src.size > max_bytes:
            raise OSError(f"member is {src.size} bytes, over the {max_bytes}-byte limit")
        key = (src.path, "tar")
        fh = _HANDLES.get(key, lambda: _open_tar_stream(src.path))
        try:
            fh.seek(src.offset)
            data = fh.read(src.size)
        except Exception:
            _HANDLES.drop(key)
            raise
        if len(data) != src.size:
            raise OSError(f"archive ends inside the member ({len(data)} of {src.size} bytes)")
    if len(data) > max_bytes:
        raise OSError(f"file is over the {max_bytes}-byte limit")
    return data
