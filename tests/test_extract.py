"""spinelevel extract: DICOM copies, the Key Object Selection, previews, manifest, and their failure modes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401 - pa.compute
import pyarrow.parquet as pq
import pydicom
import pytest
from typer.testing import CliRunner

from conftest import L3_PICK_30, LEVELS_30
from dicomgen import SeriesSpec, level_sequence, write_series
from spinelevel.cli import app

runner = CliRunner()

# Identity written into every dicomgen file (SeriesSpec defaults and make_slice_dataset).
PHI = ("DOE^JANE", "PID-123456", "19400101", "ACC-998877")

# 12 slices, T at the top and L3 at the bottom: neighbours run off both ends.
# T run 0..2 (pick 1), L1 3..5 (pick 4), L2 6..8, L3 9..11 (pick 10).
LEVELS_END = level_sequence({"T": 3, "L1": 3, "L2": 3, "L3": 3})


def _run(inputs: list[Path], model: Path, out: Path, *extra: str) -> None:
    args = ["run", *map(str, inputs), "-m", str(model), "-o", str(out), "--workers", "0", "--sampling", "full", "-q", *extra]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output


def _extract(run_dir: Path, out: Path, *extra: str, code: int = 0):  # noqa: ANN202
    result = runner.invoke(app, ["extract", str(run_dir), "--out", str(out), *extra])
    assert result.exit_code == code, result.output
    return result


def _files(root: Path) -> dict[str, bytes]:
    """Every non-dot file under root (the lock file holds a pid), by relative path."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and not p.name.startswith(".")}


def _dciodvfy_errors(path: Path) -> list[str]:
    proc = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("Error")]


needs_dciodvfy = pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (Debian's dicom3tools) is not installed; .ci/run installs it")


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory: pytest.TempPathFactory, series_dir: Path, model_path: Path) -> Path:
    """A run over the two 30-slice series of conftest (folders)."""
    out = tmp_path_factory.mktemp("run") / "run"
    _run([series_dir], model_path, out)
    return out


def test_folder_extract_copies_picks_byte_for_byte(tmp_path: Path, folder_run: Path) -> None:
    out = tmp_path / "x"
    result = _extract(folder_run, out)
    assert "extract: 2 series, 2 instances" in result.output
    m = pq.read_table(out / "manifest.parquet")
    assert m.schema.field("flags").type == pa.list_(pa.string())
    assert m.schema.field("frame").type == pa.int32()
    rows = m.to_pylist()
    assert len(rows) == 2
    slices = pq.read_table(folder_run / "slices").to_pylist()
    by_sop = {r["sop_uid"]: r for r in slices}
    series = {r["series_uid"]: r for r in pq.read_table(folder_run / "series").to_pylist()}
    for r in rows:
        assert r["level"] == "L3" and r["offset"] == 0 and r["frame"] is None
        assert r["sop_uid"] == series[r["series_uid"]]["l3_sop_uid"]
        assert r["slice_index"] == L3_PICK_30
        assert r["file"] == f"{r['study_uid']}/{r['series_uid']}/L3_+0.dcm"
        assert (out / r["file"]).read_bytes() == Path(r["source"]).read_bytes()
        assert r["source"] == by_sop[r["sop_uid"]]["source"] and r["z_mm"] == by_sop[r["sop_uid"]]["z_mm"]
        assert r["kos"] == f"{r['study_uid']}/{r['series_uid']}/kos.dcm" and (out / r["kos"]).is_file()
        png = out / r["png"]
        from PIL import Image

        with Image.open(png) as img:
            assert img.format == "PNG" and img.height == 512
        # the copy keeps the original header, identity included (the next tool needs it)
        assert pydicom.dcmread(out / r["file"]).PatientID == "PID-123456"
    meta = json.loads(m.schema.metadata[b"spinelevel.extract"])
    assert meta["levels"] == ["L3"] and "middle slice" in meta["pick_definition"] and meta["l3_definition"]
    assert list(pq.read_table(out / "skipped.parquet").to_pylist()) == []
    assert str(out.resolve()) in json.loads((folder_run / "extracted.json").read_text())["dirs"]


@needs_dciodvfy
def test_kos_is_valid_and_references_the_picks(tmp_path: Path, series_dir: Path, model_path: Path, copy_of) -> None:  # noqa: ANN001
    import highdicom as hd

    src = copy_of(series_dir)
    run = tmp_path / "run"
    _run([src], model_path, run)
    series = {r["series_uid"]: r for r in pq.read_table(run / "series").to_pylist()}
    sl = pq.read_table(run / "slices").to_pylist()
    # After the run, give one pick's source more header than the KOS may take (same SOP UID: still valid).
    uid = sorted(series)[0]
    pick_src = next(r["source"] for r in sl if r["sop_uid"] == series[uid]["l3_sop_uid"])
    ds = pydicom.dcmread(pick_src)
    ds.InstitutionName = "GENERAL HOSPITAL"
    ds.PatientAge = "084Y"
    ds.PatientSex = "F"
    ds.StudyDate, ds.StudyTime, ds.StudyID = "20200102", "101500", "S77"
    ds.save_as(pick_src)
    out = tmp_path / "x"
    _extract(run, out, "--levels", "L3,L1")
    rows = [r for r in pq.read_table(out / "manifest.parquet").to_pylist() if r["series_uid"] == uid]
    kos_path = out / rows[0]["kos"]
    assert _dciodvfy_errors(kos_path) == []
    kos = pydicom.dcmread(kos_path)
    doc = hd.ko.KeyObjectSelectionDocument.from_dataset(kos)
    assert kos.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.59" and kos.Modality == "KO"
    title = doc.content[0].ConceptNameCodeSequence[0]
    assert (title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning) == ("128196", "DCM", "For Segmentation")
    # content: one IMAGE per pick, in the order asked for, plus one text item naming levels and tool
    items = doc.content[0].ContentSequence
    images = [i for i in items if i.ValueType == "IMAGE"]
    picks = {r["level"]: r["sop_uid"] for r in rows if r["offset"] == 0}
    assert [i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in images] == [picks["L3"], picks["L1"]]
    text = [i for i in items if i.ValueType == "TEXT" and i.ConceptNameCodeSequence[0].CodeValue == "113012"]
    assert len(text) == 1
    sha = series[uid]["model_sha256"]
    assert "L3 at slice 15" in text[0].TextValue and "L1 at slice" in text[0].TextValue
    assert sha in text[0].TextValue and "spinelevel 0.1.0" in text[0].TextValue and "L3 definition:" in text[0].TextValue
    # evidence: the picks of this study and series
    ev = kos.CurrentRequestedProcedureEvidenceSequence
    assert ev[0].StudyInstanceUID == rows[0]["study_uid"]
    assert ev[0].ReferencedSeriesSequence[0].SeriesInstanceUID == uid
    assert {i.ReferencedSOPInstanceUID for i in ev[0].ReferencedSeriesSequence[0].ReferencedSOPSequence} == set(picks.values())
    for sop in picks.values():
        assert doc.resolve_reference(sop) == (rows[0]["study_uid"], uid, sop)
    # the patient and study module from the source; nothing else of its header
    assert (str(kos.PatientName), kos.PatientID, kos.PatientBirthDate, kos.PatientSex) == ("DOE^JANE", "PID-123456", "19400101", "F")
    assert (kos.StudyInstanceUID, kos.AccessionNumber, kos.StudyDate, kos.StudyTime, kos.StudyID) == (rows[0]["study_uid"], "ACC-998877", "20200102", "101500", "S77")
    assert "InstitutionName" not in kos and "PatientAge" not in kos and "ImagePositionPatient" not in kos
    assert kos.SeriesInstanceUID != uid and kos.Manufacturer == "spinelevel"


def _member_bytes(archive: Path, member: str) -> bytes:
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            return zf.read(member)
    with tarfile.open(archive) as tf:
        return tf.extractfile(member).read()


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_archive_members_are_copied_byte_for_byte(tmp_path: Path, series_dir: Path, model_path: Path, kind: str) -> None:
    archive = tmp_path / f"export.{kind}"
    files = [p for p in sorted(series_dir.rglob("*")) if p.is_file()]
    if kind == "zip":
        with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
            for p in files:
                zf.write(p, f"DICOM/{p.relative_to(series_dir)}")
    else:
        with tarfile.open(archive, "w:gz") as tf:
            for p in files:
                tf.add(p, f"DICOM/{p.relative_to(series_dir)}")
    run = tmp_path / "run"
    _run([archive], model_path, run)
    out = tmp_path / "x"
    _extract(run, out, "--neighbours", "1")
    rows = pq.read_table(out / "manifest.parquet").to_pylist()
    assert len(rows) == 6 and [r["offset"] for r in rows[:3]] == [-1, 0, 1]
    for r in rows:
        path, _, member = r["source"].partition("::")
        assert path == str(archive) and member.startswith("DICOM/")
        assert (out / r["file"]).read_bytes() == _member_bytes(archive, member)
    assert sum(1 for r in rows if r["png"]) == 2


def test_neighbours_at_the_series_ends_give_fewer_rows(tmp_path: Path, model_path: Path) -> None:
    src = tmp_path / "in"
    study = "1.2.826.0.1.3680043.8.498.77"
    write_series(src, SeriesSpec(levels=LEVELS_END, study_uid=study, series_uid=study + ".1", seed=3))
    run = tmp_path / "run"
    _run([src], model_path, run, "--level-extents", "off")  # 15 mm levels: shorter than the bounds allow
    out = tmp_path / "x"
    result = _extract(run, out, "--levels", "T,L3,L1,L5", "--neighbours", "3")
    rows = pq.read_table(out / "manifest.parquet").to_pylist()
    got = [(r["level"], r["offset"], r["slice_index"]) for r in rows]
    assert got == (
        [("T", k, 1 + k) for k in range(-1, 4)]
        + [("L3", k, 10 + k) for k in range(-3, 2)]
        + [("L1", k, 4 + k) for k in range(-3, 4)]
    )
    folder = out / study / (study + ".1")
    assert sorted(p.name for p in folder.glob("*.dcm")) == sorted([f"{lv}_{k:+d}.dcm" for lv, k, _ in got] + ["kos.dcm"])
    # the series has no L5: a line in the summary and a skipped row, not an error
    assert "no L5 decoded in this series (levels present: T, L1, L2, L3)" in result.output
    skipped = pq.read_table(out / "skipped.parquet").to_pylist()
    assert [(s["series_uid"], s["level"]) for s in skipped] == [(study + ".1", "L5")]
    # one KOS for the three picks
    kos = pydicom.dcmread(folder / "kos.dcm")
    images = [i for i in kos.ContentSequence if i.ValueType == "IMAGE"]
    assert len(images) == 3


def test_extracting_again_is_idempotent_and_drops_what_is_no_longer_asked(tmp_path: Path, folder_run: Path) -> None:
    out = tmp_path / "x"
    _extract(folder_run, out, "--levels", "L3,L2", "--neighbours", "2")
    first = _files(out)
    assert len([k for k in first if k.endswith(".dcm")]) == 2 * (2 * 5 + 1)
    again = _extract(folder_run, out, "--levels", "L3,L2", "--neighbours", "2")
    assert "(0 files written," in again.output
    assert _files(out) == first
    # fewer levels: the files only the old manifest named are removed, the rest stay as they were
    _extract(folder_run, out, "--levels", "L3", "--no-png")
    now = _files(out)
    assert not any("L2_" in k or k.endswith(".png") for k in now)
    for k, v in now.items():
        if k.endswith("L3_+0.dcm"):
            assert v == first[k]
    assert not list(out.rglob(".*.tmp*"))


def test_interrupted_extract_leaves_no_partial_file(tmp_path: Path, folder_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import spinelevel.extract.core as core

    real_fsync = os.fsync
    calls = {"n": 0}

    def dying_fsync(fd: int) -> None:
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        real_fsync(fd)

    out = tmp_path / "x"
    monkeypatch.setattr(core.os, "fsync", dying_fsync)
    result = runner.invoke(app, ["extract", str(folder_run), "--out", str(out), "--neighbours", "1"])
    assert result.exit_code == 130
    monkeypatch.setattr(core.os, "fsync", real_fsync)
    # every file under a final name is complete: a DICOM copy equal to its source
    assert not (out / "manifest.parquet").exists()
    assert not list(out.rglob(".*.tmp*"))
    assert calls["n"] == 4 and list(out.rglob("*.dcm"))  # it died after writing some copies
    for p in out.rglob("*.dcm"):
        pydicom.dcmread(p)
    _extract(folder_run, out, "--neighbours", "1")
    clean = tmp_path / "clean"
    _extract(folder_run, clean, "--neighbours", "1")
    assert _files(out) == _files(clean)


def test_changed_or_vanished_source_is_reported_not_copied(tmp_path: Path, series_dir: Path, model_path: Path, copy_of) -> None:  # noqa: ANN001
    src = copy_of(series_dir)
    run = tmp_path / "run"
    _run([src], model_path, run)
    series = sorted(pq.read_table(run / "series").to_pylist(), key=lambda r: r["series_uid"])
    sl = pq.read_table(run / "slices").to_pylist()
    a, b = series[0], series[1]
    # series a: its pick's file now holds another instance (new SOP UID)
    pick_a = next(r for r in sl if r["sop_uid"] == a["l3_sop_uid"])
    ds = pydicom.dcmread(pick_a["source"])
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(pick_a["source"])
    # series b: the neighbour below its pick was deleted
    below_b = next(r for r in sl if r["series_uid"] == b["series_uid"] and r["slice_index"] == b["l3_index"] + 1)
    os.unlink(below_b["source"])
    out = tmp_path / "x"
    result = _extract(run, out, "--neighbours", "1")
    assert "source changed since the run: its SOP Instance UID is not the one classified" in result.output
    assert "source vanished since the run (file not found)" in result.output
    rows = pq.read_table(out / "manifest.parquet").to_pylist()
    got = {(r["series_uid"], r["offset"]) for r in rows}
    assert got == {(a["series_uid"], -1), (a["series_uid"], 1), (b["series_uid"], -1), (b["series_uid"], 0)}
    a_dir = out / a["study_uid"] / a["series_uid"]
    assert not (a_dir / "L3_+0.dcm").exists() and not (a_dir / "kos.dcm").exists()
    assert not (out / b["study_uid"] / b["series_uid"] / "L3_+1.dcm").exists()
    skipped = {(s["series_uid"], s["offset"]): s for s in pq.read_table(out / "skipped.parquet").to_pylist()}
    assert set(skipped) == {(a["series_uid"], 0), (b["series_uid"], 1)}
    assert skipped[(a["series_uid"], 0)]["source"] == pick_a["source"]


def test_phi_stays_out_of_manifest_previews_and_summary(tmp_path: Path, folder_run: Path) -> None:
    out = tmp_path / "x"
    result = _extract(folder_run, out, "--levels", "L3,L1", "--neighbours", "1")
    for path in [out / "manifest.parquet", out / "skipped.parquet", *out.rglob("*.png")]:
        data = path.read_bytes()
        for value in PHI:
            assert value.encode() not in data, (path, value)
    table = pq.read_table(out / "manifest.parquet")
    text = json.dumps(table.to_pylist()) + str(table.schema.metadata)
    for value in PHI:
        assert value not in text and value not in result.output
    assert not {"PatientName", "PatientID", "patient_id", "patient_name"} & set(table.column_names)


def _flagged_run(tmp_path: Path, model_path: Path) -> tuple[Path, str, str]:
    """A run with one clean series and one with a one-slice L3 run (short_l3)."""
    src = tmp_path / "in"
    study = "1.2.826.0.1.3680043.8.498.91"
    write_series(src, SeriesSpec(levels=LEVELS_30, study_uid=study, series_uid=study + ".1", seed=1))
    short = level_sequence({"T": 6, "L1": 4, "L2": 4, "L3": 1, "L4": 4, "L5": 4, "S": 4})
    write_series(src, SeriesSpec(levels=short, study_uid=study, series_uid=study + ".2", seed=2))
    run = tmp_path / "run"
    # order-only decoding: the extent bounds would not let a one-slice L3 run stand
    _run([src], model_path, run, "--level-extents", "off")
    flags = {r["series_uid"]: r["flags"] for r in pq.read_table(run / "series").to_pylist()}
    assert "short_l3" in flags[study + ".2"] and not flags[study + ".1"]
    return run, study + ".1", study + ".2"


def test_flagged_series_are_exported_with_flags_or_skipped(tmp_path: Path, model_path: Path) -> None:
    run, clean, flagged = _flagged_run(tmp_path, model_path)
    out = tmp_path / "x"
    result = _extract(run, out)
    assert "1 of them flagged" in result.output
    rows = {r["series_uid"]: r for r in pq.read_table(out / "manifest.parquet").to_pylist()}
    assert "short_l3" in rows[flagged]["flags"] and rows[clean]["flags"] == []
    out2 = tmp_path / "y"
    result = _extract(run, out2, "--skip-flagged")
    assert [r["series_uid"] for r in pq.read_table(out2 / "manifest.parquet").to_pylist()] == [clean]
    skipped = pq.read_table(out2 / "skipped.parquet").to_pylist()
    assert [(s["series_uid"], s["reason"]) for s in skipped] == [(flagged, "flagged (short_l3); --skip-flagged")]
    assert f"{flagged}: flagged (short_l3)" in result.output


def test_bad_input_is_one_error_line_before_anything_is_written(tmp_path: Path, folder_run: Path) -> None:
    not_a_run = tmp_path / "empty"
    not_a_run.mkdir()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cases = [
        ([str(not_a_run), "--out", str(tmp_path / "a")], "not a run directory of 'spinelevel run'", tmp_path / "a"),
        ([str(tmp_path / "nope"), "--out", str(tmp_path / "b")], "no such run directory", tmp_path / "b"),
        ([str(folder_run), "--out", str(tmp_path / "c"), "--levels", "L3,L9"], "--levels L9: not a class of the model card", tmp_path / "c"),
        ([str(folder_run), "--out", str(tmp_path / "d"), "--levels", ","], "--levels is empty", tmp_path / "d"),
        ([str(folder_run), "--out", str(tmp_path / "e"), "--kos-title", "ForFun"], "not a key object selection title", tmp_path / "e"),
        ([str(folder_run), "--out", str(blocker / "x")], "cannot create the extract folder", None),
    ]
    for args, message, out in cases:
        result = runner.invoke(app, ["extract", *args])
        assert result.exit_code == 1, (args, result.output)
        assert result.output.startswith("error:") and message in result.output, result.output
        assert result.output.count("\n") <= 2 and "Traceback" not in result.output
        if out is not None:
            assert not out.exists()
    bad = runner.invoke(app, ["extract", str(folder_run), "--out", str(tmp_path / "f"), "--neighbours", "-1"])
    assert bad.exit_code == 2


def test_run_with_extract_does_it_at_the_end(tmp_path: Path, series_dir: Path, model_path: Path) -> None:
    out, x = tmp_path / "run", tmp_path / "x"
    result = runner.invoke(app, ["run", str(series_dir), "-m", str(model_path), "-o", str(out), "--workers", "0", "--extract", str(x), "--extract-levels", "L3,L1", "--extract-neighbours", "1"])
    assert result.exit_code == 0, result.output
    assert "extract: 2 series, 12 instances" in result.output and "2 series: 2 processed" in result.output
    assert pq.read_table(x / "manifest.parquet").num_rows == 12
    bad = runner.invoke(app, ["run", str(series_dir), "-m", str(model_path), "-o", str(tmp_path / "r2"), "--extract", str(tmp_path / "y"), "--extract-levels", "L7"])
    assert bad.exit_code == 1 and "--extract-levels" in bad.output
    assert not (tmp_path / "r2").exists()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    bad = runner.invoke(app, ["run", str(series_dir), "-m", str(model_path), "-o", str(tmp_path / "r3"), "--extract", str(blocker / "x")])
    assert bad.exit_code == 1 and "cannot create the extract folder" in bad.output
    assert not (tmp_path / "r3").exists()


def test_review_report_links_the_extracted_pictures(tmp_path: Path, series_dir: Path, model_path: Path) -> None:
    out, x = tmp_path / "run", tmp_path / "x"
    result = runner.invoke(app, ["run", str(series_dir), "-m", str(model_path), "-o", str(out), "--workers", "0", "--extract", str(x), "--qc", "-q"])
    assert result.exit_code == 0, result.output
    html = (out / "report" / "index.html").read_text(encoding="utf-8")
    rows = pq.read_table(x / "manifest.parquet").to_pylist()
    for r in rows:
        rel = os.path.relpath(x / r["png"], (out / "report").resolve())
        assert json.dumps(rel)[1:-1] in html
        assert (out / "report" / rel).is_file()


# -- multi-frame (Enhanced CT): a run directory with the frame column, as the real-archives engine writes it


def _enhanced_ct(path: Path, n_frames: int, hu: np.ndarray) -> pydicom.Dataset:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    uid = "1.2.826.0.1.3680043.8.498.55"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"  # Enhanced CT Image Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = uid, uid + ".1"
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.AccessionNumber = "DOE^JANE", "PID-123456", "19400101", "ACC-998877"
    ds.Modality = "CT"
    ds.Rows, ds.Columns = hu.shape[1:]
    ds.NumberOfFrames = n_frames
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    shared = Dataset()
    pm = Dataset()
    pm.PixelSpacing, pm.SliceThickness = [0.8, 0.8], 5.0
    po = Dataset()
    po.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    pv = Dataset()
    pv.RescaleIntercept, pv.RescaleSlope, pv.RescaleType = -1024, 1, "HU"
    shared.PixelMeasuresSequence, shared.PlaneOrientationSequence, shared.PixelValueTransformationSequence = [pm], [po], [pv]
    ds.SharedFunctionalGroupsSequence = [shared]
    per = []
    for i in range(n_frames):
        item = Dataset()
        pp = Dataset()
        pp.ImagePositionPatient = [0, 0, 100 - 5 * i]
        item.PlanePositionSequence = [pp]
        per.append(item)
    ds.PerFrameFunctionalGroupsSequence = per
    ds.PixelData = (hu + 1024).astype(np.int16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return ds


def test_multiframe_source_is_copied_whole_and_the_frame_named(tmp_path: Path, folder_run: Path) -> None:
    from spinelevel.engine.writer import SERIES_SCHEMA, SKIPPED_SCHEMA, slices_schema

    n = 12
    hu = np.stack([np.full((32, 32), -100 + 20 * i, np.int16) for i in range(n)])
    mf = tmp_path / "enhanced.dcm"
    ds = _enhanced_ct(mf, n, hu)
    run = tmp_path / "run"
    for name in ("slices", "series", "skipped"):
        (run / name).mkdir(parents=True)
    classes = ("T", "L1", "L2", "L3", "L4", "L5", "S")
    levels = LEVELS_END
    schema = slices_schema(classes)
    cols = {f.name: [None] * n for f in schema}
    cols.update(
        study_uid=[ds.StudyInstanceUID] * n, series_uid=[ds.SeriesInstanceUID] * n, sop_uid=[ds.SOPInstanceUID] * n,
        source=[str(mf)] * n, slice_index=list(range(n)), z_mm=[100.0 - 5 * i for i in range(n)], level=list(levels),
        evaluated=[False] * n, frame=list(range(1, n + 1)),
    )
    pq.write_table(pa.table(cols, schema=schema), run / "slices" / "part-20240101T000000Z-abcdef-00000.parquet")
    row = {f.name: None for f in SERIES_SCHEMA}
    row.update(
        study_uid=ds.StudyInstanceUID, series_uid=ds.SeriesInstanceUID, status="ok", n_slices=n, l3_index=10, l3_sop_uid=ds.SOPInstanceUID,
        l3_z_mm=50.0, l3_first_index=9, l3_last_index=11, levels_present=["T", "L1", "L2", "L3"], flags=[], model_sha256="ab" * 32,
    )
    pq.write_table(pa.Table.from_pylist([row], schema=SERIES_SCHEMA), run / "series" / "part-20240101T000000Z-abcdef-00000.parquet")
    pq.write_table(SKIPPED_SCHEMA.empty_table(), run / "skipped" / "part-20240101T000000Z-abcdef-00000.parquet")
    (run / "run.json").write_text(json.dumps({"format": "spinelevel.run/1", "runs": [{"run_id": "x", "card": {"classes": list(classes)}, "l3_definition": "middle of the L3 run"}]}))
    out = tmp_path / "x"
    _extract(run, out, "--levels", "L3,L1", "--neighbours", "1")
    rows = pq.read_table(out / "manifest.parquet").to_pylist()
    assert [(r["level"], r["offset"], r["frame"]) for r in rows] == [("L3", -1, 10), ("L3", 0, 11), ("L3", 1, 12), ("L1", -1, 4), ("L1", 0, 5), ("L1", 1, 6)]
    whole = mf.read_bytes()
    for r in rows:
        assert (out / r["file"]).read_bytes() == whole
    # the frame's preview: frame 11 is uniform at -100 + 200 = 100 HU, inside the soft-tissue window
    from PIL import Image

    with Image.open(out / rows[1]["png"]) as img:
        grey = np.asarray(img.convert("L"))
    centre = grey[grey.shape[0] // 2 - 20 : grey.shape[0] // 2 + 20, grey.shape[1] // 2 - 20 : grey.shape[1] // 2 + 20]
    assert abs(float(np.median(centre)) - (100 - (40 - 200)) / 400 * 255) < 3
    kos = pydicom.dcmread(out / rows[0]["kos"])
    images = [i for i in kos.ContentSequence if i.ValueType == "IMAGE"]
    assert [(i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID, int(i.ReferencedSOPSequence[0].ReferencedFrameNumber)) for i in images] == [(ds.SOPInstanceUID, 11), (ds.SOPInstanceUID, 5)]
    ev = kos.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence
    assert [i.ReferencedSOPInstanceUID for i in ev] == [ds.SOPInstanceUID]
    assert kos.ContentDate == "20240101"
    if shutil.which("dciodvfy"):
        assert _dciodvfy_errors(out / rows[0]["kos"]) == []


def test_review_page_links_open_the_previews_in_chromium(tmp_path: Path, series_dir: Path, model_path: Path) -> None:
    from urllib.parse import unquote, urlparse

    from browser.reportcase import chromium_path, launch_chromium

    chromium = chromium_path()
    if chromium is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium); the browser tests need it")
    from playwright.sync_api import sync_playwright

    out, x = tmp_path / "run", tmp_path / "x"
    assert runner.invoke(app, ["run", str(series_dir), "-m", str(model_path), "-o", str(out), "--workers", "0", "--extract", str(x), "--qc", "-q"]).exit_code == 0
    with sync_playwright() as p:
        context = launch_chromium(p, chromium, tmp_path / "profile")
        try:
            page = context.new_page()
            page.goto((out / "report" / "index.html").as_uri())
            page.wait_for_selector("body[data-ready='1']", timeout=30_000)
            links = page.eval_on_selector_all("a.extracted", "as => as.map(a => ({uid: a.closest('tr').dataset.uid, level: a.textContent, href: a.href}))")
            assert sorted(link["uid"] for link in links) == sorted(r["series_uid"] for r in pq.read_table(x / "manifest.parquet").to_pylist())
            for link in links:
                assert link["level"] == "L3"
                target = Path(unquote(urlparse(link["href"]).path))
                assert target.is_file() and target.suffix == ".png" and x.resolve() in target.parents
            page.goto(links[0]["href"])  # the picture opens from the page's link
        finally:
            context.close()


def test_odd_identity_values_still_give_a_kos_and_never_reach_the_logs(tmp_path: Path, model_path: Path, caplog: pytest.LogCaptureFixture, recwarn: pytest.WarningsRecorder) -> None:
    src = tmp_path / "in"
    study = "1.2.826.0.1.3680043.8.498.66"
    paths = write_series(src, SeriesSpec(levels=LEVELS_30, study_uid=study, series_uid=study + ".1", seed=5, patient_name="SMITHERS"))
    for path in paths:  # values archives really hold, which highdicom refuses or warns about, quoting them
        ds = pydicom.dcmread(path)
        ds.PatientSex, ds.PatientBirthDate, ds.StudyDate = "female", "1940", "2020"
        ds.save_as(path)
    run = tmp_path / "run"
    _run([src], model_path, run)
    out = tmp_path / "x"
    caplog.set_level("DEBUG")
    result = _extract(run, out, "-v")
    kos = pydicom.dcmread(next(out.rglob("kos.dcm")))
    assert str(kos.PatientName) == "SMITHERS" and kos.PatientSex == "" and kos.PatientBirthDate == "" and kos.StudyDate == ""
    logged = caplog.text + result.output + " ".join(str(w.message) for w in recwarn)
    assert "SMITHERS" not in logged and "PID-123456" not in logged
    if shutil.which("dciodvfy"):
        assert _dciodvfy_errors(next(out.rglob("kos.dcm"))) == []


def test_slices_parts_with_and_without_the_frame_column(tmp_path: Path, folder_run: Path) -> None:
    """A run resumed across versions: older parts have no frame column, newer ones do."""
    run = tmp_path / "run"
    shutil.copytree(folder_run, run)
    table = pq.read_table(run / "slices")
    for part in (run / "slices").glob("*.parquet"):
        part.unlink()
    a, b = sorted(set(table.column("series_uid").to_pylist()))
    # an older part: written before the frame column existed
    old = table.filter(pa.compute.equal(table["series_uid"], a)).drop_columns(["frame"])
    new = table.filter(pa.compute.equal(table["series_uid"], b))
    new = new.set_column(new.schema.get_field_index("frame"), pa.field("frame", pa.int32()), pa.array([1] * new.num_rows, pa.int32()))  # frame 1 of a one-frame file
    pq.write_table(old, run / "slices" / "part-20240101T000000Z-aaaaaa-00000.parquet")
    pq.write_table(new, run / "slices" / "part-20240102T000000Z-bbbbbb-00000.parquet")
    out = tmp_path / "x"
    _extract(run, out)
    frames = {r["series_uid"]: r["frame"] for r in pq.read_table(out / "manifest.parquet").to_pylist()}
    assert frames == {a: None, b: 1}


def test_extract_after_a_run_over_multiframe_ct(tmp_path: Path, model_path: Path) -> None:
    """End to end: the engine classifies the frames of a Legacy Converted Enhanced CT file, and the
    extract copies that whole file for the pick and names the pick's frame (manifest and KOS)."""
    from spinelevel.engine.pipeline import RunOptions, run

    from test_real_archives import _legacy_converted

    single = write_series(tmp_path / "single", SeriesSpec(levels=LEVELS_30, seed=70), nested=False)
    mf = _legacy_converted(single, tmp_path / "in" / "legacy.dcm")
    run_dir = tmp_path / "run"
    run([mf.parent], model_path, run_dir, RunOptions(workers=0))
    (series,) = pq.read_table(run_dir / "series").to_pylist()
    assert series["l3_frame"] is not None
    out = tmp_path / "x"
    _extract(run_dir, out)
    (row,) = pq.read_table(out / "manifest.parquet").to_pylist()
    assert row["frame"] == series["l3_frame"] and row["sop_uid"] == series["l3_sop_uid"]
    assert (out / row["file"]).read_bytes() == mf.read_bytes()
    kos = pydicom.dcmread(out / row["kos"])
    (image,) = [i for i in kos.ContentSequence if i.ValueType == "IMAGE"]
    assert int(image.ReferencedSOPSequence[0].ReferencedFrameNumber) == series["l3_frame"]
