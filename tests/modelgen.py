"""A tiny ONNX classifier with a spinelevel card, built with onnx.helper (no torch).

It averages the first input channel (the soft-tissue window of the slice) and scores each class by
``-sharpness * (mean - center_k)^2``, so a slice written at ``dicomgen.LEVEL_HU[level]`` is
classified as that level. ``reference_probs`` computes the same function in numpy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from dicomgen import CLASSES, LEVEL_HU
from spinelevel.card import ModelCard, write_onnx_card

WINDOWS = ((40.0, 400.0), (400.0, 1800.0), (-600.0, 1500.0))
SHARPNESS = 400.0


def centers() -> np.ndarray:
    c, w = WINDOWS[0]
    return np.asarray([np.clip((LEVEL_HU[k] - (c - w / 2)) / w, 0, 1) for k in CLASSES], dtype=np.float32)


def make_card(input_size: int = 32, output: str = "probabilities") -> ModelCard:
    return ModelCard(classes=CLASSES, input_size=(input_size, input_size), windows=WINDOWS, output=output, extra={"architecture": "test-nearest-center"})


def build_model(path: Path, input_size: int = 32, output: str = "probabilities", card: bool = True, fixed_batch: int | None = None) -> Path:
    """Write the model (with its card unless ``card`` is False)."""
    batch = fixed_batch if fixed_batch else "N"
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, [batch, 3, input_size, input_size])
    y = helper.make_tensor_value_info("probs", TensorProto.FLOAT, [batch, len(CLASSES)])
    select = numpy_helper.from_array(np.asarray([[1.0], [0.0], [0.0]], dtype=np.float32), "select")
    ctr = numpy_helper.from_array(centers()[None, :], "centers")
    neg = numpy_helper.from_array(np.asarray([-SHARPNESS], dtype=np.float32), "neg")
    nodes = [
        helper.make_node("ReduceMean", ["image"], ["mean"], axes=[2, 3], keepdims=0),
        helper.make_node("MatMul", ["mean", "select"], ["m0"]),
        helper.make_node("Sub", ["m0", "centers"], ["d"]),
        helper.make_node("Mul", ["d", "d"], ["d2"]),
        helper.make_node("Mul", ["d2", "neg"], ["logits"]),
    ]
    if output == "probabilities":
        nodes.append(helper.make_node("Softmax", ["logits"], ["probs"], axis=1))
    else:
        nodes.append(helper.make_node("Identity", ["logits"], ["probs"]))
    graph = helper.make_graph(nodes, "nearest_center", [x], [y], initializer=[select, ctr, neg])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    if card:
        write_onnx_card(path, make_card(input_size, output))
    return path


def reference_probs(batch: np.ndarray) -> np.ndarray:
    """The model's function in numpy: (n, 3, H, W) -> (n, 7)."""
    m = batch[:, 0].mean(axis=(1, 2))
    logits = -SHARPNESS * (m[:, None] - centers()[None, :]) ** 2
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)
