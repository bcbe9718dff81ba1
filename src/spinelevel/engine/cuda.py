"""The CUDA glue of the GPU path: devices, streams, events, device and pinned host buffers.

Everything goes through cuda-python's runtime bindings (``cuda.bindings.runtime``, cuda-python
>= 12.6; older releases spelled it ``from cuda import cudart``, which is tried second). Every
runtime call returns ``(cudaError_t, *values)``; :func:`check` turns a failure into
:class:`CudaError` naming the call. Nothing here imports torch, TensorRT or DALI.

This module also answers "what GPU path can run here?" (:func:`probe`) without creating a CUDA
context when the packages are missing, so error messages can name exactly what is absent.
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from spinelevel.errors import BackendUnavailableError, SpineLevelError

__all__ = [
    "CUDA_REQUIRES",
    "CudaError",
    "GpuInfo",
    "GpuProbe",
    "runtime",
    "check",
    "cuda_available",
    "cuda_python_available",
    "cuda_unavailable_reason",
    "gpu_info",
    "probe",
    "require_cuda",
    "set_device",
    "LEGACY_DEFAULT_STREAM",
    "PER_THREAD_DEFAULT_STREAM",
    "TENSOR_ALIGNMENT",
    "Stream",
    "Event",
    "DeviceBuffer",
    "PinnedBuffer",
    "CudaGraph",
    "device_pointer",
]

log = logging.getLogger(__name__)

# Packages the CUDA glue imports (cuda-python's runtime bindings).
CUDA_REQUIRES = ("cuda-python",)

# The special stream handles of the CUDA runtime (cudaStreamLegacy, cudaStreamPerThread; also the
# values the CUDA Array Interface v3 uses in its "stream" entry for those streams).
LEGACY_DEFAULT_STREAM = 1
PER_THREAD_DEFAULT_STREAM = 2

# Alignment TensorRT requires of every tensor address ("The pointer must have at least 256-byte
# alignment", IExecutionContext::setTensorAddress, NvInferRuntime.h, TensorRT 10.13 and 11.1).
TENSOR_ALIGNMENT = 256


class CudaError(SpineLevelError):
    """A CUDA runtime call failed."""


@dataclass(frozen=True)
class GpuInfo:
    """The device an engine is built for or runs on."""

    # Device index in this process.
    index: int
    # Marketing name, e.g. "NVIDIA H100 80GB HBM3".
    name: str
    # Compute capability (major, minor), e.g. (9, 0); TensorRT engines are tied to it.
    compute_capability: tuple[int, int]
    # Total device memory in bytes.
    memory_bytes: int

    @property
    def sm(self) -> str:
        """Compute capability as TensorRT and nvcc spell it: ``sm_90``."""
        return f"sm_{self.compute_capability[0]}{self.compute_capability[1]}"


@dataclass(frozen=True)
class GpuProbe:
    """What the GPU path finds on this machine (no CUDA context is created for missing parts)."""

    # cuda-python importable.
    cuda_python: bool
    # A CUDA device usable through the runtime (driver present, device visible).
    cuda_device: bool
    # Why no device (driver message) when cuda_device is False, else "".
    cuda_reason: str
    # tensorrt importable.
    tensorrt: bool
    # torch importable and torch.cuda.is_available().
    torch_cuda: bool
    # torch importable at all.
    torch: bool
    # nvidia.dali importable.
    dali: bool
    # The first device, when there is one.
    gpu: GpuInfo | None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (for run.json and selftest output)."""
        return {
            "cuda_python": self.cuda_python,
            "cuda_device": self.cuda_device,
            "cuda_reason": self.cuda_reason,
            "tensorrt": self.tensorrt,
            "torch": self.torch,
            "torch_cuda": self.torch_cuda,
            "dali": self.dali,
            "gpu": None if self.gpu is None else {"name": self.gpu.name, "compute_capability": list(self.gpu.compute_capability)},
        }


def _have(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing or broken
        return False


def runtime() -> Any:
    """The cuda-python runtime module (``cudart``).

    Raises:
        BackendUnavailableError: cuda-python is not installed.
    """
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6 (13.x: the only spelling)
    except ImportError:
        try:
            from cuda import cudart  # type: ignore[no-redef]  # cuda-python 11.x / 12.0-12.5
        except ImportError:
            raise BackendUnavailableError(
                "the GPU path needs the package cuda-python (pip install 'cuda-python>=12.6')"
            ) from None
    return cudart


def _error_text(err: Any) -> str:
    cudart = runtime()
    try:
        _, text = cudart.cudaGetErrorString(err)
        text = text.decode() if isinstance(text, bytes) else str(text)
    except Exception:  # noqa: BLE001 - error formatting must not raise
        text = ""
    name = getattr(err, "name", str(err))
    return f"{name}: {text}" if text else name


def check(result: Any, what: str) -> Any:
    """Unpack a cuda-python result tuple ``(err, *values)``.

    Returns:
        None, the single value, or a tuple of values.

    Raises:
        CudaError: ``err`` is not ``cudaSuccess``; the message names ``what``.
    """
    cudart = runtime()
    if not isinstance(result, tuple):
        result = (result,)
    err, values = result[0], result[1:]
    if err != cudart.cudaError_t.cudaSuccess:
        raise CudaError(f"CUDA {what} failed ({_error_text(err)})")
    if not values:
        return None
    return values[0] if len(values) == 1 else values


@lru_cache(maxsize=1)
def _device_state() -> tuple[bool, str]:
    if not _have("cuda.bindings") and not _have("cuda.cudart"):
        return False, "cuda-python is not installed"
    cudart = runtime()
    try:
        err, count = cudart.cudaGetDeviceCount()
    except Exception as exc:  # noqa: BLE001 - the runtime library itself may fail to load
        return False, f"the CUDA runtime cannot be loaded ({type(exc).__name__}: {exc})"
    if err != cudart.cudaError_t.cudaSuccess:
        return False, f"no usable NVIDIA driver or GPU ({_error_text(err)})"
    if count < 1:
        return False, "no CUDA device is visible (check CUDA_VISIBLE_DEVICES)"
    return True, ""


def cuda_python_available() -> bool:
    """True when cuda-python's runtime bindings can be imported (no device needed)."""
    return _have("cuda.bindings") or _have("cuda.cudart")


def cuda_unavailable_reason() -> str | None:
    """Why no CUDA device can be used here (driver message), or None when one can."""
    ok, reason = _device_state()
    return None if ok else reason


def cuda_available() -> bool:
    """True when cuda-python is installed and at least one CUDA device answers."""
    return _device_state()[0]


def require_cuda(what: str) -> None:
    """Raise :class:`BackendUnavailableError` saying why ``what`` cannot use a GPU here."""
    ok, reason = _device_state()
    if not ok:
        raise BackendUnavailableError(f"{what} needs an NVIDIA GPU with CUDA: {reason}")


def gpu_info(index: int = 0) -> GpuInfo:
    """Name, compute capability and memory of device ``index``.

    Raises:
        BackendUnavailableError: no CUDA device here.
    """
    require_cuda("reading the GPU properties")
    cudart = runtime()
    prop = check(cudart.cudaGetDeviceProperties(index), "cudaGetDeviceProperties")
    name = prop.name.decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
    return GpuInfo(index, name.rstrip("\x00").strip(), (int(prop.major), int(prop.minor)), int(prop.totalGlobalMem))


def set_device(index: int) -> None:
    """Make ``index`` the current device of the calling thread (cudaSetDevice is per host thread)."""
    check(runtime().cudaSetDevice(int(index)), "cudaSetDevice")


def probe() -> GpuProbe:
    """Find what the GPU path can use here; cheap, never raises."""
    ok, reason = _device_state()
    gpu = None
    if ok:
        try:
            gpu = gpu_info(0)
        except SpineLevelError as exc:
            ok, reason = False, str(exc)
    torch_cuda = False
    have_torch = _have("torch")
    if have_torch:
        try:
            import torch

            torch_cuda = bool(torch.cuda.is_available())
        except Exception:  # noqa: BLE001 - a broken torch install is "no torch CUDA"
            torch_cuda = False
    return GpuProbe(
        cuda_python=cuda_python_available(),
        cuda_device=ok,
        cuda_reason=reason,
        tensorrt=_have("tensorrt"),
        torch_cuda=torch_cuda,
        torch=have_torch,
        dali=_have("nvidia.dali"),
        gpu=gpu,
    )


class Stream:
    """A non-blocking CUDA stream (does not synchronise with the legacy default stream)."""

    def __init__(self) -> None:
        cudart = runtime()
        self.handle = check(cudart.cudaStreamCreateWithFlags(cudart.cudaStreamNonBlocking), "cudaStreamCreateWithFlags")

    @property
    def ptr(self) -> int:
        """The cudaStream_t as an integer (what TensorRT's execute_async_v3 takes)."""
        return int(self.handle)

    def synchronize(self) -> None:
        """Block until all work queued on the stream is done."""
        check(runtime().cudaStreamSynchronize(self.handle), "cudaStreamSynchronize")

    def wait(self, event: Event) -> None:
        """Make later work on this stream wait for ``event`` (no host blocking)."""
        check(runtime().cudaStreamWaitEvent(self.handle, event.handle, 0), "cudaStreamWaitEvent")

    def wait_for_stream(self, producer: int, event: Event) -> None:
        """Make later work on this stream wait for everything queued so far on stream handle ``producer``.

        ``producer`` may be a real cudaStream_t or :data:`LEGACY_DEFAULT_STREAM` /
        :data:`PER_THREAD_DEFAULT_STREAM`. A non-blocking stream (this class) does not synchronise
        with the legacy default stream implicitly, so work another library queued there (torch's
        default stream) must be ordered explicitly: record an event there, wait on it here.
        """
        event.record_handle(producer)
        self.wait(event)

    def close(self) -> None:
        """Destroy the stream."""
        if self.handle is not None:
            check(runtime().cudaStreamDestroy(self.handle), "cudaStreamDestroy")
            self.handle = None


class Event:
    """A CUDA event without timing (cheapest kind), used to order and to wait for work."""

    def __init__(self, timing: bool = False) -> None:
        cudart = runtime()
        flags = cudart.cudaEventDefault if timing else cudart.cudaEventDisableTiming
        self.handle = check(cudart.cudaEventCreateWithFlags(flags), "cudaEventCreateWithFlags")

    def record(self, stream: Stream) -> None:
        """Record the event at the current end of ``stream``."""
        check(runtime().cudaEventRecord(self.handle, stream.handle), "cudaEventRecord")

    def record_handle(self, stream_handle: int) -> None:
        """Record the event at the end of a stream given as a raw handle (another library's stream)."""
        check(runtime().cudaEventRecord(self.handle, int(stream_handle)), "cudaEventRecord")

    def synchronize(self) -> None:
        """Block the host until the recorded work is done."""
        check(runtime().cudaEventSynchronize(self.handle), "cudaEventSynchronize")

    def close(self) -> None:
        """Destroy the event."""
        if self.handle is not None:
            check(runtime().cudaEventDestroy(self.handle), "cudaEventDestroy")
            self.handle = None


class DeviceBuffer:
    """``nbytes`` of device memory (cudaMalloc)."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = int(nbytes)
        self.ptr = int(check(runtime().cudaMalloc(self.nbytes), "cudaMalloc"))

    def copy_from_host_async(self, host: PinnedBuffer | np.ndarray, nbytes: int, stream: Stream) -> None:
        """Queue a host -> device copy of the first ``nbytes`` (pinned source: truly asynchronous)."""
        cudart = runtime()
        src = host.ptr if isinstance(host, PinnedBuffer) else host.ctypes.data
        check(cudart.cudaMemcpyAsync(self.ptr, src, nbytes, cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, stream.handle), "cudaMemcpyAsync H2D")

    def copy_to_host_async(self, host: PinnedBuffer, nbytes: int, stream: Stream) -> None:
        """Queue a device -> host copy of the first ``nbytes`` into pinned memory."""
        cudart = runtime()
        check(cudart.cudaMemcpyAsync(host.ptr, self.ptr, nbytes, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream.handle), "cudaMemcpyAsync D2H")

    def copy_from_device_async(self, src_ptr: int, nbytes: int, stream: Stream) -> None:
        """Queue a device -> device copy (used to feed a CUDA graph from a foreign device array)."""
        cudart = runtime()
        check(cudart.cudaMemcpyAsync(self.ptr, src_ptr, nbytes, cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice, stream.handle), "cudaMemcpyAsync D2D")

    def close(self) -> None:
        """Free the memory."""
        if self.ptr:
            check(runtime().cudaFree(self.ptr), "cudaFree")
            self.ptr = 0


class PinnedBuffer:
    """Page-locked host memory (cudaMallocHost) seen as a numpy array, so copies can overlap compute."""

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype | type) -> None:
        dtype = np.dtype(dtype)
        self.nbytes = int(np.prod(shape)) * dtype.itemsize
        self.ptr = int(check(runtime().cudaMallocHost(self.nbytes), "cudaMallocHost"))
        raw = (ctypes.c_byte * self.nbytes).from_address(self.ptr)
        self.array = np.frombuffer(raw, dtype=dtype).reshape(shape)

    def close(self) -> None:
        """Free the memory (the numpy view must not be used afterwards)."""
        if self.ptr:
            self.array = None  # type: ignore[assignment]
            check(runtime().cudaFreeHost(self.ptr), "cudaFreeHost")
            self.ptr = 0


class CudaGraph:
    """Work captured once from a stream and replayed with one launch."""

    def __init__(self, stream: Stream) -> None:
        self._stream = stream
        self._graph = None
        self._exec = None

    def begin(self) -> None:
        """Start capturing work queued on the stream (thread-local capture mode)."""
        cudart = runtime()
        check(cudart.cudaStreamBeginCapture(self._stream.handle, cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal), "cudaStreamBeginCapture")

    def end(self) -> None:
        """Stop capturing and instantiate the graph."""
        cudart = runtime()
        self._graph = check(cudart.cudaStreamEndCapture(self._stream.handle), "cudaStreamEndCapture")
        # cudaGraphInstantiate(graph, flags): CUDA >= 12.0 signature (11.x took error-node/log buffers).
        self._exec = check(cudart.cudaGraphInstantiate(self._graph, 0), "cudaGraphInstantiate")

    def abort(self) -> None:
        """End a capture whose work failed, leaving the stream usable; never raises.

        As trtexec's ``TrtCudaGraph::endCaptureOnError`` (TensorRT samples/common/sampleDevice.h):
        end the capture (``cudaErrorStreamCaptureInvalidated`` returns no graph), destroy a graph
        that was returned, and clear the sticky error with ``cudaGetLastError``.
        """
        cudart = runtime()
        try:
            err, graph = cudart.cudaStreamEndCapture(self._stream.handle)
            if err == cudart.cudaError_t.cudaSuccess and graph is not None and int(graph):
                cudart.cudaGraphDestroy(graph)
            cudart.cudaGetLastError()
        except Exception:  # noqa: BLE001 - cleanup after a failure must not hide the failure
            log.debug("ending a failed CUDA graph capture raised", exc_info=True)
        self._graph = self._exec = None

    def launch(self) -> None:
        """Replay the captured work on the stream."""
        check(runtime().cudaGraphLaunch(self._exec, self._stream.handle), "cudaGraphLaunch")

    def close(self) -> None:
        """Destroy the graph."""
        cudart = runtime()
        if self._exec is not None:
            check(cudart.cudaGraphExecDestroy(self._exec), "cudaGraphExecDestroy")
            self._exec = None
        if self._graph is not None:
            check(cudart.cudaGraphDestroy(self._graph), "cudaGraphDestroy")
            self._graph = None


def device_pointer(obj: Any) -> tuple[int, tuple[int, ...], np.dtype, bool]:
    """Pointer, shape, dtype and C-contiguity of an object with ``__cuda_array_interface__``.

    Works for CuPy arrays, torch CUDA tensors, Numba device arrays and DALI ``TensorListGPU``
    as-tensor views (interface version 2 or 3).

    Raises:
        TypeError: ``obj`` has no CUDA array interface.
    """
    iface = getattr(obj, "__cuda_array_interface__", None)
    if iface is None:
        raise TypeError(f"{type(obj).__name__} has no __cuda_array_interface__")
    shape = tuple(int(v) for v in iface["shape"])
    dtype = np.dtype(iface["typestr"])
    strides = iface.get("strides")
    contiguous = True
    if strides is not None:
        expected, step = [], dtype.itemsize
        for dim in reversed(shape):
            expected.append(step)
            step *= dim
        contiguous = tuple(strides) == tuple(reversed(expected))
    return int(iface["data"][0]), shape, dtype, contiguous


def __getattr__(name: str) -> Any:
    # Backend choice moved beside the backend registry (spinelevel.engine.backends); these names
    # stay importable from here for callers written before the move.
    if name in ("BackendChoice", "choose_backend"):
        from spinelevel.engine import backends

        return getattr(backends, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
