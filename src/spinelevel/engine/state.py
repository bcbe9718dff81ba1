"""What an output directory already holds, so that runs resume and never duplicate a row.

Every flush of the writer ends with a *commit record*, ``DIR/_progress/commit-<n>-<run id>.json``,
written atomically after the Parquet parts it names. The record is the commit point: a part that no
record names was left by a run that died between writing it and committing, and is deleted before the
next run starts. Replaying the records in order gives the committed parts and, for every series,
the key of what was done (series UID, the set of SOP instance UIDs and the model's sha256). A series
whose key changed (it gained slices, or the model changed) is removed row by row and done again.

Only one run may write into a directory at a time: ``OutputLock`` holds an advisory ``flock`` that the
kernel releases when its process dies, so a killed run never blocks the next one.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import signal
import socket
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from spinelevel.errors import OutputError

__all__ = [
    "critical_section",
    "PROGRESS_DIR",
    "SeriesEntry",
    "OutputState",
    "OutputLock",
    "series_key",
    "load_state",
    "remove_series",
    "write_commit",
    "fsync_dir",
]

log = logging.getLogger(__name__)

# Hidden from Parquet dataset readers by its leading underscore.
PROGRESS_DIR = "_progress"
_LOCK_NAME = ".spinelevel.lock"


@dataclass(frozen=True)
class SeriesEntry:
    """A series that a committed run finished."""

    # series_key() of what was done.
    key: str
    # 'ok', 'skipped' or 'error'.
    status: str
    # Sources of this series' rows in DIR/skipped (to remove them when the series is redone).
    skipped_sources: tuple[str, ...] = ()


@dataclass
class OutputState:
    """The committed content of an output directory."""

    out: Path
    # Committed part files, relative to ``out`` ("slices/part-....parquet").
    parts: set[str] = field(default_factory=set)
    # Finished series by SeriesInstanceUID.
    series: dict[str, SeriesEntry] = field(default_factory=dict)
    # Parts of DIR/skipped holding files that belong to no series (replaced by every run).
    loose_parts: set[str] = field(default_factory=set)
    # Number of commit records (the next one gets this number).
    commits: int = 0


@contextmanager
def critical_section() -> Iterator[None]:
    """Defer SIGINT and SIGTERM until the block ends (a part and its commit record go together).

    A signal that arrives inside is delivered, to the handler that was installed before, when the
    block is left. Only the main thread can install handlers; elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[tuple[int, object]] = []

    def _remember(signum: int, frame: object) -> None:
        received.append((signum, frame))

    previous = {sig: signal.signal(sig, _remember) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for signum, frame in received[:1]:
            handler = previous[signum]
            if callable(handler):
                handler(signum, frame)
            elif handler == signal.SIG_DFL:
                signal.raise_signal(signum)


def series_key(model_sha256: str, kind: str, members: Iterable[str]) -> str:
    """A digest of what a series row stands for: model, kind of result and its member UIDs/files."""
    digest = hashlib.sha256()
    digest.update(model_sha256.encode())
    digest.update(b"\0")
    digest.update(kind.encode())
    for m in sorted(members):
        digest.update(b"\0")
        digest.update(m.encode())
    return digest.hexdigest()


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _records(out: Path) -> list[Path]:
    progress = out / PROGRESS_DIR
    if not progress.is_dir():
        return []
    return sorted(p for p in progress.iterdir() if p.name.startswith("commit-") and p.suffix == ".json")


def load_state(out: Path, datasets: Iterable[str] = ("slices", "series", "skipped")) -> OutputState:
    """Replay the commit records of ``out`` and delete what no record committed.

    Deleted: part files that no record names (a run died before committing them), parts that a
    later record removed, and temporary dot-files of interrupted writes.
    """
    out = Path(out)
    state = OutputState(out)
    for path in _records(out):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            # Records are renamed into place complete; an unreadable one is damage, not a crash.
            raise OutputError(f"{path}: unreadable commit record ({exc}); move it away to resume without it") from None
        _apply(state, record)
    state.loose_parts &= state.parts
    for dataset in datasets:
        folder = out / dataset
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            rel = f"{dataset}/{p.name}"
            stale_tmp = p.name.startswith(".") and p.name.endswith(".tmp")
            orphan = p.name.startswith("part-") and p.suffix == ".parquet" and rel not in state.parts
            if stale_tmp or orphan:
                log.info("removing %s left by an interrupted run", p)
                p.unlink()
    for p in (out / PROGRESS_DIR).glob(".*.tmp") if (out / PROGRESS_DIR).is_dir() else ():
        p.unlink()
    return state


def write_commit(state: OutputState, run_id: str, record: dict[str, Any]) -> None:
    """Write one commit record atomically and apply it to ``state``."""
    progress = state.out / PROGRESS_DIR
    progress.mkdir(parents=True, exist_ok=True)
    final = progress / f"commit-{state.commits:08d}-{run_id}.json"
    tmp = progress / f".{final.name}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump({"run_id": run_id, **record}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        fsync_dir(progress)
    except OSError as exc:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise OutputError(f"{final}: cannot commit ({exc.strerror or exc}); parts committed before stay readable") from None
    _apply(state, record)


def _apply(state: OutputState, record: dict[str, Any]) -> None:
    """Replay one commit record onto ``state``."""
    state.commits += 1
    for name in record.get("removed", []):
        state.parts.discard(name)
        state.loose_parts.discard(name)
    state.parts.update(record.get("added", []))
    state.loose_parts.update(record.get("loose", []))
    for uid in record.get("removed_series", []):
        state.series.pop(uid, None)
    for uid, entry in record.get("series", {}).items():
        state.series[uid] = SeriesEntry(entry["key"], entry["status"], tuple(entry.get("skipped_sources", ())))


def remove_series(state: OutputState, uids: set[str], run_id: str, write_part) -> None:  # noqa: ANN001
    """Remove every row of the series ``uids`` (and all loose rows if ``uids`` is everything).

    Parts holding such rows are rewritten without them under new names (``write_part(dataset,
    table) -> relative name``) and the swap is committed in one record, so a crash leaves either the
    old parts or the new ones.
    """
    if not uids:
        return
    skipped_sources = {s for uid in uids if uid in state.series for s in state.series[uid].skipped_sources}
    added: list[str] = []
    removed: list[str] = []
    for rel in sorted(state.parts):
        dataset = rel.split("/", 1)[0]
        path = state.out / rel
        if dataset == "skipped":
            if rel in state.loose_parts or not skipped_sources:
                continue
            column, drop = "source", skipped_sources
        else:
            column, drop = "series_uid", uids
        try:
            keys = pq.read_table(path, columns=[column])[column]
        except (OSError, pa.ArrowException) as exc:
            raise OutputError(f"{path}: cannot read committed part ({exc})") from None
        mask = pc.is_in(keys, value_set=pa.array(sorted(drop), pa.string()))
        if not pc.any(mask).as_py():
            continue
        table = pq.read_table(path).filter(pc.invert(mask))
        if table.num_rows:
            added.append(write_part(dataset, table))
        removed.append(rel)
    write_commit(state, run_id, {"added": added, "removed": removed, "removed_series": sorted(uids)})
    for rel in removed:
        try:
            (state.out / rel).unlink()
        except OSError:
            pass


class OutputLock:
    """An exclusive advisory lock on an output directory, released when the process dies."""

    def __init__(self, out: Path) -> None:
        self.path = Path(out) / _LOCK_NAME
        self._fh = None

    def __enter__(self) -> OutputLock:
        try:
            fh = open(self.path, "a+", encoding="utf-8")
        except OSError as exc:
            raise OutputError(f"{self.path}: cannot create the lock file ({exc.strerror or exc})") from None
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            raise OutputError(
                f"{self.path.parent}: another spinelevel run is writing here ({holder}); wait for it to "
                "finish or stop it (a run that died releases the lock by itself)"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()}")
        fh.flush()
        self._fh = fh
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fh is not None:
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None
