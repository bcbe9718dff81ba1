"""DICOMweb options, URL and credential rules, and source-independent resume keys (no server needed)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from spinelevel.cli import app
from spinelevel.engine.dicomweb import instance_source, parse_date, parse_input
from spinelevel.engine.pipeline import plan_key, skip_key
from spinelevel.engine.scan import ScanOptions, SkippedFile
from spinelevel.engine.select import SeriesPlan, SeriesSkip, SliceRef
from spinelevel.engine.sources import Source
from spinelevel.errors import InputError


def test_url_rules() -> None:
    conn = parse_input("dicomweb+https://pacs.example.org/dicom-web/", timeout_s=3.0)
    assert conn.url == "https://pacs.example.org/dicom-web" and conn.timeout_s == 3.0
    with pytest.raises(InputError) as info:
        parse_input("dicomweb+https://bob:hunter2@pacs.example.org/dicom-web")
    assert "hunter2" not in str(info.value) and "SPINELEVEL_DICOMWEB_PASSWORD" in str(info.value)
    for bad in ("dicomweb+ftp://pacs/x", "dicomweb+https:///x", "dicomweb+https://pacs/x?StudyDate=1"):
        with pytest.raises(InputError):
            parse_input(bad)
    src = instance_source(conn, "1.2", "1.2.3", "1.2.3.4")
    assert src.label == "https://pacs.example.org/dicom-web/studies/1.2/series/1.2.3/instances/1.2.3.4"
    import pickle

    assert pickle.loads(pickle.dumps(src)) == src  # travels to decode worker processes


def test_dates() -> None:
    assert parse_date("2026-11-30", "--since") == parse_date("20261130", "--since") == "20261130"
    with pytest.raises(InputError, match="YYYY-MM-DD"):
        parse_date("30/11/2026", "--since")


def test_cli_refuses_misused_options(tmp_path: Path, model_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["run", str(tmp_path), "--model", str(model_path), "--out", str(tmp_path / "o"), "--since", "2026-11-30"])
    assert res.exit_code == 1 and "only for DICOMweb inputs" in res.output
    res = runner.invoke(app, ["run", "dicomweb+http://127.0.0.1:9/dicom-web", "--model", str(model_path), "--out", str(tmp_path / "o"), "--ray", "local"])
    assert res.exit_code == 1 and "--ray does not read DICOMweb" in res.output
    res = runner.invoke(app, ["run", "dicomweb+http://127.0.0.1:9/dicom-web", "--model", str(model_path), "--out", str(tmp_path / "o"), "--since", "2026-12-02", "--until", "2026-12-01"])
    assert res.exit_code == 1 and "is after" in res.output
    res = runner.invoke(app, ["run", str(tmp_path), "--model", str(model_path), "--out", str(tmp_path / "o"), "--dicomweb-by-instance"])
    assert res.exit_code == 1 and "--dicomweb-by-instance: only for DICOMweb inputs" in res.output
    assert not (tmp_path / "o").exists()


def _plan(src_of) -> tuple[SeriesPlan, SeriesSkip]:  # noqa: ANN001
    slices = tuple(SliceRef(src_of(f"1.9.{i}"), f"1.9.{i}", float(-i), "") for i in range(3))
    dropped = (SkippedFile(src_of("1.9.99"), "duplicate position", "1.9.99"),)
    plan = SeriesPlan("1.8", "1.8.1", slices, 5.0, 5.0, (), dropped)
    skip = SeriesSkip("1.8", "1.8.2", "localizer (scout) images", 1, (SkippedFile(src_of("1.9.50"), "series skipped: localizer", "1.9.50"),))
    return plan, skip


def test_keys_name_instances_not_places() -> None:
    local = _plan(lambda sop: Source(f"/archive/{sop}"))
    remote = _plan(lambda sop: instance_source(parse_input("dicomweb+http://pacs/dicom-web"), "1.8", "1.8.1", sop))
    assert plan_key("m", local[0]) == plan_key("m", remote[0])
    assert skip_key("m", local[1]) == skip_key("m", remote[1])
    # the keys of earlier versions named files by label: those still identify the local run
    assert plan_key("m", local[0], legacy=True) != plan_key("m", remote[0], legacy=True)


def test_outputs_of_earlier_versions_are_rekeyed_not_redone(tmp_path: Path, model_path: Path) -> None:
    """A series done under a label-based key is found done and re-keyed, not classified again."""
    import json

    from dicomgen import write_localizer
    from spinelevel.engine.pipeline import RunOptions, run, skip_key as new_key
    from spinelevel.engine.state import PROGRESS_DIR

    root = tmp_path / "in"
    write_localizer(root, "1.2.826.0.1.3680043.8.498.5")
    out = tmp_path / "out"
    run([root], model_path, out, RunOptions(workers=0))
    # rewrite the commit records as an earlier version wrote them (keys by source label)
    from spinelevel.engine.scan import scan_paths
    from spinelevel.engine.select import select_series
    from spinelevel.card import file_sha256

    sel = select_series(scan_paths([root]))
    sha = file_sha256(model_path)
    old = {s.series_uid: skip_key(sha, s, legacy=True) for s in sel.skipped_series}
    for rec in (out / PROGRESS_DIR).glob("commit-*.json"):
        data = json.loads(rec.read_text())
        for uid, entry in data.get("series", {}).items():
            entry["key"] = old[uid]
        rec.write_text(json.dumps(data))
    again = run([root], model_path, out, RunOptions(workers=0))
    assert (again.series_skipped, again.series_already_done) == (0, 1)
    from spinelevel.engine.state import load_state

    state = load_state(out)
    assert {uid: e.key for uid, e in state.series.items()} == {s.series_uid: new_key(sha, s) for s in sel.skipped_series}


def test_streamed_multipart_parts_truncation_and_size() -> None:
    from spinelevel.engine.dicomweb import _multipart_parts, _Oversized, _Truncated

    class _Answer:
        def __init__(self, body: bytes) -> None:
            self.headers = {"Content-Type": 'multipart/related; type="application/dicom"; boundary="b0"'}
            self.body = body

        def iter_content(self, chunk_size: int):  # noqa: ANN201 - 3-byte chunks: boundaries straddle them
            return (self.body[i : i + 3] for i in range(0, len(self.body), 3))

    part = b"Content-Type: application/dicom\r\n\r\n"
    body = b"--b0\r\n" + part + b"AAAA\r\n--b0\r\n" + part + b"BB\r\n--b0--\r\n"
    assert list(_multipart_parts(_Answer(body), 100)) == [b"AAAA", b"BB"]
    with pytest.raises(_Truncated):
        list(_multipart_parts(_Answer(body[: len(body) - 12]), 100))
    with pytest.raises(_Oversized):
        list(_multipart_parts(_Answer(body), 3))


@pytest.mark.parametrize(("transient", "expected"), [(True, "RemoteReadError"), (False, "DecodeError")])
def test_only_transient_retrieval_failures_make_the_series_a_retry(monkeypatch: pytest.MonkeyPatch, transient: bool, expected: str) -> None:
    """A 404 (instance deleted on the PACS) or an oversized instance is permanent: a dropped slice, not
    a series every nightly run would redo; a timeout or a 503 is worth the next run's retry."""
    from spinelevel.engine import dicomweb
    from spinelevel.engine.sources import Source
    from spinelevel.errors import DicomwebError

    def failing(conn, what, url, fn):  # noqa: ANN001, ANN202
        raise DicomwebError(f"{url}: HTTP {503 if transient else 404}", status=503 if transient else 404, transient=transient)

    monkeypatch.setattr(dicomweb, "_call", failing)
    monkeypatch.setattr(dicomweb, "_connection", lambda src: object())
    monkeypatch.setattr(dicomweb, "_client", lambda conn, max_bytes=0: object())
    monkeypatch.setattr(dicomweb, "_cached_dataset", lambda src: None)
    src = Source("http://127.0.0.1:1/dicom-web", "dicomweb", "studies/1.2/series/1.2.3/instances/1.2.3.4")
    with pytest.raises(Exception) as info:
        dicomweb.retrieve_dataset(src, 1 << 20)
    assert type(info.value).__name__ == expected


def test_instance_metadata_headers_ignore_private_elements(tmp_path: Path) -> None:
    """The scan of DICOM JSON drops private elements before pydicom parses it: same header."""
    import pydicom

    from spinelevel.engine.dicomweb import DicomwebConnection, _headers_from_json, _no_bulk

    path = sorted((Path(__file__).parent / "data" / "realworld").rglob("*.dcm"))[0]
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    ds.add_new(0x00091010, "LO", "GEMS_IDEN_01")  # a private creator
    ds.add_new(0x00091001, "LO", "private value")
    item = ds.to_json_dict()
    assert "00091001" in item
    conn = DicomwebConnection("http://127.0.0.1:1/dicom-web")
    with_private = _headers_from_json(conn, "1", "2", item, ScanOptions())
    without = _headers_from_json(conn, "1", "2", {k: v for k, v in item.items() if int(k[:4], 16) % 2 == 0}, ScanOptions())
    assert with_private == without and hasattr(with_private[0], "sop_uid")
    assert "00091001" not in _no_bulk(item) and "00091010" not in _no_bulk(item) and "00080018" in _no_bulk(item)
