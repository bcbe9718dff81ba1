"""Slice labels: the labels table (DESIGN.md 3.3) and labels derived from vertebra masks.

A labels table is Parquet or CSV with ``series_uid, sop_uid, level`` (``level`` one of
:data:`spinelevel.levels.CLASSES`, or null for an excluded slice) and optional ``study_uid``,
``patient_id``, ``z_mm`` columns. Phantom folders carry one as ``labels.parquet``.

Vertebra masks (NIfTI) are turned into per-slice labels by the dominant-vertebra rule
(:func:`dominant_levels`): on each axial slice the vertebra with the largest mask area takes the
slice when it holds at least ``dominance`` (80 %) of the slice's vertebral pixels; slices where no
vertebra dominates (intervertebral discs, where the end plates of two vertebrae share the slice,
and overlaps) and slices without vertebral pixels are excluded, as the paper excluded discs.

Vertebra names map to classes by :func:`vertebra_class`: T1-T13 -> ``T``, L1-L5 -> ``L1``..``L5``,
sacrum (S1-S5, ``sacrum``) and coccyx -> ``S``; cervical vertebrae are not a class and L6 is
excluded (None) -- a six-lumbar spine counted from the top has no level that its L6 would be, the
same rule as the phantom's ``six_lumbar`` variant. Both still count as vertebral pixels, so a slice
dominated by L6 (or shared by L5 and L6) is excluded rather than given to a neighbour.

Two mask namings are read: TotalSegmentator's folder of binary masks (``vertebrae_L3.nii.gz``,
``sacrum.nii.gz``, ...; :func:`read_totalsegmentator_masks`) and VerSe's one multi-label mask
(:data:`VERSE_LABELS`; :func:`read_verse_mask`). nibabel is imported only by the readers.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from spinelevel.errors import InputError
from spinelevel.levels import CLASSES

__all__ = [
    "DOMINANCE",
    "VERSE_LABELS",
    "LabelsTable",
    "read_labels_arrow",
    "read_labels_table",
    "vertebra_class",
    "dominant_levels",
    "read_totalsegmentator_masks",
    "read_verse_mask",
    "canonical_volume",
    "volume_slice",
]

log = logging.getLogger(__name__)

DOMINANCE = 0.8
"""Share of a slice's vertebral pixels the largest vertebra needs to take the slice."""

VERSE_LABELS: dict[int, str] = {
    **{i: f"C{i}" for i in range(1, 8)},
    **{7 + i: f"T{i}" for i in range(1, 13)},
    **{19 + i: f"L{i}" for i in range(1, 7)},
    26: "sacrum",
    27: "coccyx",
    28: "T13",
}
"""VerSe label numbers: 1-7 C1-C7, 8-19 T1-T12, 20-25 L1-L6, 26 sacrum, 27 coccyx, 28 T13."""

_TOTALSEG_NAME = re.compile(r"^(?:vertebrae_(?P<v>[CTLS]\d{1,2})|(?P<s>sacrum|coccyx))\.nii(?:\.gz)?$")


class LabelsTable:
    """A labels table read into plain Python: level per SOP UID, and the optional keys.

    Attributes:
        level: ``sop_uid -> level`` (None for excluded slices).
        series: ``sop_uid -> series_uid``.
        group: ``sop_uid -> patient_id`` (or ``study_uid``) where the table has one.
        z_mm: ``sop_uid -> z_mm`` where the table has it.
        source: the file the table was read from.
    """

    def __init__(self, level: dict[str, str | None], series: dict[str, str], group: dict[str, str], z_mm: dict[str, float], source: str) -> None:
        self.level = level
        self.series = series
        self.group = group
        self.z_mm = z_mm
        self.source = source

    def __len__(self) -> int:
        return len(self.level)

    def merged(self, other: LabelsTable) -> LabelsTable:
        """This table with ``other``'s rows added (``other`` wins on a repeated SOP UID)."""
        return LabelsTable(
            {**self.level, **other.level},
            {**self.series, **other.series},
            {**self.group, **other.group},
            {**self.z_mm, **other.z_mm},
            f"{self.source}, {other.source}",
        )


def read_labels_arrow(path: Path):  # noqa: ANN201 - pyarrow Table
    """A labels table file (``.parquet`` or ``.csv``) as a pyarrow Table, its columns checked.

    Raises:
        InputError: the file is missing, unreadable or lacks a required column.
    """
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: labels table not found")
    try:
        if path.suffix.lower() == ".csv":
            table = pacsv.read_csv(
                path,
                convert_options=pacsv.ConvertOptions(
                    column_types={"series_uid": pa.string(), "sop_uid": pa.string(), "level": pa.string(), "study_uid": pa.string(), "patient_id": pa.string()},
                    strings_can_be_null=True,
                ),
            )
        else:
            table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ...
        raise InputError(f"{path}: not a readable Parquet or CSV labels table ({type(exc).__name__}: {exc})") from None
    missing = [c for c in ("series_uid", "sop_uid", "level") if c not in table.column_names]
    if missing:
        raise InputError(f"{path}: labels table lacks column(s) {', '.join(missing)} (needs series_uid, sop_uid, level)")
    return table


def read_labels_table(path: Path) -> LabelsTable:
    """Read a labels table (``.parquet`` or ``.csv``).

    Raises:
        InputError: the file is missing, unreadable, lacks a required column, or names a level that
            is not a class.
    """
    table = read_labels_arrow(path)
    sops = [str(s) for s in table.column("sop_uid").to_pylist()]
    levels: list[Any] = table.column("level").to_pylist()
    levels = [None if (v is None or v == "") else str(v) for v in levels]
    unknown = sorted({v for v in levels if v is not None and v not in CLASSES})
    if unknown:
        raise InputError(f"{path}: column level holds {unknown}, which are not classes {list(CLASSES)} (use null for excluded slices)")
    series = [str(s) for s in table.column("series_uid").to_pylist()]
    group_col = next((c for c in ("patient_id", "study_uid") if c in table.column_names), None)
    group: dict[str, str] = {}
    if group_col is not None:
        group = {s: str(g) for s, g in zip(sops, table.column(group_col).to_pylist()) if g is not None}
    z: dict[str, float] = {}
    if "z_mm" in table.column_names:
        z = {s: float(v) for s, v in zip(sops, table.column("z_mm").to_pylist()) if v is not None}
    return LabelsTable(dict(zip(sops, levels)), dict(zip(sops, series)), group, z, str(path))


def vertebra_class(name: str) -> str | None:
    """The class of a vertebra name (``T7`` -> ``T``, ``L3`` -> ``L3``, ``sacrum`` -> ``S``).

    Cervical vertebrae and L6 give None (no class; such slices are excluded).

    Raises:
        InputError: the name is not a vertebra.
    """
    key = name.strip()
    low = key.lower()
    if low in ("sacrum", "coccyx") or re.fullmatch(r"s\d", low):
        return "S"
    m = re.fullmatch(r"([ctl])(\d{1,2})", low)
    if not m:
        raise InputError(f"{name!r} is not a vertebra name (C1-C7, T1-T13, L1-L6, S1-S5, sacrum, coccyx)")
    region, number = m.group(1), int(m.group(2))
    if region == "c" and 1 <= number <= 7:
        return None
    if region == "t" and 1 <= number <= 13:
        return "T"
    if region == "l" and 1 <= number <= 5:
        return f"L{number}"
    if region == "l" and number == 6:
        return None
    raise InputError(f"{name!r} is not a vertebra name (C1-C7, T1-T13, L1-L6, S1-S5, sacrum, coccyx)")


def dominant_levels(masks: Mapping[str, np.ndarray], axis: int = 2, dominance: float = DOMINANCE) -> list[str | None]:
    """Per-slice class by the dominant-vertebra rule.

    Args:
        masks: vertebra name -> boolean (or 0/1) mask, all the same shape.
        axis: the slice axis of the masks.
        dominance: share of the slice's vertebral pixels the largest vertebra needs.

    Returns:
        One entry per index along ``axis`` (in the masks' own order): the class of the dominant
        vertebra, or None (no vertebral pixels, no dominant vertebra, a vertebra without class, or,
        at an end of a partly labelled spine, a slice past the end vertebra's body: see
        :func:`_trim_open_ends`).

    Raises:
        InputError: masks is empty, shapes differ, or a name is not a vertebra.
    """
    if not masks:
        raise InputError("no vertebra masks given")
    names = list(masks)
    shapes = {np.shape(masks[n]) for n in names}
    if len(shapes) != 1:
        raise InputError(f"vertebra masks differ in shape: {sorted(shapes)}")
    classes = [vertebra_class(n) for n in names]
    other = tuple(i for i in range(len(next(iter(shapes)))) if i != axis)
    # areas[v, k]: pixels of vertebra v on slice k.
    areas = np.stack([np.count_nonzero(np.asarray(masks[n]), axis=other) for n in names]).astype(np.int64)
    total = areas.sum(axis=0)
    best = areas.argmax(axis=0)
    out: list[str | None] = []
    for k in range(areas.shape[1]):
        if total[k] == 0:
            out.append(None)
            continue
        v = int(best[k])
        out.append(classes[v] if areas[v, k] >= dominance * total[k] else None)
    _trim_open_ends(names, areas, out)
    return out


def _rank(name: str) -> float:
    """Cranio-caudal rank of a vertebra name (C1 ... T12, T13, L1 ... L6, sacrum, coccyx)."""
    key = name.strip().upper()
    if key in ("SACRUM", "COCCYX"):
        return 400.0 + (key == "COCCYX")
    return {"C": 0.0, "T": 100.0, "L": 200.0, "S": 300.0}[key[0]] + float(key[1:])


def _trim_open_ends(names: list[str], areas: np.ndarray, out: list[str | None]) -> None:
    """Unlabel the slices past the body of an end vertebra whose neighbour is in view but unlabelled.

    A partly labelled spine (VerSe cases labelled down to L3 only, say) has the first unlabelled
    vertebra in the image: past the last labelled body the slices hold the disc and that
    neighbour's body, while the labelled vertebra's articular processes reach into them and would
    make it dominant there. On the far side of the end vertebra's centroid, the slices where its
    area is under half its largest are unlabelled - unless its mask reaches the end of the volume
    (cut by the field of view: nothing of the neighbour is seen) or it is sacral or C1.
    """
    if len(names) < 2:
        return
    order = sorted(range(len(names)), key=lambda i: _rank(names[i]))
    ks = np.arange(areas.shape[1], dtype=np.float64)
    centroid = {i: float((areas[i] * ks).sum() / areas[i].sum()) for i in order if areas[i].sum()}
    for end, inner in ((order[-1], order[-2]), (order[0], order[1])):
        if vertebra_class(names[end]) == "S" or _rank(names[end]) == 1.0 or end not in centroid or inner not in centroid:
            continue
        present = np.flatnonzero(areas[end])
        outward = -1 if centroid[inner] > centroid[end] else 1  # index direction away from the inner one
        if (outward < 0 and present.min() == 0) or (outward > 0 and present.max() == areas.shape[1] - 1):
            continue  # cut by the field of view
        c = centroid[end]
        beyond = ks < c if outward < 0 else ks > c
        thin = areas[end] < 0.5 * areas[end].max()
        for k in np.flatnonzero(beyond & thin):
            if out[k] == vertebra_class(names[end]):
                out[k] = None


def canonical_volume(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Load a NIfTI volume in RAS+ orientation; returns (data, affine).

    Raises:
        InputError: nibabel is missing or the file is unreadable.
    """
    try:
        import nibabel as nib
    except ImportError:
        raise InputError("reading NIfTI needs nibabel: pip install nibabel (part of the 'train' extra)") from None
    try:
        img = nib.as_closest_canonical(nib.load(str(path)))
        return np.asanyarray(img.dataobj), np.asarray(img.affine, dtype=np.float64)
    except Exception as exc:
        raise InputError(f"{path}: not a readable NIfTI volume ({type(exc).__name__}: {exc})") from None


def volume_slice(data: np.ndarray, k: int) -> np.ndarray:
    """Axial slice ``k`` (RAS+ index) of a canonical volume, laid out like a DICOM image.

    DICOM rows run anterior -> posterior and columns right -> left (patient's right on the image's
    left); RAS+ axes 0 and 1 run left -> right and posterior -> anterior, hence both flips.
    """
    return np.ascontiguousarray(data[::-1, ::-1, k].T)


def read_totalsegmentator_masks(folder: Path) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Read a TotalSegmentator folder's vertebra masks (RAS+); returns (name -> mask, affine).

    Files named ``vertebrae_<name>.nii.gz`` (and ``sacrum``/``coccyx``) are read; other masks are
    ignored. Empty masks are dropped.

    Raises:
        InputError: no vertebra mask in the folder, or masks of different shapes.
    """
    folder = Path(folder)
    masks: dict[str, np.ndarray] = {}
    affine = None
    for f in sorted(folder.iterdir()) if folder.is_dir() else []:
        m = _TOTALSEG_NAME.match(f.name)
        if not m:
            continue
        name = m.group("v") or m.group("s")
        data, aff = canonical_volume(f)
        if affine is None:
            affine = aff
        mask = np.asarray(data) > 0
        if mask.any():
            masks[name] = mask
    if not masks or affine is None:
        raise InputError(f"{folder}: no vertebra masks (vertebrae_L3.nii.gz, sacrum.nii.gz, ... in TotalSegmentator naming)")
    return masks, affine


def read_verse_mask(path: Path) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Split a VerSe multi-label mask (RAS+) into ``name -> mask``; returns it with the affine.

    Raises:
        InputError: the file holds no vertebra label or an unknown one.
    """
    data, affine = canonical_volume(path)
    labels = np.asarray(data).astype(np.int32)
    present = [int(v) for v in np.unique(labels) if v != 0]
    unknown = [v for v in present if v not in VERSE_LABELS]
    if unknown:
        raise InputError(f"{path}: label number(s) {unknown} are not VerSe vertebra labels (1-28)")
    if not present:
        raise InputError(f"{path}: the mask holds no vertebra label")
    return {VERSE_LABELS[v]: labels == v for v in present}, affine
