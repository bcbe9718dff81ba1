"""Decode and preprocess slices in a pool of worker processes, ahead of inference.

Tasks are small (a few slice addresses and the preprocessing spec); results are the preprocessed
float32 arrays. Results come back in submission order and only a bounded number of tasks is in
flight, so memory does not grow with the archive. A worker killed by a decoder crash on a hostile file
breaks the pool: the pool is rebuilt and the tasks in flight are retried one at a time, so only the
files of a task that kills a worker again are recorded as failed.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import sys
import warnings
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

import numpy as np

from spinelevel.engine.decode import read_hu, read_stored
from spinelevel.engine.preprocess import PreprocessSpec, preprocess_slice
from spinelevel.engine.sources import Source
from spinelevel.errors import DecodeError, InputError, RemoteReadError

__all__ = ["DecodeTask", "Prepared", "prepare", "DecodePool", "WORKER_KINDS"]

log = logging.getLogger(__name__)

_CRASH_REASON = "the decoder crashed its worker process on this file"

# What a DecodePool's workers can be (see DecodePool).
WORKER_KINDS = ("processes", "threads")

# Testing only: a SOPInstanceUID; a worker process asked to decode that slice dies on the spot
# (os._exit), as a decoder that segfaults would, so tests can check the pool's recovery.
CRASH_SOP_ENV = "SPINELEVEL_DECODE_CRASH_SOP"


@dataclass(frozen=True)
class DecodeTask:
    """Slices of one series to read, decode and preprocess."""

    # Caller's key of the series.
    key: int
    # Slice indices within the series and their files.
    indices: tuple[int, ...]
    sources: tuple[Source, ...]
    # Expected SOPInstanceUIDs (the file must not have changed since the scan).
    sop_uids: tuple[str, ...]
    spec: PreprocessSpec
    # Largest file read, in bytes.
    max_bytes: int
    # 'numpy': return model input; 'dali': return packed stored values for the DALI graph.
    preprocess: str = "numpy"
    # 1-based frame per slice for frames of multi-frame files (None: single-frame file); () = all None.
    frames: tuple[int | None, ...] = ()
    # PixelSpacing (row mm, column mm) of the series, for preprocessing version 2.
    spacing: tuple[float, float] | None = None
    # JPEG 2000 / HTJ2K decoder: 'cpu', 'nvimgcodec' or 'dali' (GPU, exact or CPU fallback; gpu_j2k).
    j2k_decoder: str = "cpu"
    # CUDA device of a GPU JPEG 2000 decoder.
    j2k_device: int = 0
    # DICOMweb sources of one series: the SOPInstanceUIDs of this round of the series (this task's
    # among them), retrieved together in one series request and kept by the worker for the round's
    # other tasks (dicomweb.prefetch_series); () retrieves each instance alone.
    series_sops: tuple[str, ...] = ()


@dataclass(frozen=True)
class Prepared:
    """The outcome of a task."""

    key: int
    # Indices of the slices in ``array``, in its row order.
    indices: tuple[int, ...]
    # (len(indices), C, H, W) float32 model input.
    array: np.ndarray
    # (slice index, reason) for slices that could not be decoded.
    failures: tuple[tuple[int, str], ...]
    # preprocess='dali': one PackedSlice per index (``array`` is then empty).
    packed: tuple = ()
    # Log records of the DICOM libraries in the worker process while it ran this task (values
    # dropped, see thirdparty_log); 0 when the task ran in the main process, which counts its own.
    thirdparty_records: int = 0
    # GPU JPEG 2000 path: (outcome, slices) pairs, outcome "gpu" or the reason for a CPU fallback.
    j2k_outcomes: tuple[tuple[str, int], ...] = ()
    # Indices among ``failures`` whose instance could not be retrieved from a server (a DICOMweb
    # source after retries): the series is then an error to redo, not a series with dropped slices.
    unavailable: tuple[int, ...] = ()


def _empty(spec: PreprocessSpec) -> np.ndarray:
    return np.empty((0, len(spec.windows), *spec.input_size), dtype=np.float32)


class _J2kPaths:
    """This process's GPU JPEG 2000 paths, made on first use (a decoder holds a CUDA context)."""

    def __init__(self) -> None:
        self.paths: dict[tuple[str, int], object] = {}

    def get(self, decoder: str, device: int):  # noqa: ANN201 - GpuJ2kPath | None
        if decoder == "cpu":
            return None
        key = (decoder, device)
        if key not in self.paths:
            from spinelevel.engine.gpu_j2k import make_path

            self.paths[key] = make_path(decoder, device)
        return self.paths[key]


_J2K_PATHS = _J2kPaths()


def prepare(task: DecodeTask) -> Prepared:
    """Read, decode and preprocess the slices of one task; failures are recorded, never raised."""
    j2k = _J2K_PATHS.get(task.j2k_decoder, task.j2k_device)
    j2k_before = dict(j2k.outcomes) if j2k is not None else {}
    ok: list[int] = []
    arrays: list[np.ndarray] = []
    packed: list = []
    failures: list[tuple[int, str]] = []
    unavailable: list[int] = []
    crash_sop = os.environ.get(CRASH_SOP_ENV)
    from spinelevel.engine import thirdparty_log

    in_child = multiprocessing.parent_process() is not None
    records_before = thirdparty_log.record_count()
    frames = task.frames or (None,) * len(task.indices)
    if task.series_sops:
        from spinelevel.engine.dicomweb import prefetch_series

        try:
            prefetch_series(task.sources, task.series_sops, task.max_bytes)
        except Exception:  # each instance is then retrieved alone, and fails there with its reason
            log.debug("series retrieval failed", exc_info=True)
    for index, src, sop, frame in zip(task.indices, task.sources, task.sop_uids, frames):
        if crash_sop and sop == crash_sop and in_child:
            os._exit(70)
        try:
            if task.preprocess == "dali":
                from spinelevel.engine.dali import pack_slice

                stored, found_sop = read_stored(src, task.max_bytes, frame, j2k)
                if found_sop != sop:
                    raise DecodeError("file changed since it was scanned (SOPInstanceUID differs)")
                packed.append(pack_slice(stored.raw, stored.slope, stored.intercept, stored.padding, task.spacing))
            else:
                hu, found_sop = read_hu(src, task.max_bytes, frame, j2k)
                if found_sop != sop:
                    raise DecodeError("file changed since it was scanned (SOPInstanceUID differs)")
                arrays.append(preprocess_slice(hu, task.spec, task.spacing))
            ok.append(index)
        except RemoteReadError as exc:
            failures.append((index, str(exc)))
            unavailable.append(index)
        except DecodeError as exc:
            failures.append((index, str(exc)))
        except MemoryError:
            failures.append((index, "out of memory while decoding"))
        except Exception as exc:  # a decoder surprise must not take the series down
            failures.append((index, f"unexpected error while decoding ({type(exc).__name__}: {exc})"))
    array = np.stack(arrays) if arrays else _empty(task.spec)
    records = thirdparty_log.record_count() - records_before if in_child else 0
    outcomes = tuple((k, n - j2k_before.get(k, 0)) for k, n in j2k.outcomes.items() if n > j2k_before.get(k, 0)) if j2k is not None else ()
    return Prepared(task.key, tuple(ok), array, tuple(failures), tuple(packed), records, outcomes, tuple(unavailable))


def _warm_up() -> int:
    """Import the decoders in a worker, and stay busy long enough that every worker gets one."""
    import time

    import pydicom.pixels  # noqa: F401

    time.sleep(0.2)
    return os.getpid()


def _one_opencv_thread() -> None:
    # The pool is the parallelism: one OpenCV thread per worker avoids oversubscription.
    try:
        import cv2

        cv2.setNumThreads(1)
    except ImportError:
        pass


def _init_worker() -> None:
    from spinelevel.engine import thirdparty_log

    # Ctrl-C reaches the whole process group: the parent decides how to stop, not the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _one_opencv_thread()
    # pydicom's warnings quote header values; a spawned worker has no logging set up, so logging's
    # last-resort handler would print them to stderr
    thirdparty_log.install()
    # A parent killed with SIGKILL cannot shut the pool down: let the kernel end the workers too
    # (Linux prctl PR_SET_PDEATHSIG), so no orphan holds files, pipes or memory.
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG = 1
        except (OSError, AttributeError):
            pass
        if os.getppid() == 1:  # the parent died before prctl took effect
            os._exit(1)


def _crashed(task: DecodeTask) -> Prepared:
    return Prepared(task.key, (), _empty(task.spec), tuple((i, _CRASH_REASON) for i in task.indices))


class DecodePool:
    """FIFO decode queue over ``workers`` processes or threads (0 or 1: in the calling thread).

    Processes (the default) isolate the run from a decoder that crashes its process: only the files
    of that task are lost. Threads skip the transfer of every preprocessed slice between processes
    (about 0.8 MB per 256 px slice), which on two cores decodes uncompressed CT about 1.5x faster,
    but JPEG 2000 and JPEG-LS no faster than one thread (their decoders hold the GIL; BENCHMARKS.md),
    and a decoder that crashes takes the run down with it (resume picks up after the last committed
    series).
    """

    def __init__(self, workers: int, max_in_flight: int | None = None, kind: str = "processes") -> None:
        if kind not in WORKER_KINDS:
            raise InputError(f"decode worker kind must be one of {', '.join(WORKER_KINDS)}, got {kind!r}")
        self.workers = workers
        self.kind = kind
        self.max_in_flight = max_in_flight or 2 * max(1, workers)
        self._queue: deque[DecodeTask] = deque()
        self._in_flight: deque[tuple[DecodeTask, Future]] = deque()
        self._pool: ProcessPoolExecutor | ThreadPoolExecutor | None = None
        self._crashes_without_success = 0
        self._quiet: warnings.catch_warnings | None = None

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self, wait: bool = False) -> None:
        """Start every worker now (imports overlap with the caller's work unless ``wait``)."""
        if self.workers <= 1:
            return
        if self._pool is None:
            self._restart()
        if self.kind == "threads":
            return
        warm = [self._pool.submit(_warm_up) for _ in range(self.workers)]  # type: ignore[union-attr]
        if wait:
            for future in warm:
                future.result()

    def submit(self, task: DecodeTask) -> None:
        """Queue a task (it starts when a slot in flight is free)."""
        self._queue.append(task)

    def pending(self) -> int:
        """Tasks queued or in flight."""
        return len(self._queue) + len(self._in_flight)

    def get(self) -> Prepared:
        """The result of the oldest task (blocks)."""
        if self.workers <= 1:
            return prepare(self._queue.popleft())
        self._fill()
        task, future = self._in_flight.popleft()
        try:
            result = future.result()
            self._crashes_without_success = 0
            return result
        except BrokenProcessPool:
            pass
        # Rebuild, retry this task alone, and put the others back at the front of the queue.
        retry = [t for t, _ in self._in_flight]
        self._in_flight.clear()
        self._queue.extendleft(reversed(retry))
        self._restart()
        try:
            result = self._pool.submit(prepare, task).result()  # type: ignore[union-attr]
            self._crashes_without_success = 0
            return result
        except BrokenProcessPool:
            self._crashes_without_success += 1
            if self._crashes_without_success >= 3:
                raise InputError(
                    "decode worker processes keep dying; run with --workers 0, and when calling "
                    "spinelevel from a script guard it with if __name__ == '__main__'"
                ) from None
            log.warning("a decode worker crashed; %d file(s) recorded as failed", len(task.indices))
            self._restart()
            return _crashed(task)

    def _fill(self) -> None:
        if self._pool is None:
            self._restart()
        while self._queue and len(self._in_flight) < self.max_in_flight:
            task = self._queue.popleft()
            self._in_flight.append((task, self._pool.submit(prepare, task)))  # type: ignore[union-attr]

    def _restart(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        if self.kind == "threads":
            _one_opencv_thread()
            if self._quiet is None:
                # Decoder warnings may quote element values (patient data). Each read silences them
                # with warnings.catch_warnings, which is not thread-safe: a thread leaving it can
                # restore the filters under another. Ignoring warnings for the pool's lifetime makes
                # every state those threads restore an ignoring one.
                self._quiet = warnings.catch_warnings()
                self._quiet.__enter__()
                warnings.simplefilter("ignore")
            self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="spinelevel-decode")
            return
        # spawn, not fork: the parent holds an inference runtime with its own threads.
        self._pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker)

    def close(self) -> None:
        """Stop the workers; queued tasks are dropped."""
        self._queue.clear()
        for _, future in self._in_flight:
            future.cancel()
        self._in_flight.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=self.kind == "threads", cancel_futures=True)
            self._pool = None
        if self._quiet is not None:
            self._quiet.__exit__(None, None, None)
            self._quiet = None
