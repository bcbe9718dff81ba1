"""`spinelevel quantize`: the static INT8 (QDQ) copy of an ONNX model, checked with ONNX Runtime on the CPU.

Tolerances (measured on the tiny CNN below, held-out synthetic slices): argmax agreement with FP32
100 % and max |p_int8 - p_fp32| about 1e-2; the test bounds are argmax >= 95 % and max diff <= 0.1,
loose enough for ONNX Runtime versions, tight enough that a broken calibration (ranges from zeros or
wrong preprocessing) fails.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from dicomgen import CLASSES, SeriesSpec, level_sequence, write_series
from spinelevel.builders.quantize import QuantizeOptions, calibration_inputs, count_qdq_nodes, quantize_model
from spinelevel.card import file_sha256, read_card
from spinelevel.cli import app
from spinelevel.engine.backends import BackendOptions, load_backend
from spinelevel.errors import InputError
from spinelevel.selftest import tiny_cnn_onnx


@pytest.fixture(scope="module")
def held_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A series unlike the calibration ones (other seed, other level counts)."""
    root = tmp_path_factory.mktemp("held_out")
    levels = level_sequence({"T": 8, "L1": 3, "L2": 3, "L3": 4, "L4": 3, "L5": 3, "S": 6})
    write_series(root, SeriesSpec(levels=levels, study_uid="1.2.826.0.1.3680043.8.498.9", series_uid="1.2.826.0.1.3680043.8.498.9.1", seed=9))
    return root


def test_quantize_writes_qdq_model_with_card(tmp_path: Path, series_dir: Path) -> None:
    fp32 = tiny_cnn_onnx(tmp_path / "m.onnx", size=32)
    result = quantize_model(fp32, [series_dir], tmp_path / "m.int8.onnx", QuantizeOptions(slices=32))
    proto = onnx.load(str(result.path))
    ops = {n.op_type for n in proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert result.n_qdq == count_qdq_nodes(result.path) > 0
    assert any(t.data_type == onnx.TensorProto.INT8 for t in proto.graph.initializer)  # int8 weights
    card = read_card(result.path)
    assert card == read_card(fp32)  # same preprocessing contract
    assert card.extra["precision"] == "int8"
    assert card.extra["quantization"]["format"] == "QDQ"
    assert card.extra["quantization"]["calibration_slices"] == result.n_calibration == 32
    assert card.extra["fp32_onnx_sha256"] == file_sha256(fp32)


def test_int8_agrees_with_fp32_on_held_out_slices(tmp_path: Path, series_dir: Path, held_out: Path) -> None:
    fp32 = tiny_cnn_onnx(tmp_path / "m.onnx", size=32)
    int8 = quantize_model(fp32, [series_dir], tmp_path / "m.int8.onnx", QuantizeOptions(slices=60)).path
    card = read_card(fp32)
    x = calibration_inputs(card, [held_out], 100)
    a = load_backend("onnxruntime", fp32, card, BackendOptions(max_batch=8))
    b = load_backend("onnxruntime", int8, read_card(int8), BackendOptions(max_batch=8))
    p32, p8 = a.infer(x), b.infer(x)
    assert p8.shape == (len(x), len(CLASSES))
    assert np.allclose(p8.sum(1), 1.0, atol=1e-4)
    assert float(np.mean(p8.argmax(1) == p32.argmax(1))) >= 0.95
    assert float(np.abs(p8 - p32).max()) <= 0.1


def test_calibration_takes_a_share_of_every_folder(tmp_path: Path, series_dir: Path, held_out: Path) -> None:
    card = read_card(tiny_cnn_onnx(tmp_path / "m.onnx", size=32))
    x = calibration_inputs(card, [series_dir, held_out], 10)
    assert x.shape == (10, 3, 32, 32) and x.dtype == np.float32


def test_quantize_refuses_empty_calibration(tmp_path: Path) -> None:
    fp32 = tiny_cnn_onnx(tmp_path / "m.onnx", size=32)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no CT slices"):
        quantize_model(fp32, [tmp_path / "empty"], tmp_path / "out.onnx")
    with pytest.raises(InputError, match="not found"):
        quantize_model(fp32, [tmp_path / "nowhere"], tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()


def test_cli_quantize_takes_several_folders(tmp_path: Path, series_dir: Path, held_out: Path) -> None:
    fp32 = tiny_cnn_onnx(tmp_path / "m.onnx", size=32)
    out = tmp_path / "q.onnx"
    res = CliRunner().invoke(app, ["quantize", str(fp32), "--calibration", str(series_dir), str(held_out), "--slices", "16", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert read_card(out).extra["quantization"]["calibration_data"] == [series_dir.name, held_out.name]
    res = CliRunner().invoke(app, ["quantize", str(fp32), "--calibration", str(series_dir), "--method", "bogus", "--out", str(out)])
    assert res.exit_code == 1 and "bogus" in res.output


def test_histogram_calibration_with_a_short_last_batch(tmp_path: Path, series_dir: Path) -> None:
    fp32 = tiny_cnn_onnx(tmp_path / "m.onnx", size=32)
    result = quantize_model(fp32, [series_dir], tmp_path / "p.onnx", QuantizeOptions(slices=20, batch=8, method="percentile"))
    assert result.n_calibration == 16  # equal batches: 20 -> 2 x 8
    assert read_card(result.path).extra["quantization"]["calibration_method"] == "percentile"
    assert result.argmax_agreement >= 0.9
