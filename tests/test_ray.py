"""The Ray Data runner: same rows as a single-machine run, killed workers, resume, optional extra.

One local Ray instance (2 CPUs, small object store) serves the whole module: starting Ray costs
10-20 s, each dataset execution a few seconds.
"""

from __future__ import annotations

import builtins
import os
import shutil
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import LEVELS_30
from dicomgen import SeriesSpec, write_localizer, write_series
from spinelevel.engine.pipeline import RunOptions, run
from spinelevel.engine.ray_runner import CRASH_ONCE_ENV, RayOptions, run_on_ray
from spinelevel.engine.sampling import SamplingOptions
from spinelevel.errors import BackendUnavailableError, InputError

STUDY = "1.2.826.0.1.3680043.8.498.77"
FULL = RunOptions(workers=0, batch_size=6, chunk_slices=5, sampling=SamplingOptions(mode="full"))
SPARSE = RunOptions(workers=0, batch_size=6, chunk_slices=5, sampling=SamplingOptions(mode="sparse"))
KEYS = {"slices": ["sop_uid", "frame"], "series": ["series_uid"], "skipped": ["source", "reason"]}


def _tables(out: Path) -> dict:
    return {name: pq.read_table(out / name).sort_by([(k, "ascending") for k in keys]) for name, keys in KEYS.items()}


def _assert_same(a: Path, b: Path) -> None:
    ta, tb = _tables(a), _tables(b)
    for name in KEYS:
        assert ta[name].num_rows == tb[name].num_rows, name
        assert ta[name].equals(tb[name]), name


@pytest.fixture(scope="module")
def crash_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where tests drop the flag files that make one Ray worker die (see CRASH_ONCE_ENV)."""
    return tmp_path_factory.mktemp("crash")


@pytest.fixture(scope="module")
def ray_local(crash_dir: Path):  # noqa: ANN201
    """A local Ray instance on two CPUs for the module; run_on_ray joins it."""
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'spinelevel[ray]')")
    pytest.importorskip("ray.data", reason="Ray Data is not installed (pip install 'spinelevel[ray]')")
    ray.init(
        num_cpus=2,
        object_store_memory=500 * 2**20,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        runtime_env={"env_vars": {CRASH_ONCE_ENV: str(crash_dir), "RAY_DEDUP_LOGS": "0"}},
    )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 64 px phantom study as .tar.gz, three synthetic series (one with a damaged slice), a scout, junk."""
    from spinelevel.phantom import PhantomOptions, generate

    root = tmp_path_factory.mktemp("ray_archive")
    phantom = root / "phantom"
    generate(phantom, PhantomOptions(studies=1, seed=3, size=64, coverage="lumbar", thickness_mm=5.0, second_recon_probability=0, localizer_probability=1.0, dose_report_probability=1.0))
    inp = root / "in"
    inp.mkdir()
    with tarfile.open(inp / "phantom.tgz", "w:gz") as tf:
        tf.add(phantom, arcname="export")
    for i in range(3):
        paths = write_series(inp, SeriesSpec(levels=LEVELS_30, study_uid=STUDY, series_uid=f"{STUDY}.{i}", size=32, seed=40 + i))
        if i == 1:
            data = paths[3].read_bytes()
            paths[3].write_bytes(data[: len(data) - 600])
    write_localizer(inp / "scout", STUDY)
    (inp / "notes.txt").write_text("not dicom")
    return inp


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, archive: Path, model_path: Path) -> dict[str, Path]:
    """Single-machine runs of the archive, full and sparse sampling."""
    root = tmp_path_factory.mktemp("ray_reference")
    run([archive], model_path, root / "full", FULL)
    run([archive], model_path, root / "sparse", SPARSE)
    return {"full": root / "full", "sparse": root / "sparse"}


@pytest.mark.slow
def test_ray_run_equals_single_machine_run(ray_local, tmp_path: Path, archive: Path, model_path: Path, reference: dict[str, Path]) -> None:  # noqa: ANN001
    out = tmp_path / "ray"
    summary = run_on_ray([archive], model_path, out, FULL, RayOptions())
    single = pq.read_table(reference["full"] / "series").to_pylist()
    assert summary.series_ok == sum(s["status"] == "ok" for s in single) >= 4
    assert summary.series_skipped >= 2  # scouts and the dose report
    assert any(s["status"] == "ok" and "dropped_slices" in s["flags"] for s in single)
    _assert_same(reference["full"], out)
    import json

    (entry,) = json.loads((out / "run.json").read_text())["runs"]
    assert entry["status"] == "complete" and entry["options"]["ray"]["gpus_per_worker"] == 0
    assert entry["options"]["sampling"]["mode"] == "full"


@pytest.mark.slow
def test_ray_sparse_sampling_equals_single_machine(ray_local, tmp_path: Path, archive: Path, model_path: Path, reference: dict[str, Path]) -> None:  # noqa: ANN001
    out = tmp_path / "ray"
    run_on_ray([archive], model_path, out, SPARSE, RayOptions(inference_workers=2))
    _assert_same(reference["sparse"], out)
    slices = pq.read_table(out / "slices").to_pylist()
    assert not all(r["evaluated"] for r in slices)


@pytest.mark.slow
def test_killed_decode_worker_and_inference_actor_lose_and_duplicate_nothing(ray_local, crash_dir: Path, tmp_path: Path, archive: Path, model_path: Path, reference: dict[str, Path]) -> None:  # noqa: ANN001
    for stage in ("decode", "infer"):
        (crash_dir / stage).write_text("die once")
    out = tmp_path / "ray"
    run_on_ray([archive], model_path, out, FULL, RayOptions(decode_workers=1))
    # both flags were taken: a decode task process and an inference actor died mid-run
    assert not (crash_dir / "decode").exists() and not (crash_dir / "infer").exists()
    _assert_same(reference["full"], out)


@pytest.mark.slow
def test_resume_skips_completed_series_across_single_machine_and_ray(ray_local, tmp_path: Path, archive: Path, model_path: Path, reference: dict[str, Path]) -> None:  # noqa: ANN001
    inp = tmp_path / "in"
    shutil.copytree(archive, inp)
    later = tmp_path / "later"
    later.mkdir()
    # one synthetic series arrives later: the first run does the rest on one machine
    moved = [p for p in inp.rglob("*") if p.is_file() and p.stat().st_size > 1000 and _series_of(p) == f"{STUDY}.2"]
    assert len(moved) == 30
    for p in moved:
        p.rename(later / p.name)
    out = tmp_path / "out"
    first = run([inp], model_path, out, FULL)
    for p in moved:
        (later / p.name).rename(p)
    second = run_on_ray([inp], model_path, out, FULL, RayOptions())
    assert second.series_ok == 1 and second.slices == 30
    assert second.series_already_done == first.series_ok + first.series_skipped + first.series_error
    third = run_on_ray([inp], model_path, out, FULL, RayOptions())
    assert (third.series_ok, third.series_skipped, third.slices) == (0, 0, 0)
    ref, got = _tables(reference["full"]), _tables(out)
    for name in KEYS:
        # sources differ (another folder); everything else is row-for-row the same
        drop = [c for c in ("source",) if c in ref[name].column_names]
        assert ref[name].drop(drop).equals(got[name].drop(drop)), name


def _series_of(path: Path) -> str | None:
    import pydicom

    try:
        return str(pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID)
    except Exception:  # noqa: BLE001 - junk files
        return None


def test_object_store_output_is_refused_with_the_fix(ray_local, archive: Path, model_path: Path) -> None:  # noqa: ANN001
    with pytest.raises(InputError, match="local or network-mounted path"):
        run_on_ray([archive], model_path, Path("s3://bucket/out"), FULL, RayOptions())


def test_without_ray_the_error_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, model_path: Path) -> None:
    real_import = builtins.__import__

    def no_ray(name: str, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        if name == "ray" or name.startswith("ray."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    from spinelevel.engine.ray_runner import ray_available

    assert not ray_available()
    with pytest.raises(BackendUnavailableError, match=r"pip install 'spinelevel\[ray\]'"):
        run_on_ray([tmp_path], model_path, tmp_path / "out", FULL, RayOptions())
    assert not (tmp_path / "out").exists()
    assert os.environ.get(CRASH_ONCE_ENV) is None


@pytest.mark.slow
def test_cli_ray_option_runs_on_ray(ray_local, tmp_path: Path, archive: Path, model_path: Path, reference: dict[str, Path]) -> None:  # noqa: ANN001
    from typer.testing import CliRunner

    from spinelevel.cli import _bare_flag, app

    assert _bare_flag(["run", "x", "--ray", "--quiet"], "--ray", "local") == ["run", "x", "--ray", "local", "--quiet"]
    assert _bare_flag(["run", "x", "--ray", "auto"], "--ray", "local") == ["run", "x", "--ray", "auto"]
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["run", str(archive), "--model", str(model_path), "--out", str(out), "--ray", "local", "--sampling", "full", "--quiet"])
    assert result.exit_code == 0, result.output
    import json

    runs = json.loads((out / "run.json").read_text())["runs"]
    assert "ray" in runs[-1]["options"]
    _assert_same(reference["full"], out)


@pytest.mark.parametrize("options", [FULL, SPARSE], ids=["full", "sparse"])
def test_ray_classifies_multiframe_ct_like_a_single_machine(ray_local, tmp_path: Path, model_path: Path, options: RunOptions) -> None:  # noqa: ANN001
    from test_real_archives import _legacy_converted

    single = write_series(tmp_path / "single", SeriesSpec(levels=LEVELS_30, study_uid=STUDY, size=32, seed=60), nested=False)
    mf = _legacy_converted(single, tmp_path / "in" / "legacy.dcm")
    run([mf.parent], model_path, tmp_path / "local", options)
    summary = run_on_ray([mf.parent], model_path, tmp_path / "ray", options, RayOptions())
    assert summary.series_ok == 1
    _assert_same(tmp_path / "local", tmp_path / "ray")
    frames = pq.read_table(tmp_path / "ray" / "slices").column("frame").to_pylist()
    assert sorted(f for f in frames) == sorted(set(frames)) and None not in frames
