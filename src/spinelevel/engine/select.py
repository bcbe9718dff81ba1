"""Select: group headers into series, keep axial CT image series, order their slices.

Slices are ordered by position along the slice normal (ImagePositionPatient projected on the normal
of ImageOrientationPatient), never by file name or InstanceNumber; slice 0 is the most superior one.
Everything that is not classified is recorded with a reason: whole series in ``skipped_series``,
single files in ``skipped_files``.
"""

from __future__ import annotations

import logging
import math
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, replace

import numpy as np

from spinelevel.engine.frames import MULTIFRAME_CT
from spinelevel.engine.identity import derived_uid
from spinelevel.engine.scan import FileHeader, SkippedFile
from spinelevel.engine.sources import Source

__all__ = ["SelectOptions", "SliceRef", "SeriesPlan", "SeriesSkip", "Selection", "select_series", "preference_rank"]

log = logging.getLogger(__name__)

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


@dataclass(frozen=True)
class SelectOptions:
    """Which series are classified."""

    # Series with fewer slices than this are skipped (too short to decode an order from).
    min_slices: int = 10
    # Series with more slices than this are skipped (protects memory on absurd inputs).
    max_slices: int = 5000
    # Slices with more pixels than this (Rows x Columns) are skipped.
    max_pixels: int = 4096 * 4096
    # A series whose slice normal is further than this from the patient z axis is not axial.
    max_axial_deviation_deg: float = 15.0
    # Stack direction this far from the slice normal is reported as gantry tilt.
    tilt_tolerance_deg: float = 1.0
    # Two slices closer than this along the normal share one position.
    duplicate_tolerance_mm: float = 0.01


@dataclass(frozen=True, slots=True)
class SliceRef:
    """One slice of a series plan."""

    # Where the file is.
    source: Source
    # SOPInstanceUID.
    sop_uid: str
    # Patient z of ImagePositionPatient, in mm.
    z_mm: float
    # Transfer syntax UID (for messages).
    transfer_syntax: str
    # 1-based frame number for a frame of a multi-frame CT file, None for a single-frame file.
    frame: int | None = None
    # Where the pixels of an uncompressed single-frame file are (engine.native.NativePixels), else None.
    native: object | None = None

    @property
    def slice_id(self) -> str:
        """The identity of the slice: the SOP instance UID, plus ``#frame`` for a frame."""
        return self.sop_uid if self.frame is None else f"{self.sop_uid}#{self.frame}"


@dataclass(frozen=True)
class SeriesPlan:
    """A series to classify, slices ordered superior to inferior."""

    study_uid: str
    series_uid: str
    # Slices, index 0 = most superior.
    slices: tuple[SliceRef, ...]
    # Median SliceThickness in mm (None when no file states it).
    slice_thickness_mm: float | None
    # Median distance between neighbouring slices along the normal, in mm.
    spacing_mm: float
    # Findings that do not stop classification (gantry_tilt, duplicate_positions, ...).
    flags: tuple[str, ...]
    # Files of this series that were left out (duplicates, inconsistent or broken geometry).
    dropped: tuple[SkippedFile, ...] = ()
    # Tags kept on request (--keep-phi), as (keyword, value).
    kept: tuple[tuple[str, str], ...] = ()
    # PixelSpacing (row mm, column mm) that every slice of the plan shares.
    pixel_spacing: tuple[float, float] | None = None


@dataclass(frozen=True)
class SeriesSkip:
    """A series that is not classified, and why."""

    study_uid: str
    series_uid: str
    reason: str
    # Images met in the series (single-frame files plus frames of multi-frame files).
    n_files: int
    # One skip record per file of the series.
    files: tuple[SkippedFile, ...] = ()
    # Tags kept on request (--keep-phi), as (keyword, value).
    kept: tuple[tuple[str, str], ...] = ()
    # 'skipped' (not classifiable, with the reason) or 'error' (selection itself failed).
    status: str = "skipped"
    # Findings about the series (derived_series_uid, derived_study_uid, ...).
    flags: tuple[str, ...] = ()


@dataclass(frozen=True)
class Selection:
    """The outcome of selection."""

    plans: tuple[SeriesPlan, ...]
    skipped_series: tuple[SeriesSkip, ...]
    # Files that belong to no series (not DICOM, unreadable, no SeriesInstanceUID, ...).
    skipped_files: tuple[SkippedFile, ...]


def select_series(items: Iterable[FileHeader | SkippedFile], options: SelectOptions = SelectOptions()) -> Selection:
    """Group scanned files by SeriesInstanceUID and decide, per series, whether to classify it."""
    skipped_files: list[SkippedFile] = []
    groups: dict[str, list[FileHeader]] = defaultdict(list)
    for item in items:
        if isinstance(item, SkippedFile):
            skipped_files.append(item)
        else:
            groups[item.series_uid].append(item)
    groups = _split_multiframe_twins(groups)
    plans: list[SeriesPlan] = []
    skipped_series: list[SeriesSkip] = []
    for series_uid in sorted(groups):
        try:
            plan, skip = _select_one(groups[series_uid], options)
        except Exception as exc:  # one odd series must not take the run down
            log.debug("selecting series %s failed", series_uid, exc_info=True)
            files = groups[series_uid]
            reason = f"unexpected error while selecting the series ({type(exc).__name__}: {exc})"
            plan, skip = None, SeriesSkip(
                Counter(f.study_uid for f in files).most_common(1)[0][0], series_uid, reason, len(files),
                _file_records(files, f"series failed: {reason}"), status="error", flags=_identity_flags(files),
            )
        if plan is not None:
            plans.append(plan)
        if skip is not None:
            skipped_series.append(skip)
    plans.sort(key=lambda p: (p.study_uid, p.series_uid))
    return Selection(tuple(plans), tuple(skipped_series), tuple(skipped_files))


def _split_multiframe_twins(groups: dict[str, list[FileHeader]]) -> dict[str, list[FileHeader]]:
    """A series UID shared by single-frame files and multi-frame files is two series.

    Archive converters sometimes keep the SeriesInstanceUID when they turn a single-frame series into
    Legacy Converted Enhanced CT; both copies in one archive would otherwise merge into one series
    with every slice twice. The multi-frame part gets a derived UID (flag ``derived_series_uid``).
    """
    out: dict[str, list[FileHeader]] = {}
    for uid, files in groups.items():
        single = [f for f in files if f.frame is None]
        multi = [f for f in files if f.frame is not None]
        if single and multi:
            twin = derived_uid("multiframe-twin", (uid,))
            out[uid] = single
            out[twin] = [replace(f, series_uid=twin, flags=tuple(sorted(set(f.flags) | {"derived_series_uid"}))) for f in multi]
        else:
            out[uid] = files
    return out


def _identity_flags(files: list[FileHeader]) -> tuple[str, ...]:
    return tuple(sorted({flag for f in files for flag in f.flags}))


def _label(f: FileHeader) -> str:
    return f.source.label if f.frame is None else f"{f.source.label} frame {f.frame}"


def _file_records(files: list[FileHeader], reason: str) -> tuple[SkippedFile, ...]:
    """One skip record per file (a multi-frame file once, however many of its frames)."""
    seen: dict[str, SkippedFile] = {}
    for f in files:
        seen.setdefault(f.source.label, SkippedFile(f.source, reason, f.sop_uid))
    return tuple(seen.values())


def preference_rank(f: FileHeader) -> tuple:
    """Which of two images of one slice to keep (smaller first).

    ORIGINAL before DERIVED, lossless before lossy compression, more BitsStored, lower
    InstanceNumber; then the SOP instance UID, frame and file name, so the choice is deterministic.
    """
    derived = bool(f.image_type) and f.image_type[0] == "DERIVED"
    number = f.instance_number if f.instance_number is not None else float("inf")
    return (derived, f.lossy, -f.bits_stored, number, f.sop_uid, f.frame or 0, f.source.label)


def _why_kept(kept: FileHeader, other: FileHeader) -> str:
    a, b = preference_rank(kept), preference_rank(other)
    if a[0] != b[0]:
        return "ORIGINAL image over DERIVED"
    if a[1] != b[1]:
        return "lossless over lossy compression"
    if a[2] != b[2]:
        return f"BitsStored {kept.bits_stored} over {other.bits_stored}"
    if a[3] != b[3]:
        return "lower InstanceNumber"
    return "same rank, first by SOP instance UID and name"


def _series_kind_problem(files: list[FileHeader]) -> str:
    """Why a whole series is not an axial CT image series, or ''."""
    modality = Counter(f.modality for f in files).most_common(1)[0][0]
    sop = Counter(f.sop_class_uid for f in files).most_common(1)[0][0]
    if sop.startswith("1.2.840.10008.5.1.4.1.1.88."):
        kind = "dose report" if sop in ("1.2.840.10008.5.1.4.1.1.88.67", "1.2.840.10008.5.1.4.1.1.88.68") else "structured report"
        return f"{kind} (SR), not an image"
    if sop.startswith("1.2.840.10008.5.1.4.1.1.481."):
        return "radiotherapy object (RT), not a CT image"
    if sop.startswith("1.2.840.10008.5.1.4.1.1.7"):
        return "secondary capture, not an original CT image"
    if sop in MULTIFRAME_CT and any(f.frame is None for f in files):
        return f"{MULTIFRAME_CT[sop]} file without Per-frame Functional Groups: its frames have no positions"
    if sop not in MULTIFRAME_CT and any(f.frames > 1 for f in files):
        return f"multi-frame image of SOP class {sop or 'missing'} is not an Enhanced or Legacy Converted Enhanced CT"
    if modality != "CT":
        return f"modality {modality or 'missing'} is not CT"
    if sop != CT_IMAGE_STORAGE and sop not in MULTIFRAME_CT:
        return f"SOP class {sop or 'missing'} is not CT Image Storage, Enhanced CT or Legacy Converted Enhanced CT"
    if any("LOCALIZER" in f.image_type for f in files):
        return "localizer (scout) images"
    return ""


def _plane(normal: np.ndarray, deviation: float) -> str:
    """What a non-axial slice normal means, in words."""
    ax = int(np.argmax(np.abs(normal)))
    if deviation > 75:
        return f"{'sagittal' if ax == 0 else 'coronal'} slices (normal {deviation:.0f} degrees from the patient z axis)"
    return f"slice normal is {deviation:.0f} degrees from the patient z axis (a tilted gantry or an oblique reconstruction)"


def _geometry_key(f: FileHeader) -> tuple:
    assert f.orientation is not None and f.pixel_spacing is not None
    return (
        tuple(round(v, 3) for v in f.orientation),
        tuple(round(v, 3) for v in f.pixel_spacing),
        f.rows,
        f.columns,
    )


def _difference(key: tuple, ref: tuple) -> str:
    if key[0] != ref[0]:
        return "orientation differs from the rest of the series"
    if key[1] != ref[1]:
        return f"pixel spacing {list(key[1])} differs from the rest of the series {list(ref[1])}"
    return f"image size {key[2]}x{key[3]} differs from the rest of the series {ref[2]}x{ref[3]}"


def _select_one(files: list[FileHeader], options: SelectOptions) -> tuple[SeriesPlan | None, SeriesSkip | None]:
    study_uid = Counter(f.study_uid for f in files).most_common(1)[0][0]
    series_uid = files[0].series_uid
    phi = Counter(f.kept for f in files).most_common(1)[0][0]
    identity = _identity_flags(files)
    dropped: list[SkippedFile] = []

    def skip_all(reason: str, members: list[FileHeader]) -> tuple[None, SeriesSkip]:
        dropped.extend(_file_records(members, f"series skipped: {reason}"))
        return None, SeriesSkip(study_uid, series_uid, reason, len(files), tuple(dropped), phi, flags=identity)

    def drop(f: FileHeader, reason: str) -> None:
        dropped.append(SkippedFile(f.source, reason if f.frame is None else f"frame {f.frame}: {reason}", f.slice_id))

    problem = _series_kind_problem(files)
    if problem:
        return skip_all(problem, files)

    # One image per slice identity: the same instance may sit in a folder and in an archive.
    by_id: dict[str, list[FileHeader]] = defaultdict(list)
    for f in files:
        by_id[f.slice_id].append(f)
    unique: list[FileHeader] = []
    for slice_id in sorted(by_id):
        copies = sorted(by_id[slice_id], key=preference_rank)
        unique.append(copies[0])
        for other in copies[1:]:
            drop(other, f"duplicate SOPInstanceUID (kept {_label(copies[0])}: {_why_kept(copies[0], other)})")

    usable: list[FileHeader] = []
    for f in unique:
        missing = [name for name, v in (("ImagePositionPatient", f.position), ("ImageOrientationPatient", f.orientation), ("PixelSpacing", f.pixel_spacing)) if v is None]
        if f.geometry_problem:
            drop(f, f"unusable geometry: {f.geometry_problem}")
        elif missing:
            drop(f, f"unusable geometry: missing {', '.join(missing)}")
        elif f.rows <= 0 or f.columns <= 0:
            drop(f, "missing Rows or Columns")
        elif f.rows * f.columns > options.max_pixels:
            drop(f, f"{f.rows}x{f.columns} pixels is over the limit of {options.max_pixels}")
        else:
            usable.append(f)
    if not usable:
        return None, SeriesSkip(study_uid, series_uid, f"no slice with usable geometry ({len(files)} images)", len(files), tuple(dropped), phi, flags=identity)

    # Slices must share orientation, spacing and size: keep the largest consistent group.
    by_key: dict[tuple, list[FileHeader]] = defaultdict(list)
    for f in usable:
        by_key[_geometry_key(f)].append(f)
    main_key = max(by_key, key=lambda k: (len(by_key[k]), k))
    flags: set[str] = set(identity)
    for key, members in by_key.items():
        if key != main_key:
            flags.add("dropped_inconsistent_slices")
            for f in members:
                drop(f, _difference(key, main_key))
    kept = by_key[main_key]

    orientation = np.asarray(kept[0].orientation, dtype=np.float64)
    row, col = orientation[:3], orientation[3:]
    normal = np.cross(row / np.linalg.norm(row), col / np.linalg.norm(col))
    normal /= np.linalg.norm(normal)
    deviation = math.degrees(math.acos(min(1.0, abs(float(normal[2])))))
    if deviation > options.max_axial_deviation_deg:
        return skip_all(f"not axial: {_plane(normal, deviation)} (limit {options.max_axial_deviation_deg:g} degrees)", kept)
    if deviation > options.tilt_tolerance_deg:
        flags.add("oblique")

    positions = np.asarray([f.position for f in kept], dtype=np.float64)
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    if positions[order[0], 2] < positions[order[-1], 2]:
        order = order[::-1]  # index 0 = most superior (largest patient z)
    ordered = [kept[i] for i in order]
    along = along[order]
    positions = positions[order]

    # Duplicate positions: of the images within the tolerance of one position, keep the preferred one
    # (ORIGINAL, lossless, more bits, lower InstanceNumber; preference_rank) and record the rest.
    keep_mask = np.zeros(len(ordered), dtype=bool)
    start = 0
    while start < len(ordered):
        end = start + 1
        while end < len(ordered) and abs(along[end] - along[end - 1]) < options.duplicate_tolerance_mm:
            end += 1
        cluster = list(range(start, end))
        best = min(cluster, key=lambda i: preference_rank(ordered[i]))
        keep_mask[best] = True
        for i in cluster:
            if i != best:
                flags.add("duplicate_positions")
                drop(ordered[i], f"duplicate slice position z={positions[i, 2]:.2f} mm (kept {_label(ordered[best])}: {_why_kept(ordered[best], ordered[i])})")
        start = end
    ordered = [f for f, k in zip(ordered, keep_mask) if k]
    along = along[keep_mask]
    positions = positions[keep_mask]

    n = len(ordered)
    if n < options.min_slices:
        what = f"{n} distinct slice position{'s' if n != 1 else ''}"
        if n != len(files):
            what += f" among {len(files)} images"
        return skip_all(f"{what}, fewer than --min-slices {options.min_slices}", ordered)
    if n > options.max_slices:
        return skip_all(f"{n} slices, more than the limit of {options.max_slices}", ordered)

    thicknesses = [f.slice_thickness for f in ordered if f.slice_thickness is not None and f.slice_thickness > 0]
    thickness = float(np.median(thicknesses)) if thicknesses else None
    gaps = np.abs(np.diff(along))
    if len(gaps):
        spacing = float(np.median(gaps))
        if gaps.max() > 1.5 * spacing + 0.01:
            flags.add("uneven_spacing")
    else:  # a single slice: its thickness stands for the spacing
        spacing = thickness or 0.0
    stack = positions[-1] - positions[0]
    stack_norm = float(np.linalg.norm(stack))
    if stack_norm > 0:
        tilt = math.degrees(math.acos(min(1.0, abs(float(stack @ normal)) / stack_norm)))
        if tilt > options.tilt_tolerance_deg:
            flags.add("gantry_tilt")

    slices = tuple(SliceRef(f.source, f.sop_uid, float(p[2]), f.transfer_syntax, f.frame, f.native) for f, p in zip(ordered, positions))
    plan = SeriesPlan(study_uid, series_uid, slices, thickness, spacing, tuple(sorted(flags)), tuple(dropped), phi, ordered[0].pixel_spacing)
    return plan, None
