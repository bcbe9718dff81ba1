"""Real-archive oddities reproduced in fixtures, end to end through `run`.

Each test names the real case it stands for (tests/data/realworld/SOURCES.md holds the real files
where their licence allows): anonymised files with empty UIDs, files without file meta, Enhanced and
Legacy Converted Enhanced CT, retired JPEG syntaxes, one-slice series, failures inside one series,
out-of-field-of-view values, and pydicom warnings that quote header values.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pydicom
import pytest
from pydicom.uid import generate_uid

from conftest import LEVELS_30
from dicomgen import SeriesSpec, read_back_hu, write_series
from spinelevel.engine.pipeline import RunOptions, run
from spinelevel.engine.select import SelectOptions

DATA = Path(__file__).parent / "data"


def _rows(out: Path, dataset: str = "slices") -> list[dict]:
    return pq.read_table(out / dataset).to_pylist()


def _levels_by_z(out: Path) -> dict[str, list[str]]:
    by: dict[str, list[tuple[float, str]]] = {}
    for r in _rows(out):
        by.setdefault(r["series_uid"], []).append((r["z_mm"], r["level"]))
    return {uid: [lv for _, lv in sorted(v, reverse=True)] for uid, v in by.items()}


# -- identity: empty UIDs, no file meta ------------------------------------------------------


def _blank_uids(paths: list[Path]) -> None:
    """The de-identification profile met in real archives: dataset UIDs present but empty, the
    file meta's Media Storage UIDs kept (e.g. TotalSegmentator's example_ct_dicom)."""
    for p in paths:
        ds = pydicom.dcmread(p)
        for kw in ("SOPInstanceUID", "SOPClassUID", "SeriesInstanceUID", "StudyInstanceUID"):
            ds[kw].value = ""
        ds.save_as(p)


def test_empty_uids_are_derived_and_resume(tmp_path: Path, model_path: Path) -> None:
    root = tmp_path / "in"
    a = write_series(root / "a", SeriesSpec(levels=LEVELS_30, seed=1), nested=False)
    b = write_series(root / "b", SeriesSpec(levels=LEVELS_30[:20], seed=2), nested=False)
    _blank_uids(a + b)
    out = tmp_path / "out"
    first = run([root], model_path, out, RunOptions(workers=0))
    assert first.series_ok == 2
    series = _rows(out, "series")
    assert all({"derived_series_uid", "derived_study_uid"} <= set(s["flags"]) for s in series)
    assert all(s["series_uid"].startswith("2.25.") for s in series)
    # folders a/ and b/ hold different series: the folder is part of the key
    assert len({s["series_uid"] for s in series}) == 2
    sops = {r["sop_uid"] for r in _rows(out)}
    assert sops == {pydicom.dcmread(p).file_meta.MediaStorageSOPInstanceUID for p in a + b}
    assert sorted(len(v) for v in _levels_by_z(out).values()) == [20, 30]
    assert _levels_by_z(out)[next(s["series_uid"] for s in series if s["n_slices"] == 30)] == LEVELS_30
    # a re-run derives the same UIDs, so it resumes instead of classifying again
    again = run([root], model_path, out, RunOptions(workers=0))
    assert again.series_already_done == 2 and again.series_ok == 0
    assert {s["series_uid"] for s in _rows(out, "series")} == {s["series_uid"] for s in series}


def test_a_file_nothing_identifies_names_the_missing_tags(tmp_path: Path, model_path: Path) -> None:
    root = tmp_path / "in"
    paths = write_series(root, SeriesSpec(levels=LEVELS_30[:12], seed=3), nested=False)
    ds = pydicom.dcmread(paths[0])
    ds.SOPInstanceUID = ""
    ds.file_meta.MediaStorageSOPInstanceUID = ""
    ds.save_as(paths[0])
    out = tmp_path / "out"
    run([root], model_path, out, RunOptions(workers=0))
    (row,) = [r for r in _rows(out, "skipped") if r["source"] == str(paths[0])]
    assert row["reason"] == "DICOM file without an instance UID: SOPInstanceUID (0008,0018) empty, MediaStorageSOPInstanceUID (0002,0003) empty"


def _write_without_meta(ds: pydicom.Dataset, path: Path) -> None:
    """No preamble, no file meta, implicit VR little endian: how 1990s scanners exported."""
    ds = ds.copy()
    del ds.file_meta
    ds.preamble = None
    with open(path, "wb") as fh:
        pydicom.dcmwrite(fh, ds, implicit_vr=True, little_endian=True, enforce_file_format=False)


def test_files_without_file_meta_decode_with_the_detected_encoding(tmp_path: Path, model_path: Path) -> None:
    # stands for a 1998 GE series of '.ct' files: UIDs in the dataset, no preamble, no file meta
    src = tmp_path / "src"
    spec = SeriesSpec(levels=LEVELS_30, seed=4)
    paths = write_series(src, spec, nested=False)
    root = tmp_path / "in"
    root.mkdir()
    for i, p in enumerate(paths):
        ds = pydicom.dcmread(p)
        _write_without_meta(ds, root / f"I{i:04d}.ct")
    raw = (root / "I0000.ct").read_bytes()
    assert raw[128:132] != b"DICM" and raw[:2] == b"\x08\x00"  # no preamble: the dataset starts at byte 0
    out = tmp_path / "out"
    summary = run([root], model_path, out, RunOptions(workers=0))
    assert summary.series_ok == 1 and summary.skipped_files == 0
    assert list(_levels_by_z(out).values()) == [LEVELS_30]
    from spinelevel.engine.decode import read_hu
    from spinelevel.engine.sources import Source

    hu, sop = read_hu(Source(str(root / "I0000.ct")), 1 << 30)
    assert np.array_equal(hu, read_back_hu(paths[0])) and sop == pydicom.dcmread(paths[0]).SOPInstanceUID


def test_acr_nema_file_without_any_uid_is_named(tmp_path: Path, model_path: Path) -> None:
    # stands for a Siemens ACR-NEMA 2.0 export (1996; no preamble, no file meta, no UIDs), whose
    # real copy could not be committed (no licence): pre-DICOM files have no instance identity
    paths = write_series(tmp_path / "src", SeriesSpec(levels=LEVELS_30[:3], seed=5), nested=False)
    ds = pydicom.dcmread(paths[0])
    for kw in ("SOPInstanceUID", "SOPClassUID", "SeriesInstanceUID", "StudyInstanceUID", "FrameOfReferenceUID"):
        del ds[kw]
    ds.RecognitionCode = "ACR-NEMA 2.0"
    root = tmp_path / "in"
    root.mkdir()
    _write_without_meta(ds, root / "image.ima")
    out = tmp_path / "out"
    run([root], model_path, out, RunOptions(workers=0, select=SelectOptions(min_slices=1)))
    (row,) = _rows(out, "skipped")
    assert row["reason"].startswith("DICOM file without an instance UID: SOPInstanceUID (0008,0018) absent, no file meta")


# -- multi-frame CT ----------------------------------------------------------------------------


def _legacy_converted(paths: list[Path], out: Path, series_uid: str | None = None, vary_rescale: bool = True) -> Path:
    """The series as one Legacy Converted Enhanced CT file (highdicom), with per-frame rescale."""
    import highdicom.legacy as hdl

    datasets = []
    for i, p in enumerate(paths):
        ds = pydicom.dcmread(p)
        if vary_rescale and i % 2:
            # same HU, other stored values: the rescale must come from each frame's functional group
            arr = ds.pixel_array.astype(np.int32) + 24
            ds.PixelData = arr.astype(np.int16).tobytes()
            ds.RescaleIntercept = str(float(ds.RescaleIntercept) - 24.0)
        datasets.append(ds)
    image = hdl.LegacyConvertedEnhancedCTImage(datasets, series_instance_uid=series_uid or generate_uid(), series_number=9, sop_instance_uid=generate_uid(), instance_number=1)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save_as(out)
    return out


@pytest.fixture(scope="module")
def multiframe(tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = tmp_path_factory.mktemp("mf")
    single = write_series(base / "single", SeriesSpec(levels=LEVELS_30, seed=6), nested=False)
    mf = _legacy_converted(single, base / "mf" / "legacy.dcm")
    per_frame = pydicom.dcmread(mf, stop_before_pixels=True).PerFrameFunctionalGroupsSequence
    assert "PixelValueTransformationSequence" in per_frame[0]  # per-frame rescale, as varied
    zpath = base / "zip" / "mf.zip"
    zpath.parent.mkdir()
    with zipfile.ZipFile(zpath, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.write(mf, "study/series/legacy.dcm")
    tpath = base / "zip" / "mf.tar.gz"
    with tarfile.open(tpath, "w:gz") as tf:
        tf.add(mf, "study/series/legacy.dcm")
    return {"single": base / "single", "mf": base / "mf", "zip": zpath, "tar": tpath, "file": mf}


def test_frames_classify_like_their_single_frame_series(tmp_path: Path, model_path: Path, multiframe: dict) -> None:
    out_s, out_m = tmp_path / "s", tmp_path / "m"
    run([multiframe["single"]], model_path, out_s, RunOptions(workers=0, sampling=_full()))
    run([multiframe["mf"]], model_path, out_m, RunOptions(workers=2, sampling=_full()))
    s, m = _rows(out_s), _rows(out_m)
    assert len(m) == 30 and sorted(r["frame"] for r in m) == list(range(1, 31))
    assert all(r["frame"] is None for r in s)
    key = lambda r: -r["z_mm"]  # noqa: E731
    for a, b in zip(sorted(s, key=key), sorted(m, key=key)):
        assert a["level"] == b["level"] and a["z_mm"] == b["z_mm"]
        assert a["p_L3"] == pytest.approx(b["p_L3"], abs=1e-6)
    assert [r["level"] for r in sorted(m, key=key)] == LEVELS_30
    (series,) = _rows(out_m, "series")
    l3 = next(r for r in m if r["slice_index"] == series["l3_index"])
    assert series["l3_frame"] == l3["frame"] and series["l3_sop_uid"] == l3["sop_uid"]
    assert pq.read_schema(next((out_m / "slices").glob("part-*.parquet"))).field("frame").type == "int32"


def _full():  # noqa: ANN202
    from spinelevel.engine.sampling import SamplingOptions

    return SamplingOptions(mode="full")


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_frames_inside_an_archive_and_resume(tmp_path: Path, model_path: Path, multiframe: dict, kind: str) -> None:
    out = tmp_path / "out"
    first = run([multiframe[kind]], model_path, out, RunOptions(workers=2))
    assert first.series_ok == 1
    assert list(_levels_by_z(out).values()) == [LEVELS_30]
    assert {r["source"] for r in _rows(out)} == {f"{multiframe[kind]}::study/series/legacy.dcm"}
    again = run([multiframe[kind]], model_path, out, RunOptions(workers=0))
    assert again.series_already_done == 1 and again.slices == 0


def test_a_multiframe_file_is_read_once_and_decoded_a_frame_at_a_time(tmp_path: Path, model_path: Path, multiframe: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    import pydicom.pixels

    from spinelevel.engine import decode

    reads: list[int] = []
    real_read = pydicom.dcmread

    def counting_read(fp, *a, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
        if kw.get("force") and not kw.get("stop_before_pixels"):
            reads.append(1)
        return real_read(fp, *a, **kw)

    indices: list[int | None] = []
    real_pixels = pydicom.pixels.pixel_array

    def spying_pixels(src, *a, index=None, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
        indices.append(index)
        return real_pixels(src, *a, index=index, **kw)

    monkeypatch.setattr(pydicom, "dcmread", counting_read)
    monkeypatch.setattr(pydicom.pixels, "pixel_array", spying_pixels)
    decode._PARSED.key = decode._PARSED.ds = None
    run([multiframe["mf"]], model_path, tmp_path / "out", RunOptions(workers=0, sampling=_full()))
    assert len(reads) == 1  # the file is parsed once, not once per frame
    assert len(indices) == 30 and None not in indices  # one frame per call, never the whole array


def test_multiframe_twin_with_the_same_series_uid_is_two_series(tmp_path: Path, model_path: Path) -> None:
    root = tmp_path / "in"
    uid = generate_uid()
    single = write_series(root / "single", SeriesSpec(levels=LEVELS_30, seed=7, series_uid=uid), nested=False)
    _legacy_converted(single, root / "converted" / "mf.dcm", series_uid=uid, vary_rescale=False)
    out = tmp_path / "out"
    summary = run([root], model_path, out, RunOptions(workers=0))
    assert summary.series_ok == 2
    series = {s["series_uid"]: s for s in _rows(out, "series")}
    assert uid in series and "duplicate_positions" not in series[uid]["flags"]
    (twin,) = [s for u, s in series.items() if u != uid]
    assert "derived_series_uid" in twin["flags"]
    assert all(v == LEVELS_30 for v in _levels_by_z(out).values())


def test_multiframe_on_the_dali_path(tmp_path: Path, model_path: Path, multiframe: dict) -> None:
    from spinelevel.engine.dali import dali_available

    if not dali_available():
        pytest.skip("nvidia-dali-cuda130 is not installed")
    out = tmp_path / "out"
    run([multiframe["mf"]], model_path, out, RunOptions(workers=0, preprocess="dali", sampling=_full()))
    assert list(_levels_by_z(out).values()) == [LEVELS_30]


def test_multiframe_in_the_review_report(tmp_path: Path, model_path: Path, multiframe: dict) -> None:
    from spinelevel.report.build import ReportOptions, build_report

    out = tmp_path / "out"
    run([multiframe["mf"]], model_path, out, RunOptions(workers=0))
    report = build_report(out, tmp_path / "report", ReportOptions())
    assert report.drawn == 1 and report.unavailable == 0
    assert list((tmp_path / "report").rglob("*.png"))


# -- one series must not take the run down ------------------------------------------------------


def test_a_single_slice_series_is_classified(tmp_path: Path, model_path: Path) -> None:
    root = tmp_path / "in"
    write_series(root, SeriesSpec(levels=["L3"], seed=8), nested=False)
    out = tmp_path / "out"
    summary = run([root], model_path, out, RunOptions(workers=0, select=SelectOptions(min_slices=1)))
    assert summary.series_ok == 1
    (row,) = _rows(out, "series")
    assert row["status"] == "ok" and row["n_slices"] == 1 and row["levels_present"] == ["L3"]


def test_an_exception_while_labelling_one_series_is_its_error_row(tmp_path: Path, model_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from spinelevel.engine import pipeline

    root = tmp_path / "in"
    bad_uid = generate_uid()
    write_series(root / "good", SeriesSpec(levels=LEVELS_30, seed=9))
    write_series(root / "bad", SeriesSpec(levels=LEVELS_30[:20], seed=10, series_uid=bad_uid))
    real = pipeline.label_series

    def fragile(probs, *a, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
        if len(probs) == 20:
            raise FloatingPointError("overflow in the decoder")
        return real(probs, *a, **kw)

    monkeypatch.setattr(pipeline, "label_series", fragile)
    out = tmp_path / "out"
    summary = run([root], model_path, out, RunOptions(workers=0))
    assert summary.series_ok == 1 and summary.series_error == 1
    (bad,) = [s for s in _rows(out, "series") if s["series_uid"] == bad_uid]
    assert bad["status"] == "error"
    assert bad["reason"] == "unexpected error while labelling the series (FloatingPointError: overflow in the decoder)"
    # every file of the failed series is accounted for
    assert sum(1 for r in _rows(out, "skipped") if "bad" in r["source"]) == 20
    manifest = json.loads((out / "run.json").read_text())["runs"][-1]
    assert manifest["status"] == "complete"


# -- retired JPEG (optional GDCM) -------------------------------------------------------------


@pytest.mark.parametrize("name", ["spectral_53", "progressive_55"])
def test_retired_jpeg_decodes_with_gdcm_like_dcmtk(name: str) -> None:
    from spinelevel.engine import retired_jpeg
    from spinelevel.engine.decode import decode_hu

    if not retired_jpeg.gdcm_available():
        pytest.fail("python-gdcm is a dev dependency: pip install -e '.[gdcm]'")
    ds = pydicom.dcmread(DATA / "retired_jpeg" / f"{name}.dcm")
    assert retired_jpeg.is_retired_jpeg(ds.file_meta.TransferSyntaxUID)
    reference = pydicom.dcmread(DATA / "retired_jpeg" / f"{name}_dcmdjpeg.dcm")
    assert np.array_equal(decode_hu(ds), decode_hu(reference))  # bit-exact against DCMTK's decoder


def test_retired_jpeg_without_gdcm_names_the_syntax_and_the_package(tmp_path: Path, model_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from spinelevel.engine import retired_jpeg

    monkeypatch.setattr(retired_jpeg, "gdcm_available", lambda: False)
    root = tmp_path / "in"
    root.mkdir()
    (root / "a.dcm").write_bytes((DATA / "retired_jpeg" / "progressive_55.dcm").read_bytes())
    out = tmp_path / "out"
    run([root], model_path, out, RunOptions(workers=0, select=SelectOptions(min_slices=1)))
    (row,) = _rows(out, "skipped")
    assert row["reason"] == "JPEG Full Progression, Non-Hierarchical (Process 10 and 12) (1.2.840.10008.1.2.4.55) is a retired JPEG transfer syntax; pip install python-gdcm to decode it"
    (series,) = _rows(out, "series")
    assert series["status"] == "error" and "retired JPEG transfer syntax" in series["reason"]


def test_installing_gdcm_does_not_change_the_decoder_of_current_syntaxes(monkeypatch: pytest.MonkeyPatch) -> None:
    from spinelevel.engine import decode

    if "gdcm" not in decode._plugins("1.2.840.10008.1.2.4.90"):
        pytest.fail("python-gdcm is a dev dependency: pip install -e '.[gdcm]'")
    used: list[str] = []
    import pydicom.pixels

    real = pydicom.pixels.pixel_array

    def spy(src, *a, decoding_plugin="", **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
        used.append(decoding_plugin)
        return real(src, *a, decoding_plugin=decoding_plugin, **kw)

    monkeypatch.setattr(pydicom.pixels, "pixel_array", spy)
    ds = pydicom.dcmread(DATA / "realworld" / "toshiba_ct_axial_j2k" / "ct_toshiba_axial_j2k.dcm")
    decode.decode_hu(ds)
    assert used == ["pylibjpeg"]



def _jls_files() -> list[Path]:
    out = []
    for p in sorted((DATA / "realworld").rglob("*.dcm")):
        try:
            if str(pydicom.dcmread(p, stop_before_pixels=True).file_meta.get("TransferSyntaxUID", "")) in ("1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"):
                out.append(p)
        except Exception:
            continue
    return out


def test_jpeg_ls_goes_to_charls_first_with_the_same_values(monkeypatch: pytest.MonkeyPatch) -> None:
    """pyjpegls (CharLS) decodes JPEG-LS about 4x faster than pylibjpeg, which pydicom tries first."""
    import pydicom.pixels

    from spinelevel.engine import decode

    files = _jls_files()
    assert len(files) >= 2  # lossless and near-lossless, real files
    real = pydicom.pixels.pixel_array
    used: list[str] = []

    def spy(src, *a, decoding_plugin="", **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
        used.append(decoding_plugin)
        return real(src, *a, decoding_plugin=decoding_plugin, **kw)

    for path in files:
        ds = pydicom.dcmread(path)
        reference = real(ds, decoding_plugin="pylibjpeg")
        monkeypatch.setattr(pydicom.pixels, "pixel_array", spy)
        used.clear()
        got = decode._pixel_array(ds, str(ds.file_meta.TransferSyntaxUID), None)
        monkeypatch.setattr(pydicom.pixels, "pixel_array", real)
        assert used == ["pyjpegls"], path.name
        assert got.dtype == reference.dtype and np.array_equal(got, reference), path.name


# -- values outside the field of view ---------------------------------------------------------


def test_out_of_fov_values_are_air_in_every_window() -> None:
    from spinelevel.engine.decode import AIR_HU, hu_from_stored
    from spinelevel.engine.preprocess import PreprocessSpec, preprocess_slice

    spec = PreprocessSpec(windows=((40.0, 400.0), (400.0, 1800.0), (-600.0, 1500.0)), input_size=(8, 8))
    body = np.full((8, 8), 40.0, np.float32)
    with_air, with_marks = body.copy(), body.copy()
    with_air[:, :3] = AIR_HU
    for mark in (-2000.0, -2048.0, -3024.0, -2900.0):  # the last: padding smeared by lossy compression
        with_marks[:, :3] = mark
        hu = hu_from_stored(with_marks, 1.0, 0.0)
        assert np.array_equal(preprocess_slice(hu, spec), preprocess_slice(with_air, spec))
    # real air noise below -1000 is left alone
    assert hu_from_stored(np.asarray([[-1024.0, -1090.0]]), 1.0, 0.0).tolist() == [[-1024.0, -1090.0]]


# -- third-party warnings must not leak header values -------------------------------------------


def test_pydicom_warnings_reach_no_output_and_are_counted(tmp_path: Path, model_path: Path) -> None:
    from pydicom import config

    root = tmp_path / "in"
    paths = write_series(root, SeriesSpec(levels=LEVELS_30[:12], seed=11), nested=False)
    secret_cs, secret_ui = "jane-doe-7781", "1.2.826.0.1.3680043.8.498.99.secret"
    saved = config.settings.writing_validation_mode
    config.settings.writing_validation_mode = config.IGNORE
    try:
        for i, p in enumerate(paths):
            ds = pydicom.dcmread(p)
            ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", secret_cs]  # read by the scan (main process)
            ds.SOPInstanceUID = f"{secret_ui}.{i}"  # read again by the decode workers
            ds.file_meta.MediaStorageSOPInstanceUID = f"{secret_ui}.{i}"
            ds.save_as(p)
    finally:
        config.settings.writing_validation_mode = saved
    exe = str(Path(sys.executable).with_name("spinelevel"))
    out = tmp_path / "out"
    proc = subprocess.run([exe, "run", str(root), "--model", str(model_path), "--out", str(out), "--workers", "2", "--verbose"], capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()
    stderr = proc.stderr.decode()
    assert "Invalid value for VR" in stderr and "<value>" in stderr  # --verbose shows the problem...
    assert secret_cs not in stderr and "secret" not in stderr  # ...but not the value
    blob = b"".join(p.read_bytes() for p in out.rglob("*") if p.is_file() and p.suffix != ".parquet")
    assert secret_cs.encode() not in blob
    manifest = json.loads((out / "run.json").read_text())["runs"][-1]
    assert manifest["third_party_log_records"] >= 12
    quiet = subprocess.run([exe, "run", str(root), "--model", str(model_path), "--out", str(tmp_path / "q"), "--workers", "2"], capture_output=True, timeout=300)
    assert quiet.returncode == 0 and b"Invalid value" not in quiet.stderr and b"secret" not in quiet.stderr


def test_redaction_keeps_the_problem_and_drops_the_value() -> None:
    from spinelevel.engine.thirdparty_log import redact

    assert redact("Invalid value for VR PN: 'DOE^JANE'. Please see <https://x>") == "Invalid value for VR PN: <value>. Please see <https://x>"
    assert redact('Value "12345678" is not valid for elements with a VR of IS') == "Value <value> is not valid for elements with a VR of IS"
    assert redact("bad element PatientID=PID-99, giving up") == "bad element PatientID=<value>, giving up"
