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
