"""Evaluation against a hand-computed confusion matrix and L3 errors, through the API and the CLI."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from spinelevel.cli import app
from spinelevel.errors import InputError
from spinelevel.training.evaluate import EvaluateOptions, confusion_matrix, evaluate_run, per_class_metrics

CLASSES = ["T", "L1", "L2", "L3", "L4", "L5", "S"]
N = None

# series: (z per slice, truth, decoded, argmax (None = not evaluated), pick index)
SERIES = {
    "A": ([0, -5, -10, -15, -20, -25, -30, -35, -40, -45],
          ["T", "T", "L1", "L2", "L3", "L3", "L3", "L4", N, "S"],
          ["T", "L1", "L1", "L2", "L3", "L3", "L4", "L4", "L5", "S"],
          ["T", "L1", "L1", "L3", "L3", N, "L4", "L4", "L5", "S"], 4),
    "B": ([0, -5, -10, -15, -20], ["T", "T", "T", "L1", "L1"], ["T"] * 5, ["T"] * 5, None),
    "C": ([100, 95, 90, 85, 80], ["L2", "L2", "L3", "L3", "L4"], ["L2", "L3", "L3", "L4", "L4"], ["L2", "L3", "L3", "L4", "L4"], 1),
    "D": ([0, -3, -6], ["L3"] * 3, ["L4"] * 3, ["L4"] * 3, None),
    # In the run but not in the labels: ignored.
    "E": ([0, -5], [N, N], ["T", "T"], ["T", "T"], None),
}

# Rows = truth, columns = decoded, counted by hand from SERIES.
EXPECTED_CM = [
    [4, 1, 0, 0, 0, 0, 0],
    [2, 1, 0, 0, 0, 0, 0],
    [0, 0, 2, 1, 0, 0, 0],
    [0, 0, 0, 3, 5, 0, 0],
    [0, 0, 0, 0, 2, 0, 0],
    [0, 0, 0, 0, 0, 0, 0],
    [0, 0, 0, 0, 0, 0, 1],
]


def write_run(root: Path) -> tuple[Path, Path]:
    """A run directory (slices/, series/, run.json) and its labels table."""
    run = root / "run"
    (run / "slices").mkdir(parents=True)
    (run / "series").mkdir()
    slices, series, labels = [], [], []
    for uid, (z, truth, dec, am, pick) in SERIES.items():
        for i, (zz, t, d, a) in enumerate(zip(z, truth, dec, am)):
            sop = f"{uid}.{i}"
            slices.append({"study_uid": "S", "series_uid": uid, "sop_uid": sop, "slice_index": i, "z_mm": float(zz), "level": d, "level_argmax": a, "evaluated": a is not None})
            if uid != "E":
                labels.append({"series_uid": uid, "sop_uid": sop, "level": t})
        series.append({"study_uid": "S", "series_uid": uid, "status": "ok", "l3_index": pick, "l3_sop_uid": None if pick is None else f"{uid}.{pick}",
                       "l3_z_mm": None if pick is None else float(z[pick]), "flags": [] if pick is not None else ["l3_not_in_fov"]})
    labels.append({"series_uid": "Z", "sop_uid": "Z.0", "level": "L3"})  # labelled but not in the run: ignored
    pq.write_table(pa.Table.from_pylist(slices), run / "slices" / "part-0.parquet")
    pq.write_table(pa.Table.from_pylist(series), run / "series" / "part-0.parquet")
    (run / "run.json").write_text(json.dumps({"format": "spinelevel.run/1", "runs": [{"card": {"classes": CLASSES}}]}))
    lab = root / "labels.parquet"
    pq.write_table(pa.Table.from_pylist(labels, schema=pa.schema([("series_uid", pa.string()), ("sop_uid", pa.string()), ("level", pa.string())])), lab)
    return run, lab


def test_metrics_match_hand_computation(tmp_path: Path) -> None:
    run, lab = write_run(tmp_path)
    m = evaluate_run(run, lab, tmp_path / "eval")
    assert m["confusion_matrix"] == EXPECTED_CM
    assert m["n_series"] == 4 and m["n_slices"] == 22
    assert m["accuracy_decoded"] == pytest.approx(13 / 22)
    assert m["accuracy_argmax"] == pytest.approx(11 / 21) and m["n_slices_argmax"] == 21
    assert m["per_class"]["T"] == pytest.approx({"precision": 4 / 6, "recall": 4 / 5, "f1": 2 * (4 / 6) * (4 / 5) / (4 / 6 + 4 / 5), "support": 5})
    assert m["per_class"]["L4"]["precision"] == pytest.approx(2 / 7) and m["per_class"]["L4"]["recall"] == 1.0
    assert m["per_class"]["L5"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    # L3: A inside (error 5 mm), C outside at 7.5 mm, D missed; B has no labelled L3.
    assert (m["l3_series"], m["l3_missed"], m["l3_absent"], m["l3_false_pick"]) == (3, 1, 1, 0)
    assert m["l3_inside"] == pytest.approx(1 / 3)
    assert m["l3_within_5mm"] == pytest.approx(1 / 3)
    assert m["l3_within_10mm"] == pytest.approx(2 / 3)
    assert m["l3_error_mm_median"] == pytest.approx(6.25) and m["l3_error_mm_mean"] == pytest.approx(6.25)
    written = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    for key in ("accuracy_decoded", "accuracy_argmax", "per_class", "confusion_matrix", "l3_error_mm_median", "l3_error_mm_mean", "l3_within_5mm", "l3_within_10mm", "n_series", "n_slices"):
        assert key in written
    assert written["confusion_matrix"] == EXPECTED_CM
    assert (tmp_path / "eval" / "confusion_matrix.png").stat().st_size > 1000
    rows = list(csv.DictReader(open(tmp_path / "eval" / "per_series.csv")))
    a = next(r for r in rows if r["series_uid"] == "A")
    assert float(a["l3_error_mm"]) == 5.0 and a["l3_inside"] == "True"
    assert float(a["l3_true_top_z_mm"]) == -20.0 and float(a["l3_true_bottom_z_mm"]) == -30.0
    d = next(r for r in rows if r["series_uid"] == "D")
    assert d["l3_error_mm"] == "" and d["flags"] == "l3_not_in_fov"


def test_vertebrae_table_gives_the_l3_extent(tmp_path: Path) -> None:
    run, lab = write_run(tmp_path)
    vert = tmp_path / "vertebrae.parquet"
    pq.write_table(pa.Table.from_pylist([
        {"series_uid": "A", "vertebra": "L3", "level": "L3", "top_z_mm": -15.0, "bottom_z_mm": -31.0},
        {"series_uid": "A", "vertebra": "L4", "level": "L4", "top_z_mm": -33.0, "bottom_z_mm": -40.0},
        # B (z 0 to -20 mm) stops above its L3: outside its field of view, so B stays 'absent'
        {"series_uid": "B", "vertebra": "L3", "level": "L3", "top_z_mm": -60.0, "bottom_z_mm": -85.0},
    ]), vert)
    m = evaluate_run(run, lab, tmp_path / "eval", EvaluateOptions(vertebrae=vert, plot=False))
    # A: middle -23 -> error 3; C and D still from their labelled slices.
    assert m["l3_error_mm_median"] == pytest.approx((3.0 + 7.5) / 2)
    assert m["l3_extent_from"] == "vertebrae table"
    assert (m["l3_series"], m["l3_missed"], m["l3_absent"]) == (3, 1, 1)
    assert not (tmp_path / "eval" / "confusion_matrix.png").exists()


def test_no_overlap_is_an_input_error(tmp_path: Path) -> None:
    run, _ = write_run(tmp_path)
    other = tmp_path / "other.csv"
    other.write_text("series_uid,sop_uid,level\nX,X.1,L3\n")
    with pytest.raises(InputError, match="sop_uid"):
        evaluate_run(run, other, tmp_path / "eval")


def test_confusion_helpers() -> None:
    cm = confusion_matrix(["T", "L3", "L3", "X"], ["T", "L4", "L3", "T"], ("T", "L3", "L4"))
    assert cm.tolist() == [[1, 0, 0], [0, 1, 1], [0, 0, 0]]
    pc = per_class_metrics(cm, ("T", "L3", "L4"))
    assert pc["L3"]["recall"] == 0.5 and pc["L4"]["precision"] == 0.0
    from spinelevel.report.confusion import normalise_rows

    assert np.allclose(normalise_rows(cm), [[1, 0, 0], [0, 0.5, 0.5], [0, 0, 0]])


def test_evaluate_cli(tmp_path: Path) -> None:
    run, lab = write_run(tmp_path)
    result = CliRunner().invoke(app, ["evaluate", str(run), "--labels", str(lab), "--out", str(tmp_path / "ev")])
    assert result.exit_code == 0, result.output
    assert '"n_slices": 22' in result.output
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["l3_within_10mm"] == pytest.approx(2 / 3)
    bad = CliRunner().invoke(app, ["evaluate", str(tmp_path / "nope"), "--labels", str(lab), "--out", str(tmp_path / "ev2")])
    assert bad.exit_code == 1 and "error:" in bad.output and "slices" in bad.output
