"""Which part of a single mid-L3 slice moves a model's call: an occlusion map per real CT case.

For every case folder under ``--cases`` (``scripts/real_ct_eval.py``'s ``OUT/cases``) that has the one-slice
series ``l3mid/L3MID.dcm``, the slice is preprocessed as the engine does (the model's card) and run once as it
is, then once per square patch of ``--patch`` input pixels (stride half a patch) with the patch replaced by its own
mean (so air stays air and tissue stays tissue, edges and texture go). The gain in p(L3) when a patch is hidden
says how much that region argued against L3.

Writes ``OUT.json`` (per case: the probabilities as is, the patch whose hiding raises p(L3) most, its position
in input pixels and the probabilities then) and ``OUT.png`` (the soft-tissue channel of each input, red where
hiding raises p(L3), blue where it lowers it, full colour at +-0.3).

Diagnostic only (issue 14, tests/data/real_ct/results_demo_v10.md).

Usage::

    python scripts/real_ct_eval.py --model demo --out real-ct-eval/
    python scripts/occlusion_map.py --model demo --cases real-ct-eval/cases --out occlusion
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from spinelevel.card import file_sha256, read_card
from spinelevel.errors import SpineLevelError
from spinelevel.models import resolve_model


def occlusion(x: np.ndarray, predict, patch: int) -> tuple[np.ndarray, list[tuple[int, int]], np.ndarray]:  # noqa: ANN001 - (N, C, H, W) -> (N, classes) probabilities
    """Probabilities of ``x`` (C, H, W) as is, the patch corners, and the probabilities with each patch hidden."""
    h, w = x.shape[1:]
    step = max(1, patch // 2)
    pos = [(y0, x0) for y0 in range(0, h, step) for x0 in range(0, w, step)]
    batch = np.repeat(x[None], len(pos), axis=0)
    for b, (y0, x0) in zip(batch, pos):
        region = b[:, y0:y0 + patch, x0:x0 + patch]
        region[...] = region.mean(axis=(1, 2), keepdims=True)
    return predict(x[None])[0], pos, predict(batch)


def gain_map(shape: tuple[int, int], pos: list[tuple[int, int]], p_hidden: np.ndarray, p0: np.ndarray, k: int, patch: int) -> np.ndarray:
    """Mean gain of class ``k``'s probability over the patches that cover each pixel."""
    gain = np.zeros(shape)
    count = np.zeros(shape)
    for (y0, x0), p in zip(pos, p_hidden):
        gain[y0:y0 + patch, x0:x0 + patch] += p[k] - p0[k]
        count[y0:y0 + patch, x0:x0 + patch] += 1
    return gain / np.maximum(count, 1)


def run(model: Path, cases: Path, patch: int) -> tuple[dict[str, Any], list[np.ndarray]]:
    import pydicom

    from spinelevel.engine.backends import load_backend
    from spinelevel.engine.decode import decode_hu
    from spinelevel.engine.preprocess import PreprocessSpec, preprocess_slice

    card = read_card(model)
    prep = PreprocessSpec.from_card(card)
    names = list(card.classes)
    k3 = names.index("L3")
    backend = load_backend("onnxruntime", model, card)  # the engine's runtime: probabilities whatever the card's output
    records, panels = [], []
    try:
        for case in sorted(p for p in cases.iterdir() if (p / "l3mid" / "L3MID.dcm").is_file()):
            ds = pydicom.dcmread(case / "l3mid" / "L3MID.dcm")
            x = preprocess_slice(decode_hu(ds), prep, tuple(float(v) for v in ds.PixelSpacing))
            p0, pos, ph = occlusion(x, backend.infer, patch)
            best = int(np.argmax(ph[:, k3]))
            gain = gain_map(x.shape[1:], pos, ph, p0, k3, patch)
            records.append({"case": case.name, "p": {n: round(float(v), 4) for n, v in zip(names, p0)},
                            "best_patch_row_col": list(pos[best]), "p_best_patch_hidden": {n: round(float(v), 4) for n, v in zip(names, ph[best])},
                            "gain_max": round(float(gain.max()), 4), "gain_min": round(float(gain.min()), 4)})
            base = np.clip((x[0] - x[0].min()) / (np.ptp(x[0]) + 1e-6), 0.0, 1.0)
            g = np.clip(gain / 0.3, -1.0, 1.0)
            panels.append(np.stack([0.6 * base + 0.4 * np.clip(g, 0, 1), 0.6 * base, 0.6 * base + 0.4 * np.clip(-g, 0, 1)], axis=-1))
    finally:
        backend.close()
    return {"model": model.name, "sha256": file_sha256(model), "patch_px": patch, "input_size": list(card.input_size), "cases": records}, panels


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="demo", help="ONNX model with a card, or 'demo' (the bundled model)")
    p.add_argument("--cases", type=Path, required=True, help="scripts/real_ct_eval.py's OUT/cases folder")
    p.add_argument("--patch", type=int, default=16, help="patch side in input pixels (default 16)")
    p.add_argument("--out", type=Path, required=True, help="writes OUT.json and OUT.png")
    p.add_argument("--no-png", action="store_true", help="write OUT.json only")
    args = p.parse_args(argv)
    try:
        model = resolve_model(args.model)
    except SpineLevelError as exc:
        print(f"occlusion_map: {exc}", file=sys.stderr)
        return 2
    if not model.is_file():
        print(f"occlusion_map: {model}: no such model file", file=sys.stderr)
        return 2
    if not args.cases.is_dir():
        print(f"occlusion_map: {args.cases}: no such folder", file=sys.stderr)
        return 2
    result, panels = run(model, args.cases, args.patch)
    if not panels:
        print(f"occlusion_map: {args.cases}: no case folder holds l3mid/L3MID.dcm", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    if not args.no_png:
        from PIL import Image

        img = np.concatenate([np.kron(q, np.ones((3, 3, 1))) for q in panels], axis=1)
        Image.fromarray((img * 255).astype(np.uint8)).save(args.out.with_suffix(".png"))
    for r in result["cases"]:
        print(f"{r['case']}: p(L3) {r['p']['L3']:.2f}, p(L4) {r['p']['L4']:.2f}; hiding the patch at {r['best_patch_row_col']}: "
              f"p(L3) {r['p_best_patch_hidden']['L3']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
