"""Hostile and broken input: the run always completes and accounts for every input file.

A property-based test (hypothesis) mutates valid DICOM files, bytes and tags, and runs them through
the engine next to a healthy series that must come through untouched.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dicomgen import SeriesSpec, level_sequence, write_series
from spinelevel.engine.pipeline import RunOptions, run
from spinelevel.engine.sampling import SamplingOptions
from spinelevel.engine.select import SelectOptions
from spinelevel.errors import OutputError

STUDY = "1.2.826.0.1.3680043.8.498.77"
LEVELS = level_sequence({"T": 3, "L1": 2, "L2": 2, "L3": 3, "L4": 2})
FULL = SamplingOptions(mode="full")
MIN5 = SelectOptions(min_slices=5)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pristine")
    write_series(root / "victim", SeriesSpec(levels=LEVELS, study_uid=STUDY, series_uid=STUDY + ".1", seed=1, size=32), nested=False)
    write_series(root / "healthy", SeriesSpec(levels=LEVELS, study_uid=STUDY, series_uid=STUDY + ".2", seed=2, size=32), nested=False)
    return root


TAG_MUTATIONS = {
    "nan_position": lambda ds: setattr(ds, "ImagePositionPatient", ["nan", "0", "0"]),
    "no_position": lambda ds: delattr(ds, "ImagePositionPatient"),
    "zero_spacing": lambda ds: setattr(ds, "PixelSpacing", ["0", "0"]),
    "slope_zero": lambda ds: setattr(ds, "RescaleSlope", "0"),
    "rows_mismatch": lambda ds: setattr(ds, "Rows", ds.Rows * 2),
    "bits_mismatch": lambda ds: setattr(ds, "BitsAllocated", 32),
    "no_pixels": lambda ds: delattr(ds, "PixelData"),
    "duplicate_sop": lambda ds: setattr(ds, "SOPInstanceUID", STUDY + ".1.dup"),
    "other_size": lambda ds: (setattr(ds, "Rows", 16), setattr(ds, "Columns", 64)),
    "sagittal_slice": lambda ds: setattr(ds, "ImageOrientationPatient", ["0", "1", "0", "0", "0", "-1"]),
    "garbage_orientation": lambda ds: setattr(ds, "ImageOrientationPatient", ["1", "0", "0", "1", "0", "0"]),
    "not_ct": lambda ds: setattr(ds, "Modality", "MR"),
    "huge_size": lambda ds: (setattr(ds, "Rows", 60000), setattr(ds, "Columns", 60000)),
    "text_in_number": lambda ds: setattr(ds, "RescaleIntercept", "abc"),
}


def _byte_mutation(data: bytes, kind: str, where: float, value: int) -> bytes:
    if not data:
        return data
    at = int(where * (len(data) - 1))
    if kind == "truncate":
        return data[:at]
    if kind == "flip":
        return data[:at] + bytes([data[at] ^ (value or 1)]) + data[at + 1 :]
    if kind == "zero_run":
        return data[:at] + b"\0" * 64 + data[at + 64 :]
    if kind == "garbage":
        return data[:at] + bytes((value * i) % 256 for i in range(97)) + data[at:]
    return b""  # empty


mutation = st.one_of(
    st.tuples(st.just("tag"), st.sampled_from(sorted(TAG_MUTATIONS)), st.integers(0, 11)),
    st.tuples(st.just("bytes"), st.sampled_from(["truncate", "flip", "zero_run", "garbage", "empty"]), st.integers(0, 11), st.floats(0, 1, allow_subnormal=False), st.integers(0, 255)),
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutations=st.lists(mutation, min_size=1, max_size=10))
def test_mutated_files_never_crash_the_run(tmp_path_factory: pytest.TempPathFactory, pristine: Path, model_path: Path, mutations: list) -> None:
    work = tmp_path_factory.mktemp("mut")
    inp = work / "in"
    shutil.copytree(pristine, inp)
    victims = sorted((inp / "victim").iterdir())
    for m in mutations:
        target = victims[m[2] % len(victims)]
        if m[0] == "tag":
            try:
                ds = pydicom.dcmread(target, force=True)
                TAG_MUTATIONS[m[1]](ds)
                ds.save_as(target, enforce_file_format=False)
            except Exception:
                continue  # a previous byte mutation made it unreadable even for the mutator
        else:
            target.write_bytes(_byte_mutation(target.read_bytes(), m[1], m[3], m[4]))
    out = work / "out"
    summary = run([inp], model_path, out, RunOptions(workers=0, sampling=FULL, select=MIN5))
    slices = pq.read_table(out / "slices").to_pylist() if (out / "slices").exists() and any((out / "slices").iterdir()) else []
    skipped = pq.read_table(out / "skipped").to_pylist() if any((out / "skipped").iterdir()) else []
    files = sorted(str(p) for p in inp.rglob("*") if p.is_file())
    accounted = sorted([r["source"] for r in slices] + [r["source"] for r in skipped])
    assert accounted == files
    assert all(r["reason"] for r in skipped)
    healthy = [r for r in slices if r["series_uid"] == STUDY + ".2"]
    assert len(healthy) == len(LEVELS)
    series = {r["series_uid"]: r for r in pq.read_table(out / "series").to_pylist()}
    assert series[STUDY + ".2"]["status"] == "ok"
    assert summary.series_ok >= 1


def test_full_disk_stops_cleanly_and_keeps_what_was_committed(tmp_path: Path, pristine: Path, model_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import spinelevel.engine.writer as writer

    calls = {"n": 0}
    real = writer.pq.write_table

    def flaky(table, where, **kw):  # noqa: ANN001, ANN003
        calls["n"] += 1
        if calls["n"] == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(table, where, **kw)

    monkeypatch.setattr(writer.pq, "write_table", flaky)
    out = tmp_path / "out"
    with pytest.raises(OutputError, match="No space left on device"):
        run([pristine], model_path, out, RunOptions(workers=0, sampling=FULL, rows_per_part=5, select=MIN5))
    for part in out.glob("*/part-*.parquet"):
        pq.read_metadata(part)
    assert not list(out.glob("*/.*.tmp"))
    monkeypatch.setattr(writer.pq, "write_table", real)
    summary = run([pristine], model_path, out, RunOptions(workers=0, sampling=FULL, rows_per_part=5, select=MIN5))
    assert summary.series_ok + summary.series_already_done == 2
    assert pq.read_table(out / "slices").num_rows == 2 * len(LEVELS)


def test_unreadable_files_are_recorded(tmp_path: Path, pristine: Path, model_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As root, chmod does not stop reads: simulate EACCES on one file at open."""
    import builtins

    inp = tmp_path / "in"
    shutil.copytree(pristine, inp)
    locked = sorted((inp / "victim").iterdir())[0]
    real_open = builtins.open

    def guarded(file, *args, **kw):  # noqa: ANN001, ANN002, ANN003
        if str(file) == str(locked):
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return real_open(file, *args, **kw)

    monkeypatch.setattr(builtins, "open", guarded)
    run([inp], model_path, tmp_path / "out", RunOptions(workers=0, sampling=FULL, select=MIN5))
    skipped = {r["source"]: r["reason"] for r in pq.read_table(tmp_path / "out" / "skipped").to_pylist()}
    assert skipped[str(locked)] == "cannot read: permission denied"
