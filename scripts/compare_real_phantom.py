"""Real CT next to phantoms, level by level, as the model sees them (issue 14's diagnosis picture).

One row per level (T12, L1..L5, S1): the middle labelled slice of a real case (its three card windows), then
the soft-tissue channel of the middle slice of that level in a few phantom studies, all after the
card's preprocessing (field of view, windows, resize). Uses a case folder that
``scripts/real_ct_eval.py`` wrote (``OUT/cases/totalseg_example_ct``). Validation data only: the
picture is for looking, nothing here trains on it.

Usage::

    python scripts/compare_real_phantom.py real-ct-eval/cases/totalseg_example_ct --out compare.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

LEVELS = ("T12", "L1", "L2", "L3", "L4", "L5", "S")


def main() -> None:
    import pandas as pd
    import pydicom
    from PIL import Image

    from spinelevel.card import read_card
    from spinelevel.engine.preprocess import PreprocessSpec, preprocess_slice
    from spinelevel.models import resolve_model
    from spinelevel.phantom import Anatomy, PhantomOptions, plan_study
    from spinelevel.phantom.anatomy import add_noise, noise_bank

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("case", type=Path, help="a case folder of scripts/real_ct_eval.py (dicom/ and labels.parquet)")
    parser.add_argument("--model", default="demo", help="model whose card gives the preprocessing")
    parser.add_argument("--seed", type=int, default=1400)
    parser.add_argument("--studies", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("compare_real_phantom.png"))
    args = parser.parse_args()
    spec = PreprocessSpec.from_card(read_card(resolve_model(args.model)))

    def model_input(hu: np.ndarray, spacing: tuple[float, float]) -> np.ndarray:
        return (preprocess_slice(hu.astype(np.float32), spec, spacing) * 255).astype(np.uint8)

    labels = pd.read_parquet(args.case / "labels.parquet")
    real = []
    for level in LEVELS:
        rows = labels[labels.level == ("T" if level == "T12" else level)].sort_values("z_mm", ascending=False)
        rows = rows.iloc[: max(1, len(rows) // 3)] if level == "S" else rows  # S1, not the lower sacrum
        rows = rows.iloc[-max(1, len(rows) // 3) :] if level == "T12" else rows  # the lowest thoracic slices
        ds = pydicom.dcmread(args.case / rows.iloc[len(rows) // 2]["path"])
        hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        x = model_input(hu, tuple(float(v) for v in ds.PixelSpacing))
        real.append(np.concatenate(list(x), axis=1))
    columns = [real]
    for i in range(args.studies):
        study = plan_study(PhantomOptions(size=256, seed=args.seed, studies=args.studies), i)
        anatomy = Anatomy(study)
        rng = np.random.default_rng(i)
        bank = noise_bank(rng, study.size, 1)
        col = []
        for level in LEVELS:
            v = study.vertebra("S1" if level == "S" else level)
            hu = add_noise(anatomy.render((v.top_z + v.bottom_z) / 2), bank, rng, study.series[0].noise_sigma)
            col.append(model_input(hu, (study.pixel_spacing, study.pixel_spacing))[0])
        columns.append(col)
    image = np.concatenate([np.concatenate([c[k] for c in columns], axis=1) for k in range(len(LEVELS))], axis=0)
    Image.fromarray(image).resize((image.shape[1] * 2, image.shape[0] * 2), Image.NEAREST).save(args.out)
    print(f"wrote {args.out}: rows {', '.join(LEVELS)}; real case (3 windows), then {args.studies} phantoms of seed {args.seed}")


if __name__ == "__main__":
    main()
