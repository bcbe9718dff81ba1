"""End to end on the CPU: DICOM folders and archives in, Parquet out, checked row by row."""

from __future__ import annotations

import json
import shutil
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pydicom.data
import pytest
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless

from conftest import L3_PICK_30, LEVELS_30
from dicomgen import SeriesSpec, level_sequence, write_localizer, write_series, write_sr
from modelgen import build_model, reference_probs
from spinelevel.card import ModelCard, read_card
from spinelevel.engine.decode import read_hu
from spinelevel.engine.pipeline import RunOptions, run
from spinelevel.engine.preprocess import PreprocessSpec, preprocess_slice
from spinelevel.engine.sampling import SamplingOptions
from spinelevel.engine.sources import Source
from spinelevel.engine.writer import SERIES_SCHEMA, SKIPPED_SCHEMA, slices_schema
from spinelevel.errors import CardError, InputError, OutputError

STUDY = "1.2.826.0.1.3680043.8.498.1"
FULL = SamplingOptions(mode="full")


def _tables(out: Path) -> tuple[list[dict], list[dict], list[dict]]:
    return tuple(pq.read_table(out / name).to_pylist() for name in ("slices", "series", "skipped"))  # type: ignore[return-value]


def _messy_dir(root: Path) -> Path:
    """Two series (JPEG 2000 lossless, JPEG-LS), a scout, a dose SR and a junk file."""
    write_series(root, SeriesSpec(levels=LEVELS_30, study_uid=STUDY, series_uid=STUDY + ".3", syntax=JPEG2000Lossless, seed=3))
    write_series(root, SeriesSpec(levels=LEVELS_30, study_uid=STUDY, series_uid=STUDY + ".4", syntax=JPEGLSLossless, seed=4))
    write_localizer(root / "d1", STUDY)
    write_sr(root / "d0" / "e1", STUDY)
    (root / "d2").mkdir(exist_ok=True)
    (root / "d2" / "notes").write_text("not dicom")
    return root


def test_run_classifies_orders_and_accounts_for_every_file(tmp_path: Path, series_dir: Path, model_path: Path) -> None:
    inp = _messy_dir(shutil.copytree(series_dir, tmp_path / "in"))
    out = tmp_path / "out"
    summary = run([inp], model_path, out, RunOptions(workers=0, batch_size=7, sampling=FULL))
    assert (summary.series_ok, summary.series_skipped, summary.series_error) == (4, 2, 0)
    assert summary.slices == 120
    slices, series, skipped = _tables(out)
    assert pq.read_table(out / "slices").schema.equals(slices_schema(read_card(model_path).classes))
    assert pq.read_table(out / "series").schema.equals(SERIES_SCHEMA)
    assert pq.read_table(out / "skipped").schema.equals(SKIPPED_SCHEMA)

    ok = [s for s in series if s["status"] == "ok"]
    assert len(ok) == 4
    for s in ok:
        assert s["l3_index"] == L3_PICK_30 and (s["l3_first_index"], s["l3_last_index"]) == (13, 17)
        assert s["levels_present"] == ["T", "L1", "L2", "L3", "L4", "L5", "S"]
        assert s["flags"] == [] and s["n_slices"] == 30 and s["n_evaluated"] == 30
        assert s["backend"] == "onnxruntime" and len(s["model_sha256"]) == 64
        rows = sorted((r for r in slices if r["series_uid"] == s["series_uid"]), key=lambda r: r["slice_index"])
        assert [r["level"] for r in rows] == LEVELS_30
        assert [r["level_argmax"] for r in rows] == LEVELS_30
        assert [r["z_mm"] for r in rows] == sorted((r["z_mm"] for r in rows), reverse=True)
        assert rows[L3_PICK_30]["sop_uid"] == s["l3_sop_uid"] and rows[L3_PICK_30]["z_mm"] == s["l3_z_mm"]
        assert all(r["evaluated"] for r in rows)
    reasons = {s["reason"] for s in series if s["status"] == "skipped"}
    assert reasons == {"localizer (scout) images", "dose report (SR), not an image"}

    every_file = {str(p) for p in inp.rglob("*") if p.is_file()}
    accounted = {r["source"] for r in slices} | {r["source"] for r in skipped}
    assert accounted == every_file
    assert len(slices) + len(skipped) == len(every_file)

    manifest = json.loads((out / "run.json").read_text())
    (entry,) = manifest["runs"]
    assert entry["status"] == "complete" and entry["counts"]["slices"] == 120
    assert entry["card"]["classes"] == list(read_card(model_path).classes)
    assert "middle" in entry["l3_definition"]


def test_probabilities_pass_through_unchanged(tmp_path: Path, series_dir: Path, model_path: Path) -> None:
    out = tmp_path / "out"
    run([series_dir], model_path, out, RunOptions(workers=0, batch_size=4, sampling=FULL))
    slices = pq.read_table(out / "slices").to_pylist()
    spec = PreprocessSpec.from_card(read_card(model_path))
    classes = read_card(model_path).classes
    for row in slices[:: 7]:
        hu, _ = read_hu(Source(row["source"]), 1 << 30)
        expected = reference_probs(preprocess_slice(hu, spec)[None])[0]
        got = np.asarray([row[f"p_{c}"] for c in classes], dtype=np.float32)
        np.testing.assert_allclose(got, expected, atol=1e-5)


def test_logit_models_get_softmax_and_fixed_batch_models_work(tmp_path: Path, series_dir: Path, model_path: Path) -> None:
    ref = tmp_path / "ref"
    run([series_dir], model_path, ref, RunOptions(workers=0))
    logits = build_model(tmp_path / "logits.onnx", output="logits", fixed_batch=3)
    out = tmp_path / "out"
    run([series_dir], logits, out, RunOptions(workers=0, batch_size=16))
    a = pq.read_table(ref / "slices").sort_by("sop_uid")
    b = pq.read_table(out / "slices").sort_by("sop_uid")
    for c in read_card(model_path).classes:
        np.testing.assert_allclose(a[f"p_{c}"].to_numpy(), b[f"p_{c}"].to_numpy(), atol=1e-5)


@pytest.mark.parametrize("kind", ["processes", "threads"])
def test_workers_pool_gives_identical_rows(tmp_path: Path, series_dir: Path, model_path: Path, kind: str) -> None:
    import warnings

    filters = list(warnings.filters)
    run([series_dir], model_path, tmp_path / "a", RunOptions(workers=0, batch_size=5))
    run([series_dir], model_path, tmp_path / "b", RunOptions(workers=2, worker_kind=kind, batch_size=5, chunk_slices=3))
    for name in ("slices", "series"):
        a = pq.read_table(tmp_path / "a" / name).sort_by("series_uid" if name == "series" else "sop_uid")
        b = pq.read_table(tmp_path / "b" / name).sort_by("series_uid" if name == "series" else "sop_uid")
        assert a.equals(b), name
    assert warnings.filters == filters  # the thread pool's warning silence ends with the run
    with pytest.raises(InputError, match="--worker-kind"):
        run([series_dir], model_path, tmp_path / "c", RunOptions(worker_kind="fibres"))


def test_zip_and_tar_gz_give_the_same_answers_as_the_folder(tmp_path: Path, series_dir: Path, model_path: Path) -> None:
    run([series_dir], model_path, tmp_path / "folder", RunOptions(workers=0))
    zpath = tmp_path / "study.zip"
    with zipfile.ZipFile(zpath, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in sorted(series_dir.rglob("*")):
            if p.is_file():
                zf.write(p, p.relative_to(series_dir))
    tpath = tmp_path / "study.tgz"
    with tarfile.open(tpath, "w:gz") as tf:
        tf.add(series_dir, arcname="export")
    ref = pq.read_table(tmp_path / "folder" / "slices").sort_by("sop_uid")
    for archive in (zpath, tpath):
        out = tmp_path / archive.name.replace(".", "_")
        summary = run([archive], model_path, out, RunOptions(workers=2))
        assert summary.series_ok == 2
        got = pq.read_table(out / "slices").sort_by("sop_uid")
        assert got.drop(["source"]).equals(ref.drop(["source"]))
        assert all(s.startswith(str(archive) + "::") for s in got["source"].to_pylist())


def test_batches_cross_series_and_undecodable_slices_are_dropped(tmp_path: Path, model_path: Path) -> None:
    inp = tmp_path / "in"
    paths = write_series(inp, SeriesSpec(levels=LEVELS_30, study_uid=STUDY, series_uid=STUDY + ".7", seed=7))
    short = write_series(inp, SeriesSpec(levels=level_sequence({"L2": 3, "L3": 5, "L4": 4}), study_uid=STUDY, series_uid=STUDY + ".8", seed=8))
    # damage the pixel data of two slices of the first series, and most of the second
    for p in paths[:2] + short[:4]:
        data = p.read_bytes()
        p.write_bytes(data[: len(data) - 3000])
    summary = run([inp], model_path, tmp_path / "out", RunOptions(workers=0, batch_size=6, sampling=FULL))
    slices, series, skipped = _tables(tmp_path / "out")
    by_uid = {s["series_uid"]: s for s in series}
    first = by_uid[STUDY + ".7"]
    assert first["status"] == "ok" and first["n_slices"] == 28 and "dropped_slices" in first["flags"]
    second = by_uid[STUDY + ".8"]
    assert second["status"] == "error" and "only 8 of 12 slices" in second["reason"]
    assert summary.series_error == 1
    damaged = {str(p) for p in paths[:2] + short[:4]}
    assert {r["source"] for r in skipped} >= damaged
    assert all("cannot decode" in r["reason"] or "unreadable" in r["reason"] for r in skipped if r["source"] in damaged)
    idx = sorted(r["slice_index"] for r in slices if r["series_uid"] == STUDY + ".7")
    assert idx == list(range(28))


@pytest.mark.parametrize("kind", ["processes", "threads"])
def test_pydicom_test_files_as_one_messy_archive(tmp_path: Path, series_dir: Path, model_path: Path, kind: str) -> None:
    root = Path(pydicom.data.__file__).parent / "test_files"
    inp = tmp_path / "messy"
    shutil.copytree(root, inp)
    shutil.copytree(series_dir, inp / "good")
    zpath = inp / "bundle.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for p in sorted(root.iterdir())[:30]:
            if p.is_file():
                zf.write(p, "zipped/" + p.name)
    summary = run([inp], model_path, tmp_path / "out", RunOptions(workers=2, worker_kind=kind, batch_size=8))
    slices, series, skipped = _tables(tmp_path / "out")
    assert summary.series_ok == 2 and summary.slices == 60
    files = [str(p) for p in inp.rglob("*") if p.is_file() and p != zpath]
    with zipfile.ZipFile(zpath) as zf:
        files += [f"{zpath}::{n}" for n in zf.namelist()]
    accounted = [r["source"] for r in slices] + [r["source"] for r in skipped]
    assert sorted(accounted) == sorted(files)
    assert all(r["reason"] for r in skipped)
    assert {s["status"] for s in series} <= {"ok", "skipped", "error"}


def test_no_patient_identity_in_any_output(tmp_path: Path, model_path: Path) -> None:
    inp = tmp_path / "in"
    spec = SeriesSpec(levels=LEVELS_30, patient_name="ZYXWVU^SECRETNAME", patient_id="PID-77AA88BB", seed=9)
    write_series(inp, spec)
    run([inp], model_path, tmp_path / "out", RunOptions(workers=0))
    blob = b"".join(p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file())
    for secret in (b"SECRETNAME", b"ZYXWVU", b"PID-77AA88BB", b"19400101", b"ACC-998877"):
        assert secret not in blob


def test_model_without_card_is_refused_before_any_output(tmp_path: Path, series_dir: Path) -> None:
    bare = build_model(tmp_path / "bare.onnx", card=False)
    with pytest.raises(CardError, match="spinelevel card set"):
        run([series_dir], bare, tmp_path / "out", RunOptions(workers=0))
    assert not (tmp_path / "out").exists()


def test_card_that_does_not_fit_the_model_is_refused(tmp_path: Path, series_dir: Path) -> None:
    from spinelevel.card import write_onnx_card
    from spinelevel.errors import ModelError

    model = build_model(tmp_path / "m.onnx", input_size=32)
    write_onnx_card(model, ModelCard(input_size=(64, 64), windows=((40.0, 400.0),) * 3))
    with pytest.raises(ModelError, match="input_size"):
        run([series_dir], model, tmp_path / "out", RunOptions(workers=0))


def test_rerun_resumes_without_duplicates_and_keeps_history(tmp_path: Path, series_dir: Path, model_path: Path) -> None:
    out = tmp_path / "out"
    inp = _messy_dir(shutil.copytree(series_dir, tmp_path / "in"))
    first = run([inp], model_path, out, RunOptions(workers=0, sampling=FULL))
    (out / "mine.txt").write_text("keep me")
    ref = [pq.read_table(out / n).sort_by("source" if n == "skipped" else "series_uid" if n == "series" else "sop_uid") for n in ("slices", "series", "skipped")]
    again = run([inp], model_path, out, RunOptions(workers=0, sampling=FULL))
    assert (again.series_ok, again.series_skipped, again.series_already_done) == (0, 0, first.series_ok + first.series_skipped)
    got = [pq.read_table(out / n).sort_by("source" if n == "skipped" else "series_uid" if n == "series" else "sop_uid") for n in ("slices", "series", "skipped")]
    for a, b in zip(ref, got):
        assert a.equals(b)
    assert (out / "mine.txt").read_text() == "keep me"
    runs = json.loads((out / "run.json").read_text())["runs"]
    assert [r["status"] for r in runs] == ["complete", "complete"]
    forced = run([inp], model_path, out, RunOptions(workers=0, sampling=FULL, force=True))
    assert forced.series_ok == 4 and forced.series_already_done == 0
    assert pq.read_table(out / "slices").num_rows == 120


def test_series_that_gained_slices_is_redone_and_replaced(tmp_path: Path, model_path: Path) -> None:
    inp = tmp_path / "in"
    levels = level_sequence({"T": 5, "L1": 4, "L2": 4, "L3": 5, "L4": 4})
    write_series(inp, SeriesSpec(levels=levels, study_uid=STUDY, series_uid=STUDY + ".30", seed=30))
    write_series(inp, SeriesSpec(levels=LEVELS_30, study_uid=STUDY, series_uid=STUDY + ".31", seed=31))
    out = tmp_path / "out"
    run([inp], model_path, out, RunOptions(workers=0, sampling=FULL))
    # the archive grows: the same series gets 8 more (inferior) slices, in a new folder
    more = level_sequence({"T": 5, "L1": 4, "L2": 4, "L3": 5, "L4": 4, "L5": 4, "S": 4})
    spec = SeriesSpec(levels=more, study_uid=STUDY, series_uid=STUDY + ".30", seed=30)
    added = write_series(tmp_path / "late", spec)
    keep = [p for p in added if int(pydicom.dcmread(p, stop_before_pixels=True).InstanceNumber) <= 8]
    for p in keep:
        shutil.move(p, inp / ("late_" + p.name))
    summary = run([inp], model_path, out, RunOptions(workers=0, sampling=FULL))
    assert summary.series_ok == 1 and summary.series_already_done == 1
    slices = pq.read_table(out / "slices").to_pylist()
    series = pq.read_table(out / "series").to_pylist()
    assert sorted(s["series_uid"] for s in series) == [STUDY + ".30", STUDY + ".31"]
    grown = [r for r in slices if r["series_uid"] == STUDY + ".30"]
    assert len(grown) == len(levels) + len(keep)
    assert len({r["sop_uid"] for r in grown}) == len(grown)
    assert sorted(r["slice_index"] for r in grown) == list(range(len(grown)))
    assert len([r for r in slices if r["series_uid"] == STUDY + ".31"]) == 30


def test_second_run_into_a_locked_directory_is_refused(tmp_path: Path, series_dir: Path, model_path: Path) -> None:
    from spinelevel.engine.state import OutputLock

    out = tmp_path / "out"
    out.mkdir()
    with OutputLock(out):
        with pytest.raises(OutputError, match="another spinelevel run"):
            run([series_dir], model_path, out, RunOptions(workers=0))
    run([series_dir], model_path, out, RunOptions(workers=0))  # released


def test_unwritable_output_is_a_clear_error(tmp_path: Path, series_dir: Path, model_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="not a directory"):
        run([series_dir], model_path, blocker, RunOptions(workers=0))


def test_sparse_run_matches_full_with_fewer_model_slices(tmp_path: Path, model_path: Path) -> None:
    inp = tmp_path / "in"
    thin = level_sequence({"T": 40, "L1": 30, "L2": 30, "L3": 31, "L4": 30, "L5": 30, "S": 40})
    write_series(inp, SeriesSpec(levels=thin, spacing_mm=1.0, study_uid=STUDY, series_uid=STUDY + ".20", seed=20, size=32))
    write_series(inp, SeriesSpec(levels=LEVELS_30, study_uid=STUDY, series_uid=STUDY + ".21", seed=21, size=32))
    run([inp], model_path, tmp_path / "full", RunOptions(workers=0, sampling=FULL))
    run([inp], model_path, tmp_path / "sparse", RunOptions(workers=2, sampling=SamplingOptions(mode="sparse", stride_mm=20)))
    full = pq.read_table(tmp_path / "full" / "slices").sort_by("sop_uid")
    sparse = pq.read_table(tmp_path / "sparse" / "slices").sort_by("sop_uid")
    assert full["level"].to_pylist() == sparse["level"].to_pylist()
    evaluated = np.asarray(sparse["evaluated"].to_pylist())
    thin_rows = np.asarray(sparse["series_uid"].to_pylist()) == STUDY + ".20"
    assert evaluated[thin_rows].mean() < 0.2
    nulls = [r for r in sparse.to_pylist() if not r["evaluated"]]
    assert nulls and all(r["p_L3"] is None and r["level_argmax"] is None for r in nulls)
    fs = {r["series_uid"]: r for r in pq.read_table(tmp_path / "full" / "series").to_pylist()}
    ss = {r["series_uid"]: r for r in pq.read_table(tmp_path / "sparse" / "series").to_pylist()}
    for uid in fs:
        assert (fs[uid]["l3_index"], fs[uid]["l3_first_index"], fs[uid]["l3_last_index"]) == (ss[uid]["l3_index"], ss[uid]["l3_first_index"], ss[uid]["l3_last_index"])
        assert ss[uid]["n_evaluated"] < fs[uid]["n_evaluated"]
    manifest = json.loads((tmp_path / "sparse" / "run.json").read_text())["runs"][0]
    assert manifest["options"]["sampling"]["mode"] == "sparse"


def test_dali_preprocessing_matches_numpy(tmp_path: Path, series_dir: Path, model_path: Path) -> None:
    pytest.importorskip("nvidia.dali")
    run([series_dir], model_path, tmp_path / "np", RunOptions(workers=0, sampling=FULL))
    run([series_dir], model_path, tmp_path / "dali", RunOptions(workers=2, sampling=FULL, preprocess="dali", batch_size=8))
    a = pq.read_table(tmp_path / "np" / "slices").sort_by("sop_uid")
    b = pq.read_table(tmp_path / "dali" / "slices").sort_by("sop_uid")
    assert a["level"].equals(b["level"])
    for c in read_card(model_path).classes:
        np.testing.assert_allclose(a[f"p_{c}"].to_numpy(), b[f"p_{c}"].to_numpy(), atol=1e-4)
    manifest = json.loads((tmp_path / "dali" / "run.json").read_text())["runs"][-1]
    assert manifest["options"]["preprocess"] == "dali"


def test_backend_choice_is_recorded_and_missing_gpu_named(tmp_path: Path, series_dir: Path, model_path: Path) -> None:
    from spinelevel.errors import BackendUnavailableError

    run([series_dir], model_path, tmp_path / "out", RunOptions(workers=0))
    backend = json.loads((tmp_path / "out" / "run.json").read_text())["runs"][-1]["backend"]
    assert backend["name"] == "onnxruntime" and "ONNX Runtime" in backend["reason"]
    with pytest.raises(BackendUnavailableError, match="tensorrt"):
        run([series_dir], model_path, tmp_path / "trt", RunOptions(workers=0, backend="tensorrt"))


def test_object_store_output_is_refused_before_anything_is_created(tmp_path: Path, series_dir: Path, model_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from spinelevel.errors import InputError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match="object-store"):
        run([series_dir], model_path, Path("s3://bucket/out"), RunOptions(workers=0))
    assert not (tmp_path / "s3:").exists()


def test_a_run_on_a_few_small_files_starts_no_worker_processes(tmp_path: Path, model_path: Path) -> None:
    import json

    from spinelevel.engine.pipeline import RunOptions, small_input_options

    from conftest import LEVELS_30

    paths = write_series(tmp_path / "in", SeriesSpec(levels=LEVELS_30[:12], size=32), nested=False)
    assert small_input_options(paths, RunOptions(workers=2)).workers == 0
    assert small_input_options([tmp_path / "in"], RunOptions(workers=2)).workers == 2  # a folder: workers
    assert small_input_options(paths * 5, RunOptions(workers=2)).workers == 2  # more than 16 files
    run(paths, model_path, tmp_path / "out", RunOptions(workers=2))
    manifest = json.loads((tmp_path / "out" / "run.json").read_text())["runs"][-1]
    assert manifest["options"]["workers"] == 0 and manifest["counts"]["series_ok"] == 1
