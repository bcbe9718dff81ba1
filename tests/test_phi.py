"""No patient identity in any output or log unless asked for with --keep-phi."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pydicom
import pytest

from spinelevel.phantom import PhantomOptions, generate

IDENTIFYING = ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "InstitutionName", "ReferringPhysicianName")


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("phi") / "archive"
    generate(root, PhantomOptions(studies=2, seed=4242, size=64, coverage="lumbar", thickness_mm=5.0, localizer_probability=1.0, dose_report_probability=1.0))
    any_file = next(p for p in root.rglob("*") if p.is_file() and p.suffix == "")
    ds = pydicom.dcmread(any_file, stop_before_pixels=True)
    secrets = {kw: str(ds.get(kw, "")) for kw in IDENTIFYING if str(ds.get(kw, ""))}
    assert {"PatientName", "PatientID", "PatientBirthDate"} <= set(secrets)
    return root, secrets


def _needles(secrets: dict[str, str]) -> list[bytes]:
    out = []
    for value in secrets.values():
        out.append(value.encode())
        out.extend(part.encode() for part in value.split("^") if len(part) >= 4)
    return out


def test_no_identity_in_outputs_or_logs(tmp_path: Path, phantom: tuple[Path, dict[str, str]], model_path: Path) -> None:
    root, secrets = phantom
    out = tmp_path / "out"
    exe = str(Path(sys.executable).with_name("spinelevel"))
    proc = subprocess.run([exe, "run", str(root), "--model", str(model_path), "--out", str(out), "--verbose", "--workers", "2"], capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()
    blob = proc.stdout + proc.stderr + b"".join(p.read_bytes() for p in out.rglob("*") if p.is_file())
    for needle in _needles(secrets):
        assert needle not in blob, needle
    # and the failure path: a bad option's message
    bad = subprocess.run([exe, "run", str(root), "--model", str(model_path), "--out", str(tmp_path / "x"), "--keep-phi", "NotATag"], capture_output=True, timeout=120)
    assert bad.returncode == 1 and b"NotATag" in bad.stderr
    for needle in _needles(secrets):
        assert needle not in bad.stderr


def test_keep_phi_adds_only_the_named_tags(tmp_path: Path, phantom: tuple[Path, dict[str, str]], model_path: Path) -> None:
    from spinelevel.engine.pipeline import RunOptions, run
    from spinelevel.engine.scan import ScanOptions

    root, secrets = phantom
    out = tmp_path / "out"
    run([root], model_path, out, RunOptions(workers=0, scan=ScanOptions(keep_tags=("PatientID", "AccessionNumber"))))
    series = pq.read_table(out / "series")
    assert "PatientID" in series.column_names and "AccessionNumber" in series.column_names
    assert secrets["PatientID"] in series["PatientID"].to_pylist()
    blob = b"".join(p.read_bytes() for p in out.rglob("*") if p.is_file())
    assert secrets["PatientName"].encode() not in blob
    assert secrets["PatientBirthDate"].encode() not in blob
