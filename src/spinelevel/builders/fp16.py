"""An FP16 copy of an ONNX model with float32 inputs and outputs kept.

TensorRT 11 removed ``BuilderFlag.FP16``: FP16 there means a network whose tensors are FP16 in the
graph itself, built strongly typed. This module writes that graph with onnxconverter-common's
``convert_float_to_float16(model, keep_io_types=True)`` (Cast nodes at the float32 boundary), keeps
the model card (metadata ``spinelevel.card``, with ``precision: fp16`` and the source sha256
added), and checks the copy against the float32 model with ONNX Runtime on the CPU.

Measured tolerances (tests/test_fp16.py, ONNX Runtime CPU, BatchNorm-calibrated timm
EfficientNetV2-B0 exported with ``exportable=True``): max |p_fp16 - p_fp32| about 1e-3 or less, argmax
agreement 100 %. The acceptance bound used everywhere is the selftest's: max probability difference
<= 0.01 and argmax agreement >= 99.5 %. A model with untrained BatchNorm overflows in FP16
(DESIGN.md 5): calibrate or train first.
"""

from __future__ import annotations

import importlib.util
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from spinelevel.card import CARD_METADATA_KEY, ModelCard, file_sha256
from spinelevel.errors import BackendUnavailableError, ModelError

__all__ = ["FP16_REQUIRES", "Parity", "fp16_available", "convert_fp16", "compare_onnx", "parity"]

log = logging.getLogger(__name__)

# Package that does the conversion.
FP16_REQUIRES = ("onnxconverter-common",)


def fp16_available() -> bool:
    """True when onnxconverter-common can be imported."""
    return importlib.util.find_spec("onnxconverter_common") is not None


@dataclass(frozen=True)
class Parity:
    """Agreement between a candidate path's probabilities and a reference's."""

    # Slices compared.
    n: int
    # Fraction of slices whose argmax class agrees.
    argmax_agreement: float
    # Largest absolute probability difference over all slices and classes.
    max_abs_diff: float
    # Mean absolute probability difference.
    mean_abs_diff: float

    def ok(self, min_agreement: float = 0.995, max_diff: float = 0.01) -> bool:
        """The FP16 acceptance rule (argmax agreement >= 99.5 %, max difference <= 0.01)."""
        return self.argmax_agreement >= min_agreement and self.max_abs_diff <= max_diff

    def to_dict(self) -> dict[str, float | int]:
        """JSON-ready."""
        return {"n": self.n, "argmax_agreement": self.argmax_agreement, "max_abs_diff": self.max_abs_diff, "mean_abs_diff": self.mean_abs_diff}


def parity(candidate: np.ndarray, reference: np.ndarray) -> Parity:
    """Compare two (n, classes) probability arrays."""
    candidate = np.asarray(candidate, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    if candidate.shape != reference.shape or candidate.ndim != 2:
        raise ValueError(f"parity needs two equal (n, classes) arrays, got {candidate.shape} and {reference.shape}")
    diff = np.abs(candidate - reference)
    agree = float(np.mean(candidate.argmax(1) == reference.argmax(1))) if len(candidate) else 1.0
    return Parity(len(candidate), agree, float(diff.max(initial=0.0)), float(diff.mean()) if diff.size else 0.0)


def convert_fp16(model: Path, out: Path, op_block_list: tuple[str, ...] | None = None) -> Path:
    """Write an FP16 copy of ``model`` to ``out``: FP16 weights and activations, float32 I/O.

    Args:
        model: float32 ONNX model (with its card in the metadata, if it has one).
        out: where to write the copy (atomically).
        op_block_list: ONNX op types left in float32 (None: onnxconverter-common's default list).

    Raises:
        BackendUnavailableError: onnxconverter-common is not installed.
        ModelError: the model cannot be read or converted.
    """
    if not fp16_available():
        raise BackendUnavailableError(
            "the FP16 ONNX copy needs the package onnxconverter-common (pip install onnxconverter-common)"
        )
    import onnx
    from onnxconverter_common import float16

    model, out = Path(model), Path(out)
    try:
        proto = onnx.load(str(model))
    except Exception as exc:  # onnx raises DecodeError, OSError, ...
        raise ModelError(f"{model}: not a readable ONNX model ({type(exc).__name__}: {exc})") from None
    kwargs = {"keep_io_types": True, "node_block_list": _shape_path_nodes(proto.graph)}
    if op_block_list is not None:
        kwargs["op_block_list"] = list(op_block_list)
    try:
        with warnings.catch_warnings():
            # One warning per weight below FP16's smallest normal value: expected, and noise.
            warnings.simplefilter("ignore", UserWarning)
            half = float16.convert_float_to_float16(proto, **kwargs)
    except Exception as exc:  # noqa: BLE001 - the converter raises anything from shape inference
        raise ModelError(
            f"{model}: FP16 conversion failed ({type(exc).__name__}: {exc}); export with "
            "timm.create_model(..., exportable=True) or torch.onnx.export(dynamo=True) (DESIGN.md 5)"
        ) from None
    meta = {p.key: p.value for p in half.metadata_props}
    if CARD_METADATA_KEY in meta:
        card = ModelCard.from_json(meta[CARD_METADATA_KEY], f"{model} (metadata {CARD_METADATA_KEY})")
        card = card.with_extra(precision="fp16", fp32_onnx_sha256=file_sha256(model))
        kept = [p for p in half.metadata_props if p.key != CARD_METADATA_KEY]
        del half.metadata_props[:]
        half.metadata_props.extend(kept)
        entry = half.metadata_props.add()
        entry.key = CARD_METADATA_KEY
        entry.value = card.to_json()
    tmp = out.with_name(f".{out.name}.tmp")
    onnx.save(half, str(tmp))
    try:
        onnx.checker.check_model(str(tmp))
    except Exception as exc:  # noqa: BLE001
        tmp.unlink(missing_ok=True)
        raise ModelError(f"{model}: the FP16 copy does not pass the ONNX checker ({exc})") from None
    tmp.replace(out)
    log.info("wrote FP16 copy %s of %s", out, model)
    return out


def _shape_path_nodes(graph) -> list[str]:  # noqa: ANN001 - onnx GraphProto
    """Names of the nodes that compute on tensor shapes only, so they stay float32.

    timm's "same"-padding layers exported by the TorchScript exporter compute their pads at run time
    (Shape -> Gather -> Cast(float) -> Div -> Ceil ... -> Cast(int64) -> Pad). Converting that
    arithmetic to FP16 makes onnxconverter-common write Cast nodes whose declared and actual types
    disagree, and ONNX Runtime refuses the model; shape arithmetic is exact in float32 anyway. A node
    is on the shape path when every input is a constant or an output of Shape/another shape-path
    node. Nodes without names get one (the converter blocks by name).
    """
    constants = {t.name for t in graph.initializer}
    shape_values: set[str] = set()
    blocked: list[str] = []
    for i, node in enumerate(graph.node):
        if not node.name:
            node.name = f"_spinelevel_node_{i}"
        if node.op_type == "Constant":
            constants.update(node.output)
            continue
        inputs = [v for v in node.input if v]
        if node.op_type in ("Shape", "Size"):
            shape_values.update(node.output)
            blocked.append(node.name)
        elif inputs and all(v in shape_values or v in constants for v in inputs) and any(v in shape_values for v in inputs):
            shape_values.update(node.output)
            blocked.append(node.name)
    return blocked


def _run_ort(model: Path, batch: np.ndarray, output: str) -> np.ndarray:
    import onnxruntime as ort

    from spinelevel.engine.backends.onnxruntime import softmax

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    result = np.asarray(session.run(None, {name: np.ascontiguousarray(batch, dtype=np.float32)})[0], dtype=np.float32)
    result = result.reshape(result.shape[0], -1)
    return softmax(result) if output == "logits" else result


def compare_onnx(candidate: Path, reference: Path, batch: np.ndarray, output: str = "probabilities") -> Parity:
    """Run both ONNX models on ``batch`` with ONNX Runtime (CPU) and compare probabilities.

    Args:
        candidate: e.g. the FP16 copy.
        reference: e.g. the float32 model.
        batch: (n, C, H, W) float32 inputs.
        output: the card's ``output`` ("logits" gets a softmax before comparing).
    """
    return parity(_run_ort(candidate, batch, output), _run_ort(reference, batch, output))
