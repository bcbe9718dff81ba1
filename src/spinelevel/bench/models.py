"""Benchmark models: an untrained timm EfficientNetV2 exported through the real export path."""

from __future__ import annotations

from pathlib import Path

from spinelevel.card import ModelCard, sidecar_path

__all__ = ["untrained_checkpoint", "untrained_onnx", "toy_onnx"]


def untrained_checkpoint(arch: str, input_size: int, out_dir: Path) -> Path:
    """A checkpoint in the training format (safetensors + card) with freshly initialised weights.

    Untrained weights are fine for timing; BatchNorm statistics are those of initialisation.
    """
    import timm
    import torch
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{arch}_{input_size}.safetensors"
    if path.exists():
        return path
    torch.manual_seed(0)
    card = ModelCard(input_size=(input_size, input_size), output="logits", extra={"architecture": arch, "training": {"note": "untrained, for benchmarks"}})
    model = timm.create_model(arch, num_classes=len(card.classes), pretrained=False, exportable=True).eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    sidecar_path(path).write_text(card.to_json())
    return path


def untrained_onnx(arch: str, input_size: int, out_dir: Path) -> Path:
    """The untrained checkpoint exported to ONNX with ``spinelevel export``'s code (parity checked)."""
    from spinelevel.builders.onnx_export import ExportOptions, export_checkpoint

    onnx_path = out_dir / f"{arch}_{input_size}.onnx"
    if not onnx_path.exists():
        ckpt = untrained_checkpoint(arch, input_size, out_dir)
        export_checkpoint(ckpt, onnx_path, options=ExportOptions(parity_slices=4, tolerance=1e-3))
    return onnx_path


def toy_onnx(input_size: int, out_dir: Path) -> Path:
    """A model that costs almost nothing (mean per channel, one matrix, softmax), so decoding dominates.

    For timing the engine against the naive script (issue 17); its levels mean nothing.
    """
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from spinelevel.card import write_onnx_card

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"toy_{input_size}.onnx"
    if path.exists():
        return path
    card = ModelCard(input_size=(input_size, input_size), extra={"architecture": "toy-mean-linear", "training": {"note": "untrained, for benchmarks"}})
    n = len(card.classes)
    weights = np.random.default_rng(0).normal(size=(3, n)).astype(np.float32)
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, input_size, input_size])
    y = helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", n])
    nodes = [
        helper.make_node("ReduceMean", ["image"], ["mean"], axes=[2, 3], keepdims=0),
        helper.make_node("MatMul", ["mean", "w"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=1),
    ]
    graph = helper.make_graph(nodes, "toy", [x], [y], initializer=[numpy_helper.from_array(weights, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    write_onnx_card(path, card)
    return path
