"""Select: group headers into series, keep axial CT image series, order their slices.

Slices are ordered by position along the slice normal (ImagePositionPatient projected on the normal
of ImageOrientationPatient), never by file name or InstanceNumber; slice 0 is the most superior one.
Everything that is not classified is recorded with a reason: whole series in ``skipped_series``,
single files in ``skipped_files``.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from spinelevel.engine.scan import FileHeader, SkippedFile
from spinelevel.engine.sources import Source

__all__ = ["SelectOptions", "SliceRef", "SeriesPlan", "SeriesSkip", "Selection", "select_series"]

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
_MULTIFRAME_CT = {"1.2.840.10008.5.1.4.1.1.2.1": "enhanced CT", "1.2.840.10008.5.1.4.1.1.2.2": "legacy converted enhanced CT"}


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


@dataclass(frozen=True)
class SeriesSkip:
    """A series that is not classified, and why."""

    study_uid: str
    series_uid: str
    reason: str
    # Files met in the series.
    n_files: int
    # One skip record per file of the series.
    files: tuple[SkippedFile, ...] = ()
    # Tags kept on request (--keep-phi), as (keyword, value).
    kept: tuple[tuple[str, str], ...] = ()


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
    plans: list[SeriesPlan] = []
    skipped_series: list[SeriesSkip] = []
    for series_uid in sorted(groups):
        plan, skip = _select_one(groups[series_uid], options)
        if plan is not None:
            plans.append(plan)
        if skip is not None:
            skipped_series.append(skip)
    plans.sort(key=lambda p: (p.study_uid, p.series_uid))
    return Selection(tuple(plans), tuple(skipped_series), tuple(skipped_files))


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
    if sop in _MULTIFRAME_CT or any(f.frames > 1 for f in files):
        what = _MULTIFRAME_CT.get(sop, "multi-frame image")
        return f"{what} (multi-frame) is not supported; convert it to single-frame CT images"
    if modality != "CT":
        return f"modality {modality or 'missing'} is not CT"
    if sop != CT_IMAGE_STORAGE:
        return f"SOP class {sop or 'missing'} is not CT Image Storage"
    if any("LOCALIZER" in f.image_type for f in files):
        return "localizer (scout) images"
    return ""


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
    dropped: list[SkippedFile] = []

    def skip_all(reason: str, members: list[FileHeader]) -> tuple[None, SeriesSkip]:
        dropped.extend(SkippedFile(f.source, f"series skipped: {reason}") for f in members)
        return None, SeriesSkip(study_uid, series_uid, reason, len(files), tuple(dropped), phi)

    problem = _series_kind_problem(files)
    if problem:
        return skip_all(problem, files)

    # One file per SOP instance: the same instance may sit in a folder and in an archive.
    files = sorted(files, key=lambda f: (f.sop_uid, f.source.label))
    unique: list[FileHeader] = []
    for f in files:
        if unique and unique[-1].sop_uid == f.sop_uid:
            dropped.append(SkippedFile(f.source, f"duplicate SOPInstanceUID (kept {unique[-1].source.label})"))
        else:
            unique.append(f)

    usable: list[FileHeader] = []
    for f in unique:
        missing = [name for name, v in (("ImagePositionPatient", f.position), ("ImageOrientationPatient", f.orientation), ("PixelSpacing", f.pixel_spacing)) if v is None]
        if f.geometry_problem:
            dropped.append(SkippedFile(f.source, f"unusable geometry: {f.geometry_problem}"))
        elif missing:
            dropped.append(SkippedFile(f.source, f"unusable geometry: missing {', '.join(missing)}"))
        elif f.rows <= 0 or f.columns <= 0:
            dropped.append(SkippedFile(f.source, "missing Rows or Columns"))
        elif f.rows * f.columns > options.max_pixels:
            dropped.append(SkippedFile(f.source, f"{f.rows}x{f.columns} pixels is over the limit of {options.max_pixels}"))
        else:
            usable.append(f)
    if not usable:
        return None, SeriesSkip(study_uid, series_uid, "no slice with usable geometry", len(files), tuple(dropped), phi)

    # Slices must share orientation, spacing and size: keep the largest consistent group.
    by_key: dict[tuple, list[FileHeader]] = defaultdict(list)
    for f in usable:
        by_key[_geometry_key(f)].append(f)
    main_key = max(by_key, key=lambda k: (len(by_key[k]), k))
    flags: set[str] = set()
    for key, members in by_key.items():
        if key != main_key:
            flags.add("dropped_inconsistent_slices")
            dropped.extend(SkippedFile(f.source, _difference(key, main_key)) for f in members)
    kept = by_key[main_key]

    orientation = np.asarray(kept[0].orientation, dtype=np.float64)
    row, col = orientation[:3], orientation[3:]
    normal = np.cross(row / np.linalg.norm(row), col / np.linalg.norm(col))
    normal /= np.linalg.norm(normal)
    deviation = math.degrees(math.acos(min(1.0, abs(float(normal[2])))))
    if deviation > options.max_axial_deviation_deg:
        return skip_all(
            f"not axial: slice normal is {deviation:.0f} degrees from the patient z axis "
            f"(limit {options.max_axial_deviation_deg:g}); sagittal, coronal or oblique reconstruction",
            kept,
        )
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

    # Duplicate positions: keep the first (by SOP UID order), record the rest.
    keep_mask = np.ones(len(ordered), dtype=bool)
    for i in range(1, len(ordered)):
        j = i - 1
        while not keep_mask[j]:
            j -= 1
        if abs(along[i] - along[j]) < options.duplicate_tolerance_mm:
            keep_mask[i] = False
            flags.add("duplicate_positions")
            dropped.append(SkippedFile(ordered[i].source, f"duplicate slice position z={positions[i, 2]:.2f} mm (kept {ordered[j].source.label})"))
    ordered = [f for f, k in zip(ordered, keep_mask) if k]
    along = along[keep_mask]
    positions = positions[keep_mask]

    n = len(ordered)
    if n < options.min_slices:
        return skip_all(f"{n} slices, fewer than --min-slices {options.min_slices}", ordered)
    if n > options.max_slices:
        return skip_all(f"{n} slices, more than the limit of {options.max_slices}", ordered)

    gaps = np.abs(np.diff(along))
    spacing = float(np.median(gaps))
    if gaps.max() > 1.5 * spacing + 0.01:
        flags.add("uneven_spacing")
    stack = positions[-1] - positions[0]
    stack_norm = float(np.linalg.norm(stack))
    if stack_norm > 0:
        tilt = math.degrees(math.acos(min(1.0, abs(float(stack @ normal)) / stack_norm)))
        if tilt > options.tilt_tolerance_deg:
            flags.add("gantry_tilt")
    thicknesses = [f.slice_thickness for f in ordered if f.slice_thickness is not None and f.slice_thickness > 0]
    thickness = float(np.median(thicknesses)) if thicknesses else None

    slices = tuple(SliceRef(f.source, f.sop_uid, float(p[2]), f.transfer_syntax) for f, p in zip(ordered, positions))
    plan = SeriesPlan(study_uid, series_uid, slices, thickness, spacing, tuple(sorted(flags)), tuple(dropped), phi)
    return plan, None
