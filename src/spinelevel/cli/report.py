"""`spinelevel report`: a review report (pictures per series and index.html) for an existing run."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from spinelevel.cli import app
from spinelevel.cli._common import fail_cleanly, setup_logging, stderr, terminate_as_interrupt

__all__ = ["ReportProgressBar", "report"]


class ReportProgressBar:
    """Rich progress bar over the series drawn (also for `spinelevel run --qc`)."""

    def __init__(self, enabled: bool) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=stderr,
            disable=not enabled,
        )
        self.task = None

    def __enter__(self) -> ReportProgressBar:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)

    def planned(self, series: int) -> None:
        self.task = self.progress.add_task("drawing series", total=series)

    def advanced(self, series: int) -> None:
        self.progress.update(self.task, advance=series)


@app.command("report")
def report(
    run_dir: Annotated[Path, typer.Argument(help="The --out directory of 'spinelevel run'.", show_default=False)],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Report folder (index.html, full/, thumbs/); default RUN_DIR/report.")] = None,
    metrics: Annotated[Path | None, typer.Option("--metrics", help="Output folder of 'spinelevel evaluate' to show (default: RUN_DIR/evaluation if present).")] = None,
    workers: Annotated[int | None, typer.Option("--workers", min=0, help="Processes drawing series (default: number of cores, at most 8; 0 draws in this process).")] = None,
    max_series: Annotated[int | None, typer.Option("--max-series", min=0, help="Draw pictures for at most N classified series, flagged series first (all are listed).")] = None,
    slab_mm: Annotated[float, typer.Option("--slab-mm", min=0.0, help="Thickness of the maximum-intensity slab of the sagittal and coronal views, mm.")] = 10.0,
    extracted: Annotated[list[Path] | None, typer.Option("--extracted", help="Folder of 'spinelevel extract' whose pick previews the page links (extracts recorded in RUN_DIR/extracted.json are linked anyway); repeatable.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar and no summary.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    """Draw sagittal/coronal level overlays and the L3 slice per series, and an index.html to review them.

    The DICOM files are re-read from where the run found them. Open REPORT/index.html in a browser
    (no server needed).
    """
    import os

    from spinelevel.report.build import ReportOptions, build_report
    from spinelevel.report.volume import VolumeOptions

    setup_logging(verbose)
    options = ReportOptions(
        metrics=metrics,
        workers=min(8, os.cpu_count() or 1) if workers is None else workers,
        max_series=max_series,
        volume=VolumeOptions(slab_mm=slab_mm),
        extracted=tuple(extracted or ()),
    )
    show = not quiet and stderr.is_terminal
    with fail_cleanly(), terminate_as_interrupt(), ReportProgressBar(show) as progress:
        summary = build_report(run_dir, out, options, progress)
    if not quiet:
        extra = f", {summary.not_drawn} not drawn (--max-series)" if summary.not_drawn else ""
        stderr.print(
            f"{summary.series} series: {summary.drawn} drawn, {summary.unavailable} with images unavailable{extra}; "
            f"{summary.skipped_files} skipped files listed; {summary.seconds:.1f} s"
        )
        stderr.print(f"open {summary.index}")
    sys.stdout.flush()
