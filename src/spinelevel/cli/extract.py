"""`spinelevel extract`: copy the level picks of a run, with a Key Object Selection per series, for the next tool."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from spinelevel.cli import app
from spinelevel.cli._common import fail_cleanly, setup_logging, stderr, terminate_as_interrupt

__all__ = ["ExtractProgressBar", "extract", "parse_levels", "print_extract_summary"]

# Per-series reasons printed under the summary line (all of them are in DIR/skipped.parquet).
_MAX_REASONS = 20


class ExtractProgressBar:
    """Rich progress bar over the series extracted (also for `spinelevel run --extract`)."""

    def __init__(self, enabled: bool) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=stderr, disable=not enabled)
        self.task = None

    def __enter__(self) -> ExtractProgressBar:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)

    def planned(self, series: int) -> None:
        self.task = self.progress.add_task("extracting series", total=series)

    def advanced(self, series: int) -> None:
        self.progress.update(self.task, advance=series)


def parse_levels(text: str) -> tuple[str, ...]:
    """``"L3,L1"`` -> ``("L3", "L1")`` (spaces and empty items ignored)."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def print_extract_summary(summary) -> None:  # noqa: ANN001 - ExtractSummary
    """One summary line, then one line per thing left out (at most a screenful)."""
    s = summary
    extra = f", {s.flagged} of them flagged (flags in the manifest)" if s.flagged else ""
    current = s.instances + s.kos + s.pngs - s.written
    written = f"{s.written} files written" + (f", {current} already up to date" if current > 0 else "")
    stderr.print(
        f"extract: {s.series} series, {s.instances} instances ({written}), "
        f"{s.kos} KOS, {s.pngs} previews{extra}; {len(s.skipped)} left out; {s.seconds:.1f} s; manifest {s.manifest}",
        soft_wrap=True,
        highlight=False,
        markup=False,
    )
    for skip in s.skipped[:_MAX_REASONS]:
        where = " ".join(x for x in (skip.series_uid or "", skip.level or "", "" if skip.offset is None else f"{skip.offset:+d}") if x)
        stderr.print(f"  {where}: {skip.reason}", soft_wrap=True, highlight=False, markup=False)
    if len(s.skipped) > _MAX_REASONS:
        stderr.print(f"  ... {len(s.skipped) - _MAX_REASONS} more in {s.out / 'skipped.parquet'}", soft_wrap=True, highlight=False, markup=False)


@app.command("extract")
def extract(
    run_dir: Annotated[Path, typer.Argument(help="The --out directory of 'spinelevel run'.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Extract folder: <study>/<series>/<level>_<offset>.dcm copies, kos.dcm, previews, manifest.parquet.", show_default=False)],
    levels: Annotated[str, typer.Option("--levels", help="Levels to extract, comma-separated classes of the model card (L3: the run's L3 pick; others: the middle slice of the level's run).")] = "L3",
    neighbours: Annotated[int, typer.Option("--neighbours", min=0, help="Also copy N slices on each side of every pick (fewer at the ends of a series).")] = 0,
    kos: Annotated[bool, typer.Option("--kos/--no-kos", help="Write a DICOM Key Object Selection document per series referencing its picks.")] = True,
    png: Annotated[bool, typer.Option("--png/--no-png", help="Write a PNG preview per pick (soft-tissue window, level and z in the corner).")] = True,
    skip_flagged: Annotated[bool, typer.Option("--skip-flagged", help="Leave out series with a doubt flag (low_confidence, short_l3, ...); they are listed in skipped.parquet.")] = False,
    kos_title: Annotated[str, typer.Option("--kos-title", help="KOS document title, a CID 7010 keyword: ForSegmentation, ForResearch, OfInterest, ...")] = "ForSegmentation",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar and no summary.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    """Copy the chosen slices of a run byte for byte, with a KOS document and a preview per pick, for body-composition tools.

    Copies keep the original DICOM header (patient identity included: the next tool needs it);
    manifest.parquet, the previews and this summary carry no patient identity.
    """
    from spinelevel.extract import ExtractOptions, extract_run

    setup_logging(verbose)
    options = ExtractOptions(levels=parse_levels(levels), neighbours=neighbours, kos=kos, png=png, skip_flagged=skip_flagged, kos_title=kos_title)
    show = not quiet and stderr.is_terminal
    with fail_cleanly(), terminate_as_interrupt(), ExtractProgressBar(show) as bar:
        summary = extract_run(run_dir, out, options, bar)
    if not quiet:
        print_extract_summary(summary)
    sys.stdout.flush()
