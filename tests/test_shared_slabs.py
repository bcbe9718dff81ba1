"""The process pool's shared-memory hand-off: same model input as pickling, slabs recycled, crash
recovery intact, and nothing left behind in /dev/shm or in memory when the run is SIGKILLed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from spinelevel.card import ModelCard
from spinelevel.engine.preprocess import PreprocessSpec
from spinelevel.engine.workers import CRASH_SOP_ENV, DecodePool
from test_decode_pool import _tasks, files  # noqa: F401 - fixture

pytestmark = pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="the shared-memory ring needs memfd_create (Linux)")

SPEC = PreprocessSpec.from_card(ModelCard(input_size=(32, 32)))


def _all(pool: DecodePool, tasks: list, release: bool = True) -> dict:
    out = {}
    for task in tasks:
        pool.submit(task)
    while pool.pending():
        got = pool.get()
        out[got.indices or tuple(i for i, _ in got.failures)] = (got.slab, np.array(got.array))
        if release:
            pool.release(got)
    return out


def test_slabs_give_the_same_input_as_pickling_and_are_recycled(files: list[Path]) -> None:  # noqa: F811
    tasks = _tasks(files, SPEC, per_task=2) * 3  # more tasks than slabs: slabs must come back
    with DecodePool(2, max_in_flight=2) as plain:
        expected = _all(plain, tasks)
    with DecodePool(2, max_in_flight=2, slab_spec=SPEC, slab_rows=2, held_slabs=1) as pool:
        assert pool.shared_memory
        got = _all(pool, tasks)
    assert expected.keys() == got.keys()
    for key in expected:
        assert got[key][0] >= 0, "every result came through a slab"
        np.testing.assert_array_equal(got[key][1], expected[key][1])


def test_unreleased_slabs_fall_back_to_pickling(files: list[Path]) -> None:  # noqa: F811
    tasks = _tasks(files, SPEC, per_task=2)
    with DecodePool(2, max_in_flight=2, slab_spec=SPEC, slab_rows=2, held_slabs=0) as pool:
        got = _all(pool, tasks, release=False)
    slabs = [slab for slab, _ in got.values()]
    assert slabs.count(-1) == len(tasks) - 2 and sorted(s for s in slabs if s >= 0) == [0, 1]


def test_tasks_larger_than_a_slab_come_back_pickled(files: list[Path]) -> None:  # noqa: F811
    tasks = _tasks(files, SPEC, per_task=3)
    with DecodePool(2, slab_spec=SPEC, slab_rows=2) as pool:
        got = _all(pool, tasks)
    assert all(slab == -1 and arr.shape[0] == 3 for slab, arr in got.values())


def test_a_worker_that_dies_costs_only_its_task_with_slabs(files: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    tasks = _tasks(files, SPEC)
    victim = tasks[2]
    monkeypatch.setenv(CRASH_SOP_ENV, victim.sop_uids[1])
    with DecodePool(2, max_in_flight=4, slab_spec=SPEC, slab_rows=2, held_slabs=0) as pool:
        got = _all(pool, tasks)
        assert len(pool._free) == 4 and not pool._held  # every slab came back, the crashed task's too
    with DecodePool(0) as inline:
        monkeypatch.delenv(CRASH_SOP_ENV)
        expected = _all(inline, tasks)
    assert got[victim.indices][1].shape[0] == 0
    for task in tasks:
        if task is not victim:
            np.testing.assert_array_equal(got[task.indices][1], expected[task.indices][1])


def _ring_holders(group: int) -> list[int]:
    """PIDs of the processes of process group ``group`` (the run under test, started in a session of
    its own; its workers stay in the group when orphaned) that map a spinelevel slab ring. Other runs
    on the same machine map rings of their own."""
    pids = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if os.getpgid(int(pid)) == group and "memfd:spinelevel-slabs" in Path(f"/proc/{pid}/maps").read_text():
                    pids.append(int(pid))
            except OSError:
                continue
    return pids


@pytest.mark.parametrize("group", [False, True], ids=["main-process", "process-group"])
def test_sigkill_leaves_no_shared_memory(tmp_path: Path, model_path: Path, group: bool) -> None:
    from conftest import LEVELS_30
    from dicomgen import SeriesSpec, write_series

    study = "1.2.826.0.1.3680043.8.498.77"
    for i in range(6):
        write_series(tmp_path / "in", SeriesSpec(levels=LEVELS_30, study_uid=study, series_uid=f"{study}.{i}", seed=300 + i, size=48))
    shm_before = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    cmd = [sys.executable, "-m", "spinelevel", "run", str(tmp_path / "in"), "--model", str(model_path), "--out", str(tmp_path / "out"), "--workers", "2", "--sampling", "full", "--batch-size", "2", "--quiet"]
    proc = subprocess.Popen(cmd, start_new_session=True)
    deadline = time.monotonic() + 60
    while proc.pid not in _ring_holders(proc.pid):  # the run has made its ring: kill it while it decodes
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it mapped its ring"
        time.sleep(0.05)
    time.sleep(0.3)
    if group:
        os.killpg(proc.pid, signal.SIGKILL)
    else:
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.monotonic() + 30
    while _ring_holders(proc.pid) and time.monotonic() < deadline:  # workers go with their parent (PDEATHSIG)
        time.sleep(0.1)
    assert _ring_holders(proc.pid) == [], "a process still maps the ring"
    if not os.path.isdir("/dev/shm"):
        return
    # the ring is never in /dev/shm (memfd); multiprocessing's queues of the process pool are named
    # semaphores there (sem.mp-*), which its resource tracker unlinks once the run's main process is
    # gone, unless the tracker was killed with the whole process group (a known limit, BENCHMARKS.md)
    deadline = time.monotonic() + 20
    while True:
        new = set(os.listdir("/dev/shm")) - shm_before
        if group:
            new = {n for n in new if not n.startswith("sem.mp-")}
        if not new or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    if group:  # the semaphores the killed tracker could not unlink: this test's own, remove them
        for name in set(os.listdir("/dev/shm")) - shm_before:
            if name.startswith("sem.mp-"):
                Path("/dev/shm", name).unlink(missing_ok=True)
    assert new == set()
