"""`spinelevel build`: an FP16 TensorRT engine (with its sidecar card) from an ONNX model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from spinelevel.cli import app
from spinelevel.cli._common import fail_cleanly, setup_logging, stdout


@app.command("build")
def build(
    model: Annotated[Path, typer.Argument(help="Float32 ONNX model with a spinelevel card (dynamic batch axis).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Engine file to write (MODEL.engine); its card goes to OUT.card.json.")],
    max_batch: Annotated[int, typer.Option("--max-batch", help="Largest batch the engine accepts.")] = 32,
    opt_batch: Annotated[int, typer.Option("--opt-batch", help="Batch size the kernels are tuned for.")] = 16,
    workspace_gb: Annotated[float, typer.Option("--workspace-gb", help="Builder scratch memory in GiB.")] = 4.0,
    timing_cache: Annotated[Path | None, typer.Option("--timing-cache", help="Timing cache file: loaded if present, saved after the build (faster rebuilds).")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    """Build an FP16 TensorRT engine for this GPU (FP16 flag on TensorRT 10, strongly typed FP16 ONNX on 11)."""
    from spinelevel.builders.tensorrt import EngineBuildOptions, build_engine
    from spinelevel.card import sidecar_path

    setup_logging(verbose)
    with fail_cleanly():
        options = EngineBuildOptions(max_batch=max_batch, opt_batch=opt_batch, workspace_gb=workspace_gb, timing_cache=timing_cache)
        written = build_engine(model, out, options)
    stdout.print(f"engine written: {written} (card {sidecar_path(written)})")
