"""Labels: the labels table, vertebra names, and labels from synthetic mask volumes in both namings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from spinelevel.errors import InputError
from spinelevel.training.labels import (
    VERSE_LABELS,
    dominant_levels,
    read_labels_table,
    read_totalsegmentator_masks,
    read_verse_mask,
    vertebra_class,
    volume_slice,
)

nib = pytest.importorskip("nibabel")

# Vertebrae along the RAS+ z axis (index 0 = most inferior): name -> (first, last) plane, inclusive.
# Gaps are discs (no vertebral pixels); plane 14 is shared 50/50 by L2 and L3 (an ambiguous slice);
# L6 sits between L5 and the sacrum.
BLOCKS = {"sacrum": (0, 2), "L6": (3, 3), "L5": (4, 6), "L4": (8, 10), "L3": (12, 14), "L2": (14, 17), "T12": (19, 21)}
SHAPE = (6, 4, 23)
VERSE_NUMBER = {v: k for k, v in VERSE_LABELS.items()}
# Expected class per plane, inferior first (plane 14: L2 and L3 each half -> excluded).
EXPECTED = ["S", "S", "S", None, "L5", "L5", "L5", None, "L4", "L4", "L4", None, "L3", "L3", None, "L2", "L2", "L2", None, "T", "T", "T", None]


def _masks() -> dict[str, np.ndarray]:
    masks = {}
    for name, (a, b) in BLOCKS.items():
        m = np.zeros(SHAPE, dtype=np.uint8)
        m[:, :, a : b + 1] = 1
        masks[name] = m
    # Plane 14: L3 keeps the left half, L2 the right half.
    masks["L3"][3:, :, 14] = 0
    masks["L2"][:3, :, 14] = 0
    return masks


def _affine(flip_z: bool = False) -> np.ndarray:
    aff = np.diag([0.8, 0.8, 5.0, 1.0])
    if flip_z:  # stored superior-first: the reader must reorient
        aff[2, 2] = -5.0
        aff[2, 3] = 5.0 * (SHAPE[2] - 1)
    return aff


def _save(data: np.ndarray, path: Path, affine: np.ndarray, flip_z: bool) -> None:
    arr = data[:, :, ::-1] if flip_z else data
    nib.save(nib.Nifti1Image(np.ascontiguousarray(arr), affine), str(path))


def write_case(root: Path, naming: str, flip_z: bool = False) -> Path:
    """A NIfTI case: ct.nii.gz (HU rising with z so slices are recognisable) and masks."""
    root.mkdir(parents=True, exist_ok=True)
    aff = _affine(flip_z)
    ct = np.broadcast_to(np.arange(SHAPE[2], dtype=np.int16)[None, None, :] * 10, SHAPE).copy()
    ct[0, 0, :] = -1000  # a marker pixel: RAS (x=0, y=0) is the patient's right, posterior corner
    _save(ct, root / "ct.nii.gz", aff, flip_z)
    masks = _masks()
    if naming == "totalsegmentator":
        seg = root / "segmentations"
        seg.mkdir()
        for name, m in masks.items():
            _save(m, seg / (f"vertebrae_{name}.nii.gz" if name != "sacrum" else "sacrum.nii.gz"), aff, flip_z)
        _save(np.ones(SHAPE, np.uint8), seg / "liver.nii.gz", aff, flip_z)  # not a vertebra: ignored
    else:
        multi = np.zeros(SHAPE, dtype=np.uint8)
        for name, m in masks.items():
            multi[m > 0] = VERSE_NUMBER[name]
        _save(multi, root / "case_seg-vert_msk.nii.gz", aff, flip_z)
    return root


def test_dominant_levels_excludes_discs_overlaps_and_l6() -> None:
    assert dominant_levels(_masks(), axis=2) == EXPECTED


def test_dominance_threshold_decides_shared_slices() -> None:
    masks = _masks()
    masks["L3"][:, :, 14] = 1
    masks["L2"][:, :, 14] = 0
    masks["L2"][0, 0, 14] = 1  # 1 of 25 pixels: L3 holds 96 %
    assert dominant_levels(masks)[14] == "L3"
    assert dominant_levels(masks, dominance=0.99)[14] is None


def _partial_spine(bottom_plane: int = 4) -> dict[str, np.ndarray]:
    """L2 and L3 labelled, L4 in the image but not: each vertebra a 6x4 body over planes and a
    small articular process (2 pixels) reaching 4 planes beyond the body's inferior end."""
    masks = {}
    for name, body in (("L3", (bottom_plane + 4, bottom_plane + 9)), ("L2", (bottom_plane + 12, bottom_plane + 17))):
        m = np.zeros((6, 4, 30), dtype=np.uint8)
        m[:, :, body[0] : body[1] + 1] = 1
        m[0, 0:2, body[0] - 4 : body[0]] = 1  # inferior articular process over the disc and the next body
        masks[name] = m
    return masks


def test_end_vertebra_is_trimmed_where_its_neighbour_is_unlabelled() -> None:
    # VerSe cases labelled down to L3 (sub-verse012): below L3's body only its articular processes
    # are labelled, over the disc and L4's body, and would make L3 dominant there
    masks = _partial_spine()
    levels = dominant_levels(masks)
    assert [k for k, v in enumerate(levels) if v == "L3"] == list(range(8, 14))  # the body only
    assert all(levels[k] is None for k in range(4, 8))
    # between L3 and L2 (both labelled) nothing changes: L2's processes alone over the disc (14-15)
    # keep the dominance rule's answer
    assert [k for k, v in enumerate(levels) if v == "L2"] == list(range(14, 22))
    # reversed slice order (stored superior first): the same slices
    rev = dominant_levels({n: m[:, :, ::-1] for n, m in masks.items()})
    assert rev == levels[::-1]


def test_end_vertebra_cut_by_the_field_of_view_is_kept() -> None:
    masks = _partial_spine(bottom_plane=0)  # the processes reach plane 0: L3 is cut by the FOV
    levels = dominant_levels(masks)
    assert [k for k, v in enumerate(levels) if v == "L3"] == list(range(0, 10))
    # with the neighbour labelled nothing is trimmed either
    masks = _partial_spine()
    l4 = np.zeros((6, 4, 30), dtype=np.uint8)
    l4[:, :, 0:3] = 1
    masks["L4"] = l4
    assert dominant_levels(masks)[4:8] == ["L3"] * 4


@pytest.mark.parametrize("flip_z", [False, True])
def test_totalsegmentator_folder(tmp_path: Path, flip_z: bool) -> None:
    case = write_case(tmp_path / "case", "totalsegmentator", flip_z)
    masks, affine = read_totalsegmentator_masks(case / "segmentations")
    assert set(masks) == set(BLOCKS)
    assert affine[2, 2] > 0  # RAS+: z ascends
    assert dominant_levels(masks) == EXPECTED


@pytest.mark.parametrize("flip_z", [False, True])
def test_verse_multilabel(tmp_path: Path, flip_z: bool) -> None:
    case = write_case(tmp_path / "case", "verse", flip_z)
    masks, _ = read_verse_mask(case / "case_seg-vert_msk.nii.gz")
    assert set(masks) == set(BLOCKS)
    assert dominant_levels(masks) == EXPECTED


def test_verse_rejects_unknown_label(tmp_path: Path) -> None:
    bad = np.zeros(SHAPE, np.uint8)
    bad[0, 0, 0] = 99
    nib.save(nib.Nifti1Image(bad, _affine()), str(tmp_path / "m.nii.gz"))
    with pytest.raises(InputError, match="99"):
        read_verse_mask(tmp_path / "m.nii.gz")


@pytest.mark.parametrize("naming", ["totalsegmentator", "verse"])
@pytest.mark.parametrize("flip_z", [False, True])
def test_nifti_training_slices_are_superior_first(tmp_path: Path, naming: str, flip_z: bool) -> None:
    from spinelevel.training.data import HUCache, collect_slices

    write_case(tmp_path / "data" / "case1", naming, flip_z)
    data = collect_slices([tmp_path / "data"])
    levels = [data.classes[it.label] for it in data.items]
    assert levels == [lev for lev in EXPECTED[::-1] if lev is not None]
    assert data.summary["nifti_cases"] == 1
    z = [it.z_mm for it in data.items]
    assert z == sorted(z, reverse=True)
    cache = HUCache()
    first = cache.get(data.items, 0)
    # The first item is the most superior labelled plane (T12 at RAS index 21 -> HU 210).
    assert first.shape == (SHAPE[1], SHAPE[0])
    assert float(np.median(first)) == 210.0
    # DICOM layout: RAS x=0 (patient right) is the last column, y=0 (posterior) the last row.
    assert first[-1, -1] == -1000.0


def test_volume_slice_layout() -> None:
    vol = np.zeros((3, 2, 1))
    vol[0, 0, 0] = 1  # right, posterior
    img = volume_slice(vol, 0)
    assert img.shape == (2, 3) and img[-1, -1] == 1


@pytest.mark.parametrize(
    ("name", "cls"),
    [("T1", "T"), ("T12", "T"), ("T13", "T"), ("L1", "L1"), ("L5", "L5"), ("L6", None), ("C7", None), ("sacrum", "S"), ("S1", "S"), ("coccyx", "S")],
)
def test_vertebra_class(name: str, cls: str | None) -> None:
    assert vertebra_class(name) == cls


def test_vertebra_class_rejects_non_vertebra() -> None:
    with pytest.raises(InputError, match="not a vertebra"):
        vertebra_class("liver")


def test_labels_table_csv_and_parquet(tmp_path: Path) -> None:
    csv = tmp_path / "labels.csv"
    csv.write_text("series_uid,sop_uid,level,patient_id,z_mm\n1.2,1.2.1,L3,P1,-10.5\n1.2,1.2.2,,P1,-15\n")
    t = read_labels_table(csv)
    assert t.level == {"1.2.1": "L3", "1.2.2": None}
    assert t.group["1.2.1"] == "P1" and t.z_mm["1.2.1"] == -10.5
    pq.write_table(pa.table({"series_uid": ["a"], "sop_uid": ["a.1"], "level": ["S"]}), tmp_path / "l.parquet")
    assert read_labels_table(tmp_path / "l.parquet").level == {"a.1": "S"}


def test_labels_table_errors_name_the_problem(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("series_uid,sop_uid,level\n1,1.1,L7\n")
    with pytest.raises(InputError, match="L7"):
        read_labels_table(bad)
    (tmp_path / "nolevel.csv").write_text("series_uid,sop_uid\n1,1.1\n")
    with pytest.raises(InputError, match="level"):
        read_labels_table(tmp_path / "nolevel.csv")
    with pytest.raises(InputError, match="not found"):
        read_labels_table(tmp_path / "missing.parquet")
