"""The same run on Ray Data: decoding on CPU tasks, inference in an actor pool, across a cluster.

    driver: scan -> select -> resume filter -> Dataset of series
    Ray:    series -> decode + preprocess (CPU tasks) -> infer (actor pool, model loaded once per actor)
    driver: gather each series' slices -> decode sequence, pick L3 -> RunWriter (commit records)

The driver does exactly what a single-machine run does around the model: the same scan, selection,
series keys, output lock, commit records and run history (``pipeline.py``), so a Ray run and a
single-machine run resume each other's output directories and write row-for-row the same tables.
Only the middle moves to Ray. Results stream back as the dataset executes and every completed
series is committed as it arrives, so a crash costs at most the series in flight.

Sequence decoding and the L3 pick need every slice of a series and take well under a millisecond
per series, so they run where the slices of a series meet: on the driver, as they arrive, with the
same code as the single-machine scheduler. A Ray ``groupby`` would be an all-to-all barrier: no series
could be committed before the whole cohort was inferred, and resume would lose everything.

Sparse sampling (``--sampling sparse``, the CPU default) needs several model rounds per series: it
runs as one actor stage in which each actor holds the model, decodes the slices its sampler asks
for and infers them, a series at a time (see ``docs/ray.md``).

Fault tolerance is Ray Data's: actors are restarted and their tasks retried when a worker dies, and
tasks are retried on system failures. The driver keeps one result per (series, slice), so a retry
that repeats a result cannot duplicate a row.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from spinelevel.card import ModelCard, file_sha256, read_card
from spinelevel.engine.backends import BackendOptions, load_backend
from spinelevel.engine.preprocess import PreprocessSpec
from spinelevel.engine.sampling import SamplingOptions, SeriesSampler, resolve_mode
from spinelevel.engine.select import SeriesPlan
from spinelevel.engine.sources import Source
from spinelevel.engine.state import OutputLock, load_state
from spinelevel.engine.workers import DecodeTask, prepare
from spinelevel.engine.writer import RunWriter, SeriesResult, write_json_atomic
from spinelevel.errors import BackendUnavailableError, InputError, ModelError, SpineLevelError

# Helpers of the single-machine pipeline, shared so both paths stay identical.
from spinelevel.engine.pipeline import (
    NoProgress,
    check_run_inputs,
    new_run_id,
    RunOptions,
    RunProgress,
    RunSummary,
    finish_series,
    forget_everything,
    manifest_entry,
    scan_and_select,
    start_history,
    now,
    output_dir,
    start_series,
    write_series,
)

__all__ = ["RayOptions", "ray_available", "run_on_ray", "INSTALL_HINT"]

log = logging.getLogger(__name__)

# What to run when Ray is missing.
INSTALL_HINT = "pip install 'spinelevel[ray]'"

# Testing only: a directory; a worker that finds the file 'infer' or 'decode' in it deletes it and
# dies (os._exit), once, so tests can check that a killed worker loses and duplicates nothing.
CRASH_ONCE_ENV = "SPINELEVEL_RAY_CRASH_ONCE"

_GPU_BACKENDS = ("tensorrt", "torch")

# A URI scheme ("s3://", "gs://"; pathlib folds the double slash), not a Windows drive letter.
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:/")


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide the run goes on Ray."""

    # Ray cluster address ("auto", "ray://head:10001", "head:6379"); None starts a local instance
    # (or joins the one this process already initialised).
    address: str | None = None
    # GPUs per inference actor (0: CPU actors; 0.5 puts two actors on one GPU).
    gpus_per_worker: float = 0.0
    # Most decode/preprocess tasks at once (None: as many as free CPUs allow).
    decode_workers: int | None = None
    # Inference actors (None: GPUs / gpus_per_worker on GPU clusters; CPUs / 4 on CPU clusters,
    # CPUs / cpus_per_worker with sparse sampling, whose actors also decode).
    inference_workers: int | None = None
    # CPUs reserved per inference actor (and ONNX Runtime threads when --threads is not given).
    cpus_per_worker: float = 1.0
    # Heap memory reserved per decode task, in bytes (a chunk's file bytes, HU and model input).
    # Different resources also keep Ray Data from fusing decoding into the inference actors, so
    # decoding stays on its own CPU tasks and scales apart from inference.
    decode_memory: int = 256 << 20
    # Local instance only: CPUs it offers (None: all cores).
    num_cpus: int | None = None
    # Local instance only: object store size in bytes (None: Ray's default, 30% of memory).
    object_store_memory: int | None = None


def ray_available() -> bool:
    """Whether Ray Data can be imported here."""
    try:
        import ray  # noqa: F401
        import ray.data  # noqa: F401
    except ImportError:
        return False
    return True


def _require_ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise BackendUnavailableError(f"--ray needs Ray Data, which is not installed: {INSTALL_HINT}") from None
    return ray


# -- Ray side: the functions and actors that run on workers ---------------------------------------


def _maybe_crash(stage: str) -> None:
    folder = os.environ.get(CRASH_ONCE_ENV)
    if not folder:
        return
    try:
        os.remove(os.path.join(folder, stage))
    except OSError:
        return  # no flag, or another worker took it
    os._exit(1)


def _sources(row: dict[str, Any]) -> tuple[Source, ...]:
    return tuple(
        Source(str(p), str(k), None if m == "" else str(m), int(o), int(s))  # type: ignore[arg-type]
        for p, k, m, o, s in zip(row["path"], row["kind"], row["member"], row["offset"], row["size"])
    )


def _spacing(row: dict[str, Any]) -> tuple[float, float] | None:
    row_mm, col_mm = (float(v) for v in row["spacing"])
    return (row_mm, col_mm) if row_mm > 0 and col_mm > 0 else None


def _frames(row: dict[str, Any]) -> tuple[int | None, ...]:
    return tuple(int(f) or None for f in row["frame"])


def _rows(batch: dict[str, np.ndarray]) -> Iterator[dict[str, Any]]:
    n = len(batch["series"])
    for i in range(n):
        yield {name: column[i] for name, column in batch.items()}


def _decode_series(batch: dict[str, np.ndarray], spec: PreprocessSpec, max_bytes: int, chunk: int) -> Iterator[dict[str, np.ndarray]]:
    """Ray task: decode and preprocess every slice of some series, one output batch per chunk."""
    from spinelevel.engine import thirdparty_log

    _maybe_crash("decode")
    thirdparty_log.install()  # header values stay out of the Ray workers' logs
    for row in _rows(batch):
        sources = _sources(row)
        sops = tuple(str(s) for s in row["sop"])
        frames = _frames(row)
        # Archive members are read in archive order (cheap forward seeks in compressed tars).
        order = sorted(range(len(sources)), key=lambda i: (sources[i].path, sources[i].offset, frames[i] or 0, i))
        for start in range(0, len(order), chunk):
            idx = tuple(order[start : start + chunk])
            task = DecodeTask(int(row["series"]), idx, tuple(sources[i] for i in idx), tuple(sops[i] for i in idx), spec, max_bytes, frames=tuple(frames[i] for i in idx), spacing=_spacing(row))
            yield _decoded_batch(prepare(task), spec, len(sources))


def _decoded_batch(prepared: Any, spec: PreprocessSpec, expected: int) -> dict[str, np.ndarray]:
    failures = prepared.failures
    n_ok, n_bad = len(prepared.indices), len(failures)
    images = prepared.array
    if n_bad:
        images = np.concatenate([images, np.zeros((n_bad, *images.shape[1:]), dtype=np.float32)])
    return {
        "series": np.full(n_ok + n_bad, prepared.key, dtype=np.int64),
        "index": np.asarray(list(prepared.indices) + [i for i, _ in failures], dtype=np.int32),
        "expected": np.full(n_ok + n_bad, expected, dtype=np.int32),
        "reason": np.asarray([""] * n_ok + [r for _, r in failures], dtype=object),
        "image": images.astype(np.float32, copy=False),
    }


def _load(model: str, backend: str, backend_options: BackendOptions) -> Any:
    path = Path(model)
    return load_backend(backend, path, read_card(path), backend_options)


class _Infer:
    """Ray actor: the model, loaded once; scores batches of decoded slices."""

    def __init__(self, model: str, backend: str, backend_options: BackendOptions) -> None:
        self.backend = _load(model, backend, backend_options)
        self.k = len(self.backend.card.classes)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        _maybe_crash("infer")
        ok = np.asarray([r == "" for r in batch["reason"]], dtype=bool)
        probs = np.full((len(ok), self.k), np.nan, dtype=np.float32)
        if ok.any():
            images = np.ascontiguousarray(batch["image"][ok], dtype=np.float32)
            step = max(1, self.backend.max_batch)
            probs[ok] = np.concatenate([self.backend.infer(images[s : s + step]) for s in range(0, len(images), step)])
        return {"series": batch["series"], "index": batch["index"], "expected": batch["expected"], "reason": batch["reason"], "probs": probs}


class _SparseSeries:
    """Ray actor: the model, loaded once; runs a series' sparse sampling search, decoding inside."""

    def __init__(self, model: str, backend: str, backend_options: BackendOptions, spec: PreprocessSpec, max_bytes: int, chunk: int, sampling: SamplingOptions) -> None:
        from spinelevel.engine import thirdparty_log

        thirdparty_log.install()  # header values stay out of the Ray workers' logs
        self.backend = _load(model, backend, backend_options)
        self.k = len(self.backend.card.classes)
        self.spec, self.max_bytes, self.chunk, self.sampling = spec, max_bytes, chunk, sampling

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        _maybe_crash("infer")
        for row in _rows(batch):
            yield self._series(row)

    def _series(self, row: dict[str, Any]) -> dict[str, np.ndarray]:
        key = int(row["series"])
        sources = _sources(row)
        sops = tuple(str(s) for s in row["sop"])
        frames = _frames(row)
        sampler = SeriesSampler(np.asarray(row["z"], dtype=np.float64), self.k, "sparse", self.sampling)
        reasons: dict[int, str] = {}
        indices = sampler.initial()
        while indices:
            order = sorted(indices, key=lambda i: (sources[i].path, sources[i].offset, frames[i] or 0, i))
            ok: list[int] = []
            arrays: list[np.ndarray] = []
            for start in range(0, len(order), self.chunk):
                idx = tuple(order[start : start + self.chunk])
                prepared = prepare(DecodeTask(key, idx, tuple(sources[i] for i in idx), tuple(sops[i] for i in idx), self.spec, self.max_bytes, frames=tuple(frames[i] for i in idx), spacing=_spacing(row)))
                reasons.update(prepared.failures)
                ok.extend(prepared.indices)
                arrays.append(prepared.array)
            failed = [i for i in order if i in reasons]
            if failed:
                sampler.unavailable(failed)
            if ok:
                images = np.concatenate(arrays)
                step = max(1, self.backend.max_batch)
                sampler.update(ok, np.concatenate([self.backend.infer(images[s : s + step]) for s in range(0, len(images), step)]))
            indices = sampler.next()
        done = np.flatnonzero(sampler.evaluated | sampler.failed)
        return {
            "series": np.full(len(done), key, dtype=np.int64),
            "index": done.astype(np.int32),
            "expected": np.full(len(done), len(done), dtype=np.int32),
            "reason": np.asarray([reasons.get(int(i), "") for i in done], dtype=object),
            "probs": sampler.probs[done],
        }


# -- driver side --------------------------------------------------------------------------------


@dataclass
class _Gathering:
    """A series whose slice results are arriving."""

    plan: SeriesPlan
    sampler: SeriesSampler
    failures: dict[int, str] = field(default_factory=dict)
    seen: set[int] = field(default_factory=set)
    expected: int = -1


def _series_row(no: int, plan: SeriesPlan) -> dict[str, Any]:
    s = plan.slices
    return {
        "series": no,
        "path": [x.source.path for x in s],
        "kind": [x.source.kind for x in s],
        "member": [x.source.member or "" for x in s],
        "offset": [x.source.offset for x in s],
        "size": [x.source.size for x in s],
        "sop": [x.sop_uid for x in s],
        # 0 for a single-frame file (Arrow columns here are not nullable), else the 1-based frame
        "frame": [x.frame or 0 for x in s],
        "z": [float(x.z_mm) for x in s],
        # PixelSpacing of the series (row, column mm); (0, 0) when unknown
        "spacing": list(plan.pixel_spacing or (0.0, 0.0)),
    }


def _connect(ray_options: RayOptions) -> bool:
    """Connect to (or start) Ray; True when this call started it and should shut it down."""
    ray = _require_ray()
    if ray.is_initialized():
        return False
    # Worker logs stay in Ray's session folder; the driver's console shows spinelevel's own output.
    kwargs: dict[str, Any] = {"log_to_driver": False, "include_dashboard": False, "configure_logging": False}
    if ray_options.address is None:
        kwargs.update(num_cpus=ray_options.num_cpus, object_store_memory=ray_options.object_store_memory)
    elif ray_options.num_cpus is not None or ray_options.object_store_memory is not None:
        log.warning("num_cpus and object_store_memory apply to a local Ray instance only; ignored for %s", ray_options.address)
    try:
        ray.init(address=ray_options.address, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = ray_options.address or "a local instance"
        raise InputError(f"--ray {where}: cannot connect to Ray ({exc}); check the address (ray status on the head node)") from None
    return True


def _quiet_data_context() -> None:
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.execution_options.preserve_order = False


def _choose(model: Path, options: RunOptions, ray_options: RayOptions) -> Any:
    """The backend choice, made where the model will run (a GPU worker when G > 0)."""
    from spinelevel.engine.backends import BackendChoice, choose_backend

    if ray_options.gpus_per_worker > 0:
        import ray

        probe = ray.remote(num_gpus=ray_options.gpus_per_worker, num_cpus=0)(choose_backend)
        return ray.get(probe.remote(str(model), options.backend))
    if options.backend == "auto" and model.suffix.lower() == ".onnx":
        return BackendChoice("onnxruntime", str(model), "--ray with --gpus-per-worker 0: ONNX Runtime on CPU actors")
    choice = choose_backend(model, options.backend)
    if choice.name == "tensorrt":
        raise InputError("the TensorRT backend needs GPU actors: give --gpus-per-worker (for example 1)")
    return choice


def _cluster(ray_options: RayOptions, mode: str) -> int:
    """Inference actors to start."""
    import ray

    if ray_options.inference_workers is not None:
        return ray_options.inference_workers
    res = ray.cluster_resources()
    if ray_options.gpus_per_worker > 0:
        gpus = float(res.get("GPU", 0))
        if gpus < ray_options.gpus_per_worker:
            raise InputError(f"--gpus-per-worker {ray_options.gpus_per_worker}: the Ray cluster has {gpus:g} GPU(s)")
        return max(1, int(gpus // ray_options.gpus_per_worker))
    cpus = float(res.get("CPU", 1))
    if mode == "sparse":
        return max(1, int(cpus // max(ray_options.cpus_per_worker, 1e-9)))
    return max(1, int(cpus // 4))


def _unwrap(exc: BaseException) -> BaseException | None:
    """The spinelevel error that a Ray worker raised, if that is what ``exc`` wraps."""
    seen = 0
    while exc is not None and seen < 20:
        if isinstance(exc, SpineLevelError):
            return exc
        exc = exc.__cause__ or getattr(exc, "cause", None)  # type: ignore[assignment]
        seen += 1
    return None


def run_on_ray(paths: list[Path], model: Path, out: Path, options: RunOptions = RunOptions(), ray_options: RayOptions = RayOptions(), progress: RunProgress | None = None) -> RunSummary:
    """Classify every axial CT series under ``paths`` on Ray Data and write the results to ``out``.

    The output directory, its schema, commit records and resume behaviour are those of
    :func:`spinelevel.engine.pipeline.run`; the two resume each other's runs. Inputs and the model
    must be readable at the same paths on every Ray node (a shared filesystem); only this process
    writes ``out``.

    Raises:
        BackendUnavailableError: Ray is not installed (the message says how to install it), or the
            backend's packages are missing.
        InputError: bad options, missing inputs, an output URI that cannot be written, or no Ray
            cluster at ``ray_options.address``.
        ModelError / CardError: the model cannot be run.
        OutputError: the output directory cannot be written.
    """
    progress = progress or NoProgress()
    _require_ray()
    paths = check_run_inputs(paths, options)
    if options.preprocess != "numpy":
        raise InputError(f"--preprocess {options.preprocess} is not available with --ray; the decode tasks preprocess with numpy (drop --preprocess)")
    if ray_options.gpus_per_worker < 0 or ray_options.cpus_per_worker <= 0:
        raise InputError("--gpus-per-worker must be 0 or more and CPUs per worker more than 0")
    if ray_options.inference_workers is not None and ray_options.inference_workers < 1:
        raise InputError(f"--inference-workers must be at least 1, got {ray_options.inference_workers}")
    if ray_options.decode_workers is not None and ray_options.decode_workers < 1:
        raise InputError(f"--decode-workers must be at least 1, got {ray_options.decode_workers}")
    if _URI.match(str(out)):
        raise InputError(
            f"--out {out}: with --ray the driver writes the output through the local filesystem (atomic renames and a "
            "lock); give a local or network-mounted path (NFS, a FUSE mount of the bucket), see docs/ray.md"
        )
    started = time.perf_counter()
    started_at = now()
    run_id = new_run_id()

    from spinelevel.models import resolve_model

    # Absolute: workers may run in another directory (or on another machine with the same mounts).
    model = Path(resolve_model(model)).absolute()
    if not model.is_file():
        raise ModelError(f"{model}: model file not found")
    owns_ray = _connect(ray_options)
    try:
        choice = _choose(model, options, ray_options)
        model = Path(choice.model).absolute()
        card: ModelCard = read_card(model)
        gpu = ray_options.gpus_per_worker > 0 and choice.name in _GPU_BACKENDS
        threads = options.threads or (None if gpu else max(1, int(round(ray_options.cpus_per_worker))))
        device = options.device if gpu else ("cpu" if choice.name == "torch" else options.device)
        backend_options = BackendOptions(max_batch=options.batch_size, threads=threads, device=device, cuda_graphs=options.cuda_graphs, compile=options.compile)
        if choice.name == "onnxruntime":
            # Cheap here, and a model that does not fit its card fails before anything is written.
            load_backend(choice.name, model, card, BackendOptions(max_batch=options.batch_size, threads=1)).close()
        mode = resolve_mode(options.sampling.mode, gpu_backend=gpu)
        model_sha = file_sha256(model)
        out = output_dir(out)
        with OutputLock(out):
            return _run_locked(paths, model, out, options, ray_options, progress, card, choice, backend_options, model_sha, mode, run_id, started, started_at)
    finally:
        if owns_ray:
            import ray

            ray.shutdown()


def _run_locked(paths: list[Path], model: Path, out: Path, options: RunOptions, ray_options: RayOptions, progress: RunProgress, card: ModelCard, choice: Any, backend_options: BackendOptions, model_sha: str, mode: str, run_id: str, started: float, started_at: str) -> RunSummary:
    from spinelevel.engine import thirdparty_log

    # Everything up to the plans mirrors pipeline._run_locked, so both paths write the same rows.
    thirdparty_log.install()
    records_before = thirdparty_log.record_count()
    state = load_state(out)
    writer = RunWriter(state, card.classes, run_id, model_sha, choice.name, rows_per_part=options.rows_per_part, keep_tags=options.scan.keep_tags)
    if options.force:
        forget_everything(state, run_id)
    import ray

    manifest_run = manifest_entry(
        run_id, started_at, model, model_sha, card, choice, options, mode, paths,
        {
            "threads": backend_options.threads,
            "workers": None,
            "ray": asdict(ray_options) | {"cluster_resources": {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}},
        },
    )
    manifest_run["versions"]["ray"] = ray.__version__
    manifest = start_history(out, manifest_run)

    status = "failed"
    already_done = 0
    lost = 0
    try:
        selection, seen, _ = scan_and_select(paths, options, progress)
        plans, plan_keys, already_done = start_series(state, writer, selection, seen, model_sha, run_id)
        progress.planned(len(plans), sum(len(p.slices) for p in plans))
        log.info("%d series to classify on Ray (%s sampling), %d already done, %d skipped", len(plans), mode, already_done, len(selection.skipped_series))

        gathering: dict[int, _Gathering] = {}
        for no, plan in enumerate(plans):
            z = np.asarray([s.z_mm for s in plan.slices], dtype=np.float64)
            gathering[no] = _Gathering(plan, SeriesSampler(z, len(card.classes), mode, options.sampling))  # type: ignore[arg-type]
        if plans:
            for batch in _execute(plans, model, choice.name, backend_options, card, options, ray_options, mode):
                for no, work in _absorb(gathering, batch):
                    try:
                        result = finish_series(work.plan, work.sampler, work.failures, card.classes, options)
                    except Exception as exc:  # one odd series must not take the run down
                        result = f"unexpected error while labelling the series ({type(exc).__name__}: {exc})"
                    write_series(writer, work.plan, plan_keys[work.plan.series_uid], result, work.failures, options)
                    progress.advanced(1, len(result.sop_uids) if isinstance(result, SeriesResult) else 0)
        writer.finish()
        lost = len(gathering)
        if lost:
            raise SpineLevelError(f"{lost} series got incomplete results from the Ray workers and were not written; run again to redo them")
        status = "complete"
    except KeyboardInterrupt:
        status = "interrupted"
        writer.flush()  # complete series waiting in the buffer are committed
        raise
    except Exception as exc:
        inner = _unwrap(exc)
        if inner is not None and inner is not exc:
            raise inner from None
        raise
    finally:
        seconds = time.perf_counter() - started
        # the driver's own count (the scan); Ray workers' records stay in their logs, values dropped
        manifest_run.update(status=status, finished=now(), seconds=round(seconds, 3), counts=dict(writer.counts, series_already_done=already_done), third_party_log_records=thirdparty_log.record_count() - records_before)
        try:
            write_json_atomic(out / "run.json", manifest)
        except OSError as exc:
            log.error("cannot write %s: %s", out / "run.json", exc)
    c = writer.counts
    return RunSummary(run_id, out, c["series_ok"], c["series_skipped"], c["series_error"], c["slices"], c["skipped_files"], seconds, already_done)


def _absorb(gathering: dict[int, _Gathering], batch: dict[str, np.ndarray]) -> Iterator[tuple[int, _Gathering]]:
    """Take a batch of slice results; yield (and forget) the series it completes."""
    series, index, expected, reason, probs = batch["series"], batch["index"], batch["expected"], batch["reason"], batch["probs"]
    touched: set[int] = set()
    for r in range(len(series)):
        no, i = int(series[r]), int(index[r])
        work = gathering.get(no)
        if work is None or i in work.seen:
            log.debug("dropping a repeated result for slice %d of series %d (a retried Ray task)", i, no)
            continue
        work.seen.add(i)
        work.expected = int(expected[r])
        if reason[r]:
            work.failures[i] = str(reason[r])
            work.sampler.unavailable([i])
        else:
            work.sampler.update([i], probs[r : r + 1])
        touched.add(no)
    for no in sorted(touched):
        work = gathering[no]
        if len(work.seen) == work.expected:
            del gathering[no]
            yield no, work


def _execute(plans: list[SeriesPlan], model: Path, backend: str, backend_options: BackendOptions, card: ModelCard, options: RunOptions, ray_options: RayOptions, mode: str) -> Iterator[dict[str, np.ndarray]]:
    """Build the Ray Dataset of series, run it, and stream back slice results as numpy batches."""
    import ray.data

    _quiet_data_context()
    spec = PreprocessSpec.from_card(card)
    chunk = max(1, options.chunk_slices)
    actors = _cluster(ray_options, mode)
    rows = [_series_row(no, plan) for no, plan in enumerate(plans)]
    # One block per series up to a bound: the decode tasks spread over the cluster from the start.
    ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows), 4096)))
    gpu: dict[str, float] = {"num_gpus": ray_options.gpus_per_worker} if ray_options.gpus_per_worker > 0 else {}
    if mode == "sparse":
        ds = ds.map_batches(
            _SparseSeries,
            batch_size=1,
            batch_format="numpy",
            fn_constructor_kwargs={
                "model": str(model), "backend": backend, "backend_options": backend_options, "spec": spec,
                "max_bytes": options.scan.max_file_bytes, "chunk": chunk, "sampling": options.sampling,
            },
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=ray_options.cpus_per_worker,
            **gpu,
        )
    else:
        decode_compute = ray.data.TaskPoolStrategy(size=ray_options.decode_workers) if ray_options.decode_workers else None
        ds = ds.map_batches(
            _decode_series,
            batch_size=1,
            batch_format="numpy",
            fn_kwargs={"spec": spec, "max_bytes": options.scan.max_file_bytes, "chunk": chunk},
            compute=decode_compute,
            num_cpus=1,
            memory=ray_options.decode_memory,
        )
        ds = ds.map_batches(
            _Infer,
            batch_size=options.batch_size,
            batch_format="numpy",
            zero_copy_batch=True,
            fn_constructor_kwargs={"model": str(model), "backend": backend, "backend_options": backend_options},
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=ray_options.cpus_per_worker,
            **gpu,
        )
    yield from ds.iter_batches(batch_size=None, batch_format="numpy")
