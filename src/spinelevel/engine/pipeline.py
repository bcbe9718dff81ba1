"""The one place where the stages are wired:

    scan -> select series -> decode + preprocess (worker pool) -> infer -> decode sequence -> write

Series stream through: only the headers of the archive and the slices of the few series in flight
are in memory. Decoding and preprocessing run in a pool of worker processes ahead of inference; a
bounded window of chunks in flight keeps memory flat. Batches cross series boundaries.
"""

from __future__ import annotations

import datetime as _dt
import logging
import multiprocessing
import os
import platform
import secrets
import shutil
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from spinelevel import __version__
from spinelevel.card import ModelCard, file_sha256, read_card
from spinelevel.engine.backends import Backend, BackendOptions, default_backend, load_backend
from spinelevel.engine.decode import read_hu
from spinelevel.engine.preprocess import PreprocessSpec, preprocess_slice
from spinelevel.engine.scan import FileHeader, ScanOptions, SkippedFile, scan_paths
from spinelevel.engine.select import SelectOptions, SeriesPlan, select_series
from spinelevel.engine.sources import Source
from spinelevel.engine.writer import DATASETS, RunWriter, SeriesResult, write_json_atomic
from spinelevel.errors import DecodeError, InputError, OutputError
from spinelevel.levels import LevelThresholds, l3_definition, label_series

__all__ = ["RunOptions", "RunProgress", "RunSummary", "run", "prepare_output_dir"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunOptions:
    """Everything a run needs besides its inputs, model and output directory."""

    # Backend name ('onnxruntime'); None picks the default for the model file.
    backend: str | None = None
    # Slices per inference call.
    batch_size: int = 16
    # Intra-op threads of the inference runtime (None: its default).
    threads: int | None = None
    # Decode/preprocess worker processes; 0 or 1 decodes in the main process.
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    # Slices per decode task handed to a worker.
    chunk_slices: int = 4
    # Replace the results of an earlier run in the output directory.
    overwrite: bool = False
    # File and archive limits of the scan.
    scan: ScanOptions = field(default_factory=ScanOptions)
    # Which series are classified.
    select: SelectOptions = field(default_factory=SelectOptions)
    # Thresholds of the doubt flags.
    thresholds: LevelThresholds = field(default_factory=LevelThresholds)


class RunProgress(Protocol):
    """What the pipeline reports while it works (the CLI draws it)."""

    def scanned(self, files: int) -> None: ...

    def planned(self, series: int, slices: int) -> None: ...

    def advanced(self, series: int, slices: int) -> None: ...


class _NoProgress:
    def scanned(self, files: int) -> None:
        pass

    def planned(self, series: int, slices: int) -> None:
        pass

    def advanced(self, series: int, slices: int) -> None:
        pass


@dataclass(frozen=True)
class RunSummary:
    """What a run did."""

    run_id: str
    out: Path
    series_ok: int
    series_skipped: int
    series_error: int
    slices: int
    skipped_files: int
    seconds: float

    @property
    def slices_per_s(self) -> float:
        """Classified slices per second of wall time (scan included)."""
        return self.slices / self.seconds if self.seconds > 0 else 0.0


# -- decode stage (runs in worker processes) --------------------------------------------------


@dataclass(frozen=True)
class _ChunkTask:
    series_no: int
    # Slice indices within the series and their files.
    indices: tuple[int, ...]
    sources: tuple[Source, ...]
    sop_uids: tuple[str, ...]
    spec: PreprocessSpec
    max_bytes: int


@dataclass(frozen=True)
class _PreparedChunk:
    series_no: int
    # Indices of the slices in ``array``, in its row order.
    indices: tuple[int, ...]
    array: np.ndarray
    # (slice index, reason) for slices that could not be decoded.
    failures: tuple[tuple[int, str], ...]


def _prepare_chunk(task: _ChunkTask) -> _PreparedChunk:
    """Read, decode and preprocess the slices of one task; failures are recorded, not raised."""
    ok: list[int] = []
    arrays: list[np.ndarray] = []
    failures: list[tuple[int, str]] = []
    shape: tuple[int, int] | None = None
    for index, src, sop in zip(task.indices, task.sources, task.sop_uids):
        try:
            hu, found_sop = read_hu(src, task.max_bytes)
            if found_sop != sop:
                raise DecodeError("file changed since it was scanned (SOPInstanceUID differs)")
            if shape is not None and hu.shape != shape:
                raise DecodeError(f"pixel data is {hu.shape[0]}x{hu.shape[1]}, other slices are {shape[0]}x{shape[1]}")
            shape = hu.shape
            arrays.append(preprocess_slice(hu, task.spec))
            ok.append(index)
        except DecodeError as exc:
            failures.append((index, str(exc)))
        except MemoryError:
            failures.append((index, "out of memory while decoding"))
        except Exception as exc:  # a bug or a decoder surprise must not take the series down
            failures.append((index, f"unexpected error while decoding ({type(exc).__name__}: {exc})"))
    c = len(task.spec.windows)
    h, w = task.spec.input_size
    array = np.stack(arrays) if arrays else np.empty((0, c, h, w), dtype=np.float32)
    return _PreparedChunk(task.series_no, tuple(ok), array, tuple(failures))


def _chunk_tasks(plans: list[SeriesPlan], spec: PreprocessSpec, chunk: int, max_bytes: int) -> Iterator[_ChunkTask]:
    for no, plan in enumerate(plans):
        # Archive members are read in archive order (cheap forward seeks in compressed tars).
        order = sorted(range(len(plan.slices)), key=lambda i: (plan.slices[i].source.path, plan.slices[i].source.offset, i))
        for start in range(0, len(order), chunk):
            idx = tuple(order[start : start + chunk])
            yield _ChunkTask(
                series_no=no,
                indices=idx,
                sources=tuple(plan.slices[i].source for i in idx),
                sop_uids=tuple(plan.slices[i].sop_uid for i in idx),
                spec=spec,
                max_bytes=max_bytes,
            )


def _crashed(task: _ChunkTask) -> _PreparedChunk:
    c = len(task.spec.windows)
    h, w = task.spec.input_size
    reason = "the decoder crashed its worker process on this file"
    return _PreparedChunk(task.series_no, (), np.empty((0, c, h, w), dtype=np.float32), tuple((i, reason) for i in task.indices))


def _prepared(tasks: Iterator[_ChunkTask], workers: int) -> Iterator[_PreparedChunk]:
    """Run tasks in a process pool, in order, with a bounded number in flight.

    A worker that dies (a decoder crashing on a hostile file) breaks the pool: the pool is rebuilt
    and the tasks that were in flight are retried one at a time, so only the files of the task that
    kills a worker again are recorded as failed.
    """
    if workers <= 1:
        for task in tasks:
            yield _prepare_chunk(task)
        return
    ctx = multiprocessing.get_context("spawn")

    def new_pool() -> ProcessPoolExecutor:
        return ProcessPoolExecutor(max_workers=workers, mp_context=ctx)

    pool = new_pool()
    window: deque[tuple[_ChunkTask, object]] = deque()
    task_iter = iter(tasks)
    consecutive_crashes = 0
    try:
        while True:
            while len(window) < 2 * workers:
                task = next(task_iter, None)
                if task is None:
                    break
                window.append((task, pool.submit(_prepare_chunk, task)))
            if not window:
                return
            task, future = window.popleft()
            try:
                yield future.result()  # type: ignore[attr-defined]
                consecutive_crashes = 0
                continue
            except BrokenProcessPool:
                pass
            pool.shutdown(wait=True, cancel_futures=True)
            retry = [task] + [t for t, _ in window]
            window.clear()
            pool = new_pool()
            for t in retry:
                try:
                    result = pool.submit(_prepare_chunk, t).result()
                    consecutive_crashes = 0
                except BrokenProcessPool:
                    consecutive_crashes += 1
                    if consecutive_crashes >= 3:
                        raise InputError(
                            "decode worker processes keep dying before doing any work; run with "
                            "--workers 0, and when calling spinelevel from a script guard it with "
                            "if __name__ == '__main__'"
                        ) from None
                    log.warning("a decode worker crashed; %d file(s) recorded as failed", len(t.indices))
                    pool.shutdown(wait=True, cancel_futures=True)
                    pool = new_pool()
                    result = _crashed(t)
                yield result
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


# -- inference and assembly --------------------------------------------------------------------


@dataclass
class _OpenSeries:
    plan: SeriesPlan
    probs: np.ndarray
    done: np.ndarray
    failures: dict[int, str] = field(default_factory=dict)
    remaining: int = 0


class _Assembler:
    """Collects per-slice probabilities until a series is complete, then labels it."""

    def __init__(self, plans: list[SeriesPlan], classes: tuple[str, ...], thresholds: LevelThresholds, min_slices: int) -> None:
        self.plans = plans
        self.classes = classes
        self.thresholds = thresholds
        self.min_slices = min_slices
        self.open: dict[int, _OpenSeries] = {}

    def _get(self, no: int) -> _OpenSeries:
        s = self.open.get(no)
        if s is None:
            plan = self.plans[no]
            n = len(plan.slices)
            s = _OpenSeries(plan, np.full((n, len(self.classes)), np.nan, dtype=np.float32), np.zeros(n, dtype=bool), remaining=n)
            self.open[no] = s
        return s

    def fail(self, no: int, failures: Iterable[tuple[int, str]]) -> None:
        s = self._get(no)
        for index, reason in failures:
            s.failures[index] = reason
            s.remaining -= 1

    def scored(self, no: int, indices: list[int], probs: np.ndarray) -> None:
        s = self._get(no)
        s.probs[indices] = probs
        s.done[indices] = True
        s.remaining -= len(indices)

    def pop_complete(self) -> Iterator[tuple[SeriesPlan, SeriesResult | None, dict[int, str]]]:
        for no in sorted(self.open):
            s = self.open[no]
            if s.remaining > 0:
                continue
            del self.open[no]
            yield s.plan, self._finish(s), s.failures

    def _finish(self, s: _OpenSeries) -> SeriesResult | None:
        keep = np.flatnonzero(s.done)
        if len(keep) < self.min_slices:
            return None
        plan = s.plan
        slices = [plan.slices[i] for i in keep]
        z = np.asarray([sl.z_mm for sl in slices], dtype=np.float64)
        probs = s.probs[keep]
        evaluated = np.ones(len(keep), dtype=bool)
        levels = label_series(probs, z, self.classes, evaluated, self.thresholds)
        flags = set(plan.flags)
        if s.failures:
            flags.add("dropped_slices")
        return SeriesResult(
            study_uid=plan.study_uid,
            series_uid=plan.series_uid,
            sop_uids=tuple(sl.sop_uid for sl in slices),
            sources=tuple(sl.source.label for sl in slices),
            z_mm=z,
            probs=probs,
            evaluated=evaluated,
            levels=levels,
            slice_thickness_mm=plan.slice_thickness_mm,
            flags=tuple(sorted(flags)),
        )


def _infer_stream(chunks: Iterator[_PreparedChunk], backend: Backend, batch_size: int, assembler: _Assembler) -> Iterator[tuple[SeriesPlan, SeriesResult | None, dict[int, str]]]:
    """Batch rows across chunk and series boundaries; yield series as they complete."""
    rows: list[tuple[int, int]] = []
    arrays: list[np.ndarray] = []
    buffered = 0

    def run_batch(take: int) -> None:
        nonlocal arrays, rows, buffered
        stacked = np.concatenate(arrays) if len(arrays) > 1 else arrays[0]
        batch, rest = stacked[:take], stacked[take:]
        probs = backend.infer(batch)
        ids, rows = rows[:take], rows[take:]
        arrays = [rest] if len(rest) else []
        buffered -= take
        by_series: dict[int, list[int]] = {}
        for pos, (no, index) in enumerate(ids):
            by_series.setdefault(no, []).append(pos)
        for no, positions in by_series.items():
            assembler.scored(no, [ids[p][1] for p in positions], probs[positions])

    for chunk in chunks:
        assembler.fail(chunk.series_no, chunk.failures)
        if len(chunk.indices):
            arrays.append(chunk.array)
            rows.extend((chunk.series_no, i) for i in chunk.indices)
            buffered += len(chunk.indices)
        while buffered >= batch_size:
            run_batch(batch_size)
        yield from assembler.pop_complete()
    if buffered:
        run_batch(buffered)
    yield from assembler.pop_complete()


# -- the run -----------------------------------------------------------------------------------


def prepare_output_dir(out: Path, overwrite: bool) -> None:
    """Create ``out``; refuse to mix with an earlier run's results unless ``overwrite``.

    Only spinelevel's own datasets and manifest are removed on overwrite.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a directory")
    existing = [name for name in (*DATASETS, "run.json") if (out / name).exists()]
    if existing and not overwrite:
        raise OutputError(
            f"{out}: already holds the results of an earlier run ({', '.join(existing)}); "
            "choose another --out or pass --overwrite to replace them"
        )
    for name in existing:
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{out}: cannot create the output directory ({exc.strerror or exc})") from None


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"spinelevel": __version__, "python": platform.python_version()}
    for pkg in ("numpy", "pydicom", "pyarrow", "onnxruntime", "pylibjpeg", "pylibjpeg-openjpeg", "pylibjpeg-libjpeg", "pylibjpeg-rle", "pyjpegls"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def run(paths: list[Path], model: Path, out: Path, options: RunOptions = RunOptions(), progress: RunProgress | None = None) -> RunSummary:
    """Classify every axial CT series under ``paths`` and write the results to ``out``.

    Raises:
        InputError: bad options or missing inputs.
        ModelError / CardError / BackendUnavailableError: the model cannot be run.
        OutputError: the output directory cannot be written.
    """
    progress = progress or _NoProgress()
    if options.batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {options.batch_size}")
    if options.workers < 0:
        raise InputError(f"--workers must be 0 or more, got {options.workers}")
    if options.select.min_slices < 1:
        raise InputError(f"--min-slices must be at least 1, got {options.select.min_slices}")
    paths = [Path(p) for p in paths]
    if not paths:
        raise InputError("no input path given")
    for p in paths:
        if not os.path.lexists(p):
            raise InputError(f"{p}: no such file or directory")
    started = time.perf_counter()
    started_at = _now()
    run_id = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)

    card: ModelCard = read_card(model)
    backend_name = options.backend or default_backend(model)
    backend = load_backend(backend_name, model, card, BackendOptions(max_batch=options.batch_size, threads=options.threads))
    model_sha = file_sha256(model)
    prepare_output_dir(out, options.overwrite)
    writer = RunWriter(out, card.classes, run_id, model_sha, backend_name)

    manifest_run = {
        "run_id": run_id,
        "started": started_at,
        "status": "running",
        "versions": _versions(),
        "model": {"path": str(model), "sha256": model_sha},
        "card": card.to_dict(),
        "backend": backend_name,
        "options": {
            "batch_size": options.batch_size,
            "threads": options.threads,
            "workers": options.workers,
            "scan": asdict(options.scan),
            "select": asdict(options.select),
            "thresholds": asdict(options.thresholds),
        },
        "inputs": [str(p) for p in paths],
        "l3_definition": l3_definition(options.thresholds),
    }
    manifest = {"format": "spinelevel.run/1", "runs": [manifest_run]}
    write_json_atomic(out / "run.json", manifest)

    status = "failed"
    try:
        items: list[FileHeader | SkippedFile] = []
        for item in scan_paths(paths, options.scan):
            items.append(item)
            if len(items) % 200 == 0:
                progress.scanned(len(items))
        progress.scanned(len(items))
        selection = select_series(items, options.select)
        del items
        for skip in selection.skipped_series:
            writer.add_series_status(skip.study_uid, skip.series_uid, "skipped", skip.reason, skip.n_files)
        for sf in selection.skipped_files:
            writer.add_skipped(sf.source.label, sf.reason)
        plans = list(selection.plans)
        progress.planned(len(plans), sum(len(p.slices) for p in plans))
        log.info("%d series to classify, %d skipped, %d files skipped", len(plans), len(selection.skipped_series), len(selection.skipped_files))

        spec = PreprocessSpec.from_card(card)
        tasks = _chunk_tasks(plans, spec, max(1, options.chunk_slices), options.scan.max_file_bytes)
        assembler = _Assembler(plans, card.classes, options.thresholds, options.select.min_slices)
        for plan, result, failures in _infer_stream(_prepared(tasks, options.workers), backend, options.batch_size, assembler):
            for index, reason in sorted(failures.items()):
                writer.add_skipped(plan.slices[index].source.label, reason)
            if result is None:
                ok = len(plan.slices) - len(failures)
                writer.add_series_status(
                    plan.study_uid,
                    plan.series_uid,
                    "error",
                    f"only {ok} of {len(plan.slices)} slices could be decoded (--min-slices {options.select.min_slices}); see skipped for each file",
                    len(plan.slices),
                    plan.flags,
                )
                progress.advanced(1, 0)
            else:
                writer.add_result(result)
                progress.advanced(1, len(result.sop_uids))
        writer.flush()
        status = "complete"
    except KeyboardInterrupt:
        status = "interrupted"
        writer.flush()
        raise
    finally:
        backend.close()
        seconds = time.perf_counter() - started
        manifest_run.update(status=status, finished=_now(), seconds=round(seconds, 3), counts=dict(writer.counts))
        try:
            write_json_atomic(out / "run.json", manifest)
        except OSError as exc:
            log.error("cannot write %s: %s", out / "run.json", exc)
    c = writer.counts
    return RunSummary(run_id, Path(out), c["series_ok"], c["series_skipped"], c["series_error"], c["slices"], c["skipped_files"], seconds)
