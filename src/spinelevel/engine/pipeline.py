"""The one place where the stages are wired:

    scan -> select series -> decode + preprocess (worker pool) -> infer -> decode sequence -> write

Series stream through: only the headers of the archive and the slices of the few series in flight
are in memory. Decoding and preprocessing run in a pool of worker processes ahead of inference; a
bounded window of chunks in flight keeps memory flat. Batches cross series boundaries.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import platform
import re
import secrets
import json
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa

from spinelevel import __version__
from spinelevel.card import ModelCard, file_sha256, read_card
from spinelevel.engine.backends import Backend, BackendOptions, load_backend
from spinelevel.engine import series_spool
from spinelevel.engine.dicomweb import DicomwebQuery
from spinelevel.engine.preprocess import PreprocessSpec
from spinelevel.engine.sampling import SamplingOptions, SeriesSampler, resolve_mode
from spinelevel.engine.scan import FileHeader, ScanOptions, SkippedFile, scan_paths
from spinelevel.engine.select import SelectOptions, SeriesPlan, SeriesSkip, select_series
from spinelevel.engine.workers import WORKER_KINDS, DecodePool, DecodeTask, Prepared
from spinelevel.engine.state import OutputLock, critical_section, load_state, remove_series, series_key, write_commit
from spinelevel.engine.writer import RunWriter, SeriesResult, write_json_atomic
from spinelevel.errors import BackendUnavailableError, InputError, ModelError, OutputError
from spinelevel.levels import LevelThresholds, l3_definition, label_series

__all__ = [
    "RunOptions",
    "RunProgress",
    "NoProgress",
    "RunSummary",
    "SeriesUnavailable",
    "RETRY_KEY_PREFIX",
    "run",
    "finish_series",
    "forget_everything",
    "manifest_entry",
    "check_run_inputs",
    "new_run_id",
    "start_history",
    "scan_and_select",
    "start_series",
    "write_series",
    "plan_key",
    "skip_key",
    "output_dir",
    "load_manifest",
    "versions",
    "now",
    "j2k_summary",
]

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class RunOptions:
    """Everything a run needs besides its inputs, model and output directory."""

    # 'auto' (TensorRT, then torch on CUDA, then ONNX Runtime) or a backend name.
    backend: str = "auto"
    # GPU backends: "cuda", "cuda:1" or "cpu" (torch); None: the first CUDA device.
    device: str | None = None
    # GPU backends: capture CUDA graphs per batch size.
    cuda_graphs: bool = False
    # torch backend: torch.compile the model.
    compile: bool = False
    # Preprocessing: 'numpy' (in the decode workers) or 'dali' (one DALI graph, on the GPU if any).
    preprocess: str = "numpy"
    # JPEG 2000 / HTJ2K decoder: 'cpu' (openjpeg), 'nvimgcodec' or 'dali' (GPU where bit-exact,
    # else the CPU with the reason in run.json; engine/gpu_j2k.py).
    j2k_decoder: str = "cpu"
    # Slices per inference call.
    batch_size: int = 16
    # Intra-op threads of the inference runtime (None: its default).
    threads: int | None = None
    # ONNX Runtime: let idle intra-op threads spin waiting for the next batch. None: off while decode
    # workers run beside inference (spinning takes their cores between batches: a whole run on two
    # cores was 1.45x faster with it off, BENCHMARKS.md), ONNX Runtime's default (on) without them.
    ort_spinning: bool | None = None
    # Decode/preprocess workers; 0 or 1 decodes in the main process.
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    # 'processes' (a crashing decoder costs only its files) or 'threads' (faster: no transfer of
    # preprocessed slices between processes; a crashing decoder ends the run).
    worker_kind: str = "processes"
    # Slices per decode task handed to a worker. Since uncompressed slices are read at their offset
    # (engine.native, about 0.4 ms per 512 px slice), a task of 4 cost about what handing it to a
    # worker process and back costs; 8 halves that share (BENCHMARKS.md, issue 17).
    chunk_slices: int = 8
    # Redo every series, replacing what earlier runs wrote into the output directory.
    force: bool = False
    # Rows buffered before a Parquet part is written and committed (what a crash can cost).
    rows_per_part: int = 100_000
    # File and archive limits of the scan.
    scan: ScanOptions = field(default_factory=ScanOptions)
    # Which series are classified.
    select: SelectOptions = field(default_factory=SelectOptions)
    # Thresholds of the doubt flags.
    thresholds: LevelThresholds = field(default_factory=LevelThresholds)
    # Which slices the model sees (full, or a sparse boundary search).
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    # DICOMweb services to read series from, besides the local paths (engine/dicomweb.py).
    dicomweb: tuple[DicomwebQuery, ...] = ()


@dataclass(frozen=True)
class SeriesUnavailable:
    """A series some of whose instances could not be retrieved from a server: an error row whose key
    never matches, so the next run does it again."""

    reason: str


# Prefix of the key of a series to redo (SeriesUnavailable): real keys are hex digests.
RETRY_KEY_PREFIX = "retry:"


class RunProgress(Protocol):
    """What the pipeline reports while it works (the CLI draws it)."""

    def scanned(self, files: int) -> None: ...

    def planned(self, series: int, slices: int) -> None: ...

    def advanced(self, series: int, slices: int) -> None: ...


class NoProgress:
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
    # Series found complete in the output directory and not redone.
    series_already_done: int = 0

    @property
    def slices_per_s(self) -> float:
        """Classified slices per second of wall time (scan included)."""
        return self.slices / self.seconds if self.seconds > 0 else 0.0


# -- decode, infer, sample: the scheduler -----------------------------------------------------


@dataclass
class _Work:
    """A series in flight."""

    plan: SeriesPlan
    sampler: SeriesSampler
    failures: dict[int, str] = field(default_factory=dict)
    # Slices requested and not yet scored or failed.
    outstanding: int = 0
    # An unexpected exception while sampling or labelling this series (it ends as an error row).
    error: str | None = None
    # The error is a failure to retrieve instances from a server: the next run redoes the series.
    unavailable: bool = False


def _unexpected(exc: BaseException, what: str) -> str:
    return f"unexpected error while {what} ({type(exc).__name__}: {exc})"


# Key of a decode task that only retrieves a series into the spool (_Scheduler._spool_ahead).
_SPOOL_TASK = -1


class _Scheduler:
    """Keeps the decode pool and the backend busy across series, and asks samplers for slices.

    Series are opened a few at a time; each asks its sampler which slices to evaluate, those are
    decoded in the pool, batched across series for inference, and handed back to the sampler, until
    the sampler is satisfied and the series is labelled.
    """

    def __init__(self, plans: list[SeriesPlan], backend: Backend, pool: DecodePool, spec: PreprocessSpec, classes: tuple[str, ...], options: RunOptions, mode: str, spool: Path | None = None) -> None:
        self.plans = plans
        # Where DICOMweb series answers are spooled for the decode workers (engine.series_spool).
        self.spool = str(spool) if spool is not None else None
        self._spooled: set[int] = set()
        self.backend = backend
        self.pool = pool
        self.spec = spec
        self.classes = classes
        self.options = options
        self.mode = mode
        self.open: dict[int, _Work] = {}
        self._next_plan = 0
        # Sparse series need several rounds: keep enough of them open to fill the pool.
        self.max_open = max(2, 2 * max(1, options.workers)) if mode == "sparse" else 2
        self._ids: list[tuple[int, int]] = []
        # Model input not yet batched, oldest first: (rows, the Prepared they came in); rows may be a
        # view of a shared-memory slab of the pool, handed back once all its rows went to the model.
        self._arrays: list[tuple[np.ndarray, Prepared]] = []
        self._packed: list = []
        self._buffered = 0
        self.model_calls = 0
        # Third-party log records counted in decode worker processes (thirdparty_log).
        self.thirdparty_records = 0
        # GPU JPEG 2000 outcomes over all workers: "gpu" or a fallback reason -> slices.
        self.j2k_outcomes: Counter[str] = Counter()
        self.dali = None
        if options.preprocess == "dali":
            from spinelevel.engine.cuda import cuda_available
            from spinelevel.engine.dali import DaliOptions, DaliPreprocessor

            device = "gpu" if _on_gpu(backend) and cuda_available() else "cpu"
            self.dali = DaliPreprocessor(spec, DaliOptions(device=device, batch_size=options.batch_size))

    def __iter__(self) -> Iterator[tuple[SeriesPlan, SeriesResult | str | None, dict[int, str]]]:
        self._open_more()
        while self.open:
            if self.pool.pending():
                self._receive(self.pool.get())
                while self._buffered >= self.options.batch_size:
                    self._run_batch(self.options.batch_size)
            elif self._buffered:
                self._run_batch(self._buffered)
            yield from self._settle()
            self._open_more()

    def _open_more(self) -> None:
        while len(self.open) < self.max_open and self._next_plan < len(self.plans):
            no = self._next_plan
            self._next_plan += 1
            plan = self.plans[no]
            z = np.asarray([s.z_mm for s in plan.slices], dtype=np.float64)
            try:
                work = _Work(plan, SeriesSampler(z, len(self.classes), self.mode, self.options.sampling, self.classes, self.options.thresholds))  # type: ignore[arg-type]
                first = work.sampler.initial()
            except Exception as exc:  # one odd series must not take the run down
                log.debug("sampling series %s failed", plan.series_uid, exc_info=True)
                work = _Work(plan, None, error=_unexpected(exc, "choosing the slices to evaluate"))  # type: ignore[arg-type]
                first = []
            self.open[no] = work
            self._spool_ahead(no)
            self._submit(no, work, first)

    def _spool_ahead(self, no: int) -> None:
        """Have a decode worker retrieve the series of plans ``no`` and ``no + 1`` into the spool
        before their slices are decoded (where the connection retrieves every series by series):
        the server's answer and our decoding overlap, and no worker waits for a series at its
        first round."""
        if self.spool is None:
            return
        for ahead in (no, no + 1):
            if ahead >= len(self.plans) or ahead in self._spooled:
                continue
            self._spooled.add(ahead)
            slices = self.plans[ahead].slices
            first = slices[0].source if slices else None
            if first is None or first.kind != "dicomweb" or first.remote is None or first.remote.series_fraction > 0:
                continue
            if not _by_series(slices, list(range(len(slices)))):
                continue
            self.pool.submit(DecodeTask(key=_SPOOL_TASK, indices=(), sources=(first,), sop_uids=(), spec=self.spec, max_bytes=self.options.scan.max_file_bytes, by_series=True, spool=self.spool))

    def _submit(self, no: int, work: _Work, indices: list[int]) -> None:
        slices = work.plan.slices
        # Archive members are read in archive order (cheap forward seeks in compressed tars).
        order = sorted(indices, key=lambda i: (slices[i].source.path, slices[i].source.offset, slices[i].frame or 0, i))
        chunk = max(1, self.options.chunk_slices)
        by_series = _by_series(slices, order)
        spool = self.spool if self.spool is not None and any(slices[i].source.kind == "dicomweb" for i in order) else None
        for start in range(0, len(order), chunk):
            idx = tuple(order[start : start + chunk])
            self.pool.submit(
                DecodeTask(
                    key=no,
                    indices=idx,
                    sources=tuple(slices[i].source for i in idx),
                    sop_uids=tuple(slices[i].sop_uid for i in idx),
                    spec=self.spec,
                    max_bytes=self.options.scan.max_file_bytes,
                    preprocess=self.options.preprocess,
                    frames=tuple(slices[i].frame for i in idx),
                    natives=tuple(slices[i].native for i in idx),
                    spacing=work.plan.pixel_spacing,
                    j2k_decoder=self.options.j2k_decoder,
                    j2k_device=_device_index(self.options.device),
                    by_series=by_series,
                    spool=spool,
                )
            )
        work.outstanding += len(order)

    def _receive(self, prepared: Prepared) -> None:
        from spinelevel.engine import thirdparty_log

        self.thirdparty_records += prepared.thirdparty_records
        thirdparty_log.show(prepared.thirdparty_messages)
        self.j2k_outcomes.update(dict(prepared.j2k_outcomes))
        if prepared.key == _SPOOL_TASK:  # a series put into the spool: its rounds come later
            self.pool.release(prepared)
            return
        work = self.open[prepared.key]
        if prepared.unavailable and work.error is None:
            # the server did not give the instances (after retries): decoding the rest would make a
            # series with holes that the next run would take as done
            reason = dict(prepared.failures)[prepared.unavailable[0]]
            work.error, work.unavailable = f"instances could not be retrieved ({reason}); re-run to retry", True
        if work.error is not None:  # the series has failed: its slices are only counted off
            work.outstanding -= len(prepared.failures) + len(prepared.indices)
            self.pool.release(prepared)
            return
        if prepared.failures:
            for index, reason in prepared.failures:
                work.failures[index] = reason
            work.outstanding -= len(prepared.failures)
            try:
                work.sampler.unavailable([i for i, _ in prepared.failures])
            except Exception as exc:
                work.error = _unexpected(exc, "sampling the series")
        if prepared.indices:
            if self.dali is not None:
                self._packed.extend(prepared.packed)
            else:
                self._arrays.append((prepared.array, prepared))
            self._ids.extend((prepared.key, i) for i in prepared.indices)
            self._buffered += len(prepared.indices)

    def _run_batch(self, take: int) -> None:
        if self.dali is not None:
            items, self._packed = self._packed[:take], self._packed[take:]
            # TensorRT takes DALI's device output without a copy; other backends take host arrays
            batch = self.dali.run_device(items) if self.backend.name == "tensorrt" else self.dali.run(items)
        else:
            # the rows of the batch, in order; only the last piece may be left partly for later
            pieces, used, got = [], 0, 0
            while got < take:
                rows, prepared = self._arrays[used]
                part = rows[: take - got]
                pieces.append(part)
                got += len(part)
                if len(part) < len(rows):
                    self._arrays[used] = (rows[len(part) :], prepared)
                else:
                    used += 1
            done, self._arrays = self._arrays[:used], self._arrays[used:]
            # one piece: the model reads the slab in place; several: one copy assembles the batch
            batch = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
        probs = self.backend.infer(batch)
        if self.dali is None:
            del batch, pieces
            for _, prepared in done:
                self.pool.release(prepared)
        self.model_calls += 1
        ids, self._ids = self._ids[:take], self._ids[take:]
        self._buffered -= take
        by_series: dict[int, list[int]] = {}
        for pos, (no, _) in enumerate(ids):
            by_series.setdefault(no, []).append(pos)
        for no, positions in by_series.items():
            work = self.open[no]
            work.outstanding -= len(positions)
            if work.error is not None:
                continue
            try:
                work.sampler.update([ids[p][1] for p in positions], probs[positions])
            except Exception as exc:  # one odd series must not take the run down
                log.debug("sampling series %s failed", work.plan.series_uid, exc_info=True)
                work.error = _unexpected(exc, "sampling the series")

    def _settle(self) -> Iterator[tuple[SeriesPlan, SeriesResult | None, dict[int, str]]]:
        for no in sorted(self.open):
            work = self.open[no]
            if work.outstanding:
                continue
            if work.error is None:
                try:
                    more = work.sampler.next()
                except Exception as exc:
                    work.error, more = _unexpected(exc, "sampling the series"), []
                if more:
                    self._submit(no, work, more)
                    continue
            del self.open[no]
            if self.spool is not None:
                from spinelevel.engine.dicomweb import discard_spooled

                discard_spooled(self.spool, (sl.source for sl in work.plan.slices))
            yield work.plan, self._finish(work), work.failures

    def _finish(self, work: _Work) -> SeriesResult | SeriesUnavailable | str | None:
        """The labelled series, None when too few slices decoded, or the text of an unexpected error."""
        if work.unavailable:
            return SeriesUnavailable(work.error or "instances could not be retrieved")
        if work.error is not None:
            return work.error
        try:
            return finish_series(work.plan, work.sampler, work.failures, self.classes, self.options)
        except Exception as exc:  # one odd series must not take the run down
            log.debug("labelling series %s failed", work.plan.series_uid, exc_info=True)
            return _unexpected(exc, "labelling the series")


def _by_series(slices: list, order: list[int]) -> bool:
    """Whether a round is retrieved with its series in one request (into the run's spool).

    So when every slice of the round is a DICOMweb instance of one series and the round asks for at
    least the connection's ``series_fraction`` of the series' instances.
    """
    if not order or any(slices[i].frame is not None for i in order):
        # frames of a multi-frame instance: the worker's parsed-file cache already holds the instance
        return False
    first = slices[order[0]].source
    if first.kind != "dicomweb" or first.remote is None:
        return False
    prefix = (first.member or "").rsplit("/instances/", 1)[0]
    if any(slices[i].source.kind != "dicomweb" or slices[i].source.remote != first.remote or not (slices[i].source.member or "").startswith(prefix + "/instances/") for i in order):
        return False
    sops = {slices[i].source.member for i in order}
    total = len({sl.source.member for sl in slices})
    return len(sops) >= first.remote.series_fraction * total


def finish_series(plan: SeriesPlan, sampler: SeriesSampler, failures: dict[int, str], classes: tuple[str, ...], options: RunOptions) -> SeriesResult | None:
    """Label a series whose sampler is satisfied; None when too few slices could be decoded."""
    keep = np.flatnonzero(~sampler.failed)
    if len(keep) < options.select.min_slices or not sampler.evaluated[keep].any():
        return None
    slices = [plan.slices[i] for i in keep]
    z = np.asarray([sl.z_mm for sl in slices], dtype=np.float64)
    probs = sampler.probs[keep]
    evaluated = sampler.evaluated[keep]
    levels = label_series(probs, z, classes, evaluated, options.thresholds)
    flags = set(plan.flags)
    if failures:
        flags.add("dropped_slices")
    return SeriesResult(
        study_uid=plan.study_uid,
        series_uid=plan.series_uid,
        sop_uids=tuple(sl.sop_uid for sl in slices),
        sources=tuple(sl.source.label for sl in slices),
        frames=tuple(sl.frame for sl in slices),
        z_mm=z,
        probs=probs,
        evaluated=evaluated,
        levels=levels,
        slice_thickness_mm=plan.slice_thickness_mm,
        flags=tuple(sorted(flags)),
        kept=plan.kept,
    )


def write_series(writer: RunWriter, plan: SeriesPlan, key: str, result: SeriesResult | SeriesUnavailable | str | None, failures: dict[int, str], options: RunOptions) -> None:
    """Hand one finished series to the writer, whole: signals wait until its rows are buffered.

    ``result``: the labelled series, None when too few slices could be decoded, the text of an
    unexpected error (the series becomes an error row with it), or SeriesUnavailable (an error row
    under a key that the next run does not take as done).
    """
    if isinstance(result, SeriesUnavailable):
        # which slices failed is not a property of the series: record the series, not each file
        key, result, failures = RETRY_KEY_PREFIX + key, result.reason, {}
    with critical_section():
        _write_series(writer, plan, key, result, failures, options)


def _write_series(writer: RunWriter, plan: SeriesPlan, key: str, result: SeriesResult | str | None, failures: dict[int, str], options: RunOptions) -> None:
    skipped = [(f.source.label, f.reason) for f in plan.dropped]
    skipped += [(plan.slices[i].source.label, reason if plan.slices[i].frame is None else f"frame {plan.slices[i].frame}: {reason}") for i, reason in sorted(failures.items())]
    if isinstance(result, SeriesResult):
        writer.add_result(result, key, skipped)
        return
    ok = len(plan.slices) - len(failures)
    if isinstance(result, str):
        reason = result
    else:
        common, count = Counter(failures.values()).most_common(1)[0] if failures else ("", 0)
        why = f"; {'all' if count == len(failures) else 'most'}: {common}" if common else ""
        reason = (
            f"only {ok} of {len(plan.slices)} slices could be decoded (--min-slices {options.select.min_slices}){why}; "
            "see skipped for each file"
        )
    # the slices that did decode belong to no classified series either: account for them too
    seen_sources = {label for label, _ in skipped}
    for i, sl in enumerate(plan.slices):
        if i not in failures and sl.source.label not in seen_sources:
            seen_sources.add(sl.source.label)  # a multi-frame file is one skipped row
            skipped.append((sl.source.label, f"series failed: {reason.split(';')[0]}"))
    writer.add_series_status(
        plan.study_uid,
        plan.series_uid,
        "error",
        reason,
        len(plan.slices),
        key,
        skipped,
        plan.flags,
        plan.kept,
    )


def check_run_inputs(paths: list[Path], options: RunOptions) -> list[Path]:
    """Refuse bad options and missing inputs before anything is loaded; returns the paths."""
    if options.batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {options.batch_size}")
    if options.workers < 0:
        raise InputError(f"--workers must be 0 or more, got {options.workers}")
    from spinelevel.engine.gpu_j2k import J2K_DECODERS

    if options.j2k_decoder not in J2K_DECODERS:
        raise InputError(f"--j2k-decoder must be one of {', '.join(J2K_DECODERS)}, got {options.j2k_decoder!r}")
    if options.worker_kind not in WORKER_KINDS:
        raise InputError(f"--worker-kind must be one of {', '.join(WORKER_KINDS)}, got {options.worker_kind!r}")
    if options.rows_per_part < 1:
        raise InputError(f"--rows-per-part must be at least 1, got {options.rows_per_part}")
    if options.select.min_slices < 1:
        raise InputError(f"--min-slices must be at least 1, got {options.select.min_slices}")
    out = [Path(p) for p in paths]
    if not out and not options.dicomweb:
        raise InputError("no input path given")
    for p in out:
        if not os.path.lexists(p):
            raise InputError(f"{p}: no such file or directory")
    return out


# A run on at most this many plain files, of at most this many bytes in all, decodes in the main
# process: starting worker processes (each imports Python, numpy, pydicom and OpenCV, about 0.5 s of
# CPU) would cost more than they save (a one-file run: 1.15 s without workers, 1.85 s with two on a
# loaded machine; BENCHMARKS.md).
SMALL_INPUT_FILES = 16
SMALL_INPUT_BYTES = 32 << 20


def small_input_options(paths: list[Path], options: RunOptions) -> RunOptions:
    """``options`` with ``workers=0`` for a run on a few small files (no folder, no DICOMweb)."""
    if options.workers <= 1 or options.dicomweb or len(paths) > SMALL_INPUT_FILES:
        return options
    total = 0
    for p in paths:
        try:
            st = os.stat(p)
        except OSError:
            return options
        if not os.path.isfile(p):
            return options
        total += st.st_size
    if total > SMALL_INPUT_BYTES:
        return options
    log.info("%d small input file(s): decoding in the main process, without worker processes", len(paths))
    from dataclasses import replace

    return replace(options, workers=0)


def new_run_id() -> str:
    """A run id that sorts by start time: UTC timestamp plus a random suffix."""
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


def manifest_entry(run_id: str, started_at: str, model: Path, model_sha: str, card: ModelCard, choice, options: RunOptions, mode: str, paths: list[Path], extra_options: dict) -> dict:  # noqa: ANN001
    """This run's entry of run.json (updated with status, counts and times when it ends)."""
    return {
        "run_id": run_id,
        "started": started_at,
        "status": "running",
        "versions": versions(),
        "model": {"path": str(model), "sha256": model_sha},
        "card": card.to_dict(),
        "backend": choice.to_dict(),
        "options": {
            "batch_size": options.batch_size,
            "threads": options.threads,
            "device": options.device,
            "cuda_graphs": options.cuda_graphs,
            "compile": options.compile,
            "preprocess": options.preprocess,
            "j2k_decoder": options.j2k_decoder,
            "force": options.force,
            "scan": asdict(options.scan),
            "select": asdict(options.select),
            # an unbounded extent ('--level-extents off') as null: run.json stays strict JSON
            "thresholds": {k: None if isinstance(v, float) and not np.isfinite(v) else v for k, v in asdict(options.thresholds).items()},
            "sampling": asdict(options.sampling) | {"mode": mode},
            "dicomweb": [asdict(q) for q in options.dicomweb],
            **extra_options,
        },
        "inputs": [str(p) for p in paths] + [q.connection.url for q in options.dicomweb],
        "l3_definition": l3_definition(options.thresholds),
    }


def start_history(out: Path, entry: dict) -> dict:
    """Append ``entry`` to the run history in run.json (written now, rewritten when the run ends)."""
    manifest = load_manifest(out)
    manifest["runs"].append(entry)
    write_json_atomic(out / "run.json", manifest)
    return manifest


def scan_and_select(paths: list[Path], options: RunOptions, progress: RunProgress, pool: DecodePool | None = None) -> tuple:
    """Scan the inputs (headers only) and select the series; returns (selection, every source seen,
    log records of the DICOM libraries in worker processes).

    ``pool``: a started decode pool whose worker processes read the headers of local files in
    batches (the scan is then as parallel as decoding); None reads them here.
    """
    import functools
    import itertools

    from spinelevel.engine import thirdparty_log
    from spinelevel.engine.dicomweb import DicomwebScanner, series_headers
    from spinelevel.engine.scan import scan_batch
    from spinelevel.engine.workers import counted_task

    worker_records = 0

    def in_workers(fn):  # noqa: ANN001, ANN202 - batches -> their results, read in the pool's workers
        def read(batches):  # noqa: ANN001, ANN202
            nonlocal worker_records
            for found, records, messages in pool.map_ordered(fn, batches):  # type: ignore[union-attr]
                worker_records += records
                thirdparty_log.show(messages)
                yield found

        return read if pool is not None else None

    items: list[FileHeader | SkippedFile] = []
    remote = [DicomwebScanner(q, options.scan, in_workers(functools.partial(counted_task, series_headers))) for q in options.dicomweb]
    local = scan_paths(paths, options.scan, in_workers(functools.partial(counted_task, scan_batch, options=options.scan)))
    for item in itertools.chain(local, *remote):
        items.append(item)
        if len(items) % 200 == 0:
            progress.scanned(len(items))
    progress.scanned(len(items))
    seen = {item.source.label for item in items}
    for scanner in remote:
        seen |= scanner.series_labels  # a series whose headers failed before is met again
    return select_series(items, options.select), seen, worker_records


def forget_everything(state, run_id: str) -> None:  # noqa: ANN001 - OutputState
    """--force: remove every committed part and series in one commit."""
    if not (state.parts or state.series):
        return
    removed = sorted(state.parts)
    with critical_section():
        write_commit(state, run_id, {"removed": removed, "removed_series": sorted(state.series)})
    for rel in removed:
        (state.out / rel).unlink(missing_ok=True)


def start_series(state, writer: RunWriter, selection, seen: set[str], model_sha: str, run_id: str) -> tuple[list[SeriesPlan], dict[str, str], int]:  # noqa: ANN001
    """Resume bookkeeping shared by every runner, before any series is classified.

    Replaces the rows of series whose key changed, writes this run's loose files and skipped
    series, and returns the plans still to classify, the key of every plan, and how many series
    of this run were already done.
    """
    plan_keys = {p.series_uid: plan_key(model_sha, p) for p in selection.plans}
    skip_keys = {s.series_uid: skip_key(model_sha, s) for s in selection.skipped_series}
    present = plan_keys | skip_keys
    legacy = {p.series_uid: plan_key(model_sha, p, legacy=True) for p in selection.plans if p.dropped}
    legacy |= {s.series_uid: skip_key(model_sha, s, legacy=True) for s in selection.skipped_series}
    upgraded = {uid for uid, key in legacy.items() if uid in state.series and state.series[uid].key == key != present[uid]}
    if upgraded:
        # outputs of earlier versions: the same series under its old key, re-keyed without redoing it
        entries = {uid: {"key": present[uid], "status": state.series[uid].status, "skipped_sources": list(state.series[uid].skipped_sources)} for uid in sorted(upgraded)}
        with critical_section():
            write_commit(state, run_id, {"series": entries})
    changed = {uid for uid, key in present.items() if uid in state.series and state.series[uid].key != key}
    if changed:
        log.info("%d series changed since they were done; their rows are replaced", len(changed))
        with critical_section():
            remove_series(state, changed, run_id, writer.write_part)
    already_done = sum(1 for uid in present if uid in state.series)
    writer.add_loose([(f.source.label, f.reason) for f in selection.skipped_files], seen)
    for skip in selection.skipped_series:
        if skip.series_uid not in state.series:
            with critical_section():
                writer.add_series_status(skip.study_uid, skip.series_uid, skip.status, skip.reason, skip.n_files, skip_keys[skip.series_uid], [(f.source.label, f.reason) for f in skip.files], skip.flags, skip.kept)
    plans = [p for p in selection.plans if p.series_uid not in state.series]
    return plans, plan_keys, already_done


# -- the run -----------------------------------------------------------------------------------


def output_dir(out: Path) -> Path:
    """Check and create the output directory (a local or network-mounted path)."""
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]+:/", str(out)):
        raise InputError(f"{out}: object-store URIs are not supported; write to a local or network-mounted path")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{out}: cannot create the output directory ({exc.strerror or exc})") from None
    return out


def load_manifest(out: Path) -> dict:
    path = out / "run.json"
    fresh = {"format": "spinelevel.run/1", "runs": []}
    if not path.is_file():
        return fresh
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        log.warning("%s is unreadable; starting a new run history", path)
        return fresh
    if not isinstance(manifest, dict) or not isinstance(manifest.get("runs"), list):
        return fresh
    return manifest


def _member(f: SkippedFile, legacy: bool) -> str:
    # who the file is, not where it is: a local run and a DICOMweb run of a series share the key
    return f.source.label if legacy or not f.identity else "instance:" + f.identity


def plan_key(model_sha: str, plan: SeriesPlan, legacy: bool = False) -> str:
    """The resume key of a classified series: model, slices and dropped files, by SOP instance UID.

    ``legacy``: the key of outputs written before keys named dropped files by instance UID (they
    named them by source label); start_series accepts either.
    """
    # slice_id is the SOP UID alone for single-frame files, so keys of earlier outputs still match
    return series_key(model_sha, "classify", [s.slice_id for s in plan.slices] + [_member(f, legacy) for f in plan.dropped])


def skip_key(model_sha: str, skip: SeriesSkip, legacy: bool = False) -> str:
    """The resume key of a skipped series: model, reason and files, by SOP instance UID (see plan_key)."""
    return series_key(model_sha, "skip:" + skip.reason, [_member(f, legacy) for f in skip.files])


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"spinelevel": __version__, "python": platform.python_version()}
    for pkg in ("numpy", "pydicom", "pyarrow", "onnxruntime", "pylibjpeg", "pylibjpeg-openjpeg", "pylibjpeg-libjpeg", "pylibjpeg-rle", "pyjpegls"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def run(paths: list[Path], model: Path, out: Path, options: RunOptions = RunOptions(), progress: RunProgress | None = None) -> RunSummary:
    """Classify every axial CT series under ``paths`` and write the results to ``out``.

    Raises:
        InputError: bad options or missing inputs.
        ModelError / CardError / BackendUnavailableError: the model cannot be run.
        OutputError: the output directory cannot be written.
    """
    from spinelevel.engine import thirdparty_log

    progress = progress or NoProgress()
    paths = check_run_inputs(paths, options)
    options = small_input_options(paths, options)
    if options.dicomweb:
        from spinelevel.engine.dicomweb import check_server

        for query in options.dicomweb:
            check_server(query.connection)  # a wrong URL or credentials stop the run before any output
    thirdparty_log.install()  # pydicom's warnings quote header values: count them, drop the values
    started = time.perf_counter()
    started_at = now()
    run_id = new_run_id()

    from spinelevel.engine.backends import choose_backend
    from spinelevel.models import resolve_model

    if options.preprocess not in ("numpy", "dali"):
        raise InputError(f"--preprocess {options.preprocess!r}: choose numpy or dali")
    if options.preprocess == "dali":
        from spinelevel.engine.dali import dali_available

        if not dali_available():
            raise BackendUnavailableError("--preprocess dali needs NVIDIA DALI: pip install nvidia-dali-cuda130 (or spinelevel[gpu])")
    model = resolve_model(model)
    if not Path(model).is_file():
        raise ModelError(f"{model}: model file not found")
    choice = choose_backend(model, options.backend)
    model = Path(choice.model)
    card: ModelCard = read_card(model)
    # the workers start (and import their decoders) while the inference runtime loads the model
    pool = decode_pool(options, PreprocessSpec.from_card(card))
    _warm_parquet_writer()
    try:
        pool.start()
        backend_options = BackendOptions(max_batch=options.batch_size, threads=options.threads, device=options.device, cuda_graphs=options.cuda_graphs, compile=options.compile, spinning=ort_spinning(options))
        backend = load_backend(choice.name, model, card, backend_options)
        try:
            model_sha = file_sha256(model)
            mode = resolve_mode(options.sampling.mode, gpu_backend=_on_gpu(backend))
            out = output_dir(out)
            with OutputLock(out):
                return _run_locked(paths, model, out, options, progress, card, backend, choice, model_sha, mode, run_id, started, started_at, pool)
        finally:
            backend.close()
    finally:
        pool.close()


def _warm_parquet_writer() -> None:
    """Make pyarrow load its pandas shim now, in a thread, instead of at the first Parquet write.

    pyarrow imports pandas (when installed) at its first array conversion: about 0.3 s, which every
    run paid at its end, serially. Started here it overlaps with the model load and the scan, where
    this process mostly waits for the workers. Nothing is written.
    """
    import threading

    def warm() -> None:
        try:
            pa.array([0], type=pa.int64())
        except Exception:  # only a warm-up: the writer reports real problems itself
            pass

    threading.Thread(target=warm, name="spinelevel-warm-pyarrow", daemon=True).start()


def decode_pool(options: RunOptions, spec: PreprocessSpec) -> DecodePool:
    """The run's decode pool, not started; with the shared-memory hand-off of the process pool
    (DESIGN.md 2): a slab per task of chunk_slices rows."""
    return DecodePool(
        options.workers,
        kind=options.worker_kind,
        slab_spec=spec if options.preprocess == "numpy" else None,
        slab_rows=max(1, options.chunk_slices),
        held_slabs=options.batch_size // max(1, options.chunk_slices) + 2,
    )


def ort_spinning(options: RunOptions) -> bool | None:
    """ONNX Runtime's intra-op spinning for a run: the user's choice, else off while decode workers
    share the cores with inference, else ONNX Runtime's default (None)."""
    if options.ort_spinning is not None:
        return options.ort_spinning
    return False if options.workers > 1 else None


def _device_index(device: str | None) -> int:
    """"cuda:1" -> 1; None, "cuda", "cpu" -> 0."""
    if not device or ":" not in str(device):
        return 0
    try:
        return int(str(device).split(":", 1)[1])
    except ValueError:
        return 0


def j2k_summary(options: RunOptions, outcomes: Counter) -> dict:
    """run.json's ``j2k_decode``: the decoder asked for, slices decoded on the GPU, CPU fallbacks by reason."""
    from spinelevel.engine.gpu_j2k import GPU_DECODED

    return {
        "decoder": options.j2k_decoder,
        "gpu_slices": int(outcomes.get(GPU_DECODED, 0)),
        "cpu_fallback": {reason: int(n) for reason, n in sorted(outcomes.items()) if reason != GPU_DECODED},
    }


def _on_gpu(backend: Backend) -> bool:
    if backend.name == "tensorrt":
        return True
    device = getattr(backend, "device", None)
    return device is not None and "cuda" in str(device)


def _run_locked(paths: list[Path], model: Path, out: Path, options: RunOptions, progress: RunProgress, card: ModelCard, backend: Backend, choice, model_sha: str, mode: str, run_id: str, started: float, started_at: str, pool: DecodePool) -> RunSummary:  # noqa: ANN001
    state = load_state(out)
    writer = RunWriter(state, card.classes, run_id, model_sha, choice.name, rows_per_part=options.rows_per_part, keep_tags=options.scan.keep_tags)
    if options.force:
        forget_everything(state, run_id)

    manifest_run = manifest_entry(run_id, started_at, model, model_sha, card, choice, options, mode, paths, {"workers": options.workers, "worker_kind": options.worker_kind, "ort_spinning": ort_spinning(options)})
    manifest = start_history(out, manifest_run)

    from spinelevel.engine import thirdparty_log

    status = "failed"
    already_done = 0
    scheduler: _Scheduler | None = None
    # DICOMweb series answers on their way to the decode workers (patient data: not under OUT)
    spool = series_spool.make_root() if options.dicomweb else None
    records_before = thirdparty_log.record_count()
    scan_records = 0
    spec = PreprocessSpec.from_card(card)
    try:
        # the pool's workers read the headers too: the scan runs as parallel as decoding
        selection, seen, scan_records = scan_and_select(paths, options, progress, pool)
        plans, plan_keys, already_done = start_series(state, writer, selection, seen, model_sha, run_id)
        progress.planned(len(plans), sum(len(p.slices) for p in plans))
        log.info("%d series to classify, %d already done, %d skipped", len(plans), already_done, len(selection.skipped_series))

        scheduler = _Scheduler(plans, backend, pool, spec, card.classes, options, mode, spool)
        for plan, result, failures in scheduler:
            write_series(writer, plan, plan_keys[plan.series_uid], result, failures, options)
            progress.advanced(1, len(result.sop_uids) if isinstance(result, SeriesResult) else 0)
        writer.finish()
        status = "complete"
    except KeyboardInterrupt:
        status = "interrupted"
        writer.flush()  # complete series waiting in the buffer are committed
        raise
    finally:
        pool.close()
        if spool is not None:
            series_spool.clear(spool)
        if scheduler is not None and scheduler.dali is not None:
            scheduler.dali.close()
        seconds = time.perf_counter() - started
        manifest_run.update(
            status=status,
            finished=now(),
            seconds=round(seconds, 3),
            counts=dict(writer.counts, series_already_done=already_done),
            model_calls=scheduler.model_calls if scheduler is not None else 0,
            # warnings of pydicom and the decoders (values dropped; --verbose shows them redacted)
            third_party_log_records=thirdparty_log.record_count() - records_before + scan_records + (scheduler.thirdparty_records if scheduler is not None else 0),
            j2k_decode=j2k_summary(options, scheduler.j2k_outcomes if scheduler is not None else Counter()),
        )
        try:
            write_json_atomic(out / "run.json", manifest)
        except OSError as exc:
            log.error("cannot write %s: %s", out / "run.json", exc)
    c = writer.counts
    return RunSummary(run_id, out, c["series_ok"], c["series_skipped"], c["series_error"], c["slices"], c["skipped_files"], seconds, already_done)
