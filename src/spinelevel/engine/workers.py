"""Decode and preprocess slices in a pool of worker processes, ahead of inference.

Tasks are small (a few slice addresses and the preprocessing spec); results are the preprocessed
float32 arrays. A process pool made with ``slab_rows`` hands them over through shared memory
(DESIGN.md 2): a ring of preallocated slabs in one anonymous memory file (Linux ``memfd_create``,
mapped by the parent and every worker), a worker writes a task's model input into the slab the
parent gave the task, and the parent reads it there, without pickling or a pipe; the caller hands the
slab back (:meth:`DecodePool.release`) once the rows are consumed. The memory file has no name in
/dev/shm, so nothing can leak when the run is killed, even with SIGKILL: the kernel frees it with the
last process that maps it. Results come back in submission order and only a bounded number of tasks is in
flight, so memory does not grow with the archive. A worker killed by a decoder crash on a hostile file
breaks the pool: the pool is rebuilt and the tasks in flight are retried one at a time, so only the
files of a task that kills a worker again are recorded as failed.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import mmap
import multiprocessing
import os
import signal
import sys
import threading
import warnings
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

import numpy as np

from spinelevel.engine.decode import hu_from_stored, read_hu, read_stored
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
    # Slot of the shared-memory ring the worker writes the model input into (-1: return it pickled);
    # set by the pool.
    slab: int = -1
    # DICOMweb sources of one series: retrieve the whole series in one request into the run's spool
    # first, unless it is there (dicomweb.prefetch_series), so that this and every later round of it
    # reads from there; False leaves instances the spool does not hold to be retrieved one by one.
    # A task without indices and with this set only spools its series (ahead of its decoding).
    by_series: bool = False
    # The run's spool of DICOMweb series answers (engine.series_spool; None: no spool, for tasks of
    # local files).
    spool: str | None = None
    # Per slice, where the scan found the pixels of an uncompressed file (engine.native.NativePixels)
    # or None; () = all None. Such slices are read at that offset without parsing the file again.
    natives: tuple = ()


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
    # Slot of the shared-memory ring that ``array`` is a view of (-1: an array of its own); hand it
    # back with DecodePool.release once the rows are consumed.
    slab: int = -1
    # Those log records, redacted (at most a few per task), for the parent to show with --verbose.
    thirdparty_messages: tuple[str, ...] = ()


def _empty(spec: PreprocessSpec) -> np.ndarray:
    return np.empty((0, len(spec.windows), *spec.input_size), dtype=np.float32)


class _J2kPaths(threading.local):
    """This thread's GPU JPEG 2000 paths, made on first use (a decoder holds a CUDA context).

    Per thread: a DALI pipeline (feed_input, then run) and the outcome counters are not safe to share
    between decode threads (--worker-kind threads), which would swap slices between them.
    """

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
    natives = task.natives or (None,) * len(task.indices)
    out = _SLAB_MAP.rows(task) if task.slab >= 0 and task.preprocess != "dali" else None
    if task.spool is not None:
        from spinelevel.engine.dicomweb import prefetch_series

        try:
            prefetch_series(task.spool, task.sources, task.by_series, task.max_bytes)
        except Exception:  # each instance is then retrieved alone, and fails there with its reason
            log.debug("series retrieval failed", exc_info=True)
    for index, src, sop, frame, native in zip(task.indices, task.sources, task.sop_uids, frames, natives):
        if crash_sop and sop == crash_sop and in_child:
            os._exit(70)
        try:
            stored = _read_native(src, native, sop, task.max_bytes)
            if task.preprocess == "dali":
                from spinelevel.engine.dali import pack_slice

                if stored is None:
                    stored, found_sop = read_stored(src, task.max_bytes, frame, j2k)
                    if found_sop != sop:
                        raise DecodeError("file changed since it was scanned (SOPInstanceUID differs)")
                packed.append(pack_slice(stored.raw, stored.slope, stored.intercept, stored.padding, task.spacing))
            else:
                if stored is not None:
                    hu = hu_from_stored(stored.raw, stored.slope, stored.intercept, stored.padding)
                else:
                    hu, found_sop = read_hu(src, task.max_bytes, frame, j2k)
                    if found_sop != sop:
                        raise DecodeError("file changed since it was scanned (SOPInstanceUID differs)")
                x = preprocess_slice(hu, task.spec, task.spacing)
                if out is not None:
                    out[len(ok)] = x
                else:
                    arrays.append(x)
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
    if out is not None:
        array, slab = _empty(task.spec), task.slab  # the rows are in the slab; the parent maps them
    else:
        array, slab = (np.stack(arrays) if arrays else _empty(task.spec)), -1
    records = thirdparty_log.record_count() - records_before if in_child else 0
    messages = thirdparty_log.take_messages() if in_child else ()
    outcomes = tuple((k, n - j2k_before.get(k, 0)) for k, n in j2k.outcomes.items() if n > j2k_before.get(k, 0)) if j2k is not None else ()
    return Prepared(task.key, tuple(ok), array, tuple(failures), tuple(packed), records, outcomes, tuple(unavailable), slab, messages)


def _read_native(src: Source, native, sop: str, max_bytes: int):  # noqa: ANN001, ANN202 - NativePixels | None -> StoredSlice | None
    """The stored pixels read at the scanned offset, or None to decode the file the full way (which
    also reports an unreadable or changed file)."""
    if native is None:
        return None
    from spinelevel.engine.native import read_native

    try:
        return read_native(src, native, sop, max_bytes)
    except (OSError, KeyError, ValueError):
        return None


class _SlabFd:
    """The ring's memory file, as a worker process receives it (the fd is duplicated into the child
    when the process is spawned, as multiprocessing does for its pipes)."""

    def __init__(self, fd: int, slab_bytes: int, slabs: int) -> None:
        self.fd, self.slab_bytes, self.slabs = fd, slab_bytes, slabs

    def __reduce__(self):  # noqa: ANN204 - pickled only while a worker is spawned
        from multiprocessing import reduction

        return (_SlabFd._attach, (reduction.DupFd(self.fd), self.slab_bytes, self.slabs))

    @staticmethod
    def _attach(dup, slab_bytes: int, slabs: int) -> _SlabFd:  # noqa: ANN001 - multiprocessing DupFd
        return _SlabFd(dup.detach(), slab_bytes, slabs)


class _SlabMap:
    """This process's mapping of the ring (the parent's, or a worker's after _init_worker)."""

    def __init__(self) -> None:
        self.mem: mmap.mmap | None = None
        self.slab_bytes = 0

    def attach(self, ring: _SlabFd) -> None:
        self.mem = mmap.mmap(ring.fd, ring.slab_bytes * ring.slabs)
        self.slab_bytes = ring.slab_bytes
        os.close(ring.fd)  # the mapping keeps the memory; no fd is left to inherit or leak

    def rows(self, task: DecodeTask) -> np.ndarray | None:
        """The slab of ``task`` as (len(indices), C, H, W) float32, or None if it does not fit."""
        shape = (len(task.indices), len(task.spec.windows), *task.spec.input_size)
        if self.mem is None or 4 * int(np.prod(shape)) > self.slab_bytes:
            return None
        return np.ndarray(shape, dtype=np.float32, buffer=self.mem, offset=task.slab * self.slab_bytes)


_SLAB_MAP = _SlabMap()


def _warm_up() -> int:
    """Import the decoders and the scan in a worker (the first header batches follow at once)."""
    import pydicom.pixels  # noqa: F401

    import spinelevel.engine.scan  # noqa: F401

    return os.getpid()


def _one_opencv_thread() -> None:
    # The pool is the parallelism: one OpenCV thread per worker avoids oversubscription.
    try:
        import cv2

        cv2.setNumThreads(1)
    except ImportError:
        pass


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def _keep_freed_heap() -> None:
    """Let a worker keep the memory of the slice it just decoded for the next one (glibc).

    A worker is single-threaded, so its temporaries (HU, windows, resize: a few MB per 512 px slice)
    come from the main heap, whose top glibc hands back to the kernel after every free above 128 KB;
    the next slice then faults every page in again. On two cores that was 0.85 million page faults
    and 1.2 s of system time per 2000 slices (threads, with their own arenas, had none of it). Trim
    only above 256 MiB, and map only blocks of 32 MiB or more (large multi-frame files) separately.
    """
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(_M_TRIM_THRESHOLD, 256 << 20)
        libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
    except (OSError, AttributeError):  # not glibc
        pass


def _init_worker(ring: _SlabFd | None = None) -> None:
    from spinelevel.engine import thirdparty_log

    if ring is not None:
        _SLAB_MAP.attach(ring)

    # Ctrl-C reaches the whole process group: the parent decides how to stop, not the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _one_opencv_thread()
    # pydicom's warnings quote header values; a spawned worker has no logging set up, so logging's
    # last-resort handler would print them to stderr; the parent shows them redacted (--verbose)
    thirdparty_log.install(collect=True)
    # A parent killed with SIGKILL cannot shut the pool down: let the kernel end the workers too
    # (Linux prctl PR_SET_PDEATHSIG), so no orphan holds files, pipes or memory.
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG = 1
        except (OSError, AttributeError):
            pass
        _keep_freed_heap()
        if os.getppid() == 1:  # the parent died before prctl took effect
            os._exit(1)


def counted_task(fn, *args, **kwargs) -> tuple[object, int, tuple[str, ...]]:  # noqa: ANN001 - a module-level function
    """``fn(*args, **kwargs)`` in a worker (the scan's header reads: scan.scan_batch,
    dicomweb.series_headers), with the count of the DICOM libraries' log records it caused there
    and their redacted lines (in the parent process: 0 and (), the parent counts and shows its own)."""
    from spinelevel.engine import thirdparty_log

    before = thirdparty_log.record_count()
    result = fn(*args, **kwargs)
    if multiprocessing.parent_process() is None:
        return result, 0, ()
    return result, thirdparty_log.record_count() - before, thirdparty_log.take_messages()


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

    def __init__(self, workers: int, max_in_flight: int | None = None, kind: str = "processes", slab_spec: PreprocessSpec | None = None, slab_rows: int = 0, held_slabs: int = 8) -> None:
        """
        Args:
            slab_spec, slab_rows: processes only: hand results over through a shared-memory ring of
                slabs of ``slab_rows`` slices of ``slab_spec``'s model input (tasks with more rows, or
                without a free slab, come back pickled). Results then are views into the ring: call
                :meth:`release` once their rows are consumed.
            held_slabs: slabs beyond ``max_in_flight`` that the caller may hold unreleased.
        """
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
        self._ring: _SlabFd | None = None
        self._map = _SlabMap()
        self._free: deque[int] = deque()
        self._held: set[int] = set()
        if slab_spec is not None and slab_rows > 0 and kind == "processes" and workers > 1 and hasattr(os, "memfd_create"):
            slab_bytes = 4 * slab_rows * len(slab_spec.windows) * int(np.prod(slab_spec.input_size))
            slabs = self.max_in_flight + held_slabs
            fd = os.memfd_create("spinelevel-slabs", os.MFD_CLOEXEC)
            os.ftruncate(fd, slab_bytes * slabs)  # pages are allocated when first written
            self._ring = _SlabFd(fd, slab_bytes, slabs)
            self._map.mem, self._map.slab_bytes = mmap.mmap(fd, slab_bytes * slabs), slab_bytes
            self._free.extend(range(slabs))

    @property
    def shared_memory(self) -> bool:
        """Whether results come back through the shared-memory ring."""
        return self._ring is not None

    def release(self, prepared: Prepared) -> None:
        """Hand back the slab of a result whose rows are consumed (no-op for results of their own)."""
        if prepared.slab in self._held:
            self._held.discard(prepared.slab)
            self._free.append(prepared.slab)

    def _take_slab(self, task: DecodeTask) -> DecodeTask:
        if self._ring is None or not self._free or task.preprocess == "dali":
            return task
        if 4 * len(task.indices) * len(task.spec.windows) * int(np.prod(task.spec.input_size)) > self._ring.slab_bytes:
            return task
        slot = self._free.popleft()
        self._held.add(slot)
        return dataclasses.replace(task, slab=slot)

    def _drop_slab(self, task: DecodeTask) -> DecodeTask:
        if task.slab >= 0:
            self._held.discard(task.slab)
            self._free.append(task.slab)
        return dataclasses.replace(task, slab=-1)

    def _mapped(self, task: DecodeTask, result: Prepared) -> Prepared:
        """The result with its array as a view of its slab (or the task's slab handed back)."""
        if task.slab < 0:
            return result
        if result.slab != task.slab or not result.indices:
            self._drop_slab(task)
            return dataclasses.replace(result, slab=-1)
        shape = (len(result.indices), len(task.spec.windows), *task.spec.input_size)
        view = np.ndarray(shape, dtype=np.float32, buffer=self._map.mem, offset=task.slab * self._map.slab_bytes)  # type: ignore[arg-type]
        return dataclasses.replace(result, array=view)

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

    def map_ordered(self, fn, items: Iterable) -> Iterator:  # noqa: ANN001 - a picklable callable
        """``fn(item)`` of every item, in order, in the worker processes (a bounded number in flight).

        For work other than decode tasks between runs of them (the scan's header reads, before any
        decode task is queued). While the oldest item is not back, this process takes the next
        item itself rather than wait (workers that are still starting cost nothing). Threads and one
        worker run ``fn`` here: header parsing holds the GIL, so threads would only add switching.
        An item whose worker died is redone here.
        """
        if self.kind != "processes" or self.workers <= 1:
            for item in items:
                yield fn(item)
            return
        if self._pool is None:
            self._restart()
        source = iter(items)
        # (item, future, result, pool generation) in order; future None: computed here (result), or
        # to compute here (todo)
        pending: deque[tuple[object, Future | None, object, int]] = deque()
        in_flight = 0
        generation = 0
        todo = object()

        def submit_next() -> bool:
            nonlocal in_flight
            for item in source:
                try:
                    pending.append((item, self._pool.submit(fn, item), None, generation))  # type: ignore[union-attr]
                    in_flight += 1
                except BrokenProcessPool:
                    pending.append((item, None, todo, generation))
                return True
            return False

        while in_flight < self.max_in_flight and submit_next():
            pass
        while pending:
            item, future, result, born = pending[0]
            if future is not None and not future.done():
                extra = next(source, todo)
                if extra is not todo:  # work here while the workers are busy
                    pending.append((extra, None, fn(extra), generation))
                    continue
            pending.popleft()
            try:
                if future is not None:
                    in_flight -= 1
                    result = future.result()
                elif result is todo:
                    result = fn(item)
            except BrokenProcessPool:
                if born == generation:  # the current pool broke: rebuild it once, not per lost item
                    self._restart()
                    generation += 1
                result = fn(item)
            yield result
            while in_flight < self.max_in_flight and submit_next():
                pass

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
            return self._mapped(task, result)
        except BrokenProcessPool:
            pass
        # Rebuild, retry this task alone, and put the others back at the front of the queue.
        retry = [self._drop_slab(t) for t, _ in self._in_flight]
        self._in_flight.clear()
        self._queue.extendleft(reversed(retry))
        self._restart()
        try:
            result = self._pool.submit(prepare, task).result()  # type: ignore[union-attr]
            self._crashes_without_success = 0
            return self._mapped(task, result)
        except BrokenProcessPool:
            self._drop_slab(task)
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
        restarts = 0
        while self._queue and len(self._in_flight) < self.max_in_flight:
            task = self._take_slab(self._queue.popleft())
            try:
                future = self._pool.submit(prepare, task)  # type: ignore[union-attr]
            except BrokenProcessPool:
                # A worker died after the last result came back: the executor notices on its own
                # thread, so submit can fail before any future says so. Put the task back; the
                # futures in flight raise BrokenProcessPool and get() recovers. With none in
                # flight, recover here: a fresh pool for what is queued.
                self._queue.appendleft(self._drop_slab(task))
                if self._in_flight:
                    return
                restarts += 1
                if restarts > 3:
                    raise InputError("decode worker processes keep dying as they start; run with --workers 0") from None
                self._restart()
                continue
            self._in_flight.append((task, future))

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
        self._pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker, initargs=(self._ring,))

    def close(self) -> None:
        """Stop the workers; queued tasks are dropped."""
        from spinelevel.engine.decode import clear_parsed_cache

        clear_parsed_cache()  # --workers 0 decodes in this thread: drop the last multi-frame file
        self._queue.clear()
        for _, future in self._in_flight:
            future.cancel()
        self._in_flight.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=self.kind == "threads", cancel_futures=True)
            self._pool = None
        self._free.extend(self._held)
        self._held.clear()
        if self._ring is not None:
            os.close(self._ring.fd)
            self._ring = None
            try:
                self._map.mem.close()  # type: ignore[union-attr]
            except BufferError:  # a caller still holds a view: the mapping goes with the last one
                pass
            self._map = _SlabMap()
        if self._quiet is not None:
            self._quiet.__exit__(None, None, None)
            self._quiet = None
