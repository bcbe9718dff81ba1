"""OpenVINO backend (CPU device): the same ONNX file as ONNX Runtime, compiled by OpenVINO.

Optional (``pip install 'spinelevel[openvino]'``). The ONNX model is read with
``openvino.Core().read_model``, its batch axis is kept dynamic, and it is compiled for the CPU with
the LATENCY hint (one infer request that uses every inference thread, the engine's batch-at-a-time
use) and ``INFERENCE_PRECISION_HINT=f32``: on CPUs with bfloat16 support OpenVINO would otherwise run
in bf16 by default and its output would not be the float32 model's. Measured against ONNX Runtime
in BENCHMARKS.md (issue 17); parity in tests/test_openvino_backend.py.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

import numpy as np

from spinelevel.card import ModelCard
from spinelevel.engine.backends.onnxruntime import _one_line
from spinelevel.errors import ModelError

__all__ = ["REQUIRES", "is_available", "load", "OpenVinoBackend"]

log = logging.getLogger(__name__)

# Packages this backend imports.
REQUIRES = ("openvino",)


def is_available() -> bool:
    """True when openvino can be imported."""
    try:
        return importlib.util.find_spec("openvino") is not None
    except (ImportError, ValueError):
        return False


class OpenVinoBackend:
    """One OpenVINO compiled model (CPU), loaded once, fed batches of any size."""

    name = "openvino"

    def __init__(self, model: Path, card: ModelCard, max_batch: int = 16, threads: int | None = None, precision: str = "f32") -> None:
        import openvino as ov

        self.card = card
        core = ov.Core()
        try:
            net = core.read_model(str(model))
        except Exception as exc:  # OpenVINO raises RuntimeError with a long multi-line text
            raise ModelError(f"{model}: OpenVINO cannot read the model ({_one_line(exc)})") from None
        if len(net.inputs) != 1:
            raise ModelError(f"{model}: expected one input tensor, the model has {len(net.inputs)}")
        shape = net.inputs[0].get_partial_shape()
        want = [card.channels, *card.input_size]
        if shape.rank.is_dynamic or shape.rank.get_length() != 4:
            raise ModelError(f"{model}: input has shape {shape}, expected [N, {want[0]}, {want[1]}, {want[2]}]")
        for axis, need in enumerate(want, start=1):
            dim = shape[axis]
            if dim.is_static and dim.get_length() != need:
                raise ModelError(
                    f"{model}: input has shape {shape} but the card asks for [N, {want[0]}, {want[1]}, {want[2]}] "
                    f"(axis {axis}: {dim.get_length()} != {need}); fix the card with 'spinelevel card set'"
                )
        self._fixed_batch = shape[0].get_length() if shape[0].is_static else None
        self.max_batch = self._fixed_batch or max(1, int(max_batch))
        config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": precision}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        try:
            self._compiled = core.compile_model(net, "CPU", config)
        except Exception as exc:  # noqa: BLE001
            raise ModelError(f"{model}: OpenVINO cannot compile the model for the CPU ({_one_line(exc)})") from None
        self._request = self._compiled.create_infer_request()
        log.debug("openvino %s: input %s, batch %s, config %s", ov.__version__, shape, self.max_batch, config)

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """(n, C, H, W) -> (n, classes) float32 probabilities."""
        from spinelevel.engine.backends.onnxruntime import infer_in_chunks

        return infer_in_chunks(batch, self.max_batch, self._fixed_batch, self.card, np.float32, lambda feed: self._request.infer({0: feed})[0])

    def close(self) -> None:
        """Drop the compiled model."""
        self._request = None
        self._compiled = None


def load(model: Path, card: ModelCard, options: Any) -> OpenVinoBackend:
    """Registry entry point (``options`` is a BackendOptions)."""
    return OpenVinoBackend(Path(model), card, max_batch=int(getattr(options, "max_batch", 16)), threads=getattr(options, "threads", None))
