"""The benchmark harness runs and reports what it claims (tiny sizes; no timing is asserted)."""

from __future__ import annotations

import json
from pathlib import Path

from spinelevel.bench.decode import bench_decode
from spinelevel.bench.end_to_end import bench_full_vs_sparse, phantom_archive
from spinelevel.bench.machine import describe_machine


def test_machine_description() -> None:
    m = describe_machine()
    assert m["cores"] >= 1 and m["python"] and "numpy" in m["versions"]


def test_decode_bench_reports_every_codec(tmp_path: Path) -> None:
    result = bench_decode(tmp_path, size=64, slices=6, input_size=32, workers=2, rounds=1)
    assert set(result["codecs"]) == {"none", "rle", "jpeg2000", "jpegls"}
    for row in result["codecs"].values():
        assert row["slices"] == 6
        assert row["engine_slices_per_s"] > 0 and row["naive_slices_per_s"] > 0
        assert row["speedup"] > 0 and row["speedup_one_process"] > 0 and row["speedup_threads"] > 0


def test_end_to_end_bench_compares_full_and_sparse(tmp_path: Path, model_path: Path) -> None:
    archive = phantom_archive(tmp_path, 1, 64, coverage="lumbar", thickness_mm=2.5, localizer_probability=0.0, dose_report_probability=0.0, second_recon_probability=0.0)
    result = bench_full_vs_sparse(archive, model_path, tmp_path, workers=0)
    json.dumps(result)
    full, sparse = result["full"], result["sparse"]
    assert full["slices"] == sparse["slices"] > 0
    assert full["evaluated_slices"] == full["slices"]
    assert sparse["evaluated_slices"] <= full["evaluated_slices"]
    assert full["peak_rss_mib"] > 10
    assert 0 <= result["agreement"]["slice_level_agreement"] <= 1


def test_sparse_replay_reproduces_the_engine(tmp_path: Path, model_path: Path) -> None:
    """benchmarks/sparse_replay.py, run on a full run's probabilities, evaluates exactly the slices a
    real sparse run evaluated and decodes the same levels."""
    import importlib.util

    import pyarrow.parquet as pq

    spec = importlib.util.spec_from_file_location("sparse_replay", Path(__file__).parents[1] / "benchmarks" / "sparse_replay.py")
    assert spec is not None and spec.loader is not None
    replay_mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(replay_mod)
    from spinelevel.engine.sampling import SamplingOptions

    archive = phantom_archive(tmp_path, 1, 64, coverage="lumbar", thickness_mm=2.5, localizer_probability=0.0, dose_report_probability=0.0, second_recon_probability=0.0)
    result = bench_full_vs_sparse(archive, model_path, tmp_path, workers=0)
    classes, series = replay_mod.load_series(tmp_path / "e2e_full")
    row = replay_mod.replay(series, classes, SamplingOptions(mode="sparse"))
    sparse = result["sparse"]
    assert row["evaluated_fraction"] == round(sparse["evaluated_slices"] / sparse["slices"], 4)
    assert row["slice_level_agreement"] == result["agreement"]["slice_level_agreement"]
    real = pq.read_table(tmp_path / "e2e_sparse" / "slices", columns=["evaluated"]).column("evaluated").to_pylist()
    assert sum(real) == sparse["evaluated_slices"]


def test_bench_cli_rejects_bad_scaling_sizes(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from spinelevel.cli import app

    result = CliRunner().invoke(app, ["bench", "--scaling", "1,zero", "--only", "scaling", "--work", str(tmp_path), "--out", str(tmp_path / "b.json")])
    assert result.exit_code != 0
    assert "--scaling" in result.output
    assert not (tmp_path / "b.json").exists()


def test_decode_bench_has_the_script_baseline_and_shared_memory_rows(tmp_path: Path) -> None:
    result = bench_decode(tmp_path, size=64, slices=6, input_size=32, workers=2, rounds=1)
    for row in result["codecs"].values():
        assert row["script_slices_per_s"] > 0 and row["engine_shared_memory_slices_per_s"] > 0
        assert row["speedup_vs_script"] > 0 and row["naive_slices_per_s"] > 0


def test_vs_script_bench_and_steps(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    from spinelevel.bench.models import toy_onnx
    from spinelevel.bench.script import bench_vs_script
    from spinelevel.bench.steps import bench_steps

    archive = phantom_archive(tmp_path, 1, 64, coverage="lumbar", thickness_mm=5.0, localizer_probability=0.0, dose_report_probability=0.0, second_recon_probability=0.0)
    toy = toy_onnx(256, tmp_path)  # the script is written for 256 px input, as the issue's
    result = bench_vs_script(archive, toy, tmp_path, rounds=1, rows={"engine_processes": ["--sampling", "full"], "engine_threads": ["--sampling", "full", "--worker-kind", "threads"]})
    json.dumps(result)
    assert result["wall_s"]["naive_script"] > 0 and result["processes_vs_threads"] > 0
    files = [archive / p for p in pq.read_table(archive / "labels.parquet", columns=["path"]).column("path").to_pylist()][:4]
    steps = bench_steps(files, input_size=32)["steps"]
    assert {"header_parse", "pixel_read", "hu", "windows", "resize", "handoff_pickle_roundtrip", "engine_total_prepare", "naive_script_load"} <= steps.keys()
    # the phantom is uncompressed: the engine reads its pixels at the scanned offset
    assert {"engine_scan_header", "native_read", "engine_total_prepare_full_parse"} <= steps.keys()


def test_naive_script_feeds_the_model_its_input_size(tmp_path: Path) -> None:
    from spinelevel.bench import naive_script
    from spinelevel.bench.models import toy_onnx

    archive = phantom_archive(tmp_path, 1, 64, coverage="lumbar", thickness_mm=5.0, localizer_probability=0.0, dose_report_probability=0.0, second_recon_probability=0.0)
    levels = naive_script.main(str(archive), str(toy_onnx(32, tmp_path)))
    assert len(levels) > 0


def test_model_ab_measures_both_models_on_one_archive(tmp_path: Path, model_path: Path) -> None:
    """benchmarks/model_ab.py: inference and end-to-end of two models, alternated; here the same tiny
    model twice under two names, so the report must carry one sha256 and both models' measurements."""
    import importlib.util
    import shutil

    spec = importlib.util.spec_from_file_location("model_ab", Path(__file__).parents[1] / "benchmarks" / "model_ab.py")
    assert spec is not None and spec.loader is not None
    model_ab = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(model_ab)
    b = tmp_path / "copy.onnx"
    shutil.copy(model_path, b)
    for sidecar in model_path.parent.glob(model_path.name + ".*"):
        shutil.copy(sidecar, tmp_path / sidecar.name.replace(model_path.name, b.name))
    out = tmp_path / "ab.json"
    result = model_ab.main(["--a", str(model_path), "--b", str(b), "--studies", "1", "--size", "64", "--rounds", "1",
                            "--batch", "8", "--min-seconds", "0.2", "--work", str(tmp_path / "work"), "--out", str(out)])
    assert json.loads(out.read_text())["models"]["a"]["sha256"] == result["models"]["b"]["sha256"]
    for key in ("a", "b"):
        assert len(result["inference_slices_per_s"][key]["values"]) == 1 and result["inference_slices_per_s"][key]["best"] > 0
        assert result["end_to_end_wall_s"][key]["best"] > 0
        assert result["models"][key]["input_size"] == [32, 32]
    assert result["ratio_inference_time_b_over_a"] > 0 and result["archive"]["labelled_slices"] > 0


def test_model_ab_best_is_the_highest_rate_and_the_shortest_time() -> None:
    """A rate's best is its maximum, a time's its minimum (the 256 px JSON of round 10 gave the
    slowest rate as "best" while ms-per-slice-best took the fastest)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("model_ab", Path(__file__).parents[1] / "benchmarks" / "model_ab.py")
    assert spec is not None and spec.loader is not None
    model_ab = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(model_ab)
    assert model_ab._summary([259.4, 221.0, 240.0], higher_is_better=True)["best"] == 259.4
    assert model_ab._summary([4.6, 6.3, 5.0], higher_is_better=False)["best"] == 4.6
    assert model_ab._summary([4.6, 6.3, 5.0], higher_is_better=False)["median"] == 5.0
