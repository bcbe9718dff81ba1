"""Where a model finds its (wrong) evidence on real CT slices: an occlusion test (issue 14's diagnosis).

For the slices of a ``scripts/real_ct_eval.py`` case whose label is TRUTH and whose argmax is CALLED
(e.g. ``T:L1``: thoracic slices read as L1), up to three of them: average one 16 x 16 patch of the
model input at a time (every channel) and record how much p(CALLED) drops. Prints the five patches
that carry most of that evidence per slice and writes a picture (input, red where the patch
carried evidence). Validation data only: for looking, nothing here trains on it.

Usage (after ``python scripts/real_ct_eval.py --model demo --out real-ct-eval/``)::

    python scripts/occlusion.py real-ct-eval/cases/totalseg_example_ct real-ct-eval/runs/totalseg_example_ct/run T:L1 --out occlusion.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def main() -> None:
    import onnxruntime as ort
    import pandas as pd
    import pyarrow.dataset as ds
    import pydicom
    from PIL import Image

    from spinelevel.card import read_card
    from spinelevel.engine.preprocess import PreprocessSpec, preprocess_slice
    from spinelevel.levels import CLASSES
    from spinelevel.models import resolve_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("case", type=Path, help="a case folder of scripts/real_ct_eval.py (dicom/ and labels.parquet)")
    parser.add_argument("run", type=Path, help="a 'spinelevel run --sampling full' output of that case")
    parser.add_argument("which", help="TRUTH:CALLED, e.g. T:L1")
    parser.add_argument("--model", default="demo")
    parser.add_argument("--patch", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("occlusion.png"))
    args = parser.parse_args()
    truth, called = args.which.split(":")
    model = resolve_model(args.model)
    spec = PreprocessSpec.from_card(read_card(model))
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def probs(x: np.ndarray) -> np.ndarray:  # the exported models end in a softmax
        return session.run(None, {name: x.astype(np.float32)})[0]

    labels = pd.read_parquet(args.case / "labels.parquet")[["sop_uid", "level", "path"]].rename(columns={"level": "truth"})
    slices = ds.dataset(args.run / "slices", format="parquet").to_table().to_pandas().merge(labels, on="sop_uid")
    rows = slices[(slices.truth == truth) & (slices.level_argmax == called)].sort_values("slice_index")
    print(f"{len(rows)} slices labelled {truth} with argmax {called}")
    tiles = []
    p = args.patch
    for _, r in rows.iloc[:: max(1, len(rows) // 3)].head(3).iterrows():
        image = pydicom.dcmread(args.case / r.path)
        hu = image.pixel_array * float(image.RescaleSlope) + float(image.RescaleIntercept)
        x = preprocess_slice(hu.astype(np.float32), spec, tuple(float(v) for v in image.PixelSpacing))
        p0 = probs(x[None])[0]
        _, h, w = x.shape
        batch = []
        for i in range(0, h, p):
            for j in range(0, w, p):
                y = x.copy()
                y[:, i : i + p, j : j + p] = y[:, i : i + p, j : j + p].mean(axis=(1, 2), keepdims=True)
                batch.append(y)
        occluded = np.concatenate([probs(np.stack(batch[k : k + 16])) for k in range(0, len(batch), 16)])
        drop = (p0[CLASSES.index(called)] - occluded[:, CLASSES.index(called)]).reshape(h // p, w // p)
        top = np.argsort(-drop.ravel())[:5]
        print(f"slice {r.slice_index}: p {dict(zip(CLASSES, (round(float(v), 3) for v in p0)))}; patches (row, col, drop of p_{called}): "
              + ", ".join(f"({k // (w // p)}, {k % (w // p)}, {drop.flat[k]:.3f})" for k in top))
        img = (x[0] - x[0].min()) / (np.ptp(x[0]) + 1e-6)
        heat = np.kron(np.clip(drop / max(float(drop.max()), 1e-6), 0, 1), np.ones((p, p)))
        tiles.append((np.stack([np.clip(img + 0.6 * heat, 0, 1), img, img], -1) * 255).astype(np.uint8))
    if tiles:
        picture = np.concatenate(tiles, axis=1)
        Image.fromarray(picture).resize((picture.shape[1] * 3, picture.shape[0] * 3), Image.NEAREST).save(args.out)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
