"""Training data: which slices, their labels, their HU pixels, the split and the model input.

Three kinds of input, in any mix (:func:`collect_slices`):

- **DICOM** folders or archives with a labels table (DESIGN.md 3.3). Series are found, filtered and
  ordered by the engine's own :func:`~spinelevel.engine.scan.scan_paths` and
  :func:`~spinelevel.engine.select.select_series`, and pixels decoded by its
  :func:`~spinelevel.engine.decode.read_hu`, so training sees what inference sees.
- **Phantom folders** written by ``spinelevel phantom``: DICOM with their own ``labels.parquet``,
  found automatically.
- **NIfTI cases**: a folder holding ``ct.nii.gz`` and vertebra masks, either TotalSegmentator's
  binary masks (``vertebrae_L3.nii.gz`` ... beside it or in ``segmentations/``) or one VerSe
  multi-label mask (a file whose name holds ``seg``, ``msk`` or ``mask``). Slices are taken in RAS+
  orientation, ordered superior-first and laid out like DICOM images; labels come from the
  dominant-vertebra rule (:mod:`spinelevel.training.labels`).

Slices whose level is null (discs, L6, ambiguous) or that have no label are left out. The
train/validation split (:func:`split_by_group`) is by patient (``patient_id`` column), else study,
else series -- never by slice.

The model input of a slice is always :func:`spinelevel.engine.preprocess.preprocess_slice` of its
(possibly augmented) HU image with the card's :class:`~spinelevel.engine.preprocess.PreprocessSpec`.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from spinelevel.engine.preprocess import PreprocessSpec, preprocess_slice
from spinelevel.engine.sources import Source
from spinelevel.errors import DecodeError, InputError
from spinelevel.levels import CLASSES
from spinelevel.training.augment import AugmentSpec, augment_hu, draw_params
from spinelevel.training.labels import (
    LabelsTable,
    canonical_volume,
    dominant_levels,
    read_labels_table,
    read_totalsegmentator_masks,
    read_verse_mask,
    volume_slice,
)

__all__ = [
    "NiftiRef",
    "SliceItem",
    "SliceSet",
    "collect_slices",
    "find_nifti_cases",
    "split_by_group",
    "HUCache",
    "model_input",
]

log = logging.getLogger(__name__)

_MAX_FILE_BYTES = 1 << 30
_PHANTOM_LABELS = "labels.parquet"


@dataclass(frozen=True, slots=True)
class NiftiRef:
    """One axial slice of a NIfTI CT volume."""

    # Path of the CT volume.
    path: str
    # Index along the RAS+ third axis (0 = most inferior voxel plane).
    k: int


@dataclass(frozen=True, slots=True)
class SliceItem:
    """One labelled slice."""

    # Series key: SeriesInstanceUID, or the CT path of a NIfTI case.
    series: str
    # Split key: patient, else study, else series.
    group: str
    # Index of the level in the data set's classes.
    label: int
    # Where the pixels are.
    ref: Source | NiftiRef
    # SOPInstanceUID (NIfTI: '<ct path>#<k>').
    sop_uid: str
    # Slice position in mm (patient z).
    z_mm: float
    # PixelSpacing (row mm, column mm) of the slice as the decoder gives it (preprocessing version 2).
    spacing: tuple[float, float] | None = None


@dataclass(frozen=True)
class SliceSet:
    """The labelled slices of a data set and its classes."""

    # The slices, series after series, each series superior-first.
    items: tuple[SliceItem, ...]
    # The classes present, in anatomical order (the model's output order).
    classes: tuple[str, ...]
    # What was read, for the training provenance: {'dicom_series': n, 'nifti_cases': n, ...}.
    summary: dict

    def counts(self, indices: Sequence[int] | None = None) -> dict[str, int]:
        """Slices per class (over ``indices``, default all)."""
        idx = range(len(self.items)) if indices is None else indices
        c = Counter(self.items[i].label for i in idx)
        return {name: int(c.get(k, 0)) for k, name in enumerate(self.classes)}


def find_nifti_cases(root: Path) -> list[Path]:
    """Folders under ``root`` (itself included) that hold a ``ct.nii.gz`` or ``ct.nii``."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = {p.parent for pat in ("ct.nii.gz", "ct.nii") for p in root.rglob(pat)}
    return sorted(found)


def _case_masks(case: Path) -> dict[str, np.ndarray]:
    for folder in (case / "segmentations", case):
        if folder.is_dir() and any(folder.glob("vertebrae_*.nii*")):
            return read_totalsegmentator_masks(folder)[0]
    multi = sorted(p for p in case.glob("*.nii*") if any(t in p.name.lower() for t in ("seg", "msk", "mask")))
    if len(multi) == 1:
        return read_verse_mask(multi[0])[0]
    if len(multi) > 1:
        raise InputError(f"{case}: several multi-label masks ({', '.join(p.name for p in multi)}); keep one")
    raise InputError(
        f"{case}: ct.nii.gz has no vertebra masks (vertebrae_L3.nii.gz ... beside it or in segmentations/, "
        "or one VerSe mask named *seg*.nii.gz)"
    )


def _nifti_slices(case: Path) -> list[tuple[str, str, NiftiRef, str, float]]:
    """(series, level, ref, sop, z) of the labelled slices of one case, superior-first."""
    ct = case / "ct.nii.gz" if (case / "ct.nii.gz").is_file() else case / "ct.nii"
    data, affine = canonical_volume(ct)
    masks = _case_masks(case)
    shape = {m.shape for m in masks.values()}
    if shape != {tuple(data.shape[:3])}:
        raise InputError(f"{case}: masks of shape {sorted(shape)} do not match the CT volume {tuple(data.shape)}")
    levels = dominant_levels(masks, axis=2)
    out = []
    for k in range(data.shape[2] - 1, -1, -1):  # RAS+: the last plane is the most superior
        if levels[k] is None:
            continue
        z = float(affine[2, 3] + affine[2, 2] * k)
        out.append((str(ct), levels[k], NiftiRef(str(ct), k), f"{ct}#{k}", z, nifti_spacing(affine)))
    return out


def collect_slices(
    paths: Sequence[Path],
    labels: Sequence[Path] = (),
    min_slices: int = 1,
) -> SliceSet:
    """Find the labelled slices of DICOM, phantom and NIfTI inputs.

    Args:
        paths: DICOM folders/archives/files, phantom folders, NIfTI case folders (or folders of them).
        labels: labels tables for the DICOM inputs; a phantom folder's own ``labels.parquet`` is
            added automatically.
        min_slices: series with fewer slices are skipped (the engine's ``--min-slices``; 1 keeps all).

    Raises:
        InputError: nothing labelled was found, a labels table is unreadable, or the classes lack L3.
    """
    from spinelevel.engine.scan import scan_paths
    from spinelevel.engine.select import SelectOptions, select_series

    paths = [Path(p) for p in paths]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise InputError(f"training data not found: {', '.join(missing)}")
    table: LabelsTable | None = None
    for lab in [*labels, *(p / _PHANTOM_LABELS for p in paths if (p / _PHANTOM_LABELS).is_file())]:
        t = read_labels_table(lab)
        table = t if table is None else table.merged(t)

    rows: list[tuple] = []  # series, group, level, ref, sop, z, spacing
    summary: dict = {"inputs": [str(p) for p in paths], "labels": [str(p) for p in labels], "dicom_series": 0, "nifti_cases": 0, "excluded_slices": 0, "unlabelled_slices": 0}

    cases = sorted({c for p in paths for c in find_nifti_cases(p)})
    case_set = {c.resolve() for c in cases}
    for case in cases:
        for series, level, ref, sop, z, spacing in _nifti_slices(case):
            rows.append((series, series, level, ref, sop, z, spacing))
        summary["nifti_cases"] += 1

    dicom_paths = [p for p in paths if p.resolve() not in case_set]
    if dicom_paths:
        selection = select_series(scan_paths(dicom_paths), SelectOptions(min_slices=min_slices))
        plans = [pl for pl in selection.plans if not pl.slices[0].source.path.endswith((".nii", ".nii.gz"))]
        if plans and table is None:
            raise InputError(
                f"found {len(plans)} DICOM series but no labels table: give --labels LABELS "
                "(Parquet or CSV with series_uid, sop_uid, level)"
            )
        for plan in plans:
            used = False
            for ref in plan.slices:
                assert table is not None
                if ref.frame is not None:
                    # a labels table names slices by sop_uid, which all frames of a file share
                    summary["unlabelled_slices"] += 1
                    continue
                if ref.sop_uid not in table.level:
                    summary["unlabelled_slices"] += 1
                    continue
                level = table.level[ref.sop_uid]
                if level is None:
                    summary["excluded_slices"] += 1
                    continue
                group = table.group.get(ref.sop_uid) or plan.study_uid or plan.series_uid
                rows.append((plan.series_uid, group, level, ref.source, ref.sop_uid, float(ref.z_mm), plan.pixel_spacing))
                used = True
            summary["dicom_series"] += int(used)

    if not rows:
        raise InputError(
            "no labelled slices found in "
            + ", ".join(map(str, paths))
            + " (DICOM needs a labels table whose sop_uid values match the files; NIfTI needs ct.nii.gz with vertebra masks)"
        )
    present = {r[2] for r in rows}
    classes = tuple(c for c in CLASSES if c in present)
    if "L3" not in classes:
        raise InputError(f"the labelled slices hold classes {list(classes)} but no L3; the model must learn L3")
    index = {c: i for i, c in enumerate(classes)}
    items = tuple(SliceItem(series=s, group=g, label=index[lev], ref=ref, sop_uid=sop, z_mm=z, spacing=sp) for s, g, lev, ref, sop, z, sp in rows)
    summary["series"] = len({it.series for it in items})
    summary["groups"] = len({it.group for it in items})
    summary["slices"] = len(items)
    log.info("training data: %s", summary)
    return SliceSet(items=items, classes=classes, summary=summary)


def split_by_group(items: Sequence[SliceItem], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Split item indices into (train, validation) by patient/study group, deterministically.

    ``ceil(val_fraction * groups)`` groups go to validation. With one group only, series are the
    unit instead. ``val_fraction`` 0 gives an empty validation set.

    Raises:
        InputError: validation is asked for but there is a single series.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise InputError(f"--val-fraction {val_fraction} must be in [0, 1)")
    if val_fraction == 0.0:
        return list(range(len(items))), []
    keys = [it.group for it in items]
    if len(set(keys)) < 2:
        keys = [it.series for it in items]
    units = sorted(set(keys))
    if len(units) < 2:
        raise InputError("a validation split needs at least two series (split is by series, never by slice); give more data or --val-fraction 0")
    rng = np.random.default_rng(seed)
    order = [units[i] for i in rng.permutation(len(units))]
    n_val = min(len(units) - 1, max(1, math.ceil(val_fraction * len(units))))
    val_units = set(order[:n_val])
    train = [i for i, k in enumerate(keys) if k not in val_units]
    val = [i for i, k in enumerate(keys) if k in val_units]
    return train, val


class HUCache:
    """HU pixels of slices, read through the engine's decoder (or nibabel) and kept in memory.

    Integral HU images (the usual case: integer pixels, integer slope and intercept) are kept as
    int16, others as float32, so the cache gives back exactly what the decoder gave.
    """

    def __init__(self) -> None:
        self._arrays: dict[int, np.ndarray] = {}
        self._volume: tuple[str, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self._arrays)

    def read(self, item: SliceItem) -> np.ndarray:
        """Decode one slice (not cached)."""
        if isinstance(item.ref, NiftiRef):
            if self._volume is None or self._volume[0] != item.ref.path:
                data, _ = canonical_volume(Path(item.ref.path))
                self._volume = (item.ref.path, np.asarray(data, dtype=np.float32))
            return volume_slice(self._volume[1], item.ref.k)
        from spinelevel.engine.decode import read_hu

        try:
            hu, _ = read_hu(item.ref, _MAX_FILE_BYTES)
        except DecodeError as exc:
            raise InputError(f"{item.ref.label}: cannot decode training slice ({exc})") from None
        return hu

    def preload(self, items: Sequence[SliceItem], indices: Iterable[int], progress: Callable[[int], None] | None = None) -> None:
        """Decode and keep the given items; ``progress(n)`` is called after each slice."""
        for n, i in enumerate(indices, 1):
            if i not in self._arrays:
                hu = np.asarray(self.read(items[i]), dtype=np.float32)
                rounded = np.rint(hu)
                if np.array_equal(rounded, hu) and rounded.min(initial=0) >= -32768 and rounded.max(initial=0) <= 32767:
                    self._arrays[i] = rounded.astype(np.int16)
                else:
                    self._arrays[i] = hu
            if progress is not None:
                progress(n)
        self._volume = None

    def get(self, items: Sequence[SliceItem], i: int) -> np.ndarray:
        """HU of item ``i`` (float32), from memory when preloaded."""
        arr = self._arrays.get(i)
        if arr is None:
            return np.asarray(self.read(items[i]), dtype=np.float32)
        return arr.astype(np.float32)


def model_input(hu: np.ndarray, spec: PreprocessSpec, augment: AugmentSpec, rng: np.random.Generator, spacing: tuple[float, float] | None = None) -> np.ndarray:
    """(C, h, w) float32 model input of one slice: augment the HU image, then the engine's preprocessing.

    ``spacing``: the slice's PixelSpacing (preprocessing version 2); a crop of the augmentation keeps
    it (it cuts pixels, it does not resample them).
    """
    params = draw_params(augment, rng)
    return preprocess_slice(augment_hu(hu, params) if augment.enabled else hu, spec, spacing)


def nifti_spacing(affine: np.ndarray) -> tuple[float, float]:
    """(row mm, column mm) of ``volume_slice`` images of a canonical volume with this affine."""
    return float(np.linalg.norm(affine[:3, 1])), float(np.linalg.norm(affine[:3, 0]))
