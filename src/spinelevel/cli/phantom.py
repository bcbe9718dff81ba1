"""`spinelevel phantom OUT`: write synthetic CT studies with known vertebral levels as DICOM."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from spinelevel.cli import app
from spinelevel.cli._common import fail_cleanly, stdout


class Compression(str, Enum):
    """Pixel-data encodings offered on the command line (all lossless)."""

    none = "none"
    rle = "rle"
    jpeg2000 = "jpeg2000"
    jpegls = "jpegls"
    mixed = "mixed"


@app.command("phantom")
def phantom(
    out: Annotated[Path, typer.Argument(help="New or empty folder for the studies, labels.parquet and vertebrae.parquet.")],
    studies: Annotated[int, typer.Option("--studies", min=1, help="Number of studies.")] = 4,
    seed: Annotated[int, typer.Option("--seed", min=0, help="Seed; the same seed and options give the same files.")] = 0,
    size: Annotated[int, typer.Option("--size", min=64, max=1024, help="Rows and columns of each axial image.")] = 512,
    compression: Annotated[Compression, typer.Option("--compression", help="Lossless pixel encoding; 'mixed' picks one per series.")] = Compression.none,
    workers: Annotated[int, typer.Option("--workers", min=1, help="Processes over studies (the output does not depend on it).")] = 1,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Write synthetic CT studies (DICOM) with the level of every slice in OUT/labels.parquet."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from spinelevel.phantom import PhantomOptions, generate

    with fail_cleanly():
        options = PhantomOptions(studies=studies, seed=seed, size=size, compression=compression.value)
        if quiet:
            summary = generate(out, options, workers=workers)
        else:
            columns = (TextColumn("phantom"), BarColumn(), MofNCompleteColumn(), TextColumn("slices"), TimeElapsedColumn())
            with Progress(*columns, console=stdout, transient=True) as bar:
                # the total is unknown until every study is planned; plan cheaply first
                from spinelevel.phantom import plan_study

                total = sum(len(s.z) for i in range(studies) for s in plan_study(options, i).series)
                task = bar.add_task("phantom", total=total)
                summary = generate(out, options, workers=workers, progress=lambda n: bar.advance(task, n))
    stdout.print(
        f"wrote {summary.studies} studies, {summary.series} series, {summary.slices} slices "
        f"({summary.files} files) to {summary.out} in {summary.seconds:.1f} s "
        f"({summary.slices_per_second:.0f} slices/s)"
    )
