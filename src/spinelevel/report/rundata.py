"""Read what a review report needs from a run directory (``spinelevel run --out DIR``).

The series and skipped datasets are small and read whole. The slices dataset can hold millions of
rows, so it is read one Parquet part at a time, with only the columns the pictures need, and handed
out series by series; a series whose rows lie in several parts (possible after a resumed run) is
held back until its last part has been read.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from spinelevel.errors import InputError
from spinelevel.levels import CLASSES

__all__ = ["SeriesSlices", "RunData", "read_run", "read_evaluation", "read_extractions", "SLICE_COLUMNS", "EXTRACTED_RECORD", "EXTRACT_MANIFEST"]

log = logging.getLogger(__name__)

# In a run directory: the folders 'spinelevel extract' made from it ({"dirs": [...]}).
EXTRACTED_RECORD = "extracted.json"
# In an extract folder: one row per copied instance.
EXTRACT_MANIFEST = "manifest.parquet"

# Columns of DIR/slices that the pictures use (DESIGN 3.2).
SLICE_COLUMNS = ("series_uid", "source", "frame", "slice_index", "z_mm", "level", "level_argmax", "evaluated")


@dataclass(frozen=True)
class SeriesSlices:
    """The slices of one classified series, ordered by ``slice_index`` (0 = most superior)."""

    series_uid: str
    # File label per slice: a path or ``archive::member``.
    sources: tuple[str, ...]
    # slice_index per slice (int).
    slice_index: np.ndarray
    # Patient z of ImagePositionPatient per slice, mm.
    z_mm: np.ndarray
    # Level after sequence decoding per slice.
    level: tuple[str | None, ...]
    # Raw argmax per slice (None where the model did not run).
    argmax: tuple[str | None, ...]
    # The model ran on this slice.
    evaluated: np.ndarray
    # 1-based frame per slice for frames of multi-frame files, None for single-frame files.
    frames: tuple[int | None, ...] = ()

    def disagreements(self) -> np.ndarray:
        """Positions (into this table) of evaluated slices whose argmax differs from the decoding."""
        return np.asarray(
            [i for i, (lev, arg) in enumerate(zip(self.level, self.argmax)) if arg is not None and arg != lev],
            dtype=np.int64,
        )


@dataclass(frozen=True)
class RunData:
    """The small tables of a run: series rows, skipped files, the manifest's last run, the classes."""

    run_dir: Path
    # One dict per row of DIR/series (DESIGN 3.2 columns).
    series: list[dict[str, Any]]
    # (source, reason) per row of DIR/skipped.
    skipped: list[tuple[str, str]]
    # Card classes in anatomical order.
    classes: tuple[str, ...]
    # The last entry of run.json's "runs" (empty when run.json is unreadable).
    manifest: dict[str, Any]

    def iter_slices(self, uids: set[str] | None = None) -> Iterator[SeriesSlices]:
        """Yield the slices of every series in ``uids`` (all when None), one part file at a time."""
        yield from _iter_slices(self.run_dir / "slices", uids)


def _dataset(path: Path, what: str):  # noqa: ANN202 - pyarrow.dataset.Dataset
    if not path.is_dir():
        raise InputError(
            f"{path.parent}: not a run directory of 'spinelevel run' (the {what} dataset {path.name}/ is missing)"
        )
    from spinelevel.engine.writer import read_output_dataset

    try:
        return read_output_dataset(path)
    except Exception as exc:
        raise InputError(f"{path}: unreadable {what} dataset ({type(exc).__name__}: {exc})") from None


def read_run(run_dir: Path) -> RunData:
    """Read the series and skipped datasets and run.json of ``run_dir``.

    Raises:
        InputError: ``run_dir`` is not a run directory, or a dataset is unreadable.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InputError(f"{run_dir}: no such run directory (give the --out directory of 'spinelevel run')")
    # Check all three first, so the message names the first missing one whatever is read.
    datasets = {name: _dataset(run_dir / name, name) for name in ("series", "slices", "skipped")}
    try:
        series = datasets["series"].to_table().to_pylist()
        skipped_table = datasets["skipped"].to_table(columns=["source", "reason"])
    except Exception as exc:
        raise InputError(f"{run_dir}: unreadable run dataset ({type(exc).__name__}: {exc})") from None
    skipped = list(zip(skipped_table.column("source").to_pylist(), skipped_table.column("reason").to_pylist()))
    manifest: dict[str, Any] = {}
    try:
        runs = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))["runs"]
        if runs:
            manifest = runs[-1]
    except (OSError, KeyError, TypeError, ValueError):
        log.warning("%s: run.json missing or unreadable; classes assumed to be %s", run_dir, ",".join(CLASSES))
    classes = tuple(manifest.get("card", {}).get("classes") or CLASSES)
    return RunData(run_dir, series, skipped, classes, manifest)


def _iter_slices(path: Path, uids: set[str] | None) -> Iterator[SeriesSlices]:
    import pyarrow.compute as pc

    dataset = _dataset(path, "slices")
    fragments = list(dataset.get_fragments())
    # Pass 1 (one column): in how many parts does each series appear?
    parts_left: dict[str, int] = {}
    for frag in fragments:
        col = frag.to_table(columns=["series_uid"]).column("series_uid")
        for uid in pc.unique(col).to_pylist():
            if uids is None or uid in uids:
                parts_left[uid] = parts_left.get(uid, 0) + 1
    held: dict[str, list[dict[str, list]]] = {}
    names = set(dataset.schema.names)
    columns = [c for c in SLICE_COLUMNS if c in names]  # outputs of older versions have no frame
    for frag in fragments:
        table = frag.to_table(columns=columns, schema=dataset.schema)
        if uids is not None:
            table = table.filter(pc.is_in(table.column("series_uid"), value_set=_string_array(sorted(uids))))
        if table.num_rows == 0:
            continue
        table = table.sort_by([("series_uid", "ascending"), ("slice_index", "ascending")])
        uid_col = table.column("series_uid").to_pylist()
        cols = {name: table.column(name).to_pylist() if name in names else [None] * len(uid_col) for name in SLICE_COLUMNS[1:]}
        start = 0
        for end in range(1, len(uid_col) + 1):
            if end < len(uid_col) and uid_col[end] == uid_col[start]:
                continue
            uid = uid_col[start]
            chunk = {name: values[start:end] for name, values in cols.items()}
            start = end
            held.setdefault(uid, []).append(chunk)
            parts_left[uid] -= 1
            if parts_left[uid] == 0:
                yield _merge(uid, held.pop(uid))


def _string_array(values: list[str]):  # noqa: ANN202
    import pyarrow as pa

    return pa.array(values, pa.string())


def _merge(uid: str, chunks: list[dict[str, list]]) -> SeriesSlices:
    merged: dict[str, list] = {name: [] for name in SLICE_COLUMNS[1:]}
    for chunk in chunks:
        for name, values in chunk.items():
            merged[name].extend(values)
    order = np.argsort(np.asarray(merged["slice_index"], dtype=np.int64), kind="stable")
    pick = [int(i) for i in order]
    return SeriesSlices(
        series_uid=uid,
        sources=tuple(merged["source"][i] for i in pick),
        slice_index=np.asarray(merged["slice_index"], dtype=np.int64)[order],
        z_mm=np.asarray([math.nan if v is None else v for v in merged["z_mm"]], dtype=np.float64)[order],
        level=tuple(merged["level"][i] for i in pick),
        argmax=tuple(merged["level_argmax"][i] for i in pick),
        evaluated=np.asarray([bool(v) for v in merged["evaluated"]], dtype=bool)[order],
        frames=tuple(None if merged["frame"][i] is None else int(merged["frame"][i]) for i in pick),
    )


def read_evaluation(eval_dir: Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """``metrics.json`` and ``per_series.csv`` (by series UID) of a ``spinelevel evaluate`` output.

    Raises:
        InputError: the folder or its metrics.json is missing or unreadable.
    """
    eval_dir = Path(eval_dir)
    path = eval_dir / "metrics.json"
    if not path.is_file():
        raise InputError(f"{eval_dir}: no metrics.json; give the --out folder of 'spinelevel evaluate'")
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: unreadable ({exc})") from None
    per_series: dict[str, dict[str, Any]] = {}
    csv_path = eval_dir / "per_series.csv"
    if csv_path.is_file():
        try:
            with open(csv_path, newline="", encoding="utf-8") as fh:
                for row in csv.DictReader(fh):
                    if row.get("series_uid"):
                        per_series[row["series_uid"]] = row
        except (OSError, csv.Error) as exc:
            log.warning("%s: unreadable (%s); per-series evaluation left out", csv_path, exc)
    return metrics, per_series


def read_extractions(run_dir: Path, extra: tuple[Path, ...] = ()) -> dict[str, list[dict[str, Any]]]:
    """series_uid -> its picks (``level``, absolute ``png``, ``file``, ``kos`` paths) in the extract
    folders recorded in RUN_DIR/extracted.json and in ``extra``; files that no longer exist are left out."""
    import pyarrow.parquet as pq

    dirs = [Path(d) for d in extra]
    try:
        dirs += [Path(d) for d in json.loads((Path(run_dir) / EXTRACTED_RECORD).read_text(encoding="utf-8")).get("dirs", [])]
    except (OSError, ValueError, AttributeError):
        pass
    out: dict[str, list[dict[str, Any]]] = {}
    for d in dict.fromkeys(p.resolve() for p in dirs):
        try:
            table = pq.read_table(d / EXTRACT_MANIFEST, columns=["series_uid", "level", "offset", "file", "png", "kos"])
        except Exception:
            continue
        for r in table.to_pylist():
            if r["offset"] != 0 or not r["png"] or not (d / r["png"]).is_file():
                continue
            out.setdefault(r["series_uid"], []).append(
                {"level": r["level"], "png": str(d / r["png"]), "file": str(d / r["file"]), "kos": str(d / r["kos"]) if r["kos"] else None}
            )
    return out
