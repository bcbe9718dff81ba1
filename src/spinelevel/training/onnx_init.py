"""Initialise a timm model from an ONNX file that ``spinelevel export`` wrote, to fine-tune it.

The exporter folds every BatchNorm into the convolution before it (ONNX ``Conv`` with a bias, no
``BatchNormalization`` node). Loading such weights back gives each convolution its folded weight and
makes its BatchNorm the identity: ``running_mean = 0``, ``running_var = 1 - eps`` (so that
``sqrt(var + eps) = 1``), ``weight = 1`` and ``bias`` = the folded bias. In eval mode the model then
computes exactly what the ONNX graph computes (checked against ONNX Runtime by :func:`state_from_onnx`);
training such a model must keep BatchNorm in eval mode (``TrainConfig.freeze_bn``), because batch
statistics would replace the identity.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from spinelevel.errors import ModelError

__all__ = ["state_from_onnx"]

log = logging.getLogger(__name__)

# Which BatchNorm follows a convolution in timm's EfficientNet blocks (attribute names in one module).
_BN_AFTER = {"conv_stem": "bn1", "conv_head": "bn2", "conv": "bn1", "conv_exp": "bn1", "conv_pw": "bn1", "conv_dw": "bn2"}


def _constants(graph: Any) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    out = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute:
            attr = node.attribute[0]
            if attr.name == "value":
                out[node.output[0]] = numpy_helper.to_array(attr.t)
    return out


def _bn_name(model: Any, conv_name: str) -> str | None:
    parent_name, _, attr = conv_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if attr == "conv_pwl":
        return f"{parent_name}.bn3" if hasattr(parent, "bn3") else f"{parent_name}.bn2"
    bn = _BN_AFTER.get(attr)
    if bn is None or not hasattr(parent, bn):
        return None
    return f"{parent_name}.{bn}" if parent_name else bn


def state_from_onnx(model: Any, onnx_path: Path, check: bool = True) -> dict[str, int]:
    """Load the weights of ``onnx_path`` into the timm ``model`` (in place); returns counts.

    Raises:
        ModelError: the ONNX graph does not fit the model, or (``check``) the loaded model does not
            reproduce ONNX Runtime's output.
    """
    import onnx
    import torch

    graph = onnx.load(str(onnx_path)).graph
    consts = _constants(graph)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    loaded = 0
    for node in graph.node:
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 2:
            continue
        wname = node.input[1]
        name = wname.removeprefix("inner.").removesuffix(".weight")
        if node.op_type == "Gemm":
            name = name if f"{name}.weight" in state else "classifier"
        if f"{name}.weight" not in state or wname not in consts:
            raise ModelError(f"{onnx_path}: {node.op_type} weight {wname} has no place in {type(model).__name__}; was it exported from this architecture?")
        weight = torch.from_numpy(np.array(consts[wname], dtype=np.float32))
        if tuple(weight.shape) != tuple(state[f"{name}.weight"].shape):
            raise ModelError(f"{onnx_path}: {wname} has shape {tuple(weight.shape)}, the model expects {tuple(state[name + '.weight'].shape)}")
        state[f"{name}.weight"] = weight
        loaded += 1
        bias = torch.from_numpy(np.array(consts[node.input[2]], dtype=np.float32)) if len(node.input) > 2 and node.input[2] in consts else None
        if f"{name}.bias" in state:  # SE convolutions and the classifier carry their own bias
            if bias is not None:
                state[f"{name}.bias"] = bias
            continue
        bn = _bn_name(model, name)
        if bn is None:
            raise ModelError(f"{onnx_path}: no BatchNorm after {name} in {type(model).__name__}")
        module = model.get_submodule(bn)
        n = state[f"{bn}.weight"].shape[0]
        state[f"{bn}.weight"] = torch.ones(n)
        state[f"{bn}.bias"] = bias if bias is not None else torch.zeros(n)
        state[f"{bn}.running_mean"] = torch.zeros(n)
        state[f"{bn}.running_var"] = torch.full((n,), 1.0 - float(module.eps))
    model.load_state_dict(state)
    if check:
        _check_against_onnx(model, onnx_path)
    log.info("initialised %s from %s: %d weight tensors (BatchNorm folded: identity)", type(model).__name__, onnx_path, loaded)
    return {"loaded": loaded, "new": 0}


def _check_against_onnx(model: Any, onnx_path: Path) -> None:
    import onnxruntime as ort
    import torch

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    inp = session.get_inputs()[0]
    size = [int(d) if isinstance(d, int) else 1 for d in inp.shape]
    size[0] = 2
    x = np.random.default_rng(0).random(size, dtype=np.float32)
    expected = session.run(None, {inp.name: x})[0]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        got = torch.softmax(model(torch.from_numpy(x)), dim=1).numpy()
    model.train(was_training)
    diff = float(np.abs(got - expected).max())
    if not diff <= 1e-4:
        raise ModelError(f"{onnx_path}: the model initialised from it differs from ONNX Runtime by {diff:.3g} (tolerance 1e-4)")
