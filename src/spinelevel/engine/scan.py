"""Scan: walk folders, zip and tar archives and read DICOM headers only.

Files are recognised by content (the ``DICM`` marker, zip and tar signatures, or a forced parse that
finds DICOM identifiers), never by name or extension. Pixel data is not read here. Only the tags the
engine needs are copied out of each header, so no patient identity travels further.
"""

from __future__ import annotations

import logging
import math
import os
import stat
import tarfile
import warnings
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from spinelevel.engine.sources import Source

__all__ = ["ScanOptions", "FileHeader", "SkippedFile", "scan_paths"]

log = logging.getLogger(__name__)

_DICOMDIR_UID = "1.2.840.10008.1.3.10"


@dataclass(frozen=True)
class ScanOptions:
    """Limits that keep a hostile archive from exhausting the machine."""

    # Largest single file or archive member read, in bytes.
    max_file_bytes: int = 2 << 30
    # Members whose uncompressed/compressed size ratio exceeds this are treated as zip bombs.
    max_compression_ratio: float = 1000.0
    # Most members read from one archive.
    max_archive_members: int = 5_000_000
    # DICOM keywords copied into the series table on request (--keep-phi); none by default.
    keep_tags: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class FileHeader:
    """The header facts of one DICOM file that the engine uses (no patient data)."""

    # Where the file is.
    source: Source
    # StudyInstanceUID ("" when absent).
    study_uid: str
    # SeriesInstanceUID.
    series_uid: str
    # SOPInstanceUID.
    sop_uid: str
    # SOPClassUID (from the dataset, else the file meta).
    sop_class_uid: str
    # Modality ("" when absent).
    modality: str
    # ImageType values, upper case.
    image_type: tuple[str, ...]
    # Transfer syntax UID of the file ("" when unknown).
    transfer_syntax: str
    # ImagePositionPatient (x, y, z) in mm, None when absent or malformed.
    position: tuple[float, float, float] | None
    # ImageOrientationPatient (row xyz, column xyz), None when absent or malformed.
    orientation: tuple[float, float, float, float, float, float] | None
    # PixelSpacing (row spacing, column spacing) in mm, None when absent or malformed.
    pixel_spacing: tuple[float, float] | None
    # Rows and Columns (0 when absent).
    rows: int
    columns: int
    # SliceThickness in mm, None when absent.
    slice_thickness: float | None
    # NumberOfFrames (1 when absent).
    frames: int
    # What was wrong with the geometry tags, "" when they are usable.
    geometry_problem: str
    # (keyword, value) of the tags the user asked to keep (ScanOptions.keep_tags).
    kept: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class SkippedFile:
    """An input file that is not part of any processed series, and why."""

    source: Source
    reason: str


def scan_paths(paths: Iterable[Path | str], options: ScanOptions = ScanOptions()) -> Iterator[FileHeader | SkippedFile]:
    """Yield a header or a skip record for every file found under ``paths``.

    Raises:
        InputError: a path given by the user does not exist.
    """
    from pydicom.datadict import tag_for_keyword

    from spinelevel.errors import InputError

    unknown = [kw for kw in options.keep_tags if tag_for_keyword(kw) is None]
    if unknown:
        raise InputError(f"--keep-phi {', '.join(unknown)}: not a DICOM keyword (for example PatientID, AccessionNumber)")
    for raw in paths:
        # Absolute, so that sources (and resume keys) do not depend on the working directory.
        path = Path(raw).absolute()
        if not os.path.lexists(path):
            raise InputError(f"{path}: no such file or directory")
        if path.is_dir():
            yield from _walk_dir(path, options)
        else:
            yield from _scan_file(path, options)


def _walk_dir(root: Path, options: ScanOptions) -> Iterator[FileHeader | SkippedFile]:
    # Directory symlinks are not followed, so a symlink loop cannot trap the walk.
    stack = [str(root)]
    while stack:
        current = stack.pop()
        try:
            entries = sorted(os.scandir(current), key=lambda e: e.name)
        except OSError as exc:
            yield SkippedFile(Source(current), f"cannot list directory: {_os_reason(exc)}")
            continue
        subdirs = []
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    subdirs.append(entry.path)
                elif entry.is_symlink() and entry.is_dir():
                    yield SkippedFile(Source(entry.path), "symbolic link to a directory (not followed)")
                elif entry.is_file():
                    yield from _scan_file(Path(entry.path), options)
                elif entry.is_symlink():
                    yield SkippedFile(Source(entry.path), "broken symbolic link")
                else:
                    yield SkippedFile(Source(entry.path), "not a regular file")
            except OSError as exc:
                yield SkippedFile(Source(entry.path), f"cannot read: {_os_reason(exc)}")
        stack.extend(reversed(subdirs))


def _os_reason(exc: OSError) -> str:
    return exc.strerror.lower() if exc.strerror else type(exc).__name__


def _scan_file(path: Path, options: ScanOptions) -> Iterator[FileHeader | SkippedFile]:
    src = Source(str(path))
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):
            yield SkippedFile(src, "not a regular file")
            return
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError as exc:
        yield SkippedFile(src, f"cannot read: {_os_reason(exc)}")
        return
    if not head:
        yield SkippedFile(src, "empty file")
        return
    if head[128:132] == b"DICM":
        if st.st_size > options.max_file_bytes:
            yield SkippedFile(src, f"file is {st.st_size} bytes, over the {options.max_file_bytes}-byte limit")
            return
        yield _read_header_path(src, options.keep_tags)
        return
    if _is_zip(path):
        yield from _scan_zip(path, options)
        return
    if _is_tar(path):
        yield from _scan_tar(path, options)
        return
    if st.st_size > options.max_file_bytes:
        yield SkippedFile(src, "not a DICOM file (no DICM marker) and too large to probe")
        return
    yield _read_header_path(src, options.keep_tags)


def _is_zip(path: Path) -> bool:
    try:
        return zipfile.is_zipfile(path)
    except OSError:
        return False


def _is_tar(path: Path) -> bool:
    try:
        return tarfile.is_tarfile(path)
    except Exception:  # is_tarfile can raise on truncated compressed streams
        return False


def _looks_like_archive(head: bytes) -> bool:
    return head[:4] == b"PK\x03\x04" or head[:2] == b"\x1f\x8b" or head[257:262] == b"ustar"


def _scan_zip(path: Path, options: ScanOptions) -> Iterator[FileHeader | SkippedFile]:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        yield SkippedFile(Source(str(path)), f"unreadable zip archive ({exc})")
        return
    with zf:
        infos = zf.infolist()
        for i, info in enumerate(infos):
            if info.is_dir():
                continue
            src = Source(str(path), "zip", info.filename)
            if i >= options.max_archive_members:
                yield SkippedFile(src, f"archive has more than {options.max_archive_members} members")
                continue
            if info.file_size > options.max_file_bytes:
                yield SkippedFile(src, f"member is {info.file_size} bytes, over the {options.max_file_bytes}-byte limit")
                continue
            if info.compress_size and info.file_size / info.compress_size > options.max_compression_ratio and info.file_size > (1 << 20):
                yield SkippedFile(src, f"compression ratio {info.file_size / info.compress_size:.0f}:1 looks like a zip bomb")
                continue
            try:
                with zf.open(info) as fh:
                    yield _read_header_stream(src, fh, options.keep_tags)
            except Exception as exc:  # corrupt member, bad CRC, encrypted, unsupported method
                yield SkippedFile(src, f"unreadable archive member ({type(exc).__name__}: {exc})")


def _scan_tar(path: Path, options: ScanOptions) -> Iterator[FileHeader | SkippedFile]:
    import io

    try:
        tf = tarfile.open(path, "r:*")
    except (tarfile.TarError, OSError, EOFError) as exc:
        yield SkippedFile(Source(str(path)), f"unreadable tar archive ({exc})")
        return
    count = 0
    with tf:
        while True:
            try:
                member = tf.next()
            except (tarfile.TarError, OSError, EOFError) as exc:
                yield SkippedFile(Source(str(path)), f"tar archive is damaged after {count} members ({exc})")
                return
            if member is None:
                return
            count += 1
            # tarfile keeps every TarInfo it has seen; drop them so memory stays flat.
            tf.members = []
            src = Source(str(path), "tar", member.name, member.offset_data, member.size)
            if member.isdir():
                continue
            if not member.isfile():
                yield SkippedFile(src, "archive member is a link or special file (not followed)")
                continue
            if count > options.max_archive_members:
                yield SkippedFile(src, f"archive has more than {options.max_archive_members} members")
                continue
            if member.size > options.max_file_bytes:
                yield SkippedFile(src, f"member is {member.size} bytes, over the {options.max_file_bytes}-byte limit")
                continue
            try:
                fh = tf.extractfile(member)
                assert fh is not None
                data = fh.read(member.size)
            except (tarfile.TarError, OSError, EOFError) as exc:
                yield SkippedFile(src, f"unreadable archive member ({exc})")
                continue
            yield _read_header_stream(src, io.BytesIO(data), options.keep_tags)


def _read_header_path(src: Source, keep: tuple[str, ...] = ()) -> FileHeader | SkippedFile:
    try:
        with open(src.path, "rb") as fh:
            return _read_header_stream(src, fh, keep)
    except OSError as exc:
        return SkippedFile(src, f"cannot read: {_os_reason(exc)}")


def _read_header_stream(src: Source, fh: IO[bytes], keep: tuple[str, ...] = ()) -> FileHeader | SkippedFile:
    start = fh.tell()
    head = fh.read(262)
    fh.seek(start)
    if not head:
        return SkippedFile(src, "empty file")
    if head[128:132] != b"DICM" and _looks_like_archive(head):
        if src.kind == "file":
            return SkippedFile(src, "compressed file that is not a zip or tar archive (decompress it first)")
        return SkippedFile(src, "nested archive inside an archive (not opened)")
    # pydicom warns about odd values and quotes them: that text may hold patient data.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _parse_header(src, fh, start, keep)


def _parse_header(src: Source, fh: IO[bytes], start: int, keep: tuple[str, ...]) -> FileHeader | SkippedFile:
    import pydicom
    from pydicom.errors import InvalidDicomError

    forced = False
    try:
        ds = pydicom.dcmread(fh, stop_before_pixels=True)
    except InvalidDicomError:
        fh.seek(start)
        forced = True
        try:
            ds = pydicom.dcmread(fh, stop_before_pixels=True, force=True)
        except Exception:
            return SkippedFile(src, "not a DICOM file")
    except Exception as exc:
        return SkippedFile(src, f"DICOM header is unreadable ({type(exc).__name__})")
    try:
        return _header_from_dataset(src, ds, forced, keep)
    except Exception as exc:  # a malformed element surfaces only when accessed
        reason = "not a DICOM file" if forced else f"DICOM header is unreadable ({type(exc).__name__})"
        return SkippedFile(src, reason)


def _text(ds, keyword: str) -> str:  # noqa: ANN001 - pydicom Dataset
    value = ds.get(keyword, "")
    return str(value).strip() if value is not None else ""


def _floats(ds, keyword: str, n: int) -> tuple[tuple[float, ...] | None, str]:  # noqa: ANN001
    """A numeric multi-value tag as floats, or None with what is wrong (empty if merely absent)."""
    from pydicom.multival import MultiValue

    if keyword not in ds:
        return None, ""
    try:
        value = ds[keyword].value
        items = list(value) if isinstance(value, (list, tuple, MultiValue)) else [value]
        values = [float(v) for v in items]
    except Exception:
        return None, f"{keyword} is not numeric"
    if len(values) != n:
        return None, f"{keyword} has {len(values)} values, expected {n}"
    if not all(math.isfinite(v) for v in values):
        return None, f"{keyword} holds NaN or infinite values"
    return tuple(values), ""


def _header_from_dataset(src: Source, ds, forced: bool, keep: tuple[str, ...] = ()) -> FileHeader | SkippedFile:  # noqa: ANN001
    meta = getattr(ds, "file_meta", None)
    sop_class = _text(ds, "SOPClassUID") or (_text(meta, "MediaStorageSOPClassUID") if meta else "")
    if sop_class == _DICOMDIR_UID or "DirectoryRecordSequence" in ds:
        return SkippedFile(src, "DICOMDIR (media directory), not an image")
    sop_uid = _text(ds, "SOPInstanceUID")
    series_uid = _text(ds, "SeriesInstanceUID")
    if forced and not (sop_uid and (sop_class or series_uid)):
        return SkippedFile(src, "not a DICOM file")
    if not sop_uid:
        return SkippedFile(src, "DICOM file without SOPInstanceUID")
    if not series_uid:
        return SkippedFile(src, "DICOM file without SeriesInstanceUID")
    tsyntax = _text(meta, "TransferSyntaxUID") if meta is not None else ""
    problems = []
    position, p = _floats(ds, "ImagePositionPatient", 3)
    if p:
        problems.append(p)
    orientation, p = _floats(ds, "ImageOrientationPatient", 6)
    if p:
        problems.append(p)
    spacing, p = _floats(ds, "PixelSpacing", 2)
    if p:
        problems.append(p)
    elif spacing is not None and min(spacing) <= 0:
        problems.append(f"PixelSpacing {list(spacing)} is not positive")
        spacing = None
    if orientation is not None:
        row, col = orientation[:3], orientation[3:]
        nr = math.sqrt(sum(v * v for v in row))
        nc = math.sqrt(sum(v * v for v in col))
        dot = sum(a * b for a, b in zip(row, col))
        if nr < 0.5 or nc < 0.5 or abs(dot) > 0.05 * nr * nc:
            problems.append("ImageOrientationPatient is not two orthogonal directions")
            orientation = None
    thickness, _ = _floats(ds, "SliceThickness", 1)
    image_type = ds.get("ImageType", [])
    if isinstance(image_type, str):
        image_type = image_type.split("\\")
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        frames = 1
    try:
        rows = int(ds.get("Rows", 0) or 0)
        columns = int(ds.get("Columns", 0) or 0)
    except (TypeError, ValueError):
        rows = columns = 0
    return FileHeader(
        source=src,
        study_uid=_text(ds, "StudyInstanceUID"),
        series_uid=series_uid,
        sop_uid=sop_uid,
        sop_class_uid=sop_class,
        modality=_text(ds, "Modality").upper(),
        image_type=tuple(str(v).strip().upper() for v in image_type),
        transfer_syntax=tsyntax,
        position=position,  # type: ignore[arg-type]
        orientation=orientation,  # type: ignore[arg-type]
        pixel_spacing=spacing,  # type: ignore[arg-type]
        rows=rows,
        columns=columns,
        slice_thickness=thickness[0] if thickness else None,
        frames=frames,
        geometry_problem="; ".join(problems),
        kept=tuple((kw, _text(ds, kw)) for kw in keep),
    )
