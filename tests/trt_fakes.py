"""Fakes of TensorRT and of spinelevel.engine.cuda with the real APIs' signatures and return types.

Followed (TensorRT release/10.13 and release/11.1: include/NvInfer*.h, python/src/infer/pyCore.cpp,
python/docstrings/infer/pyCoreDoc.h):

* ``IBuilderConfig.set_timing_cache(cache, ignore_mismatch) -> bool`` (False: the cache was made with
  other CUDA device properties); ``get_timing_cache() -> ITimingCache | None``;
  ``ITimingCache.serialize() -> IHostMemory``; ``Builder.build_serialized_network -> IHostMemory | None``
  (buffer protocol, not ``bytes``); ``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` is 1 in 10.x and
  0 in 11.x; ``BuilderFlag.FP16`` exists up to 10.x (deprecated in 10.12) and not in 11.x.
* ``IExecutionContext.set_input_shape -> bool``, ``set_tensor_address -> bool`` (False, address not
  taken, for a pointer without 256-byte alignment), ``execute_async_v3(stream_handle) -> bool``
  (False during a capture of an engine with operations not permitted under capture).

The fake GPU is host memory addressed like device memory; a "kernel" runs when it is enqueued, and a
captured graph replays the rows and addresses it was captured with, refusing to run when the context
has since executed another shape (the hazard of replaying without TensorRT's shape-change work).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

ALIGN = 256


class HostMemory(np.ndarray):
    """IHostMemory: a buffer with ``nbytes`` and ``dtype``, not ``bytes``."""

    @classmethod
    def of(cls, data: bytes) -> "HostMemory":
        return np.frombuffer(data, dtype=np.uint8).view(cls)


class Memory:
    """Fake device memory: allocations in one address space, 256-byte aligned like cudaMalloc."""

    def __init__(self) -> None:
        self.blocks: dict[int, np.ndarray] = {}
        self._next = 0x10000

    def alloc(self, nbytes: int) -> int:
        ptr = self._next
        self.blocks[ptr] = np.zeros(max(1, nbytes), dtype=np.uint8)
        self._next += (nbytes + 2 * ALIGN) // ALIGN * ALIGN
        return ptr

    def view(self, ptr: int, nbytes: int) -> np.ndarray:
        for base, block in self.blocks.items():
            if base <= ptr and ptr + nbytes <= base + len(block):
                return block[ptr - base : ptr - base + nbytes]
        raise AssertionError(f"fake GPU: no allocation holds [{ptr:#x}, +{nbytes})")


class Log(list):
    """Ordered record of what the backend asked the fake GPU to do."""


def fake_cuda(mem: Memory, log: Log) -> dict:
    """Replacements for spinelevel.engine.cuda's names used by the TensorRT backend."""
    streams: dict[int, "Stream"] = {}

    class Stream:
        _n = 100

        def __init__(self) -> None:
            Stream._n += 1
            self.handle = Stream._n
            self.capture: list | None = None
            streams[self.handle] = self

        @property
        def ptr(self) -> int:
            return self.handle

        def synchronize(self) -> None:
            assert self.capture is None, "synchronize on a capturing stream"

        def wait(self, event) -> None:  # noqa: ANN001
            log.append(("wait", self.handle, event.recorded_on))

        def wait_for_stream(self, producer: int, event) -> None:  # noqa: ANN001
            event.record_handle(producer)
            self.wait(event)

        def close(self) -> None:
            pass

    class Event:
        def __init__(self, timing: bool = False) -> None:
            self.recorded_on = None

        def record(self, stream) -> None:  # noqa: ANN001
            self.recorded_on = stream.handle

        def record_handle(self, handle: int) -> None:
            self.recorded_on = handle

        def synchronize(self) -> None:
            pass

        def close(self) -> None:
            pass

    class DeviceBuffer:
        def __init__(self, nbytes: int) -> None:
            self.nbytes = nbytes
            self.ptr = mem.alloc(nbytes)

        def copy_from_host_async(self, host, nbytes: int, stream) -> None:  # noqa: ANN001
            _run(stream, lambda: mem.view(self.ptr, nbytes).__setitem__(slice(None), host.array.reshape(-1).view(np.uint8)[:nbytes]))

        def copy_to_host_async(self, host, nbytes: int, stream) -> None:  # noqa: ANN001
            _run(stream, lambda: host.array.reshape(-1).view(np.uint8).__setitem__(slice(0, nbytes), mem.view(self.ptr, nbytes)))

        def copy_from_device_async(self, src_ptr: int, nbytes: int, stream) -> None:  # noqa: ANN001
            log.append(("d2d", src_ptr))
            _run(stream, lambda: mem.view(self.ptr, nbytes).__setitem__(slice(None), mem.view(src_ptr, nbytes)))

        def close(self) -> None:
            pass

    class PinnedBuffer:
        def __init__(self, shape, dtype) -> None:  # noqa: ANN001
            self.array = np.zeros(shape, dtype=dtype)
            self.nbytes = self.array.nbytes
            self.ptr = 1

        def close(self) -> None:
            pass

    class CudaGraph:
        def __init__(self, stream: Stream) -> None:
            self._stream = stream
            self._work: list | None = None
            self.closed = False

        def begin(self) -> None:
            log.append(("begin_capture", self._stream.handle))
            self._stream.capture = []

        def end(self) -> None:
            self._work, self._stream.capture = self._stream.capture, None
            log.append(("end_capture", self._stream.handle))

        def abort(self) -> None:
            self._stream.capture = None
            log.append(("abort_capture", self._stream.handle))

        def launch(self) -> None:
            assert self._work is not None and not self.closed
            log.append(("launch", self._stream.handle))
            for fn in self._work:
                fn()

        def close(self) -> None:
            self.closed = True

    def _run(stream, fn) -> None:  # noqa: ANN001
        if stream.capture is not None:
            stream.capture.append(fn)
        else:
            fn()

    devices: list[int] = []
    from spinelevel.engine import cuda as real

    return {
        "Stream": Stream,
        "Event": Event,
        "DeviceBuffer": DeviceBuffer,
        "PinnedBuffer": PinnedBuffer,
        "CudaGraph": CudaGraph,
        "set_device": lambda index: (devices.append(index), log.append(("set_device", index))),
        "gpu_info": lambda index=0: real.GpuInfo(index, "NVIDIA H100 80GB HBM3", (9, 0), 80 << 30),
        "_streams": streams,
        "_run": _run,
    }


def fake_tensorrt(mem: Memory, log: Log, chw: tuple[int, int, int], classes: int, max_batch: int, version: str = "10.13.0.35", capture_fails: bool = False, streams: dict | None = None) -> SimpleNamespace:
    """A tensorrt module whose engine computes out[n, k] = (k + 1) * mean(input[n])."""
    row = int(np.prod(chw))

    class Context:
        def __init__(self) -> None:
            self.shape = None
            self.addr: dict[str, int] = {}
            self.executed_rows = None  # the shape TensorRT last did its shape-change work for

        def set_input_shape(self, name: str, shape) -> bool:  # noqa: ANN001
            if not 1 <= shape[0] <= max_batch or tuple(shape[1:]) != chw:
                return False
            self.shape = tuple(shape)
            return True

        def set_tensor_address(self, name: str, memory: int) -> bool:
            if memory % ALIGN:
                log.append(("refused_address", name, memory))
                return False
            self.addr[name] = memory
            return True

        def execute_async_v3(self, stream_handle: int) -> bool:
            stream = streams[stream_handle]
            rows, src, dst = self.shape[0], self.addr["input"], self.addr["output"]
            if stream.capture is not None:
                if capture_fails:
                    return False
                captured_for = rows

                def kernel() -> None:
                    assert self.executed_rows == captured_for, f"graph captured at {captured_for} rows replayed after the context ran {self.executed_rows}"
                    _compute(rows, src, dst)

                stream.capture.append(kernel)
                log.append(("captured", rows))
                return True
            self.executed_rows = rows
            _compute(rows, src, dst)
            log.append(("execute", rows, src))
            return True

    def _compute(rows: int, src: int, dst: int) -> None:
        x = mem.view(src, rows * row * 4).view(np.float32).reshape(rows, row)
        out = mem.view(dst, rows * classes * 4).view(np.float32).reshape(rows, classes)
        out[:] = x.mean(axis=1, keepdims=True) * np.arange(1, classes + 1, dtype=np.float32)

    class Engine:
        num_io_tensors = 2

        def get_tensor_name(self, i: int) -> str:
            return ("input", "output")[i]

        def get_tensor_mode(self, name: str) -> str:
            return "INPUT" if name == "input" else "OUTPUT"

        def get_tensor_dtype(self, name: str) -> str:
            return "float32"

        def get_tensor_profile_shape(self, name: str, profile: int):  # noqa: ANN201
            return (1, *chw), (max_batch, *chw), (max_batch, *chw)

        def create_execution_context(self) -> Context:
            return Context()

    class Runtime:
        def __init__(self, logger) -> None:  # noqa: ANN001
            pass

        def deserialize_cuda_engine(self, data: bytes) -> Engine:
            return Engine()

    return SimpleNamespace(
        __version__=version,
        Logger=type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None}),
        Runtime=Runtime,
        TensorIOMode=SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT"),
        nptype=lambda dtype: np.float32,
    )


class DeviceArray:
    """A device array in fake memory with a given ``__cuda_array_interface__`` version and stream."""

    def __init__(self, mem: Memory, host: np.ndarray, offset: int = 0, version: int = 2, stream: object = "absent") -> None:
        base = mem.alloc(host.nbytes + offset)
        self.ptr = base + offset
        mem.view(self.ptr, host.nbytes)[:] = host.reshape(-1).view(np.uint8)
        iface = {"data": (self.ptr, False), "shape": host.shape, "typestr": host.dtype.str, "strides": None, "version": version}
        if stream != "absent":
            iface["stream"] = stream
        self.__cuda_array_interface__ = iface
        self.shape = host.shape
