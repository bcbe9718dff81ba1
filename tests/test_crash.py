"""Killed runs: SIGKILL at any moment, then a re-run, gives exactly the rows of a clean run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import LEVELS_30
from dicomgen import SeriesSpec, write_series

STUDY = "1.2.826.0.1.3680043.8.498.9"


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("archive")
    for i in range(10):
        write_series(root, SeriesSpec(levels=LEVELS_30, study_uid=STUDY, series_uid=f"{STUDY}.{i}", seed=100 + i, size=48))
    (root / "junk").write_text("not dicom")
    return root


def _cmd(archive: Path, model: Path, out: Path) -> list[str]:
    exe = str(Path(sys.executable).with_name("spinelevel"))
    # small parts: kills land between and inside commits
    return [exe, "run", str(archive), "--model", str(model), "--out", str(out), "--workers", "0", "--sampling", "full", "--batch-size", "4", "--rows-per-part", "30", "--quiet"]


def _tables(out: Path) -> list:
    keys = {"slices": ["sop_uid"], "series": ["series_uid"], "skipped": ["source", "reason"]}
    return [pq.read_table(out / name).sort_by([(k, "ascending") for k in keys[name]]) for name in ("slices", "series", "skipped")]


def test_sigkill_then_rerun_equals_a_clean_run(tmp_path: Path, archive: Path, model_path: Path) -> None:
    clean = tmp_path / "clean"
    subprocess.run(_cmd(archive, model_path, clean), check=True, timeout=300)
    expected = _tables(clean)
    for delay in (0.8, 1.6, 2.4, 3.2):
        out = tmp_path / f"killed_{delay}"
        proc = subprocess.Popen(_cmd(archive, model_path, out))
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        # any part already visible is complete Parquet
        for part in out.glob("*/part-*.parquet"):
            pq.read_metadata(part)
        subprocess.run(_cmd(archive, model_path, out), check=True, timeout=300)
        got = _tables(out)
        for name, a, b in zip(("slices", "series", "skipped"), expected, got):
            assert a.num_rows == b.num_rows, (delay, name)
            assert a.drop(["model_sha256"] if name == "series" else []).equals(b.drop(["model_sha256"] if name == "series" else [])), (delay, name)


def test_sigterm_finishes_cleanly_and_resumes(tmp_path: Path, archive: Path, model_path: Path) -> None:
    out = tmp_path / "out"
    cmd = [c for c in _cmd(archive, model_path, out) if c != "--quiet"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    # wait until the run has committed something (loose files first, then series)
    while len(list((out / "_progress").glob("commit-*.json"))) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    if proc.returncode == 0:
        pytest.skip("the run finished before SIGTERM arrived on this machine")
    assert proc.returncode == 143
    assert "terminated: completed series are saved" in err
    assert "Traceback" not in err
    import json

    runs = json.loads((out / "run.json").read_text())["runs"]
    assert runs[-1]["status"] == "interrupted"
    done = runs[-1]["counts"]["series_ok"]
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0
    assert f"{done} already done" in again.stderr
    assert pq.read_table(out / "slices").num_rows == 300


@pytest.mark.parametrize("delay", [0.0, 1.0])
def test_sigkill_leaves_no_orphan_workers(tmp_path: Path, archive: Path, model_path: Path, delay: float) -> None:
    cmd = [c if c != "0" else "2" for c in _cmd(archive, model_path, tmp_path / "out")]  # --workers 2
    proc = subprocess.Popen(cmd)
    deadline = time.monotonic() + 60
    workers: list[int] = []
    while time.monotonic() < deadline and len(workers) < 2:
        try:
            children = [int(c) for t in Path(f"/proc/{proc.pid}/task").iterdir() for c in (t / "children").read_text().split()]
            # decode workers, not the resource tracker
            workers = [c for c in children if b"multiprocessing-fork" in Path(f"/proc/{c}/cmdline").read_bytes()]
        except OSError:
            pass
        time.sleep(0.05)
    assert len(workers) == 2, "the run did not start its two decode workers"
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.monotonic() + 10
    alive = workers
    while alive and time.monotonic() < deadline:
        alive = [w for w in alive if Path(f"/proc/{w}").exists() and "Z" not in Path(f"/proc/{w}/stat").read_text().split()[2]]
        time.sleep(0.1)
    assert not alive, f"orphaned decode workers {alive}"


def test_signals_wait_for_the_critical_section() -> None:
    from spinelevel.engine.state import critical_section

    hits: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: hits.append(signum))
    try:
        with critical_section():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            assert hits == []  # deferred
        assert hits == [signal.SIGTERM]
        assert signal.getsignal(signal.SIGTERM) is not None and hits == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)
