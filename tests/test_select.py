"""Series selection: which series are classified, slice order, and every reason to skip."""

from __future__ import annotations

import math

import pytest

from spinelevel.engine.scan import FileHeader, SkippedFile
from spinelevel.engine.select import CT_IMAGE_STORAGE, SelectOptions, select_series
from spinelevel.engine.sources import Source

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def header(i: int, z: float, series: str = "1.2.3.4", **kw) -> FileHeader:  # noqa: ANN003
    fields = dict(
        source=Source(f"/data/{series}/f{i:03d}"),
        study_uid="1.2.3",
        series_uid=series,
        sop_uid=f"{series}.{i}",
        sop_class_uid=CT_IMAGE_STORAGE,
        modality="CT",
        image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
        transfer_syntax="1.2.840.10008.1.2.1",
        position=(0.0, 0.0, z),
        orientation=AXIAL,
        pixel_spacing=(0.7, 0.7),
        rows=512,
        columns=512,
        slice_thickness=2.5,
        frames=1,
        geometry_problem="",
    )
    fields.update(kw)
    return FileHeader(**fields)


def series(n: int = 12, spacing: float = 2.5, **kw) -> list[FileHeader]:  # noqa: ANN003
    # written in a scrambled order with InstanceNumber-like names: order must come from z
    zs = [-spacing * i for i in range(n)]
    order = sorted(range(n), key=lambda i: (i * 7) % n)
    return [header(i, zs[i], **kw) for i in order]


def test_orders_superior_first_by_position_not_name() -> None:
    sel = select_series(series())
    (plan,) = sel.plans
    zs = [s.z_mm for s in plan.slices]
    assert zs == sorted(zs, reverse=True)
    assert plan.spacing_mm == pytest.approx(2.5)
    assert plan.slice_thickness_mm == 2.5
    assert plan.flags == ()
    assert not sel.skipped_files and not sel.skipped_series


def test_reversed_normal_still_puts_superior_first() -> None:
    # column direction flipped: normal points to -z, so "along" ascends inferiorly
    files = series(orientation=(1.0, 0.0, 0.0, 0.0, -1.0, 0.0))
    (plan,) = select_series(files).plans
    zs = [s.z_mm for s in plan.slices]
    assert zs == sorted(zs, reverse=True)


@pytest.mark.parametrize(
    ("kw", "reason"),
    [
        ({"image_type": ("ORIGINAL", "PRIMARY", "LOCALIZER")}, "localizer"),
        ({"modality": "MR"}, "modality MR is not CT"),
        ({"sop_class_uid": "1.2.840.10008.5.1.4.1.1.7", "modality": "OT"}, "secondary capture"),
        ({"sop_class_uid": "1.2.840.10008.5.1.4.1.1.88.67", "modality": "SR"}, "dose report"),
        ({"sop_class_uid": "1.2.840.10008.5.1.4.1.1.481.3", "modality": "RTSTRUCT"}, "radiotherapy"),
        ({"sop_class_uid": "1.2.840.10008.5.1.4.1.1.2.1"}, "Enhanced CT file without Per-frame Functional Groups"),
        ({"frames": 40}, "multi-frame"),
        ({"orientation": (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)}, "not axial"),
        ({"orientation": (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)}, "not axial"),
    ],
)
def test_series_skips_carry_reasons(kw: dict, reason: str) -> None:
    files = series(**kw)
    sel = select_series(files)
    assert not sel.plans
    (skip,) = sel.skipped_series
    assert reason in skip.reason
    assert skip.n_files == len(files)
    assert not sel.skipped_files  # they belong to the skipped series
    assert len(skip.files) == len(files)
    assert all(reason in f.reason for f in skip.files)


def test_min_slices_option() -> None:
    sel = select_series(series(n=8))
    assert "fewer than --min-slices 10" in sel.skipped_series[0].reason
    assert select_series(series(n=8), SelectOptions(min_slices=8)).plans


def test_duplicate_positions_keep_one_and_flag() -> None:
    files = series()
    files.append(header(99, files[0].position[2]))
    sel = select_series(files)
    (plan,) = sel.plans
    assert len(plan.slices) == 12
    assert "duplicate_positions" in plan.flags
    (dropped,) = plan.dropped
    assert "duplicate slice position" in dropped.reason


def test_duplicate_sop_instance_is_read_once() -> None:
    files = series()
    twin = header(3, -7.5, source=Source("/archive.zip", "zip", "x/f003"))
    sel = select_series(files + [twin])
    assert len(sel.plans[0].slices) == 12
    assert "duplicate SOPInstanceUID" in sel.plans[0].dropped[0].reason


def test_inconsistent_spacing_and_size_are_dropped_not_mixed() -> None:
    files = [header(i, -2.5 * i) for i in range(14)]
    files[2] = header(2, -5.0, pixel_spacing=(0.9, 0.9))
    files[5] = header(5, -12.5, rows=256, columns=256)
    sel = select_series(files)
    (plan,) = sel.plans
    assert len(plan.slices) == 12
    assert "dropped_inconsistent_slices" in plan.flags
    reasons = sorted(f.reason for f in plan.dropped)
    assert any("pixel spacing" in r for r in reasons) and any("image size 256x256" in r for r in reasons)


def test_broken_geometry_files_are_dropped_with_reason() -> None:
    files = series(n=12)
    files.append(header(50, -100.0, position=None))
    files.append(header(51, -102.0, geometry_problem="ImagePositionPatient holds NaN or infinite values", position=None))
    sel = select_series(files)
    assert len(sel.plans[0].slices) == 12
    reasons = " | ".join(f.reason for f in sel.plans[0].dropped)
    assert "missing ImagePositionPatient" in reasons and "NaN" in reasons


def test_gantry_tilt_is_classified_and_flagged() -> None:
    tilt = math.radians(15)
    # rows along x, columns tilted in the y-z plane; stack moves along patient z only
    orientation = (1.0, 0.0, 0.0, 0.0, math.cos(tilt), math.sin(tilt))
    files = [header(i, -2.5 * i, orientation=orientation) for i in range(12)]
    (plan,) = select_series(files).plans
    assert "gantry_tilt" in plan.flags and "oblique" in plan.flags


def test_uneven_spacing_flag() -> None:
    files = [h for h in series(n=16) if h.sop_uid not in ("1.2.3.4.5", "1.2.3.4.6", "1.2.3.4.7")]
    (plan,) = select_series(files).plans
    assert "uneven_spacing" in plan.flags


def test_series_kept_apart_and_skipped_files_pass_through() -> None:
    junk = SkippedFile(Source("/data/readme.txt"), "not a DICOM file")
    files = series(series="1.2.3.5") + series(series="1.2.3.6") + [junk]
    sel = select_series(files)
    assert [p.series_uid for p in sel.plans] == ["1.2.3.5", "1.2.3.6"]
    assert sel.skipped_files == (junk,)


# -- real-archive rules (issue: real archives) ------------------------------------------------


def _duplicate_pair(a: dict, b: dict) -> tuple[list[FileHeader], str]:
    """A 12-slice series plus a second image at slice 5's position; returns (files, kept label)."""
    files = series(12)
    five = next(f for f in files if f.position == (0.0, 0.0, -5 * 2.5))
    files.remove(five)
    first = header(5, five.position[2], sop_uid="1.2.3.4.5a", source=Source("/data/a"), **a)
    second = header(5, five.position[2], sop_uid="1.2.3.4.5b", source=Source("/data/b"), **b)
    return files + [second, first], ""


@pytest.mark.parametrize(
    ("a", "b", "why"),
    [
        ({"image_type": ("ORIGINAL", "PRIMARY", "AXIAL")}, {"image_type": ("DERIVED", "PRIMARY", "AXIAL")}, "ORIGINAL image over DERIVED"),
        ({"lossy": False, "transfer_syntax": "1.2.840.10008.1.2.4.90"}, {"lossy": True, "transfer_syntax": "1.2.840.10008.1.2.4.91"}, "lossless over lossy"),
        ({"bits_stored": 16}, {"bits_stored": 8}, "BitsStored 16 over 8"),
        ({"instance_number": 3}, {"instance_number": 40}, "lower InstanceNumber"),
        # ORIGINAL beats lossless: the rule's first criterion decides
        ({"image_type": ("ORIGINAL", "PRIMARY", "AXIAL"), "lossy": True}, {"image_type": ("DERIVED", "PRIMARY", "AXIAL"), "lossy": False}, "ORIGINAL image over DERIVED"),
    ],
)
def test_duplicate_positions_keep_the_preferred_image(a: dict, b: dict, why: str) -> None:
    files, _ = _duplicate_pair(a, b)
    for order in (files, list(reversed(files))):  # whatever order the scan met them in
        (plan,) = select_series(order).plans
        assert "/data/a" in [s.source.path for s in plan.slices]
        assert "/data/b" not in [s.source.path for s in plan.slices]
        (drop,) = [d for d in plan.dropped if d.source.path == "/data/b"]
        assert "kept /data/a" in drop.reason and why in drop.reason
        assert "duplicate_positions" in plan.flags


def test_the_same_instance_twice_keeps_the_lossless_copy() -> None:
    files = series(12)
    lossy = [header(0, f.position[2], sop_uid=f.sop_uid, source=Source("/copies/" + f.source.path.rsplit("/", 1)[1]), lossy=True) for f in files[:3]]
    # the lossy copies sort first by name: the rule, not the name, must decide
    lossy = [FileHeader(**{**{k: getattr(x, k) for k in FileHeader.__slots__}, "source": Source("/a" + x.source.path)}) for x in lossy]
    (plan,) = select_series(lossy + files).plans
    assert all(not s.source.path.startswith("/a/copies") for s in plan.slices)
    assert sum("lossless over lossy" in d.reason for d in plan.dropped) == 3


def test_one_slice_series_is_classifiable_with_min_slices_1() -> None:
    (plan,) = select_series([header(0, 10.0)], SelectOptions(min_slices=1)).plans
    assert len(plan.slices) == 1 and plan.spacing_mm == 2.5  # the thickness stands for the spacing


def test_counts_say_what_they_count() -> None:
    files = [header(i, 50.0) for i in range(16)]  # 16 images, one position
    (skip,) = select_series(files).skipped_series
    assert skip.n_files == 16
    assert "1 distinct slice position among 16 images, fewer than --min-slices 10" in skip.reason


def test_an_unexpected_error_in_one_series_is_that_series_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from spinelevel.engine import select as select_mod

    real = select_mod._select_one

    def boom(files, options):  # noqa: ANN001, ANN202
        if files[0].series_uid == "bad":
            raise ZeroDivisionError("division by zero")
        return real(files, options)

    monkeypatch.setattr(select_mod, "_select_one", boom)
    sel = select_series(series(12) + series(12, series="bad"))
    assert len(sel.plans) == 1
    (skip,) = sel.skipped_series
    assert skip.status == "error" and skip.series_uid == "bad"
    assert skip.reason == "unexpected error while selecting the series (ZeroDivisionError: division by zero)"
    assert len(skip.files) == 12


def test_frames_are_slices_and_a_single_frame_twin_is_another_series() -> None:
    from spinelevel.engine.frames import MULTIFRAME_CT

    enhanced = next(iter(MULTIFRAME_CT))
    single = series(12)
    frames = [header(k, f.position[2], sop_uid="1.2.3.4.mf", sop_class_uid=enhanced, frames=12, frame=k + 1, source=Source("/data/mf.dcm")) for k, f in enumerate(sorted(single, key=lambda f: -f.position[2]))]
    sel = select_series(single + frames)
    assert len(sel.plans) == 2
    by_uid = {p.series_uid: p for p in sel.plans}
    twin = next(p for uid, p in by_uid.items() if uid != "1.2.3.4")
    assert twin.series_uid.startswith("2.25.") and "derived_series_uid" in twin.flags
    assert [s.frame for s in twin.slices] == list(range(1, 13))
    assert {s.slice_id for s in twin.slices} == {f"1.2.3.4.mf#{k}" for k in range(1, 13)}
    assert all(s.frame is None for s in by_uid["1.2.3.4"].slices)
    assert not by_uid["1.2.3.4"].dropped  # no duplicates: the twins are apart


@pytest.mark.parametrize(("normal_row", "words"), [((0.0, 1.0, 0.0, 0.0, 0.0, -1.0), "sagittal slices"), ((1.0, 0.0, 0.0, 0.0, 0.0, -1.0), "coronal slices")])
def test_not_axial_says_which_plane(normal_row: tuple, words: str) -> None:
    (skip,) = select_series(series(orientation=normal_row)).skipped_series
    assert words in skip.reason


def test_a_tilted_gantry_is_not_called_a_reformat() -> None:
    c, s = math.cos(math.radians(22)), math.sin(math.radians(22))
    (skip,) = select_series(series(orientation=(1.0, 0.0, 0.0, 0.0, c, s))).skipped_series
    assert "22 degrees" in skip.reason and "tilted gantry" in skip.reason and "sagittal" not in skip.reason
