"""The review report: re-reading series, plane choice, pictures, the page's data, the CLI."""

from __future__ import annotations

import json
import re
import shutil
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from browser.reportcase import phantom_case
from spinelevel.report.build import ReportOptions, build_report, draw_series, safe_name
from spinelevel.report.render import Band, draw_reconstruction, level_colours
from spinelevel.report.rundata import SeriesSlices, read_run
from spinelevel.report.volume import VolumeOptions, parse_label, pick_planes, positions, read_slice, read_views, source_for_label

CLASSES = ("T", "L1", "L2", "L3", "L4", "L5", "S")


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory, model_path: Path):  # noqa: ANN201
    base = tmp_path_factory.getbasetemp() / "report-case"
    base.mkdir(exist_ok=True)
    return phantom_case(base, model_path)


def _page_data(report: Path) -> dict:
    html = (report / "index.html").read_text(encoding="utf-8")
    match = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', html, re.S)
    assert match
    return json.loads(match.group(1))


# -- where the bytes are ---------------------------------------------------------------------------


def test_parse_label(tmp_path: Path) -> None:
    odd = tmp_path / "a::b"
    odd.write_bytes(b"x")
    archive = tmp_path / "x.zip"
    archive.write_bytes(b"PK")
    assert parse_label(str(odd)) == (str(odd), None)
    assert parse_label(f"{archive}::dir/member::2") == (str(archive), "dir/member::2")
    assert parse_label("/no/such/file") == ("/no/such/file", None)


def test_slices_are_reread_from_folder_zip_and_tar_alike(tmp_path: Path, case) -> None:  # noqa: ANN001
    import pydicom

    from spinelevel.engine.decode import decode_hu

    one = next(p for p in sorted((case.phantom / "study_0000").rglob("*")) if p.is_file() and pydicom.dcmread(p, stop_before_pixels=True).Modality == "CT" and "AXIAL" in pydicom.dcmread(p, stop_before_pixels=True).ImageType)
    with zipfile.ZipFile(tmp_path / "a.zip", "w") as zf:
        zf.write(one, "deep/one")
    with tarfile.open(tmp_path / "a.tar.gz", "w:gz") as tf:
        tf.add(one, "deep/one")
    want = decode_hu(pydicom.dcmread(one))
    for label in (str(one), f"{tmp_path / 'a.zip'}::deep/one", f"{tmp_path / 'a.tar.gz'}::deep/one"):
        got = read_slice(label, 1 << 30)
        np.testing.assert_array_equal(got.hu, want)  # phantoms are written in the standard orientation
        assert got.spacing == pytest.approx(tuple(float(v) for v in pydicom.dcmread(one).PixelSpacing))
    assert source_for_label(f"{tmp_path / 'a.tar.gz'}::deep/one").kind == "tar"
    from spinelevel.errors import DecodeError

    with pytest.raises(DecodeError, match="member not found"):
        read_slice(f"{tmp_path / 'a.zip'}::deep/two", 1 << 30)
    with pytest.raises(DecodeError, match="not found"):
        read_slice(str(tmp_path / "gone"), 1 << 30)


# -- planes and geometry ----------------------------------------------------------------------------


def test_sagittal_plane_goes_through_the_phantom_spine() -> None:
    from spinelevel.phantom import PhantomOptions, plan_study, render_slice

    for seed in range(4):
        spec = plan_study(PhantomOptions(size=128, seed=seed, coverage="abdomen"), 0)
        z = spec.series[0].z
        probes = [render_slice(spec, float(zz)) for zz in np.linspace(z[len(z) // 10], z[-len(z) // 10], 7)]
        ps = spec.pixel_spacing
        x, y = pick_planes(probes, (ps, ps))
        x_mm = spec.origin[0] + x * ps
        # the vertebral bodies sit on the body midline (plus a gentle scoliosis and rotation)
        assert abs(x_mm - spec.body_x) <= 12.0 + spec.scoliosis_mm, (seed, x_mm, spec.body_x)
        # the coronal row is behind the body centre (vertebral bodies are posterior) and in front of the table
        y_mm = spec.origin[1] + y * ps
        assert spec.center_y - 40 < y_mm < spec.table_y, (seed, y_mm)


def test_reconstruction_has_physical_aspect_ratio(tmp_path: Path) -> None:
    """A 5 mm series of 0.5 mm pixels: the picture's rows and columns are both ~mm_per_px mm."""
    from dicomgen import SeriesSpec, write_series

    spec = SeriesSpec(levels=["L3"] * 20, study_uid="1.2.3", series_uid="1.2.3.4", seed=1)
    files = write_series(tmp_path, spec, nested=False)
    import pydicom

    ds = [pydicom.dcmread(f) for f in files]
    ds.sort(key=lambda d: -float(d.ImagePositionPatient[2]))
    z = np.asarray([float(d.ImagePositionPatient[2]) for d in ds])
    sources = tuple(str(Path(d.filename)) for d in ds)
    views = read_views(sources, z, None, VolumeOptions(target_rows=200))
    extent = abs(z[-1] - z[0])
    rows, cols = views.sagittal.shape
    assert rows == pytest.approx(extent / views.mm_per_px + 1, abs=1.5)
    width_mm = ds[0].Rows * float(ds[0].PixelSpacing[0])
    # cropping to the body only removes air columns
    assert cols * views.mm_per_px <= width_mm + views.mm_per_px
    assert views.slices_failed == 0


def test_positions_never_decrease() -> None:
    assert positions(np.asarray([10.0, 5.0, np.nan, 0.0])).tolist() == [0.0, 5.0, 5.0, 10.0]


# -- pictures ---------------------------------------------------------------------------------------


def test_band_ticks_and_l3_line_are_where_the_table_says() -> None:
    n = 70
    levels = ["T"] * 10 + ["L1"] * 10 + ["L2"] * 10 + ["L3"] * 10 + ["L4"] * 10 + ["L5"] * 10 + ["S"] * 10
    argmax: list[str | None] = [None] * n
    argmax[5] = "T"  # agrees: no tick
    argmax[25] = "L4"  # disagrees: a tick in L4's colour
    colours = level_colours(CLASSES)
    band = Band(np.arange(n) * 2.0, tuple(levels), tuple(argmax), 35, colours)
    hu = np.full((140, 60), 300.0, dtype=np.float32)  # 140 rows of 1 mm = 70 slices of 2 mm
    img = np.asarray(draw_reconstruction(hu, 1.0, band, text=False))
    band_x = 60 + 1 + 2  # image (60 px), gap (1), inside the level band (6 px)
    tick_x = 60 + 1 + 6 + 1 + 1  # then a gap and the argmax band (4 px)
    assert tuple(img[65, band_x]) == colours["L3"] or tuple(img[64, band_x]) == colours["L3"]
    assert tuple(img[5, band_x]) == colours["T"]
    assert tuple(img[135, band_x]) == colours["S"]
    assert tuple(img[50, tick_x]) == colours["L4"]  # slice 25 at 50 mm
    assert tuple(img[10, tick_x]) != colours["T"]
    assert tuple(img[70, 30]) == (255, 255, 255)  # the L3 pick (slice 35, 70 mm) crosses the image
    full = draw_reconstruction(hu, 1.0, band, text=True, title="t")
    assert full.height > 140 and full.width > img.shape[1]


def test_draw_series_with_true_levels_on_a_phantom(tmp_path: Path, case) -> None:  # noqa: ANN001
    """Ground-truth levels drawn on a phantom from its zip: every picture, the L3 slice included."""
    import pyarrow.parquet as pq

    labels = {r["sop_uid"]: r["level"] for r in pq.read_table(case.phantom / "labels.parquet").to_pylist()}
    rows = [r for sl in read_run(case.run_dir).iter_slices() for r in [sl] if ".zip::" in sl.sources[0]]
    assert rows, "the zip study should have been classified"
    sl = rows[0]
    import pyarrow.dataset as ds

    sop = {r["source"]: r["sop_uid"] for r in ds.dataset(str(case.run_dir / "slices")).to_table(columns=["source", "sop_uid"]).to_pylist()}
    truth = [labels.get(sop[s]) for s in sl.sources]
    filled = [t or "L1" for t in truth]
    l3 = [i for i, t in enumerate(truth) if t == "L3"]
    argmax = list(filled)
    argmax[0] = "S"
    truth_sl = SeriesSlices(sl.series_uid, sl.sources, sl.slice_index, sl.z_mm, tuple(filled), tuple(argmax), sl.evaluated)
    out = tmp_path / "rep"
    (out / "full").mkdir(parents=True)
    (out / "thumbs").mkdir()
    result = draw_series(truth_sl, int(sl.slice_index[l3[len(l3) // 2]]), float(sl.z_mm[l3[len(l3) // 2]]), CLASSES, out, ReportOptions(workers=0))
    assert result["images"] == "ok", result
    assert set(result["thumbs"]) == {"sag", "cor", "ax"}
    from PIL import Image

    for t in result["thumbs"].values():
        thumb, full = Image.open(out / t["src"]), Image.open(out / t["full"])
        assert thumb.height <= 200 and full.height > thumb.height
        assert (thumb.width, thumb.height) == (t["w"], t["h"])
    assert (out / "full" / f"{safe_name(sl.series_uid)}_axial_l3.png").is_file()


# -- the report ------------------------------------------------------------------------------------


def test_report_lists_every_series_and_file(case) -> None:  # noqa: ANN001
    data = _page_data(case.report)
    rd = read_run(case.run_dir)
    assert sorted(r["series_uid"] for r in data["series"]) == sorted(r["series_uid"] for r in rd.series)
    assert sorted(map(tuple, data["skipped"])) == sorted(rd.skipped)
    by_uid = {r["series_uid"]: r for r in data["series"]}
    gone = by_uid[case.removed_series]
    assert gone["images"] == "unavailable" and "not found" in gone["images_reason"]
    drawn = [r for r in data["series"] if r["status"] == "ok" and r["series_uid"] != case.removed_series]
    assert len(drawn) == 2 and all(r["images"] == "ok" for r in drawn)
    for r in drawn:
        assert {"sag", "cor"} <= set(r["thumbs"])
        for t in r["thumbs"].values():
            assert (case.report / t["src"]).is_file() and (case.report / t["full"]).is_file()
            assert safe_name(r["series_uid"]) in t["src"]
        assert r["n_disagree"] is not None
    # evaluation found at RUN_DIR/evaluation
    assert data["metrics"]["n_series"] >= 1 and data["confusion_png"] == "confusion_matrix.png"
    assert (case.report / "confusion_matrix.png").is_file()


def test_no_patient_identity_in_the_report(case) -> None:  # noqa: ANN001
    html = (case.report / "index.html").read_text(encoding="utf-8")
    for value in case.patient_names + case.patient_ids:
        assert value not in html
        assert value.replace("^", " ") not in html
    assert "PatientName" not in html and "PatientID" not in html


def test_page_loads_nothing_from_the_network(case) -> None:  # noqa: ANN001
    html = (case.report / "index.html").read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)\s*=\s*["'](https?:)?//""", html)
    assert "http://" not in html.split('id="report-data"')[0] and "https://" not in html.split('id="report-data"')[0]


def test_max_series_draws_flagged_first(tmp_path: Path, case) -> None:  # noqa: ANN001
    summary = build_report(case.run_dir, tmp_path / "rep", ReportOptions(workers=0, max_series=1))
    data = _page_data(tmp_path / "rep")
    drawn = [r for r in data["series"] if r["images"] in ("ok", "unavailable")]
    assert len(drawn) == 1 and drawn[0]["flags"]
    ok = sum(r["status"] == "ok" for r in data["series"])
    assert summary.not_drawn == ok - 1 and summary.drawn + summary.unavailable == 1
    assert sum(r["images"] == "not rendered" for r in data["series"]) == ok - 1


def test_not_a_run_directory_is_one_clear_error(tmp_path: Path, case) -> None:  # noqa: ANN001
    from spinelevel.cli import app
    from spinelevel.errors import InputError

    partial = tmp_path / "partial"
    shutil.copytree(case.run_dir, partial)
    shutil.rmtree(partial / "slices")
    with pytest.raises(InputError, match=r"slices dataset slices/ is missing"):
        build_report(partial, tmp_path / "r")
    result = CliRunner().invoke(app, ["report", str(partial), "--out", str(tmp_path / "r")])
    assert result.exit_code == 1
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "slices" in lines[0] and lines[0].startswith("error:")
    result = CliRunner().invoke(app, ["report", str(tmp_path / "nothing"), "--out", str(tmp_path / "r")])
    assert result.exit_code == 1 and "no such run directory" in result.output
    result = CliRunner().invoke(app, ["report", str(case.run_dir), "--metrics", str(tmp_path), "--out", str(tmp_path / "r")])
    assert result.exit_code == 1 and "metrics.json" in result.output


def test_cli_report(tmp_path: Path, case) -> None:  # noqa: ANN001
    from spinelevel.cli import app

    out = tmp_path / "cli-report"
    result = CliRunner().invoke(app, ["report", str(case.run_dir), "--out", str(out), "--workers", "0", "--metrics", str(case.run_dir / "evaluation")])
    assert result.exit_code == 0, result.output
    assert "drawn" in result.output
    assert (out / "index.html").is_file()
    assert "open " in result.output


def test_flipped_and_transposed_orientations_are_turned_to_the_standard_view(tmp_path: Path) -> None:
    import pydicom

    from dicomgen import SeriesSpec, write_series
    from spinelevel.engine.decode import decode_hu

    for orientation, turn in (
        ((-1.0, 0.0, 0.0, 0.0, -1.0, 0.0), lambda a: a[::-1, ::-1]),
        ((0.0, 1.0, 0.0, 1.0, 0.0, 0.0), lambda a: a.T),
    ):
        spec = SeriesSpec(levels=["L3"], orientation=orientation, pixel_spacing=(0.7, 0.9), seed=3)
        path = write_series(tmp_path / str(orientation[0]), spec, nested=False)[0]
        raw = decode_hu(pydicom.dcmread(path))
        got = read_slice(str(path), 1 << 30)
        np.testing.assert_array_equal(got.hu, turn(raw))
        assert got.spacing == ((0.7, 0.9) if orientation[0] else (0.9, 0.7))
