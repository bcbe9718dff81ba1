"""Write: Parquet part files for slices, series and skipped files, and the run manifest.

Every part is written under a temporary dot-name, flushed to disk and renamed into place, so a reader
(or a later run) never sees half a file; dot-names are ignored by Parquet dataset readers. Part names
carry the run id, so parts of different runs never collide. Each flush ends with a commit record
(see ``state.py``); a series is never split across flushes, so a series is either committed whole or
not at all.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from spinelevel.engine.state import OutputState, critical_section, fsync_dir, write_commit
from spinelevel.errors import OutputError
from spinelevel.levels import SeriesLevels

__all__ = [
    "SeriesResult",
    "RunWriter",
    "slices_schema",
    "SERIES_SCHEMA",
    "series_schema",
    "SKIPPED_SCHEMA",
    "DATASETS",
    "write_json_atomic",
    "read_output_dataset",
]

log = logging.getLogger(__name__)

# The three datasets of an output directory.
DATASETS = ("slices", "series", "skipped")

SERIES_SCHEMA = pa.schema(
    [
        ("study_uid", pa.string()),
        ("series_uid", pa.string()),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("n_slices", pa.int32()),
        ("slice_thickness_mm", pa.float64()),
        ("l3_index", pa.int32()),
        ("l3_sop_uid", pa.string()),
        ("l3_frame", pa.int32()),
        ("l3_z_mm", pa.float64()),
        ("l3_first_index", pa.int32()),
        ("l3_last_index", pa.int32()),
        ("levels_present", pa.list_(pa.string())),
        ("flags", pa.list_(pa.string())),
        ("n_evaluated", pa.int32()),
        ("model_sha256", pa.string()),
        ("backend", pa.string()),
    ]
)

SKIPPED_SCHEMA = pa.schema([("source", pa.string()), ("reason", pa.string())])


def series_schema(keep_tags: tuple[str, ...] = ()) -> pa.Schema:
    """Schema of DIR/series: DESIGN.md 3.2, plus one string column per tag kept with --keep-phi."""
    return pa.schema(list(SERIES_SCHEMA) + [pa.field(kw, pa.string()) for kw in keep_tags])


def slices_schema(classes: tuple[str, ...]) -> pa.Schema:
    """Schema of DIR/slices: one p_<class> column per card class."""
    fields = [
        ("study_uid", pa.string()),
        ("series_uid", pa.string()),
        ("sop_uid", pa.string()),
        # 1-based frame of a multi-frame file; null for single-frame files. A slice is (sop_uid, frame).
        ("frame", pa.int32()),
        ("source", pa.string()),
        ("slice_index", pa.int32()),
        ("z_mm", pa.float64()),
        ("level", pa.string()),
        ("level_argmax", pa.string()),
    ]
    fields += [(f"p_{c}", pa.float32()) for c in classes]
    fields.append(("evaluated", pa.bool_()))
    return pa.schema(fields)


@dataclass(frozen=True)
class SeriesResult:
    """A classified series, ready to write."""

    study_uid: str
    series_uid: str
    # Per slice, index 0 = most superior.
    sop_uids: tuple[str, ...]
    sources: tuple[str, ...]
    z_mm: np.ndarray
    # (n, classes) float32 probabilities; NaN rows where the model did not run.
    probs: np.ndarray
    evaluated: np.ndarray
    levels: SeriesLevels
    slice_thickness_mm: float | None
    # Selection and decoding findings plus the sequence-decoding flags.
    flags: tuple[str, ...]
    # Tags kept on request (--keep-phi), as (keyword, value).
    kept: tuple[tuple[str, str], ...] = ()
    # Per slice: 1-based frame of a multi-frame file, None for single-frame files; () = all None.
    frames: tuple[int | None, ...] = ()


def read_output_dataset(path: Path):  # noqa: ANN201 - pyarrow.dataset.Dataset
    """One dataset of an output directory (e.g. ``OUT/slices``) for reading.

    Parts written before a column existed (``slices/frame``, ``series/l3_frame``) lack it: the dataset
    is read under the union of its parts' schemas, so the column reads as null there instead of
    vanishing from the whole dataset (which is what a plain ``pyarrow.parquet.read_table`` does
    when the oldest part comes first).
    """
    import pyarrow.dataset as pads

    dataset = pads.dataset(str(path), format="parquet")
    schemas = [frag.physical_schema for frag in dataset.get_fragments()]
    if len({tuple(sch.names) for sch in schemas}) > 1:
        dataset = pads.dataset(str(path), format="parquet", schema=pa.unify_schemas(schemas))
    return dataset


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON through a temporary file and a rename (no temporary is left behind on failure).

    Raises:
        OSError: the file cannot be written.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2, default=str)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@dataclass
class _Buffer:
    schema: pa.Schema
    columns: dict[str, list] = field(default_factory=dict)
    rows: int = 0

    def __post_init__(self) -> None:
        self.columns = {name: [] for name in self.schema.names}


class RunWriter:
    """Buffers rows and writes them as Parquet parts of at most ``rows_per_part`` rows."""

    def __init__(self, state: OutputState, classes: tuple[str, ...], run_id: str, model_sha256: str, backend: str, rows_per_part: int = 100_000, keep_tags: tuple[str, ...] = ()) -> None:
        self.state = state
        self.out = Path(state.out)
        self.classes = tuple(classes)
        self.run_id = run_id
        self.model_sha256 = model_sha256
        self.backend = backend
        self.rows_per_part = rows_per_part
        self._buffers = {
            "slices": _Buffer(slices_schema(self.classes)),
            "series": _Buffer(series_schema(keep_tags)),
            "skipped": _Buffer(SKIPPED_SCHEMA),
        }
        self._seq = {name: 0 for name in DATASETS}
        # Series entries waiting for the next commit.
        self._entries: dict[str, dict[str, Any]] = {}
        self.counts = {"slices": 0, "series_ok": 0, "series_skipped": 0, "series_error": 0, "skipped_files": 0}
        for name in DATASETS:
            try:
                (self.out / name).mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise OutputError(f"{self.out / name}: cannot create the output directory ({exc.strerror or exc})") from None
        probe = self.out / f".write-test-{run_id}"
        try:
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise OutputError(f"{self.out}: output directory is not writable ({exc.strerror or exc})") from None

    # -- rows -------------------------------------------------------------------------------

    def add_result(self, r: SeriesResult, key: str, skipped: list[tuple[str, str]] = ()) -> None:  # type: ignore[assignment]
        """One classified series: its slice rows, its series row and its skipped files."""
        n = len(r.sop_uids)
        buf = self._buffers["slices"]
        cols = buf.columns
        cols["study_uid"].extend([r.study_uid] * n)
        cols["series_uid"].extend([r.series_uid] * n)
        cols["sop_uid"].extend(r.sop_uids)
        frames = r.frames or (None,) * n
        cols["frame"].extend(frames)
        cols["source"].extend(r.sources)
        cols["slice_index"].extend(range(n))
        cols["z_mm"].extend(np.asarray(r.z_mm, dtype=np.float64).tolist())
        cols["level"].extend(r.levels.levels)
        cols["level_argmax"].extend(r.levels.level_argmax)
        for k, c in enumerate(self.classes):
            column = r.probs[:, k].astype(np.float32)
            cols[f"p_{c}"].extend(None if not ev else float(v) for v, ev in zip(column, r.evaluated))
        cols["evaluated"].extend(bool(v) for v in r.evaluated)
        buf.rows += n
        lv = r.levels
        l3 = lv.l3_index
        self._series_row(
            study_uid=r.study_uid,
            series_uid=r.series_uid,
            status="ok",
            reason=None,
            n_slices=n,
            slice_thickness_mm=r.slice_thickness_mm,
            l3_index=l3,
            l3_sop_uid=r.sop_uids[l3] if l3 is not None else None,
            l3_frame=frames[l3] if l3 is not None else None,
            l3_z_mm=float(r.z_mm[l3]) if l3 is not None else None,
            l3_first_index=lv.l3_first_index,
            l3_last_index=lv.l3_last_index,
            levels_present=list(lv.levels_present),
            flags=sorted(set(r.flags) | set(lv.flags)),
            n_evaluated=int(np.count_nonzero(r.evaluated)),
            kept=r.kept,
        )
        self.counts["slices"] += n
        self.counts["series_ok"] += 1
        self._attach(r.series_uid, key, "ok", skipped)
        self._maybe_flush()

    def add_series_status(self, study_uid: str, series_uid: str, status: str, reason: str, n_slices: int, key: str, skipped: list[tuple[str, str]] = (), flags: tuple[str, ...] = (), kept: tuple[tuple[str, str], ...] = ()) -> None:  # type: ignore[assignment]
        """A series met but not classified ('skipped') or failed ('error'), with its skipped files."""
        assert status in ("skipped", "error")
        self._series_row(
            study_uid=study_uid,
            series_uid=series_uid,
            status=status,
            reason=reason,
            n_slices=n_slices,
            slice_thickness_mm=None,
            l3_index=None,
            l3_sop_uid=None,
            l3_frame=None,
            l3_z_mm=None,
            l3_first_index=None,
            l3_last_index=None,
            levels_present=[],
            flags=sorted(flags),
            n_evaluated=0,
            kept=kept,
        )
        self.counts[f"series_{status}"] += 1
        self._attach(series_uid, key, status, skipped)
        self._maybe_flush()

    def add_loose(self, skipped: list[tuple[str, str]], seen: set[str]) -> None:
        """Files of this run that belong to no series.

        Loose rows of earlier runs whose file this run met again (``seen``: every source scanned) are
        replaced; rows of files this run did not see are kept, so runs over different folders add up.
        """
        self.flush()  # commit buffered series first: the loose part must hold loose rows only
        with critical_section():
            self._add_loose(skipped, seen)

    def _add_loose(self, skipped: list[tuple[str, str]], seen: set[str]) -> None:
        removed: list[str] = []
        added: list[str] = []
        for rel in sorted(self.state.loose_parts):
            try:
                table = pq.read_table(self.out / rel)
            except (OSError, pa.ArrowException) as exc:
                raise OutputError(f"{self.out / rel}: cannot read committed part ({exc})") from None
            mask = pc.is_in(table["source"], value_set=pa.array(sorted(seen), pa.string()))
            if pc.any(mask).as_py():
                removed.append(rel)
                kept = table.filter(pc.invert(mask))
                if kept.num_rows:
                    added.append(self.write_part("skipped", kept))
        for source, reason in skipped:
            self._skipped_row(source, reason)
        buf = self._buffers["skipped"]
        if buf.rows:
            added.append(self.write_part("skipped", pa.table(buf.columns, schema=buf.schema)))
            self._buffers["skipped"] = _Buffer(buf.schema)
        write_commit(self.state, self.run_id, {"added": added, "loose": added, "removed": removed})
        for rel in removed:
            try:
                (self.out / rel).unlink()
            except OSError:
                pass

    def _attach(self, series_uid: str, key: str, status: str, skipped: list[tuple[str, str]]) -> None:
        for source, reason in skipped:
            self._skipped_row(source, reason)
        self._entries[series_uid] = {"key": key, "status": status, "skipped_sources": sorted({s for s, _ in skipped})}

    def _skipped_row(self, source: str, reason: str) -> None:
        buf = self._buffers["skipped"]
        buf.columns["source"].append(source)
        buf.columns["reason"].append(reason)
        buf.rows += 1
        self.counts["skipped_files"] += 1

    def _series_row(self, kept: tuple[tuple[str, str], ...] = (), **row: Any) -> None:
        row.update(model_sha256=self.model_sha256, backend=self.backend)
        row.update(dict(kept))
        buf = self._buffers["series"]
        for name in buf.schema.names:
            buf.columns[name].append(row.get(name))
        buf.rows += 1

    # -- files ------------------------------------------------------------------------------

    def _maybe_flush(self) -> None:
        if any(b.rows >= self.rows_per_part for b in self._buffers.values()):
            self.flush()

    def flush(self) -> None:
        """Write every non-empty buffer as a part, then commit them with the series they hold.

        Signals wait until the commit is written: parts and their record go together.
        """
        if not any(b.rows for b in self._buffers.values()) and not self._entries:
            return
        with critical_section():
            self._flush()

    def finish(self) -> None:
        """Flush, and give every dataset at least one (possibly empty) part, so that each reads
        with its schema even when a run had nothing to put there."""
        self.flush()
        missing = [name for name in DATASETS if not any(p.startswith(name + "/") for p in self.state.parts)]
        if not missing:
            return
        with critical_section():
            added = [self.write_part(name, self._buffers[name].schema.empty_table()) for name in missing]
            write_commit(self.state, self.run_id, {"added": added})

    def _flush(self) -> None:
        added: list[str] = []
        for name in ("slices", "skipped", "series"):
            buf = self._buffers[name]
            if buf.rows == 0:
                continue
            added.append(self.write_part(name, pa.table(buf.columns, schema=buf.schema)))
            self._buffers[name] = _Buffer(buf.schema)
        write_commit(self.state, self.run_id, {"added": added, "series": self._entries})
        self._entries = {}

    def write_part(self, dataset: str, table: pa.Table) -> str:
        """Write one part atomically; returns its path relative to the output directory."""
        seq = self._seq[dataset]
        self._seq[dataset] += 1
        final = self.out / dataset / f"part-{self.run_id}-{seq:05d}.parquet"
        tmp = final.with_name(f".{final.name}.tmp")
        try:
            with open(tmp, "wb") as fh:
                pq.write_table(table, fh, compression="zstd")
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, final)
            fsync_dir(final.parent)
        except OSError as exc:
            try:
                tmp.unlink()
            except OSError:
                pass
            raise OutputError(f"{final}: cannot write Parquet part ({exc.strerror or exc}); parts already written stay readable") from None
        log.debug("wrote %s (%d rows)", final, table.num_rows)
        return f"{dataset}/{final.name}"
