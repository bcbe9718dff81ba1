"""Slice labels from the positions of the intervertebral discs (hand labelling without masks).

Whoever labels a real CT series for fine-tuning or validation rarely has vertebra masks; reading the
patient z of the six discs that bound the classes (T12/L1 ... L5/S1) in a viewer, or off the
preview of ``spinelevel label``, takes a minute per series. From those positions every slice gets
the level between its two discs; slices within ``margin_mm`` of a disc are excluded (null), as the
paper excluded discs and as :func:`spinelevel.training.labels.dominant_levels` excludes ambiguous
slices of masks. Only the six boundaries between classes matter: the thoracic discs above T12/L1
all lie inside class ``T`` and the sacral segments inside ``S``.

The result is a labels table (DESIGN.md section 3.3) keyed by the SOP instance UIDs that the
engine's scan and selection give the series, so ``spinelevel train --labels`` / ``--mix-in`` and
``spinelevel evaluate`` find the same slices.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from spinelevel.errors import InputError, OutputError

__all__ = ["DISCS", "DiscOptions", "parse_discs", "levels_from_discs", "suggest_discs", "label_rows", "write_labels"]

# The discs that separate two classes, superior first, with the class above and below each.
DISCS: tuple[tuple[str, str, str], ...] = (
    ("T12/L1", "T", "L1"),
    ("L1/L2", "L1", "L2"),
    ("L2/L3", "L2", "L3"),
    ("L3/L4", "L3", "L4"),
    ("L4/L5", "L4", "L5"),
    ("L5/S1", "L5", "S"),
)
_NAMES = tuple(d[0] for d in DISCS)
_OPEN_ENDED = ("T", "S")  # classes that reach past their disc to the edge of any field of view


@dataclass(frozen=True)
class DiscOptions:
    """How disc positions become slice labels."""

    # Slices whose z is within this distance of a disc (mm) are excluded: the disc and the endplates
    # on either side, where a slice holds two vertebrae.
    margin_mm: float = 4.0
    # Least and greatest distance between two neighbouring given discs (mm): a vertebral body plus
    # its disc. Outside it a position is more likely a typo than anatomy.
    min_gap_mm: float = 15.0
    max_gap_mm: float = 80.0
    # A lumbar vertebra past the outermost given disc is labelled up to this distance from it (mm);
    # a slice further away means a disc is missing (the decoder's upper bound of a level's extent).
    max_end_mm: float = 55.0


def parse_discs(text: str) -> dict[str, float]:
    """``"T12/L1=402.5, L1/L2=366, ..."`` -> ``{"T12/L1": 402.5, ...}``.

    Names are case-insensitive and may use ``-`` instead of ``/`` (``L5-S1``); values are patient z
    in mm (ImagePositionPatient z, what viewers show as the slice position).

    Raises:
        InputError: an entry is not ``NAME=Z``, names an unknown disc, or repeats one.
    """
    out: dict[str, float] = {}
    entries = [e.strip() for e in re.split(r"[,;\s]+", text.strip()) if e.strip()]
    if not entries:
        raise InputError("--discs: no disc positions given (e.g. --discs T12/L1=402,L1/L2=366,L2/L3=330)")
    for entry in entries:
        name, sep, value = entry.partition("=")
        key = name.strip().upper().replace("-", "/")
        if not sep or key not in _NAMES:
            raise InputError(f"--discs: {entry!r} is not DISC=Z with DISC one of {', '.join(_NAMES)}")
        try:
            z = float(value)
        except ValueError:
            raise InputError(f"--discs: {entry!r}: {value!r} is not a number (patient z in mm)") from None
        if not math.isfinite(z):
            raise InputError(f"--discs: {entry!r}: z must be a finite number of mm")
        if key in out:
            raise InputError(f"--discs: {key} is given twice")
        out[key] = z
    return out


def _checked(discs: Mapping[str, float], options: DiscOptions) -> list[tuple[str, str, str, float]]:
    """The given discs superior first, checked for order, contiguity and plausible gaps."""
    given = [(name, above, below, float(discs[name])) for name, above, below in DISCS if name in discs]
    unknown = sorted(set(discs) - set(_NAMES))
    if unknown:
        raise InputError(f"--discs: unknown disc(s) {', '.join(unknown)} (known: {', '.join(_NAMES)})")
    if not given:
        raise InputError("--discs: no disc positions given")
    first, last = _NAMES.index(given[0][0]), _NAMES.index(given[-1][0])
    missing = [n for n in _NAMES[first : last + 1] if n not in discs]
    if missing:
        raise InputError(f"--discs: {', '.join(missing)} missing between {given[0][0]} and {given[-1][0]}: "
                         "every disc between the outermost two given is needed (its vertebrae could not be split)")
    for (n1, _, _, z1), (n2, _, _, z2) in zip(given, given[1:]):
        gap = z1 - z2
        if gap <= 0:
            raise InputError(f"--discs: {n1} (z {z1:g}) must lie above {n2} (z {z2:g}): patient z grows towards the head")
        if not options.min_gap_mm <= gap <= options.max_gap_mm:
            raise InputError(f"--discs: {n1} and {n2} are {gap:g} mm apart, outside {options.min_gap_mm:g}-{options.max_gap_mm:g} mm "
                             "(one vertebra and its disc): check the positions")
    return given


def levels_from_discs(z_mm: Sequence[float], discs: Mapping[str, float], options: DiscOptions = DiscOptions()) -> list[str | None]:
    """The class of every slice at patient z ``z_mm`` between the given discs (None: excluded).

    A slice within ``options.margin_mm`` of a disc is excluded. Past the outermost given disc a
    slice takes the class beyond it: ``T`` above T12/L1 and ``S`` below L5/S1 to the edge of the
    field of view, a lumbar class only up to ``options.max_end_mm`` from the disc.

    Raises:
        InputError: the discs are out of order, not contiguous, implausibly spaced, or a slice lies
            further past the outermost disc than a lumbar vertebra reaches (a disc is missing).
    """
    given = _checked(discs, options)
    top_name, top_class, _, top_z = given[0]
    bottom_name, _, bottom_class, bottom_z = given[-1]
    m = options.margin_mm
    out: list[str | None] = []
    for z in z_mm:
        z = float(z)
        if not math.isfinite(z):
            out.append(None)
            continue
        if any(abs(z - dz) <= m for *_, dz in given):
            out.append(None)
            continue
        if z > top_z:
            if top_class not in _OPEN_ENDED and z - top_z > options.max_end_mm:
                raise InputError(f"a slice at z {z:g} lies {z - top_z:.0f} mm above {top_name}, further than {top_class} reaches "
                                 f"({options.max_end_mm:g} mm): give the disc above {top_class} too")
            out.append(top_class)
            continue
        if z < bottom_z:
            if bottom_class not in _OPEN_ENDED and bottom_z - z > options.max_end_mm:
                raise InputError(f"a slice at z {z:g} lies {bottom_z - z:.0f} mm below {bottom_name}, further than {bottom_class} reaches "
                                 f"({options.max_end_mm:g} mm): give the disc below {bottom_class} too")
            out.append(bottom_class)
            continue
        out.append(next(below for (_, _, below, z1), (_, _, _, z2) in zip(given, given[1:]) if z2 < z < z1))
    return out


def suggest_discs(lines: np.ndarray, z_mm: Sequence[float], row_mm: float, body_row: int, *, bone_hu: float = 150.0,
                  min_body_mm: float = 12.0, min_gap_mm: float = 18.0, prominence_hu: float = 15.0) -> list[tuple[float, float]]:
    """Where the discs probably are: minima of the HU profile through the vertebral bodies.

    Per slice, the vertebral body is the run of bone (above ``bone_hu``, at least ``min_body_mm``
    deep) on the midline that lies nearest the body track: first the body row found on a few slices
    (``body_row``), then that choice smoothed over 30 mm. The profile is the mean HU of the middle
    60 % of the body's depth; a disc (water-like, about 80 HU) is darker than the trabecular bone
    and endplates around it. A suggestion, not a label: which minimum is which disc is for a person
    to decide (count from the sacrum or the last rib), and an oblique disc (L5/S1 in a strong
    lordosis) sits a few millimetres off its middle.

    Args:
        lines: (slices, rows) HU along the midline, rows anterior -> posterior
            (:func:`spinelevel.report.volume.read_midline`), slices most superior first.
        z_mm: patient z per slice.
        row_mm: row spacing of the lines.
        body_row: row of the vertebral body's centre on a few slices.

    Returns:
        ``(z, prominence in HU)`` per suggested disc, most superior first.
    """
    from scipy.ndimage import gaussian_filter1d, median_filter
    from scipy.signal import find_peaks

    lines = np.asarray(lines, dtype=np.float64)
    z = np.asarray(z_mm, dtype=np.float64)
    n = len(z)
    if n < 5 or lines.shape[0] != n:
        return []
    dz = float(np.median(np.abs(np.diff(z)))) or 1.0
    min_rows = max(1, int(round(min_body_mm / row_mm)))

    def runs(k: int) -> list[tuple[int, int]]:
        line = lines[k]
        if not np.isfinite(line).all():
            return []
        bone = np.concatenate([[False], line > bone_hu, [False]])
        edges = np.flatnonzero(np.diff(bone.astype(np.int8)))
        return [(int(a), int(b) - 1) for a, b in zip(edges[::2], edges[1::2]) if b - a >= min_rows]

    found = [runs(k) for k in range(n)]

    def choose(track: np.ndarray, reach_mm: float) -> tuple[np.ndarray, np.ndarray]:
        front = np.full(n, np.nan)
        back = np.full(n, np.nan)
        for k, rs in enumerate(found):
            near = [r for r in rs if abs((r[0] + r[1]) / 2 - track[k]) * row_mm <= reach_mm]
            if near:
                a, b = min(near, key=lambda r: abs((r[0] + r[1]) / 2 - track[k]))
                front[k], back[k] = a, b
        return front, back

    front, back = choose(np.full(n, float(body_row)), 45.0)
    ok = np.isfinite(front)
    if ok.sum() < 5:
        return []
    idx = np.arange(n)
    centre = np.interp(idx, idx[ok], ((front + back) / 2)[ok])
    track = median_filter(centre, size=max(3, int(round(30.0 / dz)) | 1), mode="nearest")
    front, back = choose(track, 15.0)
    ok = np.isfinite(front)
    if ok.sum() < 5:
        return []
    front = np.interp(idx, idx[ok], front[ok])
    back = np.interp(idx, idx[ok], back[ok])
    profile = np.empty(n)
    for k in range(n):
        depth = back[k] - front[k]
        a, b = int(round(front[k] + 0.2 * depth)), int(round(back[k] - 0.2 * depth)) + 1
        row = lines[k, a:max(b, a + 1)]
        profile[k] = float(np.nanmean(row)) if np.isfinite(row).any() else np.nan
    good = np.isfinite(profile)
    profile = np.interp(idx, idx[good], profile[good]) if good.any() else profile
    smooth = gaussian_filter1d(profile, max(0.5, 1.5 / dz))
    peaks, props = find_peaks(-smooth, distance=max(1, int(round(min_gap_mm / dz))), prominence=prominence_hu)
    return [(float(z[k]), float(p)) for k, p in zip(peaks, props["prominences"])]


def label_rows(study_uid: str, series_uid: str, slices: Sequence[Any], levels: Sequence[str | None]) -> list[dict[str, Any]]:
    """Labels-table rows of one series: ``slices`` are the engine's ``SliceRef`` (superior first)."""
    return [
        {"study_uid": study_uid, "series_uid": series_uid, "sop_uid": ref.sop_uid, "level": level, "z_mm": float(ref.z_mm),
         "slice_index": i, "path": ref.source.label}
        for i, (ref, level) in enumerate(zip(slices, levels))
    ]


def write_labels(path: Path, rows: list[dict[str, Any]]) -> dict[str, int]:
    """Write ``rows`` to the labels table ``path`` (Parquet, or CSV by suffix), keeping its other series.

    Rows of the series in ``rows`` that the table already holds are replaced; every other row is
    kept. The table is written beside ``path`` and renamed over it, so an interrupted write never
    leaves a half table.

    Returns:
        ``{"kept": rows of other series, "replaced": old rows of these series, "written": len(rows)}``.

    Raises:
        InputError: ``path`` exists but is not a readable labels table.
        OutputError: the table cannot be written there.
    """
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from spinelevel.training.labels import read_labels_arrow

    if not rows:
        raise ValueError("write_labels: no rows (a series has at least one slice)")
    path = Path(path)
    old: list[dict[str, Any]] = []
    if path.exists():
        try:
            old = read_labels_arrow(path).to_pylist()
        except InputError as exc:
            raise InputError(f"{path}: exists but is not a readable labels table; not overwritten ({exc})") from None
    series = {r["series_uid"] for r in rows}
    kept = [r for r in old if str(r["series_uid"]) not in series]
    columns = list(dict.fromkeys([*(old[0].keys() if old else []), *rows[0].keys()]))
    out = pa.Table.from_pylist([{c: r.get(c) for c in columns} for r in kept + rows])
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        if path.suffix.lower() == ".csv":
            pacsv.write_csv(out, tmp)
        else:
            pq.write_table(out, tmp)
        os.replace(tmp, path)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write the labels table ({exc.strerror or exc})") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return {"kept": len(kept), "replaced": len(old) - len(kept), "written": len(rows)}
