"""`spinelevel export`: a training checkpoint to ONNX with its card, checked against PyTorch."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from spinelevel.cli import app
from spinelevel.cli._common import fail_cleanly, setup_logging, stderr

__all__ = ["export"]


@app.command("export")
def export(
    checkpoint: Annotated[Path, typer.Argument(help="A .safetensors checkpoint of 'spinelevel train' (its .card.json beside it).", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="The ONNX file to write (card embedded, softmax inside, dynamic batch).")],
    data: Annotated[list[Path] | None, typer.Option("--data", help="DICOM/phantom/NIfTI folders whose real slices check the export (default: phantom slices).")] = None,
    tolerance: Annotated[float, typer.Option("--tolerance", min=0.0, help="Largest accepted max |p_onnx - p_torch|.")] = 1e-4,
    opset: Annotated[int, typer.Option("--opset", min=13, help="ONNX opset.")] = 18,
    exporter: Annotated[str, typer.Option("--exporter", help="auto (dynamo, else legacy), dynamo or legacy.")] = "auto",
    slices: Annotated[int, typer.Option("--slices", min=1, help="Slices in the parity check.")] = 16,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No summary.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    """Export a checkpoint to ONNX (card embedded) and check ONNX Runtime against PyTorch."""
    setup_logging(verbose)
    with fail_cleanly():
        from spinelevel.training import require_torch

        require_torch()
        from spinelevel.builders.onnx_export import ExportOptions, export_checkpoint

        result = export_checkpoint(checkpoint, out, data or [], ExportOptions(opset=opset, exporter=exporter, tolerance=tolerance, parity_slices=slices))
    if not quiet:
        stderr.print(
            f"wrote {result.path} ({result.path.stat().st_size / 1e6:.1f} MB, {result.exporter} exporter); "
            f"ONNX Runtime vs PyTorch on {result.n_slices} slices: max abs prob diff {result.max_abs_diff:.2e} "
            f"(tolerance {tolerance:.0e})"
        )
