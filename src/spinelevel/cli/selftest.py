"""`spinelevel selftest`: check an inference path on this machine against ONNX Runtime."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from spinelevel.cli import app
from spinelevel.cli._common import fail_cleanly, setup_logging, stderr, stdout


class SelftestBackend(str, Enum):
    """--backend choices."""

    tensorrt = "tensorrt"
    torch = "torch"
    dali = "dali"
    onnxruntime = "onnxruntime"


@app.command("selftest")
def selftest(
    backend: Annotated[SelftestBackend, typer.Option("--backend", help="Path to check: tensorrt, torch, dali (preprocessing) or onnxruntime.")] = SelftestBackend.onnxruntime,
    slices: Annotated[int, typer.Option("--slices", help="Generated slices to push through.")] = 256,
    size: Annotated[int, typer.Option("--size", help="Model input size in pixels.")] = 64,
    batch: Annotated[int, typer.Option("--batch", help="Slices per inference call.")] = 32,
    device: Annotated[str | None, typer.Option("--device", help="torch only: 'cuda' (default) or 'cpu' (float32 check without a GPU).")] = None,
    workdir: Annotated[Path | None, typer.Option("--workdir", help="Keep the generated models here (default: a temporary directory).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    """Build or load a small model, run generated slices through BACKEND and ONNX Runtime, print a verdict.

    Exits 0 on PASS, 1 on FAIL or when something the path needs is missing (listed).
    """
    from spinelevel.selftest import SelftestOptions, result_json, run_selftest

    setup_logging(verbose)
    with fail_cleanly():
        options = SelftestOptions(backend=backend.value, slices=slices, size=size, batch=batch, device=device, workdir=workdir)
        result = run_selftest(options)
    if json_out:
        stdout.print_json(result_json(result))
    else:
        for key, value in result.details.items():
            stdout.print(f"  {key}: {value}", markup=False)
        stdout.print(result.verdict(), markup=False, soft_wrap=True)
    if not result.passed:
        stderr.print("[bold red]selftest failed:[/] the path disagrees with the reference beyond the bounds above")
        raise typer.Exit(1)
