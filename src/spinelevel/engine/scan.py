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
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

from spinelevel.engine.sources import Source

if TYPE_CHECKING:
    from spinelevel.engine.native import NativePixels

__all__ = ["ScanOptions", "FileHeader", "SkippedFile", "scan_paths", "scan_batch"]

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
    # 1-based frame number when this header is one frame of a multi-frame CT file, else None.
    frame: int | None = None
    # Findings about the identity of the file: derived_series_uid, derived_study_uid.
    flags: tuple[str, ...] = ()
    # BitsStored (0 when absent); the duplicate rule prefers more bits.
    bits_stored: int = 0
    # InstanceNumber, None when absent or malformed.
    instance_number: int | None = None
    # The pixels went through lossy compression (lossy transfer syntax or LossyImageCompression 01).
    lossy: bool = False
    # Where the pixels of an uncompressed single-frame file are (engine.native), else None.
    native: NativePixels | None = None

    @property
    def slice_id(self) -> str:
        """The identity of the slice: the SOP instance UID, plus ``#frame`` for a frame."""
        return self.sop_uid if self.frame is None else f"{self.sop_uid}#{self.frame}"


@dataclass(frozen=True, slots=True)
class SkippedFile:
    """An input file that is not part of any processed series, and why."""

    source: Source
    reason: str
    # Who the file is when its header was read: the SOP instance UID (plus "#frame" for one frame of
    # a multi-frame file); "" when unknown. Resume keys use it, so they do not depend on where the
    # file was read from (a folder, an archive or a DICOMweb server).
    identity: str = ""


def scan_paths(paths: Iterable[Path | str], options: ScanOptions = ScanOptions(), read_batches: Callable[[Iterator[list]], Iterator[list]] | None = None) -> Iterator[FileHeader | SkippedFile]:
    """Yield a header or a skip record for every file found under ``paths``, in walk order.

    Args:
        read_batches: reads the headers of batches of files elsewhere (the decode pool's worker
            processes, see :func:`scan_batch`): called with an iterator of batches, it yields each
            batch's :func:`scan_batch` result in the same order. None reads them here.

    Raises:
        InputError: a path given by the user does not exist.
    """
    from pydicom.datadict import tag_for_keyword

    from spinelevel.errors import InputError

    unknown = [kw for kw in options.keep_tags if tag_for_keyword(kw) is None]
    if unknown:
        raise InputError(f"--keep-phi {', '.join(unknown)}: not a DICOM keyword (for example PatientID, AccessionNumber)")
    roots = []
    for raw in paths:
        # Absolute, so that sources (and resume keys) do not depend on the working directory.
        path = Path(raw).absolute()
        if not os.path.lexists(path):
            raise InputError(f"{path}: no such file or directory")
        roots.append(path)
    batches = _batches(roots)
    results = read_batches(batches) if read_batches is not None else (scan_batch(b, options) for b in batches)
    for items in results:
        yield from items


# Files per batch when headers are read in worker processes (a few ms of work per batch).
BATCH_FILES = 32


def _batches(roots: list[Path]) -> Iterator[list]:
    """The walk as batches of entries: a file path (str) to read, or a SkippedFile found by the walk."""
    batch: list = []
    for root in roots:
        for entry in _walk_dir(root) if root.is_dir() else (str(root),):
            batch.append(entry)
            if len(batch) >= BATCH_FILES:
                yield batch
                batch = []
    if batch:
        yield batch


def scan_batch(entries: list, options: ScanOptions) -> list[FileHeader | SkippedFile]:
    """Headers (or skip records) of a batch of :func:`_batches` entries, in order."""
    out: list[FileHeader | SkippedFile] = []
    for entry in entries:
        if isinstance(entry, SkippedFile):
            out.append(entry)
            continue
        try:
            out.extend(_scan_file(Path(entry), options))
        except OSError as exc:
            out.append(SkippedFile(Source(entry), f"cannot read: {_os_reason(exc)}"))
    return out


def _walk_dir(root: Path) -> Iterator[str | SkippedFile]:
    """Regular files under ``root`` (paths) and what the walk cannot use (skip records), sorted."""
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
                    yield entry.path
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
        yield from _read_header_path(src, options.keep_tags)
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
    yield from _read_header_path(src, options.keep_tags)


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
                    found = _read_header_stream(src, fh, options.keep_tags)
                yield from found
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
            yield from _read_header_stream(src, io.BytesIO(data), options.keep_tags)


def _read_header_path(src: Source, keep: tuple[str, ...] = ()) -> list[FileHeader | SkippedFile]:
    try:
        with open(src.path, "rb") as fh:
            return _read_header_stream(src, fh, keep)
    except OSError as exc:
        return [SkippedFile(src, f"cannot read: {_os_reason(exc)}")]


def _read_header_stream(src: Source, fh: IO[bytes], keep: tuple[str, ...] = ()) -> list[FileHeader | SkippedFile]:
    """One header per slice of the file (one per frame of a multi-frame CT file), or a skip record."""
    start = fh.tell()
    head = fh.read(262)
    fh.seek(start)
    if not head:
        return [SkippedFile(src, "empty file")]
    if head[128:132] != b"DICM" and _looks_like_archive(head):
        if src.kind == "file":
            return [SkippedFile(src, "compressed file that is not a zip or tar archive (decompress it first)")]
        return [SkippedFile(src, "nested archive inside an archive (not opened)")]
    # pydicom warns about odd values and quotes them: that text may hold patient data.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _parse_header(src, fh, start, keep)


def _parse_header(src: Source, fh: IO[bytes], start: int, keep: tuple[str, ...]) -> list[FileHeader | SkippedFile]:
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
            return [SkippedFile(src, "not a DICOM file")]
    except Exception as exc:
        return [SkippedFile(src, f"DICOM header is unreadable ({type(exc).__name__})")]
    try:
        # the scan stopped where PixelData starts: note it for native files (engine.native)
        here = fh.tell()
        element = fh.read(12)
    except Exception:
        here, element = start, b""
    try:
        return _headers_from_dataset(src, ds, forced, keep, (element, here - start))
    except Exception as exc:  # a malformed element surfaces only when accessed
        reason = "not a DICOM file" if forced else f"DICOM header is unreadable ({type(exc).__name__})"
        return [SkippedFile(src, reason)]


def _text(ds, keyword: str) -> str:  # noqa: ANN001 - pydicom Dataset
    value = ds.get(keyword, "")
    return str(value).strip() if value is not None else ""


def _floats(ds, keyword: str, n: int, value=None) -> tuple[tuple[float, ...] | None, str]:  # noqa: ANN001
    """A numeric multi-value tag as floats, or None with what is wrong (empty if merely absent).

    ``value``: the element's value when it comes from elsewhere (a functional group item).
    """
    from pydicom.multival import MultiValue

    if value is None:
        if keyword not in ds:
            return None, ""
        try:
            value = ds[keyword].value
        except Exception:
            return None, f"{keyword} is not numeric"
    try:
        items = list(value) if isinstance(value, (list, tuple, MultiValue)) else [value]
        values = [float(v) for v in items]
    except Exception:
        return None, f"{keyword} is not numeric"
    if len(values) != n:
        return None, f"{keyword} has {len(values)} values, expected {n}"
    if not all(math.isfinite(v) for v in values):
        return None, f"{keyword} holds NaN or infinite values"
    return tuple(values), ""


# Transfer syntaxes whose compression loses information (JPEG lossy processes, JPEG-LS near-lossless,
# JPEG 2000 and HTJ2K that may be lossy). 1.2.840.10008.1.2.4.91 counts as lossy unless the file
# says LossyImageCompression 00.
_LOSSY_SYNTAXES = {
    "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.52", "1.2.840.10008.1.2.4.53",
    "1.2.840.10008.1.2.4.54", "1.2.840.10008.1.2.4.55", "1.2.840.10008.1.2.4.56", "1.2.840.10008.1.2.4.59",
    "1.2.840.10008.1.2.4.60", "1.2.840.10008.1.2.4.61", "1.2.840.10008.1.2.4.62", "1.2.840.10008.1.2.4.63",
    "1.2.840.10008.1.2.4.64", "1.2.840.10008.1.2.4.81", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.93",
    "1.2.840.10008.1.2.4.203",
}


def _is_lossy(ds, tsyntax: str) -> bool:  # noqa: ANN001
    flag = _text(ds, "LossyImageCompression")
    if flag == "01":
        return True
    if tsyntax == "1.2.840.10008.1.2.4.91" and flag == "00":
        return False
    return tsyntax in _LOSSY_SYNTAXES


def _int_or(ds, keyword: str, default):  # noqa: ANN001, ANN202
    try:
        value = ds.get(keyword, None)
        return default if value in (None, "") else int(value)
    except (TypeError, ValueError):
        return default


def _check_geometry(position, orientation, spacing, problems: list[str]):  # noqa: ANN001, ANN202
    if spacing is not None and min(spacing) <= 0:
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
    return position, orientation, spacing


def _group_floats(ds, index: int, macro: str, keyword: str, n: int, problems: list[str]):  # noqa: ANN001, ANN202
    from spinelevel.engine.frames import frame_value

    value = frame_value(ds, index, macro, keyword)
    if value is None or value == "":
        return None
    values, problem = _floats(ds, keyword, n, value)
    if problem:
        problems.append(problem)
    return values


def _frame_geometry(ds, index: int):  # noqa: ANN001, ANN202
    """(position, orientation, spacing, thickness, problems) of frame ``index`` of a multi-frame CT."""
    problems: list[str] = []
    position = _group_floats(ds, index, "PlanePositionSequence", "ImagePositionPatient", 3, problems)
    orientation = _group_floats(ds, index, "PlaneOrientationSequence", "ImageOrientationPatient", 6, problems)
    spacing = _group_floats(ds, index, "PixelMeasuresSequence", "PixelSpacing", 2, problems)
    thickness = _group_floats(ds, index, "PixelMeasuresSequence", "SliceThickness", 1, [])
    position, orientation, spacing = _check_geometry(position, orientation, spacing, problems)
    return position, orientation, spacing, thickness, problems


def _headers_from_dataset(src: Source, ds, forced: bool, keep: tuple[str, ...] = (), pixels: tuple[bytes, int] = (b"", 0)) -> list[FileHeader | SkippedFile]:  # noqa: ANN001
    """``pixels``: the bytes where the parse stopped and their offset in the file (engine.native)."""
    from spinelevel.engine.frames import frame_count, is_multiframe_ct
    from spinelevel.engine.identity import detected_transfer_syntax, instance_uids, missing_identity

    sop_uid, sop_class = instance_uids(ds)
    if sop_class == _DICOMDIR_UID or "DirectoryRecordSequence" in ds:
        return [SkippedFile(src, "DICOMDIR (media directory), not an image")]
    series_uid = _text(ds, "SeriesInstanceUID")
    study_uid = _text(ds, "StudyInstanceUID")
    if forced and not (sop_uid and (sop_class or series_uid)):
        # A forced parse "succeeds" on many non-DICOM files; only an image header with no identity
        # (e.g. ACR-NEMA 2.0, which predates UIDs) is named as such.
        if not sop_uid and all(kw in ds for kw in ("Rows", "Columns")) and ("Modality" in ds or "ImagePositionPatient" in ds):
            return [SkippedFile(src, missing_identity(ds) + "; an ACR-NEMA or pre-DICOM export? (no file meta, no UIDs)")]
        return [SkippedFile(src, "not a DICOM file")]
    if not sop_uid:
        return [SkippedFile(src, missing_identity(ds))]
    tsyntax = detected_transfer_syntax(ds)
    image_type = ds.get("ImageType", [])
    if isinstance(image_type, str):
        image_type = image_type.split("\\")
    frames = frame_count(ds)
    rows = _int_or(ds, "Rows", 0)
    columns = _int_or(ds, "Columns", 0)
    base = dict(
        source=src,
        sop_uid=sop_uid,
        sop_class_uid=sop_class,
        modality=_text(ds, "Modality").upper(),
        image_type=tuple(str(v).strip().upper() for v in image_type),
        transfer_syntax=tsyntax,
        rows=rows,
        columns=columns,
        frames=frames,
        kept=tuple((kw, _text(ds, kw)) for kw in keep),
        bits_stored=_int_or(ds, "BitsStored", 0),
        instance_number=_int_or(ds, "InstanceNumber", None),
        lossy=_is_lossy(ds, tsyntax),
    )
    flags: list[str] = []
    if not study_uid:
        study_uid = derived_study_uid(ds, src)
        flags.append("derived_study_uid")

    if is_multiframe_ct(sop_class) and "PerFrameFunctionalGroupsSequence" in ds:
        out: list[FileHeader | SkippedFile] = []
        for index in range(frames):
            position, orientation, spacing, thickness, problems = _frame_geometry(ds, index)
            out.append(_with_series(ds, src, series_uid, study_uid, flags, base, position, orientation, spacing, thickness, problems, index + 1))
        return out

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
    position, orientation, spacing = _check_geometry(position, orientation, spacing, problems)
    thickness, _ = _floats(ds, "SliceThickness", 1)
    if frames == 1 and src.kind != "dicomweb":
        from spinelevel.engine.native import native_layout

        base["native"] = native_layout(ds, tsyntax, *pixels)
    return [_with_series(ds, src, series_uid, study_uid, flags, base, position, orientation, spacing, thickness, problems, None)]


def _with_series(ds, src: Source, series_uid: str, study_uid: str, flags: list[str], base: dict, position, orientation, spacing, thickness, problems: list[str], frame: int | None) -> FileHeader:  # noqa: ANN001
    flags = list(flags)
    if not series_uid:
        series_uid = derived_series_uid(ds, src, study_uid, orientation, spacing, base["rows"], base["columns"])
        flags.append("derived_series_uid")
    return FileHeader(
        study_uid=study_uid,
        series_uid=series_uid,
        position=position,
        orientation=orientation,
        pixel_spacing=spacing,
        slice_thickness=thickness[0] if thickness else None,
        geometry_problem="; ".join(problems),
        frame=frame,
        flags=tuple(flags),
        **base,
    )


def _folder_key(src: Source) -> str:
    """The folder of a file, or archive path plus the member's folder: series do not span folders."""
    if src.member is None:
        return os.path.dirname(src.path)
    return src.path + "::" + src.member.rpartition("/")[0]


def derived_study_uid(ds, src: Source) -> str:  # noqa: ANN001 - pydicom Dataset
    """The UID of a study whose StudyInstanceUID is empty.

    Key: the folder (or archive member's folder), StudyDate, StudyTime and StudyID. No patient data.
    """
    from spinelevel.engine.identity import derived_uid

    return derived_uid("study", (_folder_key(src), _text(ds, "StudyDate"), _text(ds, "StudyTime"), _text(ds, "StudyID")))


def derived_series_uid(ds, src: Source, study_uid: str, orientation, spacing, rows: int, columns: int) -> str:  # noqa: ANN001
    """The UID of a series whose SeriesInstanceUID is empty.

    Key: the study UID (given or derived), FrameOfReferenceUID, Modality, SOP class, SeriesNumber,
    AcquisitionNumber, ImageOrientationPatient and PixelSpacing (rounded to 1e-3), Rows x Columns and
    the folder or archive-member folder. Slices that share all of these are one series.
    """
    from spinelevel.engine.identity import derived_uid, instance_uids

    rounded = lambda v: None if v is None else tuple(round(x, 3) for x in v)  # noqa: E731
    return derived_uid(
        "series",
        (
            study_uid,
            _text(ds, "FrameOfReferenceUID"),
            _text(ds, "Modality").upper(),
            instance_uids(ds)[1],
            _text(ds, "SeriesNumber"),
            _text(ds, "AcquisitionNumber"),
            rounded(orientation),
            rounded(spacing),
            rows,
            columns,
            _folder_key(src),
        ),
    )
