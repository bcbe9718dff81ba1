"""The decode pool survives a worker process that dies on a file, as a crashing decoder would."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from spinelevel.card import ModelCard
from spinelevel.engine.preprocess import PreprocessSpec
from spinelevel.engine.sources import Source
from spinelevel.engine.workers import CRASH_SOP_ENV, DecodePool, DecodeTask


def _tasks(files: list[Path], spec: PreprocessSpec, per_task: int = 2) -> list[DecodeTask]:
    sops = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]
    return [
        DecodeTask(0, tuple(range(i, min(i + per_task, len(files)))), tuple(Source(str(f)) for f in files[i : i + per_task]), tuple(sops[i : i + per_task]), spec, 1 << 30)
        for i in range(0, len(files), per_task)
    ]


@pytest.fixture
def files(tmp_path: Path) -> list[Path]:
    from spinelevel.phantom import PhantomOptions, generate

    import pyarrow.parquet as pq

    root = tmp_path / "p"
    generate(root, PhantomOptions(studies=1, seed=5, size=64, coverage="lumbar", thickness_mm=5.0, localizer_probability=0, dose_report_probability=0, second_recon_probability=0))
    return [root / p for p in pq.read_table(root / "labels.parquet", columns=["path"]).column("path").to_pylist()][:12]


def test_a_worker_that_dies_costs_only_its_task(files: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    spec = PreprocessSpec.from_card(ModelCard(input_size=(32, 32)))
    tasks = _tasks(files, spec)
    victim = tasks[2]
    monkeypatch.setenv(CRASH_SOP_ENV, victim.sop_uids[1])
    results = {}
    with DecodePool(2, max_in_flight=4) as pool:
        for task in tasks:
            pool.submit(task)
        while pool.pending():
            got = pool.get()
            results[got.indices or tuple(i for i, _ in got.failures)] = got
    # every task came back once; the one with the crashing file lost its slices, recorded as failed
    assert sorted(i for key in results for i in key) == list(range(len(files)))
    crashed = results[victim.indices]
    assert crashed.indices == () and [i for i, _ in crashed.failures] == list(victim.indices)
    assert all("crashed its worker process" in reason for _, reason in crashed.failures)
    # the tasks in flight beside it were retried on a fresh pool and decoded in full
    for task in tasks:
        if task is not victim:
            assert results[task.indices].failures == () and results[task.indices].array.shape == (2, 3, 32, 32)


def test_the_hook_never_fires_in_the_main_process(files: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    spec = PreprocessSpec.from_card(ModelCard(input_size=(32, 32)))
    task = _tasks(files, spec)[0]
    monkeypatch.setenv(CRASH_SOP_ENV, task.sop_uids[0])
    with DecodePool(0) as pool:
        pool.submit(task)
        assert pool.get().indices == task.indices


def _double_or_die_on_zero(x: int) -> int:
    import multiprocessing
    import os

    # item 0 always goes to a worker (the first items are submitted before this process takes any)
    if x == 0 and multiprocessing.parent_process() is not None:
        os._exit(70)  # as a decoder that crashes its worker
    return 2 * x


def test_map_ordered_keeps_order_and_redoes_an_item_whose_worker_died(files: list[Path]) -> None:
    spec = PreprocessSpec.from_card(ModelCard(input_size=(32, 32)))
    with DecodePool(2) as pool:
        pool.start(wait=True)
        before = pool._pool
        assert list(pool.map_ordered(_double_or_die_on_zero, range(10))) == [2 * x for x in range(10)]
        assert pool._pool is not before  # the worker died and the pool was rebuilt
        # the pool decodes afterwards
        for task in _tasks(files[:4], spec):
            pool.submit(task)
        got = [pool.get() for _ in range(2)]
        assert [r.indices for r in got] == [(0, 1), (2, 3)] and not any(r.failures for r in got)
    with DecodePool(2, kind="threads") as pool:
        assert list(pool.map_ordered(abs, [-1, 2, -3])) == [1, 2, 3]


def test_the_scan_in_worker_processes_equals_the_scan_here(files: list[Path]) -> None:
    import functools

    from spinelevel.engine.scan import ScanOptions, scan_batch, scan_paths
    from spinelevel.engine.workers import counted_task

    root = files[0].parents[2]
    here = list(scan_paths([root]))
    with DecodePool(2) as pool:
        pool.start()
        batches = lambda bs: (found for found, _, _ in pool.map_ordered(functools.partial(counted_task, scan_batch, options=ScanOptions()), bs))  # noqa: E731
        there = list(scan_paths([root], read_batches=batches))
    assert there == here and len(here) > 12
