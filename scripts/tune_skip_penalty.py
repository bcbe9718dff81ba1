"""Measure the sequence decoder's skip penalty on the stored probabilities of full-sampling runs.

``spinelevel run --sampling full`` keeps every slice's probabilities, so the decoding can be redone
offline with another ``skip_penalty`` (:func:`spinelevel.levels.decode_sequence`) and evaluated
with ``spinelevel evaluate``'s own code, without running the model again. Tune on studies that are
neither training nor test data (the demo model's recipe uses phantom seed 3000 for this).

Usage::

    spinelevel run TUNE --model demo --sampling full --out tune-full
    python scripts/tune_skip_penalty.py tune-full --labels TUNE/labels.parquet \\
        --vertebrae TUNE/vertebrae.parquet --penalty 0 1 2 4 8
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from spinelevel.levels import label_series
from spinelevel.training.evaluate import EvaluateOptions, evaluate_run

KEYS = ("accuracy_decoded", "l3_inside", "l3_within_5mm", "l3_within_10mm", "l3_error_mm_median", "l3_missed", "n_series", "n_slices")


def relabel(run_dir: Path, out: Path, skip_penalty: float) -> None:
    """Copy a full-sampling run with its levels and L3 picks decoded again with ``skip_penalty``."""
    shutil.copytree(run_dir, out)
    slices = pq.read_table(run_dir / "slices").to_pandas()
    series = pq.read_table(run_dir / "series").to_pandas()
    classes = [c[2:] for c in slices.columns if c.startswith("p_")]
    for uid, g in slices.groupby("series_uid"):
        g = g.sort_values("slice_index")
        result = label_series(g[[f"p_{c}" for c in classes]].to_numpy(), g["z_mm"].to_numpy(), classes, skip_penalty=skip_penalty)
        slices.loc[g.index, "level"] = list(result.levels)
        row = series.index[series["series_uid"] == uid]
        pick = result.l3_index
        series.loc[row, "l3_index"] = pick
        series.loc[row, "l3_z_mm"] = float(g["z_mm"].iloc[pick]) if pick is not None else None
        series.loc[row, "l3_sop_uid"] = g["sop_uid"].iloc[pick] if pick is not None else None
        series.loc[row, "l3_first_index"] = result.l3_first_index
        series.loc[row, "l3_last_index"] = result.l3_last_index
    for name, frame in (("slices", slices), ("series", series)):
        schema = pq.read_schema(next((run_dir / name).glob("*.parquet")))
        shutil.rmtree(out / name)
        (out / name).mkdir()
        pq.write_table(pa.Table.from_pandas(frame, schema=schema, preserve_index=False), out / name / "part-0.parquet")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--labels", type=Path, required=True)
    parser.add_argument("--vertebrae", type=Path)
    parser.add_argument("--penalty", type=float, nargs="+", default=[0.0, 1.0, 2.0, 4.0, 8.0])
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for penalty in args.penalty:
            run = Path(tmp) / f"run_{penalty}"
            relabel(args.run_dir, run, penalty)
            metrics = evaluate_run(run, args.labels, Path(tmp) / f"eval_{penalty}", EvaluateOptions(vertebrae=args.vertebrae, plot=False))
            rows.append({"skip_penalty": penalty, **{k: metrics.get(k) for k in KEYS}})
    print(json.dumps({"run": str(args.run_dir), "labels": str(args.labels), "results": rows}, indent=2))


if __name__ == "__main__":
    main()
