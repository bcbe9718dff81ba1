"""Re-read a classified series from its DICOM files and cut sagittal and coronal slabs through the spine.

Where the cuts go (the vertebral body lies on the midline, in the posterior half of the body):

1. A few *probe* slices spread over the middle 80 % of the series are read first.
2. **Sagittal plane** (an image column ``x``): in each probe slice, count the bone voxels (HU >= 200)
   of every column in the posterior half of the body (rows behind the body's centroid). The counts
   are summed over the probes, smoothed over 15 mm, and the column with the most bone inside the
   middle 60 % of the body's width is taken. Ribs, pelvis and the table are lateral or flat in this
   profile; the spine is the one bony structure on the same column in every slice.
3. **Coronal plane** (an image row ``y``): within the sagittal slab of each probe, the first block
   of bone at least 10 mm deep, searching backwards from 30 mm in front of the body's centroid, is
   the vertebral body (the sternum lies further forward, the posterior elements behind it); the
   median of its centres over the probes is taken (fallback: the row with the most bone).
4. Every chosen slice is then read once and reduced to two lines: the maximum intensity over a
   slab (``slab_mm`` thick, default 10 mm) around the sagittal column and around the coronal row.
   A thin-slab MIP keeps the vertebrae visible even when the spine bends out of one plane (scoliosis,
   a patient lying off-centre).

Long series are decimated: only enough slices to fill the output image's rows are read
(``max_slices`` at most); the level bands still use every slice of the run's table.

Only geometry tags (PixelSpacing, ImagePositionPatient, ImageOrientationPatient) and pixel data are
read from the files: nothing that identifies the patient.
"""

from __future__ import annotations

import logging
import os
import re
import tarfile
import warnings
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from spinelevel.engine.decode import decode_hu, read_dataset
from spinelevel.engine.frames import frame_value
from spinelevel.engine.sources import Source
from spinelevel.errors import DecodeError

__all__ = ["VolumeOptions", "SeriesViews", "Midline", "read_midline", "canonical_axial", "slice_geometry", "parse_label", "positions", "source_for_label", "read_slice", "read_views", "pick_planes"]

log = logging.getLogger(__name__)

# HU from which a voxel counts as bone when the planes are chosen.
_BONE_HU = 200.0
# HU above which a voxel belongs to the body (air and lung are below).
_BODY_HU = -400.0


@dataclass(frozen=True)
class VolumeOptions:
    """How a series is re-read."""

    # Most slices read for one series's reconstructions (the rest are interpolated).
    max_slices: int = 320
    # Slices read first to place the sagittal and coronal planes.
    probe_slices: int = 9
    # Thickness of the maximum-intensity slab around each plane, mm.
    slab_mm: float = 10.0
    # Largest file read, bytes (the scan's limit).
    max_file_bytes: int = 2 << 30
    # Output pixel size target: the reconstructions are resampled to square pixels of about
    # max(z extent / rows, ...) mm; this is the number of rows the full-size image aims for.
    target_rows: int = 720


@dataclass(frozen=True)
class SeriesViews:
    """Reconstructions of one series in HU, resampled to square pixels of ``mm_per_px``."""

    # (rows, cols) sagittal: rows superior -> inferior, columns anterior -> posterior.
    sagittal: np.ndarray
    # (rows, cols) coronal: rows superior -> inferior, columns patient right -> patient left.
    coronal: np.ndarray
    # Size of one output pixel in mm (both axes).
    mm_per_px: float
    # Distance below the first slice (slice_index 0) of output row 0, mm (always 0 today).
    top_mm: float
    # The L3 slice in HU (rows anterior -> posterior, columns right -> left), or None.
    axial: np.ndarray | None
    # (row mm, column mm) pixel spacing of the axial slice.
    axial_spacing: tuple[float, float]
    # The chosen sagittal column and coronal row on the axial grid (for marks on the axial image).
    plane_x: int
    plane_y: int
    # Slices read for the reconstructions, and how many of them failed.
    slices_read: int
    slices_failed: int
    # The first failure's reason, if any.
    failure: str | None = None


# -- where the bytes are -----------------------------------------------------------------------


def parse_label(label: str) -> tuple[str, str | None]:
    """Split a ``source`` label into (file path, archive member or None).

    A label is a path, or ``archive::member``; the first ``::`` whose left side is an existing file
    splits it (paths may themselves contain ``::``).
    """
    if os.path.exists(label) or "::" not in label:
        return label, None
    start = 0
    while True:
        pos = label.find("::", start)
        if pos < 0:
            break
        if os.path.isfile(label[:pos]):
            return label[:pos], label[pos + 2 :]
        start = pos + 1
    path, _, member = label.partition("::")
    return path, member


# The source label of a DICOMweb instance: <base URL>/studies/<uid>/series/<uid>/instances/<uid>
_DICOMWEB_LABEL = re.compile(r"^(https?://.+?)/(studies/[^/]+/series/[^/]+/instances/[^/]+)$")


@lru_cache(maxsize=4)
def _tar_index(path: str, mtime_ns: int) -> dict[str, tuple[int, int]]:
    """Member name -> (data offset, size) of a tar archive (one pass; cached per process)."""
    index: dict[str, tuple[int, int]] = {}
    with tarfile.open(path, "r:*") as tf:
        for member in tf:
            if member.isfile():
                index.setdefault(member.name, (member.offset_data, member.size))
            tf.members = []  # tarfile keeps every TarInfo: keep memory flat on huge archives
    return index


def source_for_label(label: str) -> Source:
    """The :class:`Source` that reads the file a ``source`` label names.

    Raises:
        DecodeError: the file or archive is gone, or the member is not in the archive.
    """
    remote = _DICOMWEB_LABEL.match(label)
    if remote is not None:
        # a DICOMweb instance (its WADO-RS URL): read with the default connection settings
        return Source(remote.group(1), "dicomweb", remote.group(2))
    path, member = parse_label(label)
    if member is None:
        if not os.path.isfile(path):
            raise DecodeError("file not found")
        return Source(path)
    if not os.path.isfile(path):
        raise DecodeError("archive not found")
    import zipfile

    if zipfile.is_zipfile(path):
        return Source(path, "zip", member)
    try:
        index = _tar_index(path, os.stat(path).st_mtime_ns)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DecodeError(f"unreadable archive ({type(exc).__name__})") from None
    if member not in index:
        raise DecodeError("member not found in the archive")
    offset, size = index[member]
    return Source(path, "tar", member, offset, size)


# -- one slice -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Slice:
    hu: np.ndarray  # canonical orientation: rows anterior -> posterior, columns right -> left
    spacing: tuple[float, float]  # (row mm, column mm) in canonical orientation


def read_slice(label: str, max_bytes: int, frame: int | None = None) -> _Slice:
    """Read one slice (or one frame of a multi-frame file) by its ``source`` label, in HU, turned to
    the standard axial orientation.

    Raises:
        DecodeError: the file cannot be found, read or decoded.
    """
    src = source_for_label(label)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's warnings may quote header values
        ds = read_dataset(src, max_bytes, frame)
        hu = decode_hu(ds, frame)
        spacing = _spacing(ds, frame)
        iop = _orientation(ds, frame)
    return _Slice(*_canonical(hu, spacing, iop))


def _spacing(ds, frame: int | None = None) -> tuple[float, float]:  # noqa: ANN001
    try:
        value = ds.PixelSpacing if frame is None else frame_value(ds, frame - 1, "PixelMeasuresSequence", "PixelSpacing")
        row, col = (float(v) for v in value[:2])
        if row > 0 and col > 0:
            return row, col
    except (AttributeError, TypeError, ValueError, IndexError):
        pass
    return 1.0, 1.0


def _orientation(ds, frame: int | None = None) -> np.ndarray:  # noqa: ANN001
    try:
        value = ds.ImageOrientationPatient if frame is None else frame_value(ds, frame - 1, "PlaneOrientationSequence", "ImageOrientationPatient")
        iop = np.asarray([float(v) for v in value], dtype=np.float64)
        if iop.shape == (6,) and np.all(np.isfinite(iop)):
            return iop
    except (AttributeError, TypeError, ValueError):
        pass
    return np.asarray([1.0, 0.0, 0.0, 0.0, 1.0, 0.0])


def slice_geometry(ds, frame: int | None = None) -> tuple[tuple[float, float], np.ndarray]:  # noqa: ANN001
    """((row mm, column mm), ImageOrientationPatient) of a slice, or of one frame of a multi-frame file
    (from its functional groups); (1, 1) and the standard axial orientation where the tags are unusable."""
    return _spacing(ds, frame), _orientation(ds, frame)


def canonical_axial(hu: np.ndarray, spacing: tuple[float, float], iop: np.ndarray) -> tuple[np.ndarray, tuple[float, float]]:
    """An axial slice turned to the standard view (columns patient right -> left, rows anterior ->
    posterior), and its (row mm, column mm) spacing; ``iop`` is ImageOrientationPatient (6 values)."""
    return _canonical(hu, spacing, np.asarray(iop, dtype=np.float64))


def _canonical(hu: np.ndarray, spacing: tuple[float, float], iop: np.ndarray) -> tuple[np.ndarray, tuple[float, float]]:
    """Turn an axial slice so columns run right -> left (+x) and rows anterior -> posterior (+y)."""
    row_dir, col_dir = iop[:3], iop[3:]  # along a row (column index grows), along a column (row index grows)
    if abs(row_dir[1]) > abs(row_dir[0]):  # image axes swapped relative to patient x/y
        hu = hu.T
        spacing = (spacing[1], spacing[0])
        row_dir, col_dir = col_dir, row_dir
    if row_dir[0] < 0:
        hu = hu[:, ::-1]
    if col_dir[1] < 0:
        hu = hu[::-1, :]
    return np.ascontiguousarray(hu), spacing


# -- planes ----------------------------------------------------------------------------------


def _smooth(profile: np.ndarray, width_px: int) -> np.ndarray:
    width_px = max(1, int(width_px))
    kernel = np.ones(width_px, dtype=np.float64) / width_px
    return np.convolve(profile, kernel, mode="same")


def pick_planes(probes: list[np.ndarray], spacing: tuple[float, float], slab_mm: float = 10.0) -> tuple[int, int]:
    """Choose the sagittal column and coronal row through the spine from a few axial slices.

    Args:
        probes: axial slices in HU, canonical orientation, all the same shape.
        spacing: (row mm, column mm).
        slab_mm: slab thickness (the coronal row is searched within the sagittal slab).

    Returns:
        (column x, row y) on the slice grid.
    """
    rows, cols = probes[0].shape
    x_profile = np.zeros(cols, dtype=np.float64)
    body_cols = np.zeros(cols, dtype=np.float64)
    centroids: list[int] = []
    for hu in probes:
        body = hu > _BODY_HU
        if not body.any():
            centroids.append(rows // 2)
            continue
        ys = np.nonzero(body.any(axis=1))[0]
        counts = body.sum(axis=1)
        centroid_y = int(np.round(np.average(np.arange(rows), weights=counts)))
        centroids.append(centroid_y)
        bone = hu >= _BONE_HU
        x_profile += bone[max(centroid_y, int(ys[0])) :, :].sum(axis=0)
        body_cols += body.sum(axis=0)
    if x_profile.sum() == 0:
        return cols // 2, rows // 2
    # Only the middle 60 % of the body's width (the spine is never lateral).
    present = np.nonzero(body_cols > 0.05 * body_cols.max())[0] if body_cols.max() > 0 else np.arange(cols)
    lo, hi = int(present[0]), int(present[-1])
    margin = int(0.2 * (hi - lo))
    smooth_x = _smooth(x_profile, round(15.0 / spacing[1]))
    window = smooth_x[lo + margin : hi - margin + 1]
    x = lo + margin + int(np.argmax(window)) if window.size else int(np.argmax(smooth_x))
    half = max(1, round(slab_mm / 2 / spacing[1]))
    centres: list[int] = []
    y_profile = np.zeros(rows, dtype=np.float64)
    for hu, cy in zip(probes, centroids):
        strip = hu[:, max(0, x - half) : x + half + 1]
        share = _smooth((strip >= _BONE_HU).mean(axis=1), round(5.0 / spacing[0]))
        y_profile += share
        y = _first_block(share >= 0.3, max(0, cy - round(30.0 / spacing[0])), round(10.0 / spacing[0]))
        if y is not None:
            centres.append(y)
    if centres:
        return x, int(np.median(centres))
    if y_profile.sum() == 0:
        return x, rows // 2
    return x, int(np.argmax(_smooth(y_profile, round(20.0 / spacing[0]))))


def _first_block(mask: np.ndarray, start: int, min_len: int) -> int | None:
    """Centre of the first run of True at or after ``start`` that is at least ``min_len`` long."""
    run_start = None
    for i in range(start, len(mask) + 1):
        if i < len(mask) and mask[i]:
            if run_start is None:
                run_start = i
            continue
        if run_start is not None and i - run_start >= max(1, min_len):
            return (run_start + i - 1) // 2
        run_start = None
    return None


# -- the series --------------------------------------------------------------------------------


def positions(z_mm: np.ndarray) -> np.ndarray:
    """Distance of each slice below the first one (slice_index 0), mm, never decreasing.

    Slices are ordered along the slice normal by the engine; ``|z - z[0]|`` is that distance for an
    axial series (a tilted gantry shortens it by the cosine of the tilt, which the picture ignores).
    Missing z (NaN) takes the previous slice's position.
    """
    z = np.asarray(z_mm, dtype=np.float64)
    if not len(z):
        return z
    pos = np.abs(z - z[0])
    pos[~np.isfinite(pos)] = 0.0
    return np.maximum.accumulate(pos)


def _choose(pos_mm: np.ndarray, want: int) -> np.ndarray:
    """Indices of about ``want`` slices spread evenly in position (always the first and last)."""
    n = len(pos_mm)
    if n <= want:
        return np.arange(n)
    targets = np.linspace(pos_mm[0], pos_mm[-1], want)
    idx = np.searchsorted(pos_mm, targets).clip(0, n - 1)
    # the nearer of the two neighbours
    prev = (idx - 1).clip(0, n - 1)
    nearer = np.where(np.abs(pos_mm[prev] - targets) < np.abs(pos_mm[idx] - targets), prev, idx)
    return np.unique(nearer)


def _cached_reader(sources: tuple[str, ...], frames: tuple[int | None, ...], options: VolumeOptions, cache: dict, failures: list[str]):  # noqa: ANN202
    """``get(i)``: slice ``i`` read once into ``cache`` (None, with its reason in ``failures``, when it cannot be)."""

    def get(i: int) -> _Slice | None:
        if i not in cache:
            try:
                cache[i] = read_slice(sources[i], options.max_file_bytes, frames[i] if frames else None)
            except DecodeError as exc:
                failures.append(str(exc))
                cache[i] = None
        return cache[i]

    return get


def _probe_planes(get, n: int, failures: list[str], options: VolumeOptions):  # noqa: ANN001, ANN202
    """Read the probe slices and place the planes: (probe indices, slice shape, spacing, (x, y))."""
    inner = np.arange(n)[int(0.1 * n) : max(int(0.9 * n), int(0.1 * n) + 1)]
    probe_idx = inner[np.linspace(0, len(inner) - 1, min(options.probe_slices, len(inner))).round().astype(int)] if len(inner) else np.arange(n)
    probes = [s for s in (get(int(i)) for i in probe_idx) if s is not None]
    if not probes:
        first = next((get(i) for i in range(min(n, 3)) if get(i) is not None), None)
        if first is None:
            raise DecodeError(failures[0] if failures else "no slice could be read")
        probes = [first]
    shape, spacing = probes[0].hu.shape, probes[0].spacing
    probes = [p.hu for p in probes if p.hu.shape == shape]
    return probe_idx, shape, spacing, pick_planes(probes, spacing, options.slab_mm)


@dataclass(frozen=True)
class Midline:
    """Every slice's line through the spine's sagittal plane, for finding the discs."""

    # (slices, rows) HU: per slice, the mean over ``half_mm`` either side of the sagittal plane,
    # rows anterior -> posterior (NaN for a slice that could not be read).
    lines: np.ndarray
    # Row spacing of the lines, mm.
    row_mm: float
    # Row of the vertebral body's centre found on the probe slices (pick_planes).
    body_row: int


def read_midline(sources: tuple[str, ...], options: VolumeOptions = VolumeOptions(), frames: tuple[int | None, ...] = (), half_mm: float = 4.0) -> Midline:
    """Read every slice of a series and keep its mean line through the spine's sagittal plane.

    A mean over a thin slab, not a MIP: the discs are darker than the vertebral bodies only in the
    mean (a MIP shows the posterior elements and endplates instead). Every slice is read, since a
    disc spans a few millimetres.

    Raises:
        DecodeError: no slice could be read.
    """
    n = len(sources)
    failures: list[str] = []
    cache: dict[int, _Slice | None] = {}
    get = _cached_reader(sources, frames, options, cache, failures)

    _, shape, spacing, (x, y) = _probe_planes(get, n, failures, options)
    half = max(0, round(half_mm / spacing[1]))
    lines = np.full((n, shape[0]), np.nan, dtype=np.float32)
    for i in range(n):
        s = get(i)
        cache.pop(i, None)
        if s is not None and s.hu.shape == shape:
            lines[i] = s.hu[:, max(0, x - half) : x + half + 1].mean(axis=1)
    return Midline(lines, float(spacing[0]), int(y))


def read_views(sources: tuple[str, ...], z_mm: np.ndarray, l3_position: int | None, options: VolumeOptions = VolumeOptions(), frames: tuple[int | None, ...] = ()) -> SeriesViews:
    """Read a series and build its sagittal and coronal slab reconstructions and its L3 slice.

    Args:
        sources: ``source`` label per slice, most superior first.
        z_mm: z per slice (same order).
        l3_position: position in ``sources`` of the L3 pick, or None.
        options: how to read.
        frames: 1-based frame per slice for multi-frame files (None or () for single-frame files).

    Raises:
        DecodeError: too few slices could be read (the message gives the first reason).
    """
    n = len(sources)
    pos = positions(z_mm)
    extent = float(pos[-1]) if n else 0.0
    failures: list[str] = []
    cache: dict[int, _Slice | None] = {}
    get = _cached_reader(sources, frames, options, cache, failures)

    # 1. probes
    probe_idx, shape, spacing, (x, y) = _probe_planes(get, n, failures, options)

    # 2. output grid: square pixels, about target_rows rows, at most 640 columns
    width_mm = max(shape[0] * spacing[0], shape[1] * spacing[1])
    # (upsampling a coarse series is allowed: the picture must be big enough to read the levels off)
    mm_per_px = max(extent / max(1, options.target_rows), width_mm / 640.0, 0.25)
    want = min(options.max_slices, max(2, int(np.ceil(extent / mm_per_px)) + 1))
    chosen = _choose(pos, want)

    # 3. slab lines
    half_x = max(0, round(options.slab_mm / 2 / spacing[1]))
    half_y = max(0, round(options.slab_mm / 2 / spacing[0]))
    probe_set = {int(p) for p in probe_idx} | ({int(l3_position)} if l3_position is not None else set())
    sag_lines: list[np.ndarray] = []
    cor_lines: list[np.ndarray] = []
    line_pos: list[float] = []
    read = 0
    for i in chosen:
        s = get(int(i))
        read += 1
        if s is not None and s.hu.shape == shape:
            sag_lines.append(s.hu[:, max(0, x - half_x) : x + half_x + 1].max(axis=1))
            cor_lines.append(s.hu[max(0, y - half_y) : y + half_y + 1, :].max(axis=0))
            line_pos.append(float(pos[int(i)]))
        elif s is not None:
            failures.append(f"slice size {s.hu.shape} differs from {shape}")
        # keep memory flat: only probes stay cached
        if int(i) not in probe_set:
            cache.pop(int(i), None)
    if len(sag_lines) < 2 and n > 1:
        raise DecodeError(failures[0] if failures else "fewer than two slices could be read")
    axial = None
    if l3_position is not None and 0 <= l3_position < n:
        s = get(int(l3_position))
        axial = s.hu if s is not None else None
    out_rows = max(1, int(round(extent / mm_per_px)) + 1)
    sag = _crop_to_body(_resample(np.stack(sag_lines), np.asarray(line_pos), out_rows, mm_per_px, spacing[0]), mm_per_px)
    cor = _crop_to_body(_resample(np.stack(cor_lines), np.asarray(line_pos), out_rows, mm_per_px, spacing[1]), mm_per_px)
    return SeriesViews(
        sagittal=sag,
        coronal=cor,
        mm_per_px=mm_per_px,
        top_mm=0.0,
        axial=axial,
        axial_spacing=spacing,
        plane_x=x,
        plane_y=y,
        slices_read=read,
        slices_failed=len(failures),
        failure=failures[0] if failures else None,
    )


def _resample(lines: np.ndarray, line_pos: np.ndarray, out_rows: int, mm_per_px: float, in_px_mm: float) -> np.ndarray:
    """(slices, in_cols) lines at positions ``line_pos`` -> (out_rows, out_cols) image on a square grid."""
    n_in, in_cols = lines.shape
    # along z: linear interpolation between the read slices
    row_mm = np.arange(out_rows) * mm_per_px
    if n_in == 1:
        along = np.repeat(lines, out_rows, axis=0)
    else:
        j = np.searchsorted(line_pos, row_mm, side="right").clip(1, n_in - 1)
        p0, p1 = line_pos[j - 1], line_pos[j]
        t = np.where(p1 > p0, (row_mm - p0) / np.where(p1 > p0, p1 - p0, 1.0), 0.0).clip(0.0, 1.0)
        along = lines[j - 1] * (1 - t)[:, None] + lines[j] * t[:, None]
    # across: linear interpolation from the in-plane spacing to mm_per_px
    out_cols = max(1, int(round(in_cols * in_px_mm / mm_per_px)))
    src = (np.arange(out_cols) + 0.5) * mm_per_px / in_px_mm - 0.5
    k = np.floor(src).astype(int).clip(0, in_cols - 1)
    k1 = (k + 1).clip(0, in_cols - 1)
    f = (src - k).clip(0.0, 1.0)
    return (along[:, k] * (1 - f) + along[:, k1] * f).astype(np.float32)


def _crop_to_body(img: np.ndarray, mm_per_px: float, margin_mm: float = 10.0) -> np.ndarray:
    """Drop the columns of air left and right of the body (kept: columns with body in >= 2 % of rows)."""
    present = np.flatnonzero((img > _BODY_HU).mean(axis=0) >= 0.02)
    if present.size == 0:
        return img
    margin = int(round(margin_mm / mm_per_px))
    lo, hi = max(0, int(present[0]) - margin), min(img.shape[1], int(present[-1]) + margin + 1)
    return img[:, lo:hi] if hi - lo >= 8 else img
