"""`spinelevel evaluate`: compare a run's output with labels (accuracy, confusion matrix, L3 error)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from spinelevel.cli import app
from spinelevel.cli._common import fail_cleanly, setup_logging, stderr, stdout

__all__ = ["evaluate"]


@app.command("evaluate")
def evaluate(
    run_dir: Annotated[Path, typer.Argument(help="The --out directory of 'spinelevel run'.", show_default=False)],
    labels: Annotated[Path, typer.Option("--labels", "-l", help="Labels table (Parquet/CSV: series_uid, sop_uid, level [, z_mm]).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Where metrics.json, per_series.csv and confusion_matrix.png go.")],
    vertebrae: Annotated[Path | None, typer.Option("--vertebrae", help="vertebrae.parquet (phantom) with labelled vertebra extents for the L3 check.")] = None,
    no_plot: Annotated[bool, typer.Option("--no-plot", help="Do not draw confusion_matrix.png.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No summary.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    """Measure a run against labels and write metrics.json, per_series.csv and confusion_matrix.png."""
    from spinelevel.training.evaluate import EvaluateOptions, evaluate_run

    setup_logging(verbose)
    with fail_cleanly():
        m = evaluate_run(run_dir, labels, out, EvaluateOptions(vertebrae=vertebrae, plot=not no_plot))
    if not quiet:
        stdout.print(json.dumps({k: m[k] for k in ("n_series", "n_slices", "accuracy_decoded", "accuracy_argmax", "l3_within_5mm", "l3_within_10mm", "l3_error_mm_median")}, indent=None).replace("NaN", "null"))
        stderr.print(f"metrics in {out / 'metrics.json'}")
