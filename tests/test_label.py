"""`spinelevel label`: slice labels from disc positions, the table it writes, and its preview."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from spinelevel.cli import app
from spinelevel.errors import InputError
from spinelevel.training.discs import DiscOptions, levels_from_discs, parse_discs, write_labels
from tests.dicomgen import SeriesSpec, level_sequence, write_series

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT / "tests" / "data" / "realworld"
DISCS = "T12/L1=380,L1/L2=345,L2/L3=310,L3/L4=275,L4/L5=240,L5/S1=205"

runner = CliRunner()


def test_parse_discs_reads_names_and_positions() -> None:
    assert parse_discs("T12/L1=402.5, l1-l2=366;L2/L3=-12") == {"T12/L1": 402.5, "L1/L2": 366.0, "L2/L3": -12.0}
    for bad, why in (("L3=10", "not DISC=Z"), ("L2/L3=ten", "not a number"), ("L2/L3=1,L2/L3=2", "twice"), ("", "no disc"), ("L5/S1=nan", "finite")):
        with pytest.raises(InputError, match=why):
            parse_discs(bad)


def test_levels_between_discs_with_margins_and_open_ends() -> None:
    discs = parse_discs(DISCS)
    z = [400.0, 384.0, 384.1, 380.0, 376.0, 375.9, 362.0, 330.0, 290.0, 260.0, 220.0, 209.0, 100.0, -50.0]
    assert levels_from_discs(z, discs) == ["T", None, "T", None, None, "L1", "L1", "L2", "L3", "L4", "L5", None, "S", "S"]
    # a wider margin excludes more; margin 0 keeps everything but the disc plane itself
    assert levels_from_discs([370.0, 380.0, 381.0], discs, DiscOptions(margin_mm=0.0)) == ["L1", None, "T"]
    assert levels_from_discs([372.0], discs, DiscOptions(margin_mm=10.0)) == [None]


def test_partial_discs_label_only_what_they_bound() -> None:
    discs = parse_discs("L2/L3=310,L3/L4=275")
    assert levels_from_discs([330.0, 290.0, 260.0], discs) == ["L2", "L3", "L4"]
    with pytest.raises(InputError, match="above L2/L3, further than L2 reaches"):
        levels_from_discs([370.0], discs)
    with pytest.raises(InputError, match="below L3/L4, further than L4 reaches"):
        levels_from_discs([210.0], discs)


@pytest.mark.parametrize(("text", "why"), [
    ("T12/L1=380,L2/L3=310", "L1/L2 missing between T12/L1 and L2/L3"),
    ("L1/L2=300,L2/L3=310", "must lie above"),
    ("L1/L2=345,L2/L3=340", "5 mm apart"),
    ("L1/L2=345,L2/L3=200", "145 mm apart"),
])
def test_implausible_disc_positions_are_refused(text: str, why: str) -> None:
    with pytest.raises(InputError, match=why):
        levels_from_discs([320.0], parse_discs(text))


def _series(root: Path, top_z: float = 400.0, n: int = 60, **kw) -> SeriesSpec:  # noqa: ANN003
    spec = SeriesSpec(levels=level_sequence({"T": n}), spacing_mm=5.0, top_z=top_z, **kw)
    write_series(root, spec)
    return spec


def test_cli_labels_a_series_and_the_table_trains(tmp_path: Path) -> None:
    spec = _series(tmp_path / "ct")
    out = tmp_path / "labels.parquet"
    r = runner.invoke(app, ["label", str(tmp_path / "ct"), "--discs", DISCS, "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "60 slices" in r.output and "L3 6" in r.output
    rows = pq.read_table(out).to_pylist()
    assert len(rows) == 60 and {r["series_uid"] for r in rows} == {spec.series_uid}
    by_z = {round(r["z_mm"]): r["level"] for r in rows}
    assert by_z[400] == "T" and by_z[380] is None and by_z[300] == "L3" and by_z[205] is None and by_z[110] == "S"
    assert [r["slice_index"] for r in rows] == list(range(60)) and rows[0]["z_mm"] == 400.0
    # the table is keyed the way training reads DICOM series
    from spinelevel.training.data import collect_slices

    data = collect_slices([tmp_path / "ct"], [out])
    assert len(data.items) == sum(r["level"] is not None for r in rows)


def test_cli_replaces_its_series_and_keeps_the_others(tmp_path: Path) -> None:
    a = _series(tmp_path / "a")
    b = _series(tmp_path / "b", top_z=420.0)
    out = tmp_path / "labels.csv"
    assert runner.invoke(app, ["label", str(tmp_path / "a"), "--discs", DISCS, "--out", str(out)]).exit_code == 0
    assert runner.invoke(app, ["label", str(tmp_path / "b"), "--discs", DISCS, "--out", str(out)]).exit_code == 0
    r = runner.invoke(app, ["label", str(tmp_path / "a"), "--discs", "L2/L3=310,L3/L4=275", "--out", str(out)])
    assert r.exit_code != 0 and "further than L2 reaches" in r.output  # refused: the table is untouched
    shifted = DISCS.replace("L2/L3=310", "L2/L3=300")
    r = runner.invoke(app, ["label", str(tmp_path / "a"), "--discs", shifted, "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "60 rows written, 60 replaced, 60 of other series kept" in r.output
    from spinelevel.training.labels import read_labels_table

    table = read_labels_table(out)
    assert len(table) == 120 and set(table.series.values()) == {a.series_uid, b.series_uid}
    z_a = {sop: z for sop, z in table.z_mm.items() if table.series[sop] == a.series_uid}
    assert next(table.level[s] for s, z in z_a.items() if z == 305.0) == "L2"  # the new positions


def test_cli_never_overwrites_what_is_not_a_labels_table(tmp_path: Path) -> None:
    _series(tmp_path / "ct")
    out = tmp_path / "labels.parquet"
    out.write_bytes(b"my notes, not a table")
    r = runner.invoke(app, ["label", str(tmp_path / "ct"), "--discs", DISCS, "--out", str(out)])
    assert r.exit_code == 1 and "not a readable labels table" in r.output and "not overwritten" in r.output
    assert out.read_bytes() == b"my notes, not a table"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct", "labels.parquet"]


def test_cli_needs_one_series_and_something_to_do(tmp_path: Path) -> None:
    a = _series(tmp_path / "ct")
    _series(tmp_path / "ct", top_z=300.0, n=10)
    r = runner.invoke(app, ["label", str(tmp_path / "ct"), "--discs", DISCS, "--out", str(tmp_path / "l.parquet")])
    assert r.exit_code == 1 and "2 series; choose one with --series" in r.output and a.series_uid in r.output
    r = runner.invoke(app, ["label", str(tmp_path / "ct"), "--discs", DISCS, "--out", str(tmp_path / "l.parquet"), "--series", a.series_uid[:-1]])
    assert r.exit_code == 0, r.output
    assert {row["series_uid"] for row in pq.read_table(tmp_path / "l.parquet").to_pylist()} == {a.series_uid}
    for args, why in (([], "nothing to do"), (["--discs", DISCS], "--discs needs --out"), (["--out", "x.parquet"], "--out needs --discs"),
                      (["--preview", "p.png", "--series", "9.9.9"], "no series matches")):
        r = runner.invoke(app, ["label", str(tmp_path / "ct"), *args])
        assert r.exit_code == 1 and why in r.output, (args, r.output)
    r = runner.invoke(app, ["label", str(tmp_path / "missing"), "--preview", "p.png"])
    assert r.exit_code == 1 and "not found" in r.output


def test_cli_refuses_a_multiframe_series(tmp_path: Path) -> None:
    # real Enhanced CT (tests/data/realworld/SOURCES.md): its frames share one SOPInstanceUID
    shutil.copy(REAL / "enhanced_ct_multiframe" / "ect_jpeg_lossless_57.dcm", tmp_path / "ect.dcm")
    r = runner.invoke(app, ["label", str(tmp_path / "ect.dcm"), "--discs", "L2/L3=0", "--out", str(tmp_path / "l.parquet")])
    assert r.exit_code == 1 and "multi-frame" in r.output
    assert not (tmp_path / "l.parquet").exists()


def test_cli_labels_a_real_series_without_uids_as_evaluation_keys_it(tmp_path: Path) -> None:
    """The real anonymised Siemens slab (empty Study/SeriesInstanceUID): the table's keys are the
    engine's, as in the committed TotalSegmentator-derived labels of the same files."""
    src = REAL / "siemens_ct_empty_uids"
    committed = pq.read_table(ROOT / "tests" / "data" / "real_ct" / "totalseg_example_dicom" / "labels.parquet").to_pylist()
    out, png = tmp_path / "labels.parquet", tmp_path / "prev.png"
    r = runner.invoke(app, ["label", str(src), "--discs", "T12/L1=-830", "--out", str(out), "--preview", str(png)])
    assert r.exit_code == 0, r.output
    rows = pq.read_table(out).to_pylist()
    assert [r["sop_uid"] for r in rows] == [r["sop_uid"] for r in committed]  # same slices, same order
    assert [r["z_mm"] for r in rows] == pytest.approx([r["z_mm"] for r in committed])
    assert {r["level"] for r in rows} == {"T"} and len({r["series_uid"] for r in rows}) == 1
    # one table for a cohort: a second series (synthetic, with L3) joins it, training finds both
    _series(tmp_path / "synthetic")
    assert runner.invoke(app, ["label", str(tmp_path / "synthetic"), "--discs", DISCS, "--out", str(out)]).exit_code == 0
    from spinelevel.training.data import collect_slices

    found = collect_slices([src, tmp_path / "synthetic"], [out])
    assert found.summary["dicom_series"] == 2 and len(found.items) == 20 + 54  # 60 slices, one on each of the six discs
    from PIL import Image

    img = Image.open(png)
    assert img.mode == "RGB" and img.width > img.height / 2


def test_preview_draws_the_labels_and_a_ruler(tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    _series(tmp_path / "ct")
    plain, labelled = tmp_path / "plain.png", tmp_path / "labelled.png"
    assert runner.invoke(app, ["label", str(tmp_path / "ct"), "--preview", str(plain)]).exit_code == 0
    r = runner.invoke(app, ["label", str(tmp_path / "ct"), "--preview", str(labelled), "--discs", DISCS, "--out", str(tmp_path / "l.parquet")])
    assert r.exit_code == 0, r.output
    a, b = np.asarray(Image.open(plain)), np.asarray(Image.open(labelled))
    assert a.shape == b.shape
    from spinelevel.report.render import level_colours

    l3 = np.array(level_colours(("T", "L1", "L2", "L3", "L4", "L5", "S"))["L3"], dtype=np.uint8)
    assert (b == l3).all(axis=2).sum() > (a == l3).all(axis=2).sum() + 500  # the L3 band (the legend has a swatch in both)
    # the ruler: white ticks down the left edge, every 10 mm
    assert (a[:, 2] == 255).all(axis=1).sum() >= 20


def test_write_labels_keeps_extra_columns(tmp_path: Path) -> None:
    import pyarrow as pa

    out = tmp_path / "l.parquet"
    pq.write_table(pa.table({"series_uid": ["s1"], "sop_uid": ["a"], "level": ["L3"], "patient_id": ["p1"]}), out)
    counts = write_labels(out, [{"study_uid": "st", "series_uid": "s2", "sop_uid": "b", "level": None, "z_mm": 1.0, "slice_index": 0, "path": "x"}])
    assert counts == {"kept": 1, "replaced": 0, "written": 1}
    rows = pq.read_table(out).to_pylist()
    assert rows[0]["patient_id"] == "p1" and rows[1]["patient_id"] is None and rows[1]["level"] is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l.parquet"]  # no temporary file left


def test_suggest_discs_finds_the_dark_gaps_in_the_body_not_in_the_sternum() -> None:
    import numpy as np

    from spinelevel.training.discs import suggest_discs

    z = 300.0 - 2.0 * np.arange(120)  # 2 mm slices, 300 to 62
    discs = [270.0, 235.0, 200.0, 165.0, 130.0, 95.0]
    lines = np.full((120, 140), -50.0, dtype=np.float32)  # soft tissue; rows anterior -> posterior, 1 mm
    lines[:, 50:85] = 230.0  # vertebral bodies
    lines[:, 95:120] = 400.0  # posterior elements behind the canal
    lines[:, 5:22] = 500.0  # a sternum-like plate in front, with gaps of its own
    for k, zk in enumerate(z):
        if any(abs(zk - d) <= 4.0 for d in discs):
            lines[k, 50:85] = 80.0
        if abs((zk - 10.0) % 30.0 - 15.0) < 3.0:
            lines[k, 5:22] = 20.0
    found = suggest_discs(lines, z, 1.0, 66)
    assert len(found) == len(discs) and all(abs(f - d) <= 1.0 for (f, _), d in zip(found, discs))  # a slice of the 2 mm grid
    assert all(p > 100 for _, p in found)
    assert suggest_discs(lines[:3], z[:3], 1.0, 66) == []  # too short to say


def test_cli_suggest_alone_prints_the_suggestions(tmp_path: Path) -> None:
    _series(tmp_path / "ct")
    r = runner.invoke(app, ["label", str(tmp_path / "ct"), "--suggest"])
    assert r.exit_code == 0, r.output
    assert "suggested discs, superior first" in r.output


def test_cli_unwritable_outputs_are_one_line_errors(tmp_path: Path) -> None:
    _series(tmp_path / "ct")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for args, why in ((["--discs", DISCS, "--out", str(blocker / "l.parquet")], "cannot write the labels table"),
                      (["--preview", str(blocker / "p.png")], "cannot write the preview")):
        r = runner.invoke(app, ["label", str(tmp_path / "ct"), *args])
        assert r.exit_code == 1 and why in r.output and "Traceback" not in r.output, r.output
