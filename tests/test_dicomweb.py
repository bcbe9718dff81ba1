"""DICOMweb input against a real Orthanc server (started here, fed phantom and synthetic studies)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from dicomgen import SeriesSpec, write_localizer, write_series
from conftest import LEVELS_30
from orthanc import PASSWORD, USER, FaultProxy, Orthanc, orthanc_missing
from spinelevel.engine.dicomweb import DicomwebQuery, parse_input
from spinelevel.engine.pipeline import RunOptions, run
from spinelevel.engine.sampling import SamplingOptions
from spinelevel.errors import InputError

_MISSING = orthanc_missing()
pytestmark = pytest.mark.skipif(_MISSING is not None, reason=f"DICOMweb tests {_MISSING}")

STUDY = "1.2.826.0.1.3680043.8.498.77"


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix == "")


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two 30-slice series (uncompressed and RLE) and a localizer in one study."""
    from pydicom.uid import RLELossless

    root = tmp_path_factory.mktemp("dw-archive")
    write_series(root, SeriesSpec(levels=LEVELS_30, study_uid=STUDY, series_uid=STUDY + ".1", seed=11))
    write_series(root, SeriesSpec(levels=LEVELS_30, study_uid=STUDY, series_uid=STUDY + ".2", syntax=RLELossless, signed=False, seed=12))
    write_localizer(root, STUDY)
    return root


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    srv = Orthanc(tmp_path_factory.mktemp("orthanc"))
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def loaded(server: Orthanc, archive: Path) -> Orthanc:
    """The server holding exactly ``archive``."""
    if server.proc is None:
        server.start()
    server.clear()
    assert server.upload(_files(archive)) == len(_files(archive))
    return server


@pytest.fixture
def creds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPINELEVEL_DICOMWEB_USER", USER)
    monkeypatch.setenv("SPINELEVEL_DICOMWEB_PASSWORD", PASSWORD)
    monkeypatch.delenv("SPINELEVEL_DICOMWEB_TOKEN", raising=False)


def _query(srv_input: str, **conn) -> tuple[DicomwebQuery, ...]:  # noqa: ANN003
    return (DicomwebQuery(parse_input(srv_input, **conn)),)


def _rows(out: Path, dataset: str, drop: tuple[str, ...] = ("source",)) -> list[dict]:
    table = pq.read_table(out / dataset).to_pylist()
    rows = [{k: v for k, v in r.items() if k not in drop} for r in table]
    return sorted(rows, key=lambda r: tuple(str(r.get(k)) for k in ("series_uid", "slice_index", "sop_uid")))


def test_dicomweb_run_gives_the_rows_of_a_local_run(tmp_path: Path, loaded: Orthanc, archive: Path, model_path: Path, creds: None) -> None:
    local = run([archive], model_path, tmp_path / "local", RunOptions(workers=2))
    remote = run([], model_path, tmp_path / "remote", RunOptions(workers=2, dicomweb=_query(loaded.input)))
    assert (remote.series_ok, remote.series_skipped, remote.series_error) == (local.series_ok, local.series_skipped, local.series_error) == (2, 1, 0)
    assert _rows(tmp_path / "remote", "slices") == _rows(tmp_path / "local", "slices")
    drop = ("source", "model_sha256")
    assert _rows(tmp_path / "remote", "series", drop) == _rows(tmp_path / "local", "series", drop)
    # source of a remote instance: its WADO-RS URL, no credentials
    sources = pq.read_table(tmp_path / "remote" / "slices", columns=["source", "study_uid", "series_uid", "sop_uid"]).to_pylist()
    for r in sources:
        assert r["source"] == f"{loaded.url}/studies/{r['study_uid']}/series/{r['series_uid']}/instances/{r['sop_uid']}"


def test_local_and_dicomweb_runs_resume_each_other(tmp_path: Path, loaded: Orthanc, archive: Path, model_path: Path, creds: None) -> None:
    out = tmp_path / "out"
    run([archive], model_path, out, RunOptions(workers=0))
    before = _rows(out, "slices", drop=())
    again = run([], model_path, out, RunOptions(workers=0, dicomweb=_query(loaded.input)))
    assert (again.series_ok, again.series_skipped, again.series_already_done) == (0, 0, 3)
    assert _rows(out, "slices", drop=()) == before
    # and the other way round
    out2 = tmp_path / "out2"
    run([], model_path, out2, RunOptions(workers=0, dicomweb=_query(loaded.input)))
    back = run([archive], model_path, out2, RunOptions(workers=0))
    assert (back.series_ok, back.series_already_done) == (0, 3)


def test_second_run_after_a_new_study_classifies_only_the_new_series(tmp_path: Path, loaded: Orthanc, model_path: Path, creds: None) -> None:
    out = tmp_path / "out"
    first = run([], model_path, out, RunOptions(workers=0, dicomweb=_query(loaded.input)))
    assert first.series_ok == 2
    new_study = "1.2.826.0.1.3680043.8.498.78"
    loaded.upload(write_series(tmp_path / "new", SeriesSpec(levels=LEVELS_30, study_uid=new_study, series_uid=new_study + ".1", seed=13)))
    second = run([], model_path, out, RunOptions(workers=0, dicomweb=_query(loaded.input)))
    assert (second.series_ok, second.series_already_done) == (1, 3)
    series = pq.read_table(out / "series").to_pylist()
    assert len(series) == 4 and len({r["series_uid"] for r in series}) == 4
    # --study narrows the query to one study
    only = run([], model_path, tmp_path / "only", RunOptions(workers=0, dicomweb=(DicomwebQuery(parse_input(loaded.input), studies=(new_study,)),)))
    assert only.series_ok == 1 and only.series_skipped == 0


def test_wrong_password_fails_fast_with_one_error_line(tmp_path: Path, loaded: Orthanc, model_path: Path) -> None:
    exe = str(Path(sys.executable).with_name("spinelevel"))
    env = dict(os.environ, SPINELEVEL_DICOMWEB_USER=USER, SPINELEVEL_DICOMWEB_PASSWORD="wrong-" + PASSWORD)
    out = tmp_path / "out"
    proc = subprocess.run([exe, "run", loaded.input, "--model", str(model_path), "--out", str(out)], capture_output=True, env=env, timeout=120)
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.decode().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "HTTP 401" in lines[0] and "SPINELEVEL_DICOMWEB_PASSWORD" in lines[0], lines
    assert PASSWORD.encode() not in proc.stderr + proc.stdout
    assert not out.exists()
    # a wrong URL too, and credentials in the URL are refused without repeating them
    bad = subprocess.run([exe, "run", loaded.input.replace("/dicom-web", "/nothing"), "--model", str(model_path), "--out", str(out)], capture_output=True, env=dict(env, SPINELEVEL_DICOMWEB_PASSWORD=PASSWORD), timeout=120)
    assert bad.returncode == 1 and b"error:" in bad.stderr and b"HTTP 404" in bad.stderr and not out.exists()
    inline = loaded.input.replace("http://", f"http://{USER}:{PASSWORD}@")
    leak = subprocess.run([exe, "run", inline, "--model", str(model_path), "--out", str(out)], capture_output=True, timeout=120)
    assert leak.returncode == 1 and b"credentials do not belong on the command line" in leak.stderr
    assert PASSWORD.encode() not in leak.stderr + leak.stdout and not out.exists()
    refused = subprocess.run([exe, "run", "dicomweb+http://127.0.0.1:9/dicom-web", "--model", str(model_path), "--out", str(out), "--dicomweb-retries", "0"], capture_output=True, timeout=120)
    assert refused.returncode == 1 and b"connection refused" in refused.stderr and not out.exists()


class _StopAfterFirstSeries:
    """Progress that stops the server when the first series is done."""

    def __init__(self, server: Orthanc) -> None:
        self.server = server

    def scanned(self, files: int) -> None:
        pass

    def planned(self, series: int, slices: int) -> None:
        pass

    def advanced(self, series: int, slices: int) -> None:
        if self.server.proc is not None:
            self.server.stop()


def test_server_stopped_mid_run_then_restarted_and_the_run_repeated(tmp_path: Path, loaded: Orthanc, archive: Path, model_path: Path, creds: None) -> None:
    out = tmp_path / "out"
    # full sampling, decoded in this process, instances one by one (a series retrieval would bring all
    # 30 slices of the second series at its first task): it is still being read when the first is done
    options = RunOptions(workers=0, sampling=SamplingOptions(mode="full"), dicomweb=_query(loaded.input, tries=2, backoff_s=0.1, timeout_s=5, series_fraction=2.0))
    first = run([], model_path, out, options, _StopAfterFirstSeries(loaded))
    assert (first.series_ok, first.series_error) == (1, 1)
    err = [r for r in pq.read_table(out / "series").to_pylist() if r["status"] == "error"]
    assert "connection refused" in err[0]["reason"] and "after 2 tries" in err[0]["reason"] and "re-run to retry" in err[0]["reason"]
    committed = [r for r in _rows(out, "slices", drop=()) if r["series_uid"] != err[0]["series_uid"]]
    loaded.start()  # same storage: the server comes back with what it held
    second = run([], model_path, out, options)
    assert (second.series_ok, second.series_error, second.series_already_done) == (1, 0, 2)
    # nothing committed was lost, and the whole output equals a clean local run's
    assert [r for r in _rows(out, "slices", drop=()) if r["series_uid"] != err[0]["series_uid"]] == committed
    run([archive], model_path, tmp_path / "local", RunOptions(workers=0, sampling=SamplingOptions(mode="full")))
    assert _rows(out, "slices") == _rows(tmp_path / "local", "slices")
    assert not [r for r in pq.read_table(out / "skipped").to_pylist() if "re-run to retry" in r["reason"]]


def test_transient_503s_are_retried_and_truncated_answers_are_errors(tmp_path: Path, loaded: Orthanc, model_path: Path, creds: None) -> None:
    with FaultProxy(loaded.port) as proxy:
        proxy.mode, proxy.count = "503", 3
        ok = run([], model_path, tmp_path / "ok", RunOptions(workers=0, dicomweb=_query(proxy.input, backoff_s=0.05)))
        assert (ok.series_ok, ok.series_error) == (2, 0) and proxy.count == 0
        proxy.mode = "truncate"
        cut = run([], model_path, tmp_path / "cut", RunOptions(workers=2, dicomweb=_query(proxy.input, tries=2, backoff_s=0.05)))
        assert (cut.series_ok, cut.series_error) == (0, 2)
        reasons = {r["reason"] for r in pq.read_table(tmp_path / "cut" / "series").to_pylist() if r["status"] == "error"}
        assert all("cut short" in r and "after 2 tries" in r for r in reasons), reasons
        proxy.mode = "pass"
        fixed = run([], model_path, tmp_path / "cut", RunOptions(workers=0, dicomweb=_query(proxy.input)))
        assert (fixed.series_ok, fixed.series_error, fixed.series_already_done) == (2, 0, 1)


def test_no_credential_in_any_output_byte(tmp_path: Path, loaded: Orthanc, model_path: Path) -> None:
    exe = str(Path(sys.executable).with_name("spinelevel"))
    env = dict(os.environ, SPINELEVEL_DICOMWEB_USER=USER, SPINELEVEL_DICOMWEB_PASSWORD=PASSWORD)
    env.pop("SPINELEVEL_DICOMWEB_TOKEN", None)
    out = tmp_path / "out"
    proc = subprocess.run(
        [exe, "run", loaded.input, "--model", str(model_path), "--out", str(out), "--verbose", "--workers", "2", "--push-kos"],
        capture_output=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    import base64

    needles = [PASSWORD.encode(), base64.b64encode(f"{USER}:{PASSWORD}".encode())]
    blob = proc.stdout + proc.stderr + b"".join(p.read_bytes() for p in out.rglob("*") if p.is_file())
    for needle in needles:
        assert needle not in blob
    assert b"2 KOS documents stored" in proc.stderr
    # the documents are on the server now, filed with their study
    kos = [s for s in loaded.series_of_study(STUDY) if s.get("Modality") == "KO"]
    assert len(kos) == 2


def test_bearer_token_and_netrc(tmp_path: Path, loaded: Orthanc, model_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from spinelevel.engine.dicomweb import check_server
    from spinelevel.errors import DicomwebError

    for var in ("SPINELEVEL_DICOMWEB_USER", "SPINELEVEL_DICOMWEB_PASSWORD", "SPINELEVEL_DICOMWEB_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine 127.0.0.1 login {USER} password {PASSWORD}\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    check_server(parse_input(loaded.input, timeout_s=5.0))  # netrc alone authenticates
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    monkeypatch.setenv("SPINELEVEL_DICOMWEB_TOKEN", "not-a-valid-token")
    # Orthanc knows no bearer tokens: the header is sent and refused (401), named as such
    with pytest.raises(DicomwebError, match="refused the credentials"):
        check_server(parse_input(loaded.input, timeout_s=5.1))
    monkeypatch.setenv("SPINELEVEL_DICOMWEB_USER", USER)
    with pytest.raises(InputError, match="not both"):
        check_server(parse_input(loaded.input, timeout_s=5.2))


def test_date_range_selects_studies(tmp_path: Path, loaded: Orthanc, model_path: Path, creds: None) -> None:
    from spinelevel.engine.dicomweb import DicomwebScanner

    conn = parse_input(loaded.input)
    # the synthetic study has no StudyDate: a date range leaves it out
    assert list(DicomwebScanner(DicomwebQuery(conn, since="20260101"))) == []
    assert len([h for h in DicomwebScanner(DicomwebQuery(conn)) if hasattr(h, "sop_uid")]) == 61


def test_full_run_retrieves_each_series_in_one_request(tmp_path: Path, loaded: Orthanc, archive: Path, model_path: Path, creds: None) -> None:
    full = SamplingOptions(mode="full")
    with FaultProxy(loaded.port) as proxy:
        by_series = run([], model_path, tmp_path / "series", RunOptions(workers=0, sampling=full, dicomweb=_query(proxy.input)))
        requests = proxy.requests
    assert by_series.series_ok == 2
    # QIDO-RS, two metadata resources, two series retrievals: far fewer than the 60 instances
    assert requests < 12, requests
    run([archive], model_path, tmp_path / "local", RunOptions(workers=0, sampling=full))
    assert _rows(tmp_path / "series", "slices") == _rows(tmp_path / "local", "slices")


def _series_retrievals(paths: list[str]) -> list[str]:
    return [p for p in paths if re.fullmatch(r"/dicom-web/studies/[^/?]+/series/[^/?]+", p)]


def _instance_retrievals(paths: list[str]) -> list[str]:
    return [p for p in paths if re.fullmatch(r"/dicom-web/studies/[^/?]+/series/[^/?]+/instances/[^/?]+", p)]


def test_sparse_run_retrieves_each_series_once_into_a_spool_it_removes(tmp_path: Path, loaded: Orthanc, archive: Path, model_path: Path, creds: None, monkeypatch: pytest.MonkeyPatch) -> None:
    import tempfile

    spools = tmp_path / "tmp"
    spools.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spools))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = spools / f"spinelevel-spool-{dead.pid}-x1y2"  # left by a killed run
    stale.mkdir()
    (stale / "series.bin").write_bytes(b"old")
    out = tmp_path / "out"
    made: list[Path] = []
    from spinelevel.engine import series_spool

    make_root = series_spool.make_root
    monkeypatch.setattr(series_spool, "make_root", lambda: made.append(make_root()) or made[-1])
    with FaultProxy(loaded.port) as proxy:
        # sparse sampling (the CPU default), two decode worker processes sharing the spool
        summary = run([], model_path, out, RunOptions(workers=2, dicomweb=_query(proxy.input)))
        paths = list(proxy.paths)
    assert summary.series_ok == 2
    # each classified series in one request, once, whatever the rounds and workers; the localizer's
    # series was skipped from its metadata, its pixels never asked for; no instance alone
    retrieved = _series_retrievals(paths)
    assert sorted(retrieved) == sorted(set(retrieved)) and len(retrieved) == 2
    assert _instance_retrievals(paths) == []
    # a private folder outside the output (patient data), gone after the run, and the stale one too
    assert len(made) == 1 and made[0].parent == spools
    assert list(spools.iterdir()) == []
    run([archive], model_path, tmp_path / "local", RunOptions(workers=2))
    assert _rows(out, "slices") == _rows(tmp_path / "local", "slices")


def test_by_instance_option_retrieves_only_the_slices_the_model_sees(tmp_path: Path, loaded: Orthanc, archive: Path, model_path: Path, creds: None) -> None:
    from typer.testing import CliRunner

    from spinelevel.cli import app

    with FaultProxy(loaded.port) as proxy:
        res = CliRunner().invoke(app, ["run", proxy.input, "--model", str(model_path), "--out", str(tmp_path / "out"), "--workers", "0", "--dicomweb-by-instance", "-q"])
        paths = list(proxy.paths)
    assert res.exit_code == 0, res.output
    assert _series_retrievals(paths) == []
    seen = pq.read_table(tmp_path / "out" / "slices", columns=["evaluated"]).column("evaluated").to_pylist()
    assert len(_instance_retrievals(paths)) == sum(seen) < len(seen)
    run([archive], model_path, tmp_path / "local", RunOptions(workers=0))
    assert _rows(tmp_path / "out", "slices") == _rows(tmp_path / "local", "slices")
