"""Tests of spinelevel.phantom: DICOM validity, labels, geometry, determinism, compression, extras."""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pydicom
import pytest

from spinelevel.errors import InputError, OutputError
from spinelevel.levels import CLASSES
from spinelevel.phantom import (
    COVERAGES,
    Anatomy,
    PhantomOptions,
    generate,
    level_at,
    plan_study,
    render_slice,
)
from spinelevel.phantom.dicom import DOSE_SR_STORAGE, write_ct_slice

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def _read_all(root: Path) -> list[tuple[Path, pydicom.Dataset]]:
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix == "" and p.parent != root)
    return [(p, pydicom.dcmread(p)) for p in files]


def _is_axial(ds: pydicom.Dataset) -> bool:
    return ds.SOPClassUID == CT_IMAGE_STORAGE and "AXIAL" in ds.ImageType


def _order_ok(levels: list[str | None]) -> bool:
    ranks = [CLASSES.index(x) for x in levels if x is not None]
    return all(a <= b for a, b in zip(ranks, ranks[1:]))


@pytest.fixture(scope="module")
def cap(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, PhantomOptions, list]:
    """One full-coverage study with a second reconstruction, a localizer and a dose report."""
    out = tmp_path_factory.mktemp("cap") / "out"
    options = PhantomOptions(
        studies=1, seed=11, size=96, coverage="chest_abdomen_pelvis", thickness_mm=5.0,
        second_thickness_mm=3.0, variant="none", localizer_probability=1.0,
        dose_report_probability=1.0, second_recon_probability=1.0,
    )
    generate(out, options)
    return out, options, _read_all(out)


def test_files_are_valid_dicom(cap) -> None:
    out, options, files = cap
    assert files, "no files written"
    for path, ds in files:
        assert "." not in path.name and len(path.name) == 8
        assert ds.PatientName == "PHANTOM^0" and ds.PatientID == "PH11-0" and ds.PatientBirthDate
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID
        if _is_axial(ds):
            assert ds.Modality == "CT" and list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
            assert ds.BitsAllocated == 16 and ds.RescaleType == "HU" and ds.PhotometricInterpretation == "MONOCHROME2"
            assert ds.pixel_array.shape == (options.size, options.size)


def test_labels_cover_every_axial_slice(cap) -> None:
    out, _, files = cap
    labels = pq.read_table(out / "labels.parquet").to_pylist()
    axial = {ds.SOPInstanceUID: ds for _, ds in files if _is_axial(ds)}
    assert {r["sop_uid"] for r in labels} == set(axial)
    assert len(labels) == len(axial)
    for row in labels:
        ds = axial[row["sop_uid"]]
        assert row["series_uid"] == ds.SeriesInstanceUID and row["study_uid"] == ds.StudyInstanceUID
        assert row["z_mm"] == pytest.approx(float(ds.ImagePositionPatient[2]), abs=1e-3)
        assert (out / row["path"]).is_file()
    schema = pq.read_schema(out / "labels.parquet")
    assert str(schema.field("slice_index").type) == "int32" and str(schema.field("z_mm").type) == "double"


def test_every_class_present_and_in_order(cap) -> None:
    out, _, _ = cap
    by_series: dict[str, list] = defaultdict(list)
    for row in pq.read_table(out / "labels.parquet").to_pylist():
        by_series[row["series_uid"]].append(row)
    assert len(by_series) == 2
    for rows in by_series.values():
        rows.sort(key=lambda r: r["slice_index"])
        assert [r["slice_index"] for r in rows] == list(range(len(rows)))
        assert all(a["z_mm"] > b["z_mm"] for a, b in zip(rows, rows[1:])), "slice_index 0 must be most superior"
        levels = [r["level"] for r in rows]
        assert set(CLASSES) <= set(levels)
        assert _order_ok(levels)
        assert None in levels  # discs


def test_label_order_in_random_plans() -> None:
    for i in range(40):
        spec = plan_study(PhantomOptions(studies=40, seed=3, variant_probability=0.3), i)
        for series in spec.series:
            levels = level_at(spec.vertebrae, series.z)
            assert _order_ok(levels), (i, series.role)
            assert all(x in CLASSES for x in levels if x is not None)


def test_uids_are_unique_across_studies() -> None:
    # seed 2000 studies 2 and 20 once shared SOP instance UIDs (pydicom hashes the joined parts)
    options = PhantomOptions(studies=40, seed=2000, second_recon_probability=1.0, localizer_probability=1.0, dose_report_probability=1.0)
    uids: list[str] = []
    for i in range(options.studies):
        spec = plan_study(options, i)
        uids += [spec.study_uid, spec.frame_uid, spec.localizer_series_uid, spec.dose_series_uid]
        for series in spec.series:
            uids += [series.series_uid, *series.sop_uids]
    assert len(uids) == len(set(uids))


def test_disc_slices_are_unlabelled(cap) -> None:
    out, _, _ = cap
    verts = pq.read_table(out / "vertebrae.parquet").to_pylist()
    labels = pq.read_table(out / "labels.parquet").to_pylist()
    for row in labels:
        own = [v for v in verts if v["series_uid"] == row["series_uid"]]
        holder = [v for v in own if v["bottom_z_mm"] <= row["z_mm"] <= v["top_z_mm"]]
        if row["level"] is None:
            assert not holder or holder[0]["level"] is None
            assert own[0]["top_z_mm"] > row["z_mm"] > own[-1]["bottom_z_mm"]
        elif holder:
            assert holder[0]["level"] == row["level"]
        else:  # below the coccyx tip
            assert row["level"] == "S" and row["z_mm"] < own[-1]["bottom_z_mm"]


def test_vertebrae_table(cap) -> None:
    out, _, _ = cap
    verts = pq.read_table(out / "vertebrae.parquet").to_pylist()
    names = [v["vertebra"] for v in verts[: len(verts) // 2]]
    assert names[:13] == [f"T{i}" for i in range(1, 13)] + ["L1"] and names[-1] == "Co"
    assert all(v["top_z_mm"] > v["bottom_z_mm"] for v in verts)
    assert all(v["coverage"] == "chest_abdomen_pelvis" and v["variant"] is None for v in verts)
    l3 = [v for v in verts if v["vertebra"] == "L3"]
    assert all(v["in_fov"] and v["n_slices"] >= 5 for v in l3)
    lumbar_heights = [v["top_z_mm"] - v["bottom_z_mm"] for v in verts if v["vertebra"].startswith("L")]
    assert all(20 < h < 35 for h in lumbar_heights)
    for upper, lower in zip(verts, verts[1:]):
        if upper["series_uid"] == lower["series_uid"] and upper["vertebra"].startswith(("T", "L")):
            disc = upper["bottom_z_mm"] - lower["top_z_mm"]
            assert 1.5 <= disc <= 14.0, (upper["vertebra"], disc)


def test_geometry_is_consistent(cap) -> None:
    out, options, files = cap
    series: dict[str, list] = defaultdict(list)
    for _, ds in files:
        if _is_axial(ds):
            series[ds.SeriesInstanceUID].append(ds)
    frames = {s[0].FrameOfReferenceUID for s in series.values()}
    assert len(frames) == 1
    assert len({float(s[0].SliceThickness) for s in series.values()}) == 2
    for slices in series.values():
        slices.sort(key=lambda d: -float(d.ImagePositionPatient[2]))
        z = np.array([float(d.ImagePositionPatient[2]) for d in slices])
        spacing = float(slices[0].SpacingBetweenSlices)
        np.testing.assert_allclose(-np.diff(z), spacing, atol=2e-3)
        xy = {(float(d.ImagePositionPatient[0]), float(d.ImagePositionPatient[1])) for d in slices}
        assert len(xy) == 1
        for d in slices:
            assert [float(x) for x in d.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
            assert float(d.SliceLocation) == pytest.approx(float(d.ImagePositionPatient[2]))
            ps = [float(x) for x in d.PixelSpacing]
            assert ps[0] == ps[1] and ps[0] * d.Columns == pytest.approx(float(d.ReconstructionDiameter), rel=1e-3)
        numbers = sorted(d.InstanceNumber for d in slices)
        assert numbers == list(range(1, len(slices) + 1))
        assert len({d.SOPInstanceUID for d in slices}) == len(slices)


def test_pixels_look_like_ct(cap) -> None:
    out, _, files = cap
    labels = {r["sop_uid"]: r["level"] for r in pq.read_table(out / "labels.parquet").to_pylist()}
    for _, ds in files:
        if not _is_axial(ds) or labels[ds.SOPInstanceUID] != "L3":
            continue
        hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        body = hu[hu > -500]
        assert (hu < -900).mean() > 0.1  # air around the patient
        assert (hu > 300).sum() > 5  # bone
        assert -150 < np.median(body) < 150  # fat, muscle and organs
        assert hu.max() <= 3071


def test_extra_series(cap) -> None:
    out, _, files = cap
    localizers = [ds for _, ds in files if "LOCALIZER" in ds.get("ImageType", [])]
    assert 1 <= len(localizers) <= 3
    assert all(ds.pixel_array.ndim == 2 and ds.SOPClassUID == CT_IMAGE_STORAGE for ds in localizers)
    srs = [ds for _, ds in files if ds.SOPClassUID == DOSE_SR_STORAGE]
    assert len(srs) == 1 and srs[0].Modality == "SR" and "PixelData" not in srs[0]
    labelled = {r["sop_uid"] for r in pq.read_table(out / "labels.parquet").to_pylist()}
    assert not labelled & {ds.SOPInstanceUID for ds in localizers + srs}
    study = {ds.StudyInstanceUID for _, ds in files}
    assert len(study) == 1


def test_no_extras_when_switched_off() -> None:
    options = PhantomOptions(studies=6, seed=2, localizer_probability=0, dose_report_probability=0, second_recon_probability=0)
    for i in range(6):
        spec = plan_study(options, i)
        assert len(spec.series) == 1 and spec.localizer_images == 0 and not spec.dose_report


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and p.name != "phantom.json"}


def test_deterministic_and_independent_of_workers(tmp_path: Path) -> None:
    options = PhantomOptions(studies=2, seed=5, size=64, coverage="lumbar", thickness_mm=5.0, compression="mixed",
                             second_recon_probability=0, localizer_probability=1.0)
    a = _tree(tmp_path / "a") if generate(tmp_path / "a", options) else {}
    b = _tree(tmp_path / "b") if generate(tmp_path / "b", options, workers=2) else {}
    assert a.keys() == b.keys() and a == b
    other = dataclasses.replace(options, seed=6)
    generate(tmp_path / "c", other)
    assert _tree(tmp_path / "c") != a


@pytest.mark.parametrize("compression", ["rle", "jpeg2000", "jpegls"])
@pytest.mark.parametrize(("intercept", "signed", "padding"), [(-1024.0, False, True), (-1024.0, True, True), (-8192.0, False, False), (-8192.0, True, True)])
def test_lossless_round_trip(tmp_path: Path, compression: str, intercept: float, signed: bool, padding: bool) -> None:
    spec = plan_study(PhantomOptions(size=64, seed=1, coverage="lumbar", thickness_mm=5.0), 0)
    spec = dataclasses.replace(spec, rescale_intercept=intercept, signed=signed, padding=padding,
                               bits_stored=12 if (not signed and intercept == -1024.0) else 16)
    series = dataclasses.replace(spec.series[0], compression="none")
    hu = render_slice(spec, float(series.z[3])) + np.random.default_rng(0).normal(0, 20, (64, 64)).astype(np.float32)
    write_ct_slice(tmp_path / "raw", spec, series, 3, hu)
    write_ct_slice(tmp_path / "enc", spec, dataclasses.replace(series, compression=compression), 3, hu)
    raw, enc = pydicom.dcmread(tmp_path / "raw"), pydicom.dcmread(tmp_path / "enc")
    assert enc.file_meta.TransferSyntaxUID.is_compressed
    assert enc.SOPInstanceUID == raw.SOPInstanceUID
    np.testing.assert_array_equal(enc.pixel_array, raw.pixel_array)
    hu_back = raw.pixel_array.astype(np.float64) + intercept
    r = (np.arange(64) - 31.5) / 32.0
    inside = (r[:, None] ** 2 + r[None, :] ** 2 <= 1.0) | (not padding)
    if padding:
        assert (raw.pixel_array[~inside] == raw.PixelPaddingValue).all()
    np.testing.assert_allclose(hu_back[inside], np.clip(np.rint(hu), -1024, 3071)[inside])


@pytest.mark.parametrize("variant", ["six_lumbar", "sacralised_L5"])
def test_variants(tmp_path: Path, variant: str) -> None:
    options = PhantomOptions(studies=1, seed=4, size=64, coverage="lumbar", thickness_mm=2.5, variant=variant,
                             second_recon_probability=0)
    generate(tmp_path / "out", options)
    verts = pq.read_table(tmp_path / "out" / "vertebrae.parquet").to_pylist()
    labels = pq.read_table(tmp_path / "out" / "labels.parquet").to_pylist()
    assert {v["variant"] for v in verts} == {variant}
    names = [v["vertebra"] for v in verts]
    levels = [r["level"] for r in sorted(labels, key=lambda r: r["slice_index"])]
    assert _order_ok(levels) and {"L1", "L2", "L3", "L4", "L5", "S"} <= set(levels)
    if variant == "six_lumbar":
        l6 = next(v for v in verts if v["vertebra"] == "L6")
        assert l6["level"] is None and l6["in_fov"]
        inside = [r for r in labels if l6["bottom_z_mm"] <= r["z_mm"] <= l6["top_z_mm"]]
        assert inside and all(r["level"] is None for r in inside)
    else:
        assert "L6" not in names
        l5 = next(v for v in verts if v["vertebra"] == "L5")
        s1 = next(v for v in verts if v["vertebra"] == "S1")
        assert l5["level"] == "L5" and l5["bottom_z_mm"] - s1["top_z_mm"] < 4.0


def test_partial_coverage_misses_l3() -> None:
    options = PhantomOptions(studies=10, seed=9, coverage="partial")
    for i in range(10):
        spec = plan_study(options, i)
        for series in spec.series:
            levels = set(level_at(spec.vertebrae, series.z))
            assert "L3" not in levels and len(levels - {None}) >= 2


def test_coverages_and_parameters_vary() -> None:
    specs = [plan_study(PhantomOptions(studies=60, seed=1), i) for i in range(60)]
    assert {s.coverage for s in specs} == set(COVERAGES)
    assert all(300 <= s.fov <= 500 for s in specs)
    assert {s.rescale_intercept for s in specs} == {-1024.0, -8192.0} and {s.signed for s in specs} == {True, False}
    thick = [se.thickness for s in specs for se in s.series]
    assert min(thick) < 1.5 and max(thick) >= 5.0


def test_anatomy_by_level() -> None:
    spec = plan_study(PhantomOptions(size=128, seed=2, coverage="chest_abdomen_pelvis", variant="none"), 0)
    anatomy = Anatomy(spec)

    def mid(name: str) -> np.ndarray:
        v = spec.vertebra(name)
        return anatomy.render((v.top_z + v.bottom_z) / 2)

    chest, l3, pelvis = mid("T6"), mid("L3"), anatomy.render(spec.femoral_head_z)
    area = spec.pixel_spacing**2
    above_table = (spec.origin[1] + np.arange(128) * spec.pixel_spacing < spec.table_y)[:, None]
    chest, l3 = np.where(above_table, chest, 0.0), np.where(above_table, l3, 0.0)
    assert ((chest > -950) & (chest < -700)).sum() * area > 5000  # lungs
    assert ((l3 > -950) & (l3 < -700)).sum() * area < 500  # no lung at L3
    assert (pelvis > 300).sum() * area > (l3 > 300).sum() * area  # pelvis and femora


def test_invalid_options_and_output(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="compression"):
        PhantomOptions(compression="jpeg")
    with pytest.raises(InputError, match="size"):
        PhantomOptions(size=8)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    with pytest.raises(OutputError, match="not empty"):
        generate(tmp_path / "busy", PhantomOptions(size=64))


def test_cli(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from spinelevel.cli import app

    # pick a seed whose random plan is small, so the test stays fast
    seed = next(s for s in range(200) if sum(len(x.z) for x in plan_study(PhantomOptions(size=64, seed=s), 0).series) < 120)
    runner = CliRunner()
    result = runner.invoke(app, ["phantom", str(tmp_path / "out"), "--studies", "1", "--seed", str(seed), "--size", "64", "--compression", "rle", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "slices/s" in result.output
    assert (tmp_path / "out" / "labels.parquet").is_file()
    again = runner.invoke(app, ["phantom", str(tmp_path / "out"), "--studies", "1", "--size", "64", "--quiet"])
    assert again.exit_code == 1
    bad = runner.invoke(app, ["phantom", str(tmp_path / "x"), "--compression", "zip"])
    assert bad.exit_code != 0
