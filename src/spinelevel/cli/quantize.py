"""`spinelevel quantize`: a static INT8 (QDQ) copy of an ONNX model, calibrated on real CT slices."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from spinelevel.cli import app
from spinelevel.cli._common import fail_cleanly, setup_logging, stderr

__all__ = ["quantize"]


@app.command("quantize")
def quantize(
    model: Annotated[Path, typer.Argument(help="Float32 ONNX model with a spinelevel card.", show_default=False)],
    calibration: Annotated[list[Path], typer.Option("--calibration", "-c", help="DICOM folder (phantom or real CT) whose slices calibrate the activation ranges; more folders may follow it or the option may be repeated.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The INT8 ONNX file to write (card kept, precision int8).")],
    more: Annotated[list[Path] | None, typer.Argument(help="More calibration folders (as in '--calibration A B').", show_default=False)] = None,
    slices: Annotated[int, typer.Option("--slices", min=1, help="Calibration slices: an equal share per folder, evenly spaced over its series.")] = 128,
    method: Annotated[str, typer.Option("--method", help="Calibration: minmax, entropy or percentile (entropy agreed best with FP32 on the demo model, BENCHMARKS.md; it holds every activation of the calibration slices in memory).")] = "minmax",
    per_tensor: Annotated[bool, typer.Option("--per-tensor", help="One weight scale per tensor instead of per output channel.")] = False,
    reduce_range: Annotated[bool, typer.Option("--reduce-range", help="7-bit weights, for CPUs without VNNI.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No summary.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    """Write an INT8 copy of an ONNX model (ONNX Runtime static quantisation, QDQ, per-channel weights)."""
    setup_logging(verbose)
    with fail_cleanly():
        from spinelevel.builders.quantize import QuantizeOptions, quantize_model

        options = QuantizeOptions(slices=slices, method=method, per_channel=not per_tensor, reduce_range=reduce_range)
        result = quantize_model(model, [*calibration, *(more or [])], out, options)
    if not quiet:
        stderr.print(
            f"wrote {result.path} ({result.path.stat().st_size / 1e6:.1f} MB, {result.n_qdq} Q/DQ nodes); "
            f"on the {result.n_calibration} calibration slices: argmax agreement with FP32 {result.argmax_agreement:.2%}, "
            f"max abs prob diff {result.max_abs_diff:.3g}. Judge it on held-out data before use."
        )
