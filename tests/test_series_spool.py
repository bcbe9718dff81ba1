"""The spool of DICOMweb series answers (engine.series_spool) and how instances are filed in it."""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path

import pydicom
import pytest

from spinelevel.engine import dicomweb, series_spool
from spinelevel.engine.sources import Source
from spinelevel.errors import RemoteReadError

REALWORLD = Path(__file__).parent / "data" / "realworld"
URL = "http://127.0.0.1:1/dicom-web"


def _part10_files() -> list[Path]:
    out = []
    for path in sorted(REALWORLD.rglob("*")):
        if path.is_file() and path.suffix in ("", ".dcm") and path.name != "DICOMDIR":
            with open(path, "rb") as f:
                if f.read(132)[128:] == b"DICM":
                    out.append(path)
    return out


def test_file_meta_sop_equals_pydicoms_on_every_real_file() -> None:
    files = _part10_files()
    assert len(files) > 30
    for path in files:
        data = path.read_bytes()
        meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
        assert dicomweb._meta_sop(data) == str(meta.MediaStorageSOPInstanceUID).strip(), path


def test_file_meta_sop_falls_back_to_pydicom_without_a_preamble() -> None:
    # a dataset without preamble and file meta (not what WADO-RS should send): pydicom reads its UID
    data = _instance("1.2.3.4")
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    ds = pydicom.dcmread(io.BytesIO(data))
    del ds.file_meta
    bare = DicomBytesIO()
    bare.is_little_endian, bare.is_implicit_VR = True, False
    write_dataset(bare, ds)
    assert bare.getvalue()[128:132] != b"DICM"
    assert dicomweb._meta_sop(bare.getvalue()) == "1.2.3.4"


def _instance(sop: str, meta_sop: str | None = None) -> bytes:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = meta_sop or sop
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_write_read_discard(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    d = series_spool.series_dir(root, URL, "1.2", "1.2.3")
    assert series_spool.lookup(d).state == "absent"
    parts = [_instance("1.2.3.1"), b"not DICOM at all", _instance("1.2.3.2"), _instance("1.2.3.1")]
    with series_spool.retrieving(d) as state:
        assert state.state == "absent"
        series_spool.write_series(d, iter(parts), dicomweb._meta_sop)
    state = series_spool.lookup(d)
    assert state.state == "ready" and set(state.index) == {"1.2.3.1", "1.2.3.2"}  # unreadable and repeated parts left out
    assert state.read(d, "1.2.3.2") == parts[2] and state.read(d, "1.2.3.9") is None
    series_spool.discard(root, URL, "1.2", "1.2.3")
    assert not d.exists() and series_spool.lookup(d).state == "absent"
    series_spool.clear(root)
    assert not root.exists()


def test_a_second_retriever_waits_and_finds_the_series_ready(tmp_path: Path) -> None:
    d = series_spool.series_dir(tmp_path, URL, "1.2", "1.2.3")
    seen: list[str] = []
    inside = threading.Event()

    def first() -> None:
        with series_spool.retrieving(d) as state:
            seen.append("first:" + state.state)
            inside.set()
            time.sleep(0.3)
            series_spool.write_series(d, iter([_instance("1.2.3.1")]), dicomweb._meta_sop)

    t = threading.Thread(target=first)
    t.start()
    inside.wait(5)
    with series_spool.retrieving(d) as state:  # blocks until the first is done
        seen.append("second:" + state.state)
    t.join()
    assert seen == ["first:absent", "second:ready"]


def _src(sop: str) -> Source:
    return dicomweb.instance_source(dicomweb.DicomwebConnection(URL), "1.2", "1.2.3", sop)


def test_instances_come_from_the_spool_checked_by_their_dataset_uid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = series_spool.series_dir(tmp_path, URL, "1.2", "1.2.3")
    with series_spool.retrieving(d):
        # the second is filed under its file meta's UID, but its dataset says another
        series_spool.write_series(d, iter([_instance("1.2.3.1"), _instance("1.2.3.7", meta_sop="1.2.3.2")]), dicomweb._meta_sop)
    monkeypatch.setattr(dicomweb._SPOOL, "root", str(tmp_path))
    assert dicomweb._cached_dataset(_src("1.2.3.1")).SOPInstanceUID == "1.2.3.1"
    assert dicomweb._cached_dataset(_src("1.2.3.2")) is None  # asked for alone instead
    assert dicomweb._cached_dataset(_src("1.2.3.5")) is None
    series_spool.discard(tmp_path, URL, "1.2", "1.2.3")
    assert dicomweb._cached_dataset(_src("1.2.3.1")) is None  # removed with its series


def test_a_failed_series_answer_fails_every_round_and_a_refused_one_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from spinelevel.errors import DicomwebError

    monkeypatch.setattr(dicomweb._SPOOL, "root", str(tmp_path))
    calls: list[str] = []

    def failing(conn, what, url, fn):  # noqa: ANN001, ANN202
        calls.append(url)
        raise DicomwebError(f"{url}: HTTP 503 after 5 tries", status=503, transient=True)

    monkeypatch.setattr(dicomweb, "_call", failing)
    conn = dicomweb.DicomwebConnection(URL)
    dicomweb._spool_series(str(tmp_path), conn, "1.2", "1.2.3", 1 << 20)
    dicomweb._spool_series(str(tmp_path), conn, "1.2", "1.2.3", 1 << 20)  # recorded: not asked again
    assert len(calls) == 1
    with pytest.raises(RemoteReadError, match="HTTP 503 after 5 tries"):
        dicomweb._cached_dataset(_src("1.2.3.1"))

    def oversized(conn, what, url, fn):  # noqa: ANN001, ANN202
        raise DicomwebError(f"{url}: an instance is over the limit")

    monkeypatch.setattr(dicomweb, "_call", oversized)
    dicomweb._spool_series(str(tmp_path), conn, "1.2", "1.2.4", 1 << 20)
    src = dicomweb.instance_source(conn, "1.2", "1.2.4", "1.2.4.1")
    assert dicomweb._cached_dataset(src) is None  # each instance is then retrieved alone


def test_each_run_gets_a_private_spool_and_killed_runs_spools_are_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os
    import subprocess
    import sys
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"spinelevel-spool-{dead.pid}-abc"
    stale.mkdir()
    (stale / "x").write_bytes(b"patient data")
    live = tmp_path / f"spinelevel-spool-{os.getppid()}-def"  # a run still going (our parent is alive)
    live.mkdir()
    other = tmp_path / "spinelevel-spool-notapid"
    other.mkdir()
    root = series_spool.make_root()
    assert root.parent == tmp_path and root.name.startswith(f"spinelevel-spool-{os.getpid()}-")
    assert root.stat().st_mode & 0o777 == 0o700
    assert not stale.exists() and live.exists() and other.exists()
    series_spool.clear(root)
    assert not root.exists()


@pytest.mark.parametrize("kind", ["failed", "none"])
def test_a_marked_answer_appears_whole_to_readers_without_the_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    """Workers read a series' state without its lock (series_spool.lookup): the mark must never be
    visible half-written, or a failed series' reason reads empty (seen under load in the DICOMweb
    fault tests as 'instances could not be retrieved ()')."""
    d = series_spool.series_dir(tmp_path, "http://pacs", "1.2", "1.2.3")
    seen: list[tuple[str, str]] = []
    real_replace = series_spool.os.replace

    def replace(src, dst):  # noqa: ANN001, ANN202
        seen.append((Path(dst).name, series_spool._read_state(d).state))  # what a reader sees just before
        real_replace(src, dst)

    monkeypatch.setattr(series_spool.os, "replace", replace)
    series_spool.mark(d, kind, "WADO-RS series retrieve failed: the answer was cut short after 2 tries")
    assert seen == [("failed.txt" if kind == "failed" else "none.txt", "absent")]
    state = series_spool._read_state(d)
    assert state.state == kind and (kind == "none" or "cut short" in state.index["reason"])
    assert sorted(p.name for p in d.iterdir()) == [seen[0][0]]
