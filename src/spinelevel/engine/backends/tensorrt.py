"""TensorRT backend: a serialized FP16 engine run with named tensors on explicit CUDA streams.

Two slots (each an execution context, a stream, pinned host and device buffers and events) take
alternate chunks of a batch, so one chunk's host->device copy and output copy overlap the other's
compute. ``infer`` accepts host arrays and device arrays (``__cuda_array_interface__``: DALI, CuPy,
torch), the latter bound to the engine input without a copy when its address is aligned.

Rules followed (TensorRT 10.13 / 11.1 headers and Python docstrings, trtexec's sources):

* ``set_input_shape``, ``set_tensor_address`` and ``execute_async_v3`` return a bool; each is checked.
* Tensor addresses need 256-byte alignment (``IExecutionContext::setTensorAddress``): a chunk of a
  foreign device array that starts unaligned is copied into the slot's own (cudaMalloc, aligned) buffer.
* CUDA graphs: one plain enqueue with the new shape before capture (TensorRT does its shape-change
  work there, which must not be captured); a capture whose ``execute_async_v3`` fails is ended and
  the slot falls back to plain enqueues (trtexec: ``endCaptureOnError``). A graph is only replayed
  while the context still has the shape it was captured with: a chunk of another size runs plain, and
  the next full chunk recaptures. Graphs are used for full chunks (``max_batch`` rows) only.
* Slot streams are non-blocking, so they do not wait for the legacy default stream. A device array
  whose interface names no stream (version 2, e.g. torch) is ordered after the legacy default stream
  by an event; a v3 ``stream`` entry (1 legacy, 2 per-thread, else a handle) is waited on the same
  way; ``stream: None`` means the producer needs no synchronisation (CUDA Array Interface v3).
  DALI's ``Pipeline.run()`` returns after its work is done, so DALI output is safe either way.
* The current CUDA device is per host thread: it is set in ``__init__`` and again in ``infer``.

API used: ``trt.Runtime.deserialize_cuda_engine``, ``ICudaEngine.num_io_tensors/get_tensor_name/
get_tensor_mode/get_tensor_dtype/get_tensor_profile_shape``, ``IExecutionContext.set_input_shape/
set_tensor_address/execute_async_v3(stream_handle)``. CUDA through :mod:`spinelevel.engine.cuda`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from spinelevel.card import ModelCard
from spinelevel.errors import BackendUnavailableError, ModelError

__all__ = ["REQUIRES", "TensorRTOptions", "is_available", "unavailable_reason", "load", "TensorRTBackend"]

log = logging.getLogger(__name__)

# Packages this backend imports (TensorRT from NVIDIA's index or a container; cuda-python from PyPI).
REQUIRES = ("tensorrt", "cuda-python")


@dataclass(frozen=True)
class TensorRTOptions:
    """How the TensorRT backend runs."""

    # Largest batch per execute call (capped by the engine profile's max batch).
    max_batch: int = 16
    # Capture and replay a CUDA graph per slot and batch size (saves launch overhead on small models).
    cuda_graphs: bool = False
    # CUDA device index.
    device: int = 0


def unavailable_reason() -> str | None:
    """What is missing for this backend here, or None when it can run."""
    from spinelevel.engine import cuda
    from spinelevel.engine.backends.trt_compat import tensorrt_available

    missing = []
    if not tensorrt_available():
        missing.append("tensorrt")
    if not cuda.cuda_python_available():
        missing.append("cuda-python")
    if missing:
        return f"the package(s) {', '.join(missing)} are not installed"
    return cuda.cuda_unavailable_reason()


def is_available() -> bool:
    """True when tensorrt and cuda-python can be imported (the registry's package check).

    A missing GPU or driver is reported by :func:`unavailable_reason` and by the backend itself.
    """
    from spinelevel.engine import cuda
    from spinelevel.engine.backends.trt_compat import tensorrt_available

    return tensorrt_available() and cuda.cuda_python_available()


@dataclass
class _Slot:
    """One in-flight lane: its own context, stream, buffers and completion event."""

    context: Any
    stream: Any
    host_in: Any
    dev_in: Any
    host_out: Any
    dev_out: Any
    done: Any
    # Orders the slot's stream after the producer of a foreign device array.
    ready: Any = None
    # The CUDA graph of a full chunk, valid while the context keeps the shape it was captured with.
    graph: Any = None
    # Rows of the input shape the context last really executed with (None: never ran).
    context_rows: int | None = None
    # A capture failed on this slot: plain enqueues from now on.
    graph_failed: bool = False
    # (output slice of the caller's result, rows) waiting for `done`.
    pending: tuple[np.ndarray, int] | None = None


class TensorRTBackend:
    """A deserialized engine with two execution slots."""

    name = "tensorrt"

    def __init__(self, engine_path: Path, card: ModelCard, options: TensorRTOptions = TensorRTOptions()) -> None:
        from spinelevel.engine import cuda
        from spinelevel.engine.backends.trt_compat import check_engine_compatible, engine_info

        reason = unavailable_reason()
        if reason is not None:
            raise BackendUnavailableError(f"backend 'tensorrt' cannot run here: {reason} (needs {', '.join(REQUIRES)} and an NVIDIA GPU)")
        import tensorrt as trt

        self.card = card
        self._cuda = cuda
        self._options = options
        cuda.set_device(options.device)
        gpu = cuda.gpu_info(options.device)
        check_engine_compatible(Path(engine_path), engine_info(card, Path(engine_path)), str(trt.__version__), gpu.name, gpu.compute_capability)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self._engine is None:
            raise ModelError(f"{engine_path}: TensorRT cannot deserialize the engine (corrupt, or built by another version); rebuild it with 'spinelevel build'")
        inputs, outputs = [], []
        for i in range(self._engine.num_io_tensors):
            name = self._engine.get_tensor_name(i)
            (inputs if self._engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else outputs).append(name)
        if len(inputs) != 1 or len(outputs) != 1:
            raise ModelError(f"{engine_path}: expected one input and one output tensor, the engine has {inputs} and {outputs}")
        self._input, self._output = inputs[0], outputs[0]
        self._in_dtype = np.dtype(trt.nptype(self._engine.get_tensor_dtype(self._input)))
        self._out_dtype = np.dtype(trt.nptype(self._engine.get_tensor_dtype(self._output)))
        _, _, max_shape = self._engine.get_tensor_profile_shape(self._input, 0)
        self._chw = (card.channels, int(card.input_size[0]), int(card.input_size[1]))
        if tuple(int(v) for v in max_shape[1:]) != self._chw:
            raise ModelError(f"{engine_path}: engine input shape {list(max_shape)} does not match the card's [N, {self._chw[0]}, {self._chw[1]}, {self._chw[2]}]")
        self.max_batch = max(1, min(int(options.max_batch), int(max_shape[0])))
        self._classes = len(card.classes)
        self._slots = [self._make_slot() for _ in range(2)]
        self._turn = 0
        log.debug("tensorrt engine %s: %s %s -> %s, batch <= %d, graphs %s", engine_path, self._input, self._chw, self._output, self.max_batch, options.cuda_graphs)

    def _make_slot(self) -> _Slot:
        cuda = self._cuda
        context = self._engine.create_execution_context()
        if context is None:
            raise ModelError("TensorRT could not create an execution context (out of GPU memory?)")
        in_shape = (self.max_batch, *self._chw)
        out_shape = (self.max_batch, self._classes)
        host_in = cuda.PinnedBuffer(in_shape, self._in_dtype)
        host_out = cuda.PinnedBuffer(out_shape, self._out_dtype)
        return _Slot(
            context=context,
            stream=cuda.Stream(),
            host_in=host_in,
            dev_in=cuda.DeviceBuffer(host_in.nbytes),
            host_out=host_out,
            dev_out=cuda.DeviceBuffer(host_out.nbytes),
            done=cuda.Event(),
            ready=cuda.Event(),
        )

    def _finish(self, slot: _Slot) -> None:
        """Wait for a slot's queued work and move its probabilities into the caller's array."""
        if slot.pending is None:
            return
        slot.done.synchronize()
        target, rows = slot.pending
        result = slot.host_out.array[:rows].astype(np.float32)
        if self.card.output == "logits":
            from spinelevel.engine.backends.onnxruntime import softmax

            result = softmax(result)
        target[:] = result
        slot.pending = None

    def _bind(self, ctx: Any, name: str, ptr: int) -> None:
        if int(ptr) % self._cuda.TENSOR_ALIGNMENT:
            raise ModelError(f"TensorRT tensor {name!r} at address {int(ptr):#x} is not {self._cuda.TENSOR_ALIGNMENT}-byte aligned")
        if not ctx.set_tensor_address(name, int(ptr)):
            raise ModelError(f"TensorRT refused the address of tensor {name!r} (see the TensorRT messages above)")

    def _enqueue(self, slot: _Slot, rows: int, input_ptr: int | None) -> None:
        """Queue compute (and the output copy) of ``rows`` rows on the slot's stream.

        ``input_ptr`` None: the input is already in the slot's device buffer (fixed address, so a
        CUDA graph may replay it); otherwise it is a foreign, aligned device pointer bound directly.
        """
        ctx = slot.context
        if not ctx.set_input_shape(self._input, (rows, *self._chw)):
            raise ModelError(f"TensorRT refused input shape {(rows, *self._chw)} (outside the engine's profile)")
        self._bind(ctx, self._input, slot.dev_in.ptr if input_ptr is None else input_ptr)
        self._bind(ctx, self._output, slot.dev_out.ptr)
        use_graph = self._options.cuda_graphs and input_ptr is None and rows == self.max_batch and not slot.graph_failed
        if use_graph and slot.graph is not None and slot.context_rows == rows:
            slot.graph.launch()
        else:
            if slot.graph is not None and slot.context_rows != rows:
                # captured with another shape on this context: TensorRT's shape-change work would be skipped
                slot.graph.close()
                slot.graph = None
            # A plain run: computes this chunk and, on a new shape, does TensorRT's shape-change work,
            # which must happen before (not during) a capture.
            self._execute(ctx, slot)
            slot.context_rows = rows
            if use_graph and slot.graph is None:
                slot.graph = self._capture(ctx, slot)
        slot.dev_out.copy_to_host_async(slot.host_out, rows * self._classes * self._out_dtype.itemsize, slot.stream)
        slot.done.record(slot.stream)

    def _capture(self, ctx: Any, slot: _Slot) -> Any:
        """Capture one enqueue as a CUDA graph; None (and plain enqueues from then on) when that fails."""
        graph = self._cuda.CudaGraph(slot.stream)
        graph.begin()
        captured = False
        try:
            captured = bool(ctx.execute_async_v3(slot.stream.ptr))
        finally:
            # the capture is always ended, or the stream would stay capturing
            if captured:
                try:
                    graph.end()
                except Exception:
                    graph.abort()
                    captured = False
            else:
                graph.abort()
        if not captured:
            slot.graph_failed = True
            log.warning("TensorRT engine could not be captured as a CUDA graph (operations not permitted under capture); running without CUDA graphs")
            return None
        return graph

    @staticmethod
    def _execute(ctx: Any, slot: _Slot) -> None:
        if not ctx.execute_async_v3(slot.stream.ptr):
            raise ModelError("TensorRT execute_async_v3 failed (see the TensorRT messages above)")

    def infer(self, batch: Any) -> np.ndarray:
        """(n, C, H, W) host array or device array -> (n, classes) float32 probabilities.

        A device array must be C-contiguous with the engine's input dtype (float32); the engine's
        work is ordered after its producer's stream (the legacy default stream when the interface
        names none).
        """
        self._cuda.set_device(self._options.device)  # the current device is per host thread
        if hasattr(batch, "__cuda_array_interface__"):
            return self._infer_device(batch)
        batch = np.asarray(batch)
        n = batch.shape[0]
        if tuple(batch.shape[1:]) != self._chw:
            raise ModelError(f"batch shape {tuple(batch.shape)} does not match the engine input (N, {self._chw[0]}, {self._chw[1]}, {self._chw[2]})")
        out = np.empty((n, self._classes), dtype=np.float32)
        row_bytes = int(np.prod(self._chw)) * self._in_dtype.itemsize
        for start in range(0, n, self.max_batch):
            rows = min(self.max_batch, n - start)
            slot = self._slots[self._turn]
            self._turn ^= 1
            self._finish(slot)  # its previous chunk ran while the other slot was being fed
            np.copyto(slot.host_in.array[:rows], batch[start : start + rows], casting="same_kind")
            slot.dev_in.copy_from_host_async(slot.host_in, rows * row_bytes, slot.stream)
            self._enqueue(slot, rows, None)
            slot.pending = (out[start : start + rows], rows)
        for slot in self._slots:
            self._finish(slot)
        return out

    def _order_after_producer(self, iface: dict) -> None:
        """Make both slot streams wait for the work that produced a device array (no host blocking)."""
        cuda = self._cuda
        if "stream" not in iface or int(iface.get("version", 2)) < 3:
            producer: int | None = cuda.LEGACY_DEFAULT_STREAM  # v2 names no stream: assume the legacy default
        else:
            producer = iface["stream"]  # v3: None = no synchronisation needed; 1, 2 or a handle
        if producer is None:
            return
        for slot in self._slots:
            slot.stream.wait_for_stream(int(producer), slot.ready)

    def _infer_device(self, batch: Any) -> np.ndarray:
        cuda = self._cuda
        ptr, shape, dtype, contiguous = cuda.device_pointer(batch)
        if tuple(shape[1:]) != self._chw:
            raise ModelError(f"device batch shape {shape} does not match the engine input (N, {self._chw[0]}, {self._chw[1]}, {self._chw[2]})")
        if dtype != self._in_dtype or not contiguous:
            raise ModelError(f"device batch must be C-contiguous {self._in_dtype} (got {dtype}, contiguous={contiguous})")
        self._order_after_producer(batch.__cuda_array_interface__)
        n = shape[0]
        out = np.empty((n, self._classes), dtype=np.float32)
        row_bytes = int(np.prod(self._chw)) * dtype.itemsize
        for start in range(0, n, self.max_batch):
            rows = min(self.max_batch, n - start)
            slot = self._slots[self._turn]
            self._turn ^= 1
            self._finish(slot)
            src = ptr + start * row_bytes
            if self._options.cuda_graphs or src % cuda.TENSOR_ALIGNMENT:
                # Graphs replay fixed addresses, and TensorRT needs 256-byte aligned tensors: one
                # device-to-device copy into the slot's own buffer.
                slot.dev_in.copy_from_device_async(src, rows * row_bytes, slot.stream)
                self._enqueue(slot, rows, None)
            else:
                self._enqueue(slot, rows, src)
            slot.pending = (out[start : start + rows], rows)
        for slot in self._slots:
            self._finish(slot)
        return out

    def close(self) -> None:
        """Release graphs, buffers, streams, contexts and the engine."""
        for slot in getattr(self, "_slots", []):
            slot.stream.synchronize()
            if slot.graph is not None:
                slot.graph.close()
                slot.graph = None
            for part in (slot.host_in, slot.dev_in, slot.host_out, slot.dev_out, slot.done, slot.ready, slot.stream):
                part.close()
            slot.context = None
        self._slots = []
        self._engine = None
        self._runtime = None


def _device_index(device: str | None) -> int:
    """"cuda:1" -> 1; None, "cuda" -> 0."""
    if not device or ":" not in str(device):
        return 0
    return int(str(device).split(":", 1)[1])


def load(model: Path, card: ModelCard, options: Any) -> TensorRTBackend:
    """Registry entry point (``options`` is a BackendOptions; ``cuda_graphs``/``device`` read if present)."""
    return TensorRTBackend(
        Path(model),
        card,
        TensorRTOptions(
            max_batch=int(getattr(options, "max_batch", 16)),
            cuda_graphs=bool(getattr(options, "cuda_graphs", False)),
            device=_device_index(getattr(options, "device", None)),
        ),
    )
