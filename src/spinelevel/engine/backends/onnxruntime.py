"""ONNX Runtime backend (CPU execution provider): runs anywhere, and in CI."""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

from spinelevel.card import ModelCard
from spinelevel.errors import ModelError

__all__ = ["REQUIRES", "is_available", "load", "OnnxRuntimeBackend", "infer_in_chunks", "softmax"]

log = logging.getLogger(__name__)

# Packages this backend imports.
REQUIRES = ("onnxruntime",)


def is_available() -> bool:
    """True when onnxruntime can be imported."""
    return importlib.util.find_spec("onnxruntime") is not None


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float32, stable for large logits."""
    z = logits.astype(np.float32) - logits.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


class OnnxRuntimeBackend:
    """One ONNX Runtime session, loaded once, fed batches of any size."""

    name = "onnxruntime"

    def __init__(self, model: Path, card: ModelCard, max_batch: int = 16, threads: int | None = None, spinning: bool | None = None) -> None:
        import onnxruntime as ort

        self.card = card
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
        if spinning is not None:
            # ORT's documented session config key; "0" makes idle pool threads block at once
            opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        opts.log_severity_level = 3
        try:
            self._session = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph/NoSuchFile types
            raise ModelError(f"{model}: ONNX Runtime cannot load the model ({_one_line(exc)})") from None
        inputs = self._session.get_inputs()
        outputs = self._session.get_outputs()
        if len(inputs) != 1:
            raise ModelError(f"{model}: expected one input tensor, the model has {len(inputs)}")
        inp = inputs[0]
        shape = list(inp.shape)
        want = [card.channels, *card.input_size]
        if len(shape) != 4:
            raise ModelError(f"{model}: input {inp.name!r} has shape {shape}, expected [N, {want[0]}, {want[1]}, {want[2]}]")
        for axis, (have, need) in enumerate(zip(shape[1:], want), start=1):
            if isinstance(have, int) and have != need:
                raise ModelError(
                    f"{model}: input {inp.name!r} has shape {shape} but the card asks for "
                    f"[N, {want[0]}, {want[1]}, {want[2]}] (axis {axis}: {have} != {need}); fix the card's "
                    "windows/input_size with 'spinelevel card set'"
                )
        self._fixed_batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
        self.max_batch = self._fixed_batch or max(1, int(max_batch))
        self._input = inp.name
        self._input_dtype = np.float16 if inp.type == "tensor(float16)" else np.float32
        self._output = outputs[0].name
        log.debug("onnxruntime session: input %s %s, output %s, batch %s", inp.name, shape, self._output, self.max_batch)

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """(n, C, H, W) -> (n, classes) float32 probabilities."""
        return infer_in_chunks(batch, self.max_batch, self._fixed_batch, self.card, self._input_dtype, lambda feed: self._session.run([self._output], {self._input: feed})[0])

    def close(self) -> None:
        """Drop the session."""
        self._session = None


def infer_in_chunks(batch: np.ndarray, max_batch: int, fixed_batch: int | None, card: ModelCard, dtype: type, run: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """(n, C, H, W) -> (n, classes) float32 probabilities, ``run`` called on chunks of ``max_batch``.

    A model with a fixed batch gets its last chunk padded with zeros (the padding rows dropped); the
    output must have one value per card class; logits go through softmax. Shared by the CPU runtimes
    (ONNX Runtime, OpenVINO), which differ only in ``run``.
    """
    batch = np.asarray(batch)
    n = batch.shape[0]
    classes = len(card.classes)
    out = np.empty((n, classes), dtype=np.float32)
    for start in range(0, n, max_batch):
        part = batch[start : start + max_batch]
        m = part.shape[0]
        if fixed_batch and m < fixed_batch:
            pad = np.zeros((fixed_batch - m,) + part.shape[1:], dtype=part.dtype)
            part = np.concatenate([part, pad])
        result = np.asarray(run(np.ascontiguousarray(part, dtype=dtype)))
        result = result.reshape(result.shape[0], -1)[:m]
        if result.shape[1] != classes:
            raise ModelError(
                f"model output has {result.shape[1]} values per slice but the card lists "
                f"{classes} classes ({', '.join(card.classes)})"
            )
        result = result.astype(np.float32)
        out[start : start + m] = softmax(result) if card.output == "logits" else result
    return out


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]


def load(model: Path, card: ModelCard, options) -> OnnxRuntimeBackend:  # noqa: ANN001 - BackendOptions
    """Registry entry point."""
    return OnnxRuntimeBackend(model, card, max_batch=options.max_batch, threads=options.threads, spinning=getattr(options, "spinning", None))
