"""Uniform weight soup of fine-tunes of one model (issue 14, results_demo_v6.md): the average of their weights.

Every input is a ``spinelevel train`` checkpoint (``.safetensors`` with its card) or an exported
spinelevel ONNX model of the same timm architecture (loaded as ``--pretrained`` does: BatchNorm
folded into the convolutions). Fine-tunes of one model with frozen BatchNorm share that
parameterisation, so their average is a model of the same size and speed. Writes a checkpoint with
the first checkpoint input's card; export it with ``spinelevel export``.

Usage::

    python scripts/weight_soup.py levels_demo_v5ft.onnx demo-work/v6ft/best.safetensors \\
        demo-work/v6ctl/best.safetensors --arch tf_efficientnetv2_b0 --out demo-work/soup/best.safetensors
    spinelevel export demo-work/soup/best.safetensors --out soup.onnx --data demo-work/test
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path


def main() -> None:
    import torch
    from safetensors.torch import load_file, save_file

    from spinelevel.training.onnx_init import state_from_onnx
    from spinelevel.training.train import create_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("inputs", nargs="+", type=Path, help="checkpoints (.safetensors) or exported models (.onnx)")
    ap.add_argument("--arch", default="tf_efficientnetv2_b0", help="timm architecture of the inputs")
    ap.add_argument("--classes", type=int, default=7)
    ap.add_argument("--out", type=Path, required=True, help="output checkpoint (.safetensors; its card beside it)")
    a = ap.parse_args()
    states = []
    card = None
    for path in a.inputs:
        if path.suffix == ".onnx":
            model = create_model(a.arch, a.classes)
            state_from_onnx(model, path)
            states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        else:
            states.append(load_file(str(path)))
            card = card or Path(str(path) + ".card.json")
    if card is None or not card.is_file():
        ap.error("give at least one .safetensors checkpoint (its card is the soup's)")
    keys = set(states[0])
    for path, state in zip(a.inputs, states):
        if set(state) != keys or any(state[k].shape != states[0][k].shape for k in keys):
            ap.error(f"{path}: not the same architecture as {a.inputs[0]}")
    soup = {}
    for k in states[0]:
        if states[0][k].is_floating_point():
            soup[k] = (sum(s[k].to(torch.float64) for s in states) / len(states)).to(states[0][k].dtype).contiguous()
        else:
            soup[k] = states[0][k].contiguous()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(soup, str(a.out))
    shutil.copy(card, Path(str(a.out) + ".card.json"))
    print(f"wrote {a.out}: the average of {len(states)} models")


if __name__ == "__main__":
    main()
