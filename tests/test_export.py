"""checkpoint -> export (ONNX + card, parity-checked) -> spinelevel run -> spinelevel evaluate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from dicomgen import SeriesSpec, level_sequence, write_series
from spinelevel.card import read_card
from spinelevel.cli import app
from spinelevel.errors import ModelError

pytest.importorskip("torch")
pytest.importorskip("timm")
pytest.importorskip("onnxscript")

from spinelevel.builders.onnx_export import ExportOptions, export_checkpoint  # noqa: E402
from spinelevel.training.augment import AugmentSpec  # noqa: E402
from spinelevel.training.train import TrainConfig, train  # noqa: E402

LEVELS = level_sequence({"T": 3, "L1": 2, "L2": 2, "L3": 3, "L4": 2, "L5": 2, "S": 3})
runner = CliRunner()


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(checkpoint, DICOM folder, labels CSV): a tiny model trained one epoch on two series."""
    import pydicom

    root = tmp_path_factory.mktemp("dicom")
    rows = ["series_uid,sop_uid,level"]
    for k in range(2):
        study = f"1.2.826.0.1.3680043.8.498.{30 + k}"
        spec = SeriesSpec(levels=LEVELS, study_uid=study, series_uid=study + ".1", size=32, seed=k)
        write_series(root, spec)
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        index = int(round((100.0 - float(ds.ImagePositionPatient[2])) / 5.0))
        rows.append(f"{ds.SeriesInstanceUID},{ds.SOPInstanceUID},{LEVELS[index]}")
    labels = root.parent / "labels.csv"
    labels.write_text("\n".join(rows) + "\n")
    out = tmp_path_factory.mktemp("run")
    result = train([root], [labels], TrainConfig(out=out, arch="test_efficientnet", input_size=32, epochs=1, batch_size=8, lr=1e-3,
                                                 val_fraction=0.5, augment=AugmentSpec(enabled=False), use_cache=False))
    return result.best, root, labels


def test_round_trip(trained: tuple[Path, Path, Path], tmp_path: Path) -> None:
    checkpoint, data, labels = trained
    model = tmp_path / "model.onnx"
    result = runner.invoke(app, ["export", str(checkpoint), "--out", str(model), "--data", str(data)])
    assert result.exit_code == 0, result.output
    assert "max abs prob diff" in result.output
    card = read_card(model)
    assert card.output == "probabilities" and card.classes == ("T", "L1", "L2", "L3", "L4", "L5", "S")
    assert card.extra["architecture"] == "test_efficientnet" and card.extra["opset"] == 18
    assert card.extra["parity"]["max_abs_diff"] <= 1e-4 and card.extra["parity"]["n_slices"] > 0
    assert len(card.extra["onnx_sha256"]) == 64 and "training" in card.extra
    # Dynamic batch axis, softmax inside: ORT accepts any batch and rows sum to one.
    proto = onnx.load(str(model))
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    for n in (1, 3):
        p = sess.run(None, {sess.get_inputs()[0].name: np.zeros((n, 3, 32, 32), np.float32)})[0]
        assert p.shape == (n, 7) and np.allclose(p.sum(1), 1.0, atol=1e-5)

    run_dir = tmp_path / "run"
    r = runner.invoke(app, ["run", str(data), "--model", str(model), "--out", str(run_dir), "--workers", "0", "-q"])
    assert r.exit_code == 0, r.output
    assert pq.read_table(run_dir / "series").num_rows == 2
    ev = runner.invoke(app, ["evaluate", str(run_dir), "--labels", str(labels), "--out", str(tmp_path / "eval"), "-q"])
    assert ev.exit_code == 0, ev.output
    m = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert m["n_series"] == 2 and m["n_slices"] == 2 * len(LEVELS)
    assert 0.0 <= m["accuracy_decoded"] <= 1.0 and len(m["confusion_matrix"]) == 7
    assert sum(map(sum, m["confusion_matrix"])) == m["n_slices"]


def test_parity_failure_reports_the_difference(trained: tuple[Path, Path, Path], tmp_path: Path) -> None:
    checkpoint, data, _ = trained
    out = tmp_path / "m.onnx"
    with pytest.raises(ModelError, match=r"max abs probability difference \S+ exceeds the tolerance -1"):
        export_checkpoint(checkpoint, out, [data], ExportOptions(tolerance=-1.0, exporter="legacy", parity_slices=4))
    assert not out.exists()
    assert not list(tmp_path.glob(".export-*"))


def test_export_refuses_a_checkpoint_without_card(tmp_path: Path) -> None:
    bare = tmp_path / "x.safetensors"
    bare.write_bytes(b"\0" * 16)
    result = runner.invoke(app, ["export", str(bare), "--out", str(tmp_path / "x.onnx")])
    assert result.exit_code == 1 and "card" in result.output
