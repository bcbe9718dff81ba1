"""A DICOMweb run's series answers, spooled to local disk.

One WADO-RS series request brings every instance of a series for about 1/30 of the server's and the
client's cost of asking for them one by one (loopback Orthanc, BENCHMARKS.md). The answer is streamed
into one file per instance here (memory: one instance at a time), and every later round of that
series, in any decode process or thread, reads its instances from these files instead of asking the
server again. Layout, under the run's spool directory (``make_root``: a private temporary folder,
never the output folder, which must hold no patient data)::

    <key>.lock        flock'ed while the series is being retrieved (others wait, then read)
    <key>/series.bin  the instances of the answer, as sent, one after the other
    <key>/index.json  {SOPInstanceUID: [offset, length] in series.bin}: written last, atomically
                      (the series is complete)
    <key>/failed.txt  the retrieval failed transiently after its retries: why (the series is redone
                      by the next run)
    <key>/none.txt    no series answer to use (permanent failure, oversized): instances one by one

``key`` is a hash of the service URL, the study and the series UID. The pipeline removes a series'
files once its rows are written, and the whole spool at the end of the run; a run killed before that
leaves its spool behind, and the next run on the machine removes it (its process is gone).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ["SpoolState", "clear", "discard", "lookup", "make_root", "retrieving", "series_dir", "write_series"]

_PREFIX = "spinelevel-spool-"
_INDEX = "index.json"
_DATA = "series.bin"
_FAILED = "failed.txt"
_NONE = "none.txt"
# Indexes kept in memory per process (a few series are in flight at a time).
_CACHED = 16


def make_root() -> Path:
    """A new spool directory for this run: ``$TMPDIR/spinelevel-spool-<pid>-<random>``, mode 700.
    Spools of runs whose process is gone (killed) are removed first."""
    import tempfile

    base = Path(tempfile.gettempdir())
    for old in base.glob(_PREFIX + "*"):
        try:
            pid = int(old.name[len(_PREFIX) :].split("-", 1)[0])
        except ValueError:
            continue
        if pid != os.getpid() and not _alive(pid):
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def series_dir(root: str | os.PathLike, url: str, study: str, series: str) -> Path:
    key = hashlib.sha256(f"{url}\n{study}\n{series}".encode()).hexdigest()[:32]
    return Path(root) / key


@dataclass(frozen=True)
class SpoolState:
    """What the spool holds for one series."""

    # 'absent' (not retrieved yet), 'ready', 'failed' or 'none'
    state: str
    # 'ready': SOPInstanceUID -> [offset, length]; 'failed': {"reason": why}
    index: dict

    def read(self, directory: Path, sop: str) -> bytes | None:
        """The bytes of one spooled instance, or None where the spool does not hold it.

        Raises:
            FileNotFoundError: the series' files were removed.
        """
        at = self.index.get(sop) if self.state == "ready" else None
        if not at:
            return None
        with open(directory / _DATA, "rb") as f:
            f.seek(at[0])
            return f.read(at[1])


_ABSENT = SpoolState("absent", {})
_lock = threading.Lock()
_cache: OrderedDict[Path, SpoolState] = OrderedDict()


def lookup(directory: Path) -> SpoolState:
    """The spool's state of one series (its index cached in this process once complete)."""
    with _lock:
        hit = _cache.get(directory)
        if hit is not None:
            _cache.move_to_end(directory)
            return hit
    state = _read_state(directory)
    if state.state != "absent":
        with _lock:
            _cache[directory] = state
            while len(_cache) > _CACHED:
                _cache.popitem(last=False)
    return state


def forget(directory: Path) -> None:
    """Drop this process's cached state of one series (its files are gone)."""
    with _lock:
        _cache.pop(directory, None)


def _read_state(directory: Path) -> SpoolState:
    try:
        return SpoolState("ready", json.loads((directory / _INDEX).read_text()))
    except FileNotFoundError:
        pass
    except (OSError, ValueError):
        return _ABSENT  # half-written by a process that died: retrieved again
    try:
        return SpoolState("failed", {"reason": (directory / _FAILED).read_text()})
    except FileNotFoundError:
        pass
    if (directory / _NONE).exists():
        return SpoolState("none", {})
    return _ABSENT


@contextlib.contextmanager
def retrieving(directory: Path) -> Iterator[SpoolState]:
    """Hold the series' lock; yields its state once held (another process may have filled it while
    this one waited). A process that dies holding the lock releases it with its file descriptor."""
    import fcntl  # POSIX; only DICOMweb runs get here

    directory.parent.mkdir(parents=True, exist_ok=True)
    with open(directory.with_name(directory.name + ".lock"), "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield _read_state(directory)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def write_series(directory: Path, parts: Iterable[bytes], sop_of: Callable[[bytes], str]) -> SpoolState:
    """Write the instances ``parts`` (Part 10 bytes, streamed) and then the index; call it holding
    the lock. A part whose SOPInstanceUID cannot be read, or repeats one before, is left out (its
    instance is then retrieved alone, and fails there with a reason). Restartable: a retry after a
    failure mid-answer writes the series again from its first instance."""
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    index: dict[str, list[int]] = {}
    offset = 0
    with open(directory / _DATA, "wb") as data:
        for part in parts:
            try:
                sop = sop_of(part)
            except Exception:
                continue
            if not sop or sop in index:
                continue
            data.write(part)
            index[sop] = [offset, len(part)]
            offset += len(part)
    tmp = directory / (_INDEX + ".tmp")
    tmp.write_text(json.dumps(index))
    os.replace(tmp, directory / _INDEX)
    return SpoolState("ready", index)


def mark(directory: Path, kind: str, reason: str = "") -> SpoolState:
    """Record a series answer that failed ('failed', transient, with why) or that is not to be used
    ('none'); call it holding the lock."""
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    # written whole, then renamed: readers in other worker processes do not take the lock, and one
    # that opened the file between its creation and its text took an empty reason
    name = _FAILED if kind == "failed" else _NONE
    tmp = directory / (name + ".tmp")
    tmp.write_text(reason)
    os.replace(tmp, directory / name)
    return SpoolState(kind, {"reason": reason} if kind == "failed" else {})


def discard(root: str | os.PathLike, url: str, study: str, series: str) -> None:
    """Remove one series' files (its rows are written)."""
    directory = series_dir(root, url, study, series)
    forget(directory)
    shutil.rmtree(directory, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        directory.with_name(directory.name + ".lock").unlink()


def clear(root: str | os.PathLike) -> None:
    """Remove the whole spool (the end of a run)."""
    with _lock:
        for key in [k for k in _cache if k.parent == Path(root)]:
            del _cache[key]
    shutil.rmtree(root, ignore_errors=True)
