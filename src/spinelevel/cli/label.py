"""`spinelevel label`: a labels table for one series from its disc positions, and a preview to read them off."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from spinelevel.cli import app
from spinelevel.cli._common import fail_cleanly, setup_logging, stderr, stdout

__all__ = ["label"]


def _choose(plans, series: str | None, paths: list[Path]):  # noqa: ANN001, ANN202 - engine SeriesPlan
    from spinelevel.errors import InputError

    if series:
        hits = [p for p in plans if p.series_uid == series] or [p for p in plans if p.series_uid.startswith(series)]
        if len(hits) != 1:
            known = ", ".join(p.series_uid for p in plans) or "none"
            raise InputError(f"--series {series}: {'no' if not hits else 'more than one'} series matches (series found: {known})")
        return hits[0]
    if len(plans) == 1:
        return plans[0]
    listing = "; ".join(f"{p.series_uid} ({len(p.slices)} slices, z {p.slices[0].z_mm:g} to {p.slices[-1].z_mm:g})" for p in plans)
    raise InputError(f"{', '.join(map(str, paths))}: {len(plans)} series; choose one with --series UID: {listing}")


@app.command("label")
def label(
    paths: Annotated[list[Path], typer.Argument(help="DICOM files, folders or archives holding the series.", show_default=False)],
    discs: Annotated[str | None, typer.Option("--discs", "-d", help="Patient z (mm) of the discs in view: T12/L1=Z,L1/L2=Z,L2/L3=Z,L3/L4=Z,L4/L5=Z,L5/S1=Z (every one between the outermost two).")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Labels table to write (Parquet, or CSV by suffix); an existing table keeps its other series.")] = None,
    preview: Annotated[Path | None, typer.Option("--preview", help="PNG: sagittal and coronal reconstructions with a patient-z ruler (and the labels, with --discs).")] = None,
    series: Annotated[str | None, typer.Option("--series", help="SeriesInstanceUID (or a unique prefix) when the paths hold more than one series.")] = None,
    suggest: Annotated[bool, typer.Option("--suggest", help="Find likely disc positions (dark gaps between the vertebral bodies on the midline), print them and mark them on --preview; which is which is yours to decide.")] = False,
    margin: Annotated[float, typer.Option("--margin", help="Slices within this many mm of a disc are excluded (null level).", min=0.0)] = 4.0,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    """Label every slice of a series from the positions of its discs, for training or evaluation.

    Read the patient z of the discs in a viewer, or off the ruler of --preview (--suggest marks
    where the discs probably are: name them by counting from the sacrum or the last rib); then --discs gives
    each slice the level between its discs (T above T12/L1, S below L5/S1) and excludes slices
    within --margin mm of a disc. The table works with 'spinelevel train --labels/--mix-in' and
    'spinelevel evaluate --labels'.
    """
    from collections import Counter

    from spinelevel.engine.scan import scan_paths
    from spinelevel.engine.select import SelectOptions, select_series
    from spinelevel.errors import InputError
    from spinelevel.levels import CLASSES
    from spinelevel.training.discs import DiscOptions, label_rows, levels_from_discs, parse_discs, write_labels

    setup_logging(verbose)
    with fail_cleanly():
        if discs is not None and out is None:
            raise InputError("--discs needs --out (the labels table to write)")
        if out is not None and discs is None:
            raise InputError("--out needs --discs (the disc positions to label from)")
        if discs is None and preview is None and not suggest:
            raise InputError("nothing to do: give --discs with --out (write labels), --preview (draw the series) and/or --suggest")
        given = parse_discs(discs) if discs is not None else None
        missing = [str(p) for p in paths if not p.exists()]
        if missing:
            raise InputError(f"not found: {', '.join(missing)}")
        selection = select_series(scan_paths(paths), SelectOptions(min_slices=1))  # a short series may be labelled too
        if not selection.plans:
            why = "; ".join(f"{s.series_uid}: {s.reason}" for s in selection.skipped_series[:5]) or f"{len(selection.skipped_files)} file(s), none a usable CT image"
            raise InputError(f"{', '.join(map(str, paths))}: no classifiable series ({why})")
        plan = _choose(selection.plans, series, paths)
        if any(ref.frame is not None for ref in plan.slices):
            raise InputError(f"series {plan.series_uid} is multi-frame (Enhanced CT): a labels table names slices by SOPInstanceUID, "
                             "which its frames share, so it cannot label them one by one")
        z = [ref.z_mm for ref in plan.slices]
        sources = [ref.source.label for ref in plan.slices]
        levels: list[str | None] = [None] * len(z)
        marks: list[float] = []
        if suggest:
            from spinelevel.report.volume import read_midline
            from spinelevel.training.discs import suggest_discs

            mid = read_midline(tuple(sources))
            found = suggest_discs(mid.lines, z, mid.row_mm, mid.body_row)
            marks = [zd for zd, _ in found]
            stdout.print("suggested discs, superior first (z mm, prominence HU): "
                         + (", ".join(f"{zd:.1f} ({p:.0f})" for zd, p in found) or "none found"), soft_wrap=True, highlight=False)
        if given is not None:
            assert out is not None
            levels = levels_from_discs(z, given, DiscOptions(margin_mm=margin))
            counts = write_labels(out, label_rows(plan.study_uid, plan.series_uid, plan.slices, levels))
            per = Counter(levels)
            stdout.print(f"series {plan.series_uid}: {len(z)} slices, z {z[0]:.1f} to {z[-1]:.1f} mm; "
                         + ", ".join(f"{c} {per[c]}" for c in CLASSES if per[c]) + f", excluded {per[None]}", soft_wrap=True, highlight=False)
            stderr.print(f"labels in {out} ({counts['written']} rows written, {counts['replaced']} replaced, {counts['kept']} of other series kept)", soft_wrap=True)
        if preview is not None:
            from spinelevel.report.preview import draw_preview

            title = f"{len(z)} slices, z {z[0]:.1f} to {z[-1]:.1f} mm"
            draw_preview(sources, z, levels, CLASSES, preview, title=title, marks_z_mm=marks)
            stderr.print(f"preview in {preview}")
