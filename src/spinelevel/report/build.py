"""Build a review report for a run: pictures per classified series and one static index.html.

Layout of ``REPORT/``::

    index.html                     the page (data embedded; opens from the file system)
    full/<uid>_sagittal.png        sagittal slab reconstruction with level band, argmax ticks, L3 line
    full/<uid>_coronal.png         the same, coronal
    full/<uid>_axial_l3.png        the L3 slice, soft-tissue window (series with an L3 pick)
    thumbs/<uid>_*.png             the same pictures, about 200 px tall, without text
    confusion_matrix.png           copied from the evaluation, when there is one

``<uid>`` is the series instance UID (characters other than letters, digits, ``.``, ``-`` and ``_``
become ``_``). Series are drawn in a pool of worker processes, a bounded number in flight, so memory
stays flat however long the run. A series whose files are gone or unreadable is listed with
"images unavailable" and the reason; the report still completes.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import multiprocessing
import os
import re
import shutil
import signal
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from spinelevel.errors import InputError, OutputError, SpineLevelError
from spinelevel.report.rundata import RunData, SeriesSlices, read_evaluation, read_extractions, read_run
from spinelevel.report.volume import VolumeOptions

__all__ = ["ReportOptions", "ReportProgress", "ReportSummary", "build_report", "draw_series", "safe_name", "EVALUATION_DIR"]

log = logging.getLogger(__name__)

# Where build_report looks for an evaluation when none is given: RUN_DIR/evaluation.
EVALUATION_DIR = "evaluation"


@dataclass(frozen=True)
class ReportOptions:
    """What a report holds and how it is made."""

    # Output folder of 'spinelevel evaluate' (metrics.json, per_series.csv, confusion_matrix.png);
    # None: RUN_DIR/evaluation when it exists, else no metrics.
    metrics: Path | None = None
    # Worker processes drawing series; 0 draws in this process.
    workers: int = field(default_factory=lambda: min(8, os.cpu_count() or 1))
    # Draw pictures for at most this many classified series (flagged series first); None: all.
    max_series: int | None = None
    # How series are re-read from their DICOM files.
    volume: VolumeOptions = field(default_factory=VolumeOptions)
    # Height of the thumbnails on the page, pixels.
    thumb_height: int = 200
    # Widest thumbnail, pixels (short series are wide).
    thumb_max_width: int = 200
    # Height of the full-size L3 axial picture, pixels.
    axial_height: int = 384
    # Write 8-bit palette PNGs (the class colours exact, 220+ greys): about 5x smaller than RGB.
    palette_png: bool = True
    # Folders of 'spinelevel extract' whose pick previews the page links, besides those recorded in
    # RUN_DIR/extracted.json.
    extracted: tuple[Path, ...] = ()


class ReportProgress(Protocol):
    """What the report reports while it works (the CLI draws it)."""

    def planned(self, series: int) -> None: ...

    def advanced(self, series: int) -> None: ...


class _NoProgress:
    def planned(self, series: int) -> None:
        pass

    def advanced(self, series: int) -> None:
        pass


@dataclass(frozen=True)
class ReportSummary:
    """What a report holds."""

    out: Path
    index: Path
    # Series rows in the page.
    series: int
    # Classified series drawn, whose files could not be read, and left out by max_series.
    drawn: int
    unavailable: int
    not_drawn: int
    skipped_files: int
    seconds: float


def safe_name(uid: str) -> str:
    """A file name for a series UID (UIDs are digits and dots; anything else becomes '_')."""
    name = re.sub(r"[^0-9A-Za-z._-]", "_", uid).strip(".") or "_"
    return name[:200]


# -- one series (runs in a worker process) -----------------------------------------------------


@dataclass(frozen=True)
class _Task:
    uid: str
    slices: SeriesSlices
    l3_index: int | None
    l3_z_mm: float | None
    classes: tuple[str, ...]
    out: str
    options: ReportOptions


def _ignore_sigint() -> None:
    # Ctrl-C goes to the parent, which shuts the pool down.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _draw_series(task: _Task) -> dict[str, Any]:
    """Read one series and write its pictures; never raises (a failure is the series's status)."""
    try:
        return _draw_series_inner(task)
    except Exception as exc:  # a bug or an odd file must not stop a 10,000-series report
        log.warning("series %s: pictures failed (%s: %s)", task.uid, type(exc).__name__, exc)
        return {"uid": task.uid, "images": "unavailable", "images_reason": f"drawing failed ({type(exc).__name__})"}


def _draw_series_inner(task: _Task) -> dict[str, Any]:
    return draw_series(task.slices, task.l3_index, task.l3_z_mm, task.classes, Path(task.out), task.options)


def draw_series(sl: SeriesSlices, l3_index: int | None, l3_z_mm: float | None, classes: tuple[str, ...], out: Path, options: ReportOptions = ReportOptions()) -> dict[str, Any]:
    """Re-read one series and write its pictures into ``out/full`` and ``out/thumbs``.

    Args:
        sl: the series's rows of the run's slices dataset.
        l3_index: ``slice_index`` of the L3 pick, or None.
        l3_z_mm: z of the L3 pick (for the caption), or None.
        classes: card classes (fix the colours).
        out: the report folder (``full/`` and ``thumbs/`` must exist).
        options: sizes and how to read.

    Returns:
        ``{"uid", "images": "ok" | "unavailable", "images_reason"?, "thumbs"?: {kind: {src, full, w, h}}}``
        with kinds ``sag``, ``cor`` and ``ax`` (the latter only with an L3 pick).

    Raises:
        Nothing for unreadable files (they make the series 'unavailable'); OSError if ``out`` is not writable.
    """
    from spinelevel.errors import DecodeError
    from spinelevel.report.render import Band, draw_axial, draw_reconstruction, level_colours, overlay_palette, save_png
    from spinelevel.report.volume import positions, read_views

    uid, name, opts = sl.series_uid, safe_name(sl.series_uid), options
    l3_pos = None
    if l3_index is not None:
        hit = np.flatnonzero(sl.slice_index == l3_index)
        l3_pos = int(hit[0]) if hit.size else None
    from spinelevel.engine.decode import clear_parsed_cache

    try:
        views = read_views(sl.sources, sl.z_mm, l3_pos, opts.volume, sl.frames)
    except DecodeError as exc:
        return {"uid": uid, "images": "unavailable", "images_reason": str(exc)}
    finally:
        clear_parsed_cache()  # a multi-frame series' file is not needed for the next series
    out = Path(out)
    band = Band(positions(sl.z_mm), sl.level, sl.argmax, l3_pos, level_colours(classes))
    palette = overlay_palette(band.colours)
    thumbs: dict[str, dict[str, Any]] = {}

    def save(kind: str, suffix: str, full, thumb) -> None:  # noqa: ANN001
        fname = f"{name}_{suffix}.png"
        save_png(full, out / "full" / fname, palette if opts.palette_png else None)
        save_png(thumb, out / "thumbs" / fname, palette if opts.palette_png else None, greys=64)
        thumbs[kind] = {"src": f"thumbs/{fname}", "full": f"full/{fname}", "w": thumb.width, "h": thumb.height}

    slab = f"{opts.volume.slab_mm:g} mm MIP"
    for kind, suffix, hu, orient in (("sag", "sagittal", views.sagittal, ("A", "P")), ("cor", "coronal", views.coronal, ("R", "L"))):
        title = f"{suffix} {slab}, {views.mm_per_px:.2f} mm/px, {len(sl.sources)} slices ({views.slices_read} read)"
        full = draw_reconstruction(hu, views.mm_per_px, band, title=title, orientation=orient)
        scale = min(opts.thumb_height / hu.shape[0], opts.thumb_max_width / max(1, hu.shape[1]))
        thumb = draw_reconstruction(hu, views.mm_per_px, band, scale=scale, text=False)
        save(kind, suffix, full, thumb)
    if views.axial is not None:
        marks = (views.plane_x, views.plane_y)
        caption = f"L3 pick: slice {l3_index}" + (f", z {l3_z_mm:.1f} mm" if l3_z_mm is not None else "")
        full = draw_axial(views.axial, views.axial_spacing, height=opts.axial_height, marks=marks, caption=caption)
        thumb = draw_axial(views.axial, views.axial_spacing, height=min(opts.thumb_height, 160), marks=marks, text=False)
        save("ax", "axial_l3", full, thumb)
    result: dict[str, Any] = {"uid": uid, "images": "ok", "thumbs": thumbs}
    if views.slices_failed:
        result["images_reason"] = f"{views.slices_failed} of {views.slices_read} slices read for the pictures failed: {views.failure}"
    return result


# -- the report ------------------------------------------------------------------------------


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _clean(value: Any) -> Any:
    """JSON-safe: NaN/inf -> None, numpy scalars -> Python, recursively."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _float_or_none(text: Any) -> float | None:
    try:
        v = float(text)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _series_rows(rd: RunData) -> list[dict[str, Any]]:
    keep = ("series_uid", "study_uid", "status", "reason", "n_slices", "slice_thickness_mm", "l3_index", "l3_z_mm", "l3_first_index", "l3_last_index", "levels_present", "flags", "n_evaluated")
    rows = []
    for r in rd.series:
        row = {k: r.get(k) for k in keep}
        row["flags"] = list(row["flags"] or [])
        row["levels_present"] = list(row["levels_present"] or [])
        row["n_disagree"] = None
        row["images"] = "none" if row["status"] != "ok" else "not rendered"
        rows.append(row)
    # classified series first (what a reviewer looks at), then failed, then skipped
    order = {"ok": 0, "error": 1}
    rows.sort(key=lambda r: (order.get(r["status"], 2), r["study_uid"] or "", r["series_uid"] or ""))
    return rows


def _to_draw(rows: list[dict[str, Any]], max_series: int | None) -> list[dict[str, Any]]:
    ok = [r for r in rows if r["status"] == "ok"]
    if max_series is None or max_series >= len(ok):
        return ok
    # flagged series are the ones a reviewer opens: draw them first
    ok.sort(key=lambda r: (len(r["flags"]) == 0, r["study_uid"] or "", r["series_uid"] or ""))
    return ok[: max(0, max_series)]


def _link_extracted(run_dir: Path, out: Path, rows: list[dict[str, Any]], extra: tuple[Path, ...]) -> None:
    """Give each series row the previews of its extracted picks, as links relative to the report."""
    picks = read_extractions(run_dir, extra)
    for row in rows:
        found = picks.get(row["series_uid"])
        if found:
            row["extracted"] = [{"level": p["level"], "png": os.path.relpath(p["png"], out.resolve())} for p in found]


def _prepare_out(out: Path) -> None:
    try:
        (out / "full").mkdir(parents=True, exist_ok=True)
        (out / "thumbs").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{out}: cannot create the report folder ({exc.strerror or exc})") from None
    if not os.access(out, os.W_OK):
        raise OutputError(f"{out}: the report folder is not writable")


def _results(tasks: Iterator[_Task], workers: int) -> Iterator[dict[str, Any]]:
    """Draw series in a process pool, at most 2 x workers in flight (or in this process)."""
    if workers <= 0:
        for task in tasks:
            yield _draw_series(task)
        return
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"), initializer=_ignore_sigint)
    pending: set[Future] = set()
    try:
        for task in tasks:
            pending.add(pool.submit(_draw_series, task))
            if len(pending) >= 2 * workers:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    yield fut.result()
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                yield fut.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def build_report(run_dir: Path, out: Path | None = None, options: ReportOptions = ReportOptions(), progress: ReportProgress | None = None) -> ReportSummary:
    """Write the review report of a run: pictures per classified series and ``out/index.html``.

    The DICOM files are re-read through the ``source`` labels of ``run_dir/slices`` (plain paths,
    ``zip::member`` and ``tar::member``), so they must still be where the run found them; relative
    labels are taken relative to the current directory, as the run wrote them.

    Args:
        run_dir: the ``--out`` folder of ``spinelevel run``.
        out: the report folder; None: ``run_dir/report``.
        options: see :class:`ReportOptions`.
        progress: told the number of series to draw and each one done.

    Returns:
        What was written.

    Raises:
        InputError: ``run_dir`` is not a run folder, or the evaluation folder is unusable.
        OutputError: the report folder cannot be written.
        SpineLevelError: Pillow is not installed.
    """
    from spinelevel.report.page import PAGE_FORMAT, write_page
    from spinelevel.report.render import hex_colour, level_colours

    started = time.perf_counter()
    progress = progress or _NoProgress()
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / "report"
    if options.max_series is not None and options.max_series < 0:
        raise InputError(f"--max-series must be 0 or more, got {options.max_series}")
    if options.workers < 0:
        raise InputError(f"--workers must be 0 or more, got {options.workers}")
    try:
        import PIL  # noqa: F401 - checked here so that a missing Pillow is one message, not one per series
    except ImportError:
        raise SpineLevelError("the review report draws with Pillow, which is not installed: pip install pillow") from None
    rd = read_run(run_dir)
    metrics = per_series_eval = None
    eval_dir = options.metrics
    if eval_dir is None and (run_dir / EVALUATION_DIR / "metrics.json").is_file():
        eval_dir = run_dir / EVALUATION_DIR
    if eval_dir is not None:
        metrics, per_series_eval = read_evaluation(eval_dir)
    _prepare_out(out)

    rows = _series_rows(rd)
    by_uid = {r["series_uid"]: r for r in rows}
    draw = _to_draw(rows, options.max_series)
    wanted = {r["series_uid"] for r in draw}
    progress.planned(len(draw))

    def tasks() -> Iterator[_Task]:
        for sl in rd.iter_slices(wanted):
            row = by_uid[sl.series_uid]
            row["n_disagree"] = int(len(sl.disagreements()))
            wanted.discard(sl.series_uid)
            yield _Task(sl.series_uid, sl, row["l3_index"], row["l3_z_mm"], rd.classes, str(out), options)

    drawn = unavailable = 0
    for result in _results(tasks(), options.workers):
        row = by_uid[result["uid"]]
        row["images"] = result["images"]
        if result.get("images_reason"):
            row["images_reason"] = result["images_reason"]
        if "thumbs" in result:
            row["thumbs"] = result["thumbs"]
        drawn += result["images"] == "ok"
        unavailable += result["images"] == "unavailable"
        progress.advanced(1)
    for uid in wanted:  # classified series with no slices in the table
        by_uid[uid].update(images="unavailable", images_reason="no slices of this series in the run's slices dataset")
        unavailable += 1
        progress.advanced(1)
    _link_extracted(run_dir, out, rows, options.extracted)
    if per_series_eval:
        for r in rows:
            ev = per_series_eval.get(r["series_uid"])
            if ev:
                r["l3_error_mm"] = _float_or_none(ev.get("l3_error_mm"))
                r["accuracy_decoded"] = _float_or_none(ev.get("accuracy_decoded"))

    confusion = None
    if eval_dir is not None and (Path(eval_dir) / "confusion_matrix.png").is_file():
        try:
            shutil.copyfile(Path(eval_dir) / "confusion_matrix.png", out / "confusion_matrix.png")
            confusion = "confusion_matrix.png"
        except OSError as exc:
            log.warning("cannot copy confusion_matrix.png: %s", exc)
    m = rd.manifest
    data = {
        "format": PAGE_FORMAT,
        "generated": _now(),
        "run": {
            "run_id": m.get("run_id"),
            "status": m.get("status"),
            "finished": m.get("finished"),
            "model": ((m.get("model") or {}).get("sha256") or "")[:12] or None,
            "backend": (m.get("backend") or {}).get("name") if isinstance(m.get("backend"), dict) else m.get("backend"),
        },
        "classes": list(rd.classes),
        "colours": {c: hex_colour(rgb) for c, rgb in level_colours(rd.classes).items()},
        "series": rows,
        "skipped": [[s or "", r or ""] for s, r in rd.skipped],
        "metrics": metrics,
        "confusion_png": confusion,
    }
    try:
        index = write_page(out / "index.html", _clean(data))
    except OSError as exc:
        raise OutputError(f"{out / 'index.html'}: cannot write ({exc.strerror or exc})") from None
    not_drawn = sum(1 for r in rows if r["images"] == "not rendered")
    return ReportSummary(out, index, len(rows), drawn, unavailable, not_drawn, len(rd.skipped), time.perf_counter() - started)
