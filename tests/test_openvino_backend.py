"""The optional OpenVINO backend: parity with ONNX Runtime on the same ONNX file, and its absence.

Tolerance (measured here, OpenVINO 2026.4 CPU with INFERENCE_PRECISION_HINT=f32 against ONNX Runtime
1.32 CPU): max |p_ov - p_ort| below 1e-5 on the bundled demo model (EfficientNetV2-B0) and the tiny
CNN; the bound used is 1e-4 with identical argmax.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from modelgen import build_model, reference_probs
from spinelevel.card import read_card
from spinelevel.engine.backends import BackendOptions, available_backends, load_backend
from spinelevel.errors import BackendUnavailableError

TOLERANCE = 1e-4
DEMO = Path(__file__).resolve().parents[1] / "src" / "spinelevel" / "models" / "demo" / "levels_demo.onnx"


def test_openvino_reported_unavailable_without_the_package(monkeypatch: pytest.MonkeyPatch, model_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino now fails, as when not installed
    from spinelevel.engine.backends import openvino as backend_module

    assert backend_module.is_available() is False
    assert available_backends()["openvino"] is False
    with pytest.raises(BackendUnavailableError, match="openvino"):
        load_backend("openvino", model_path, read_card(model_path))


def _both(model: Path, x: np.ndarray, batch: int = 16) -> tuple[np.ndarray, np.ndarray]:
    card = read_card(model)
    ov = load_backend("openvino", model, card, BackendOptions(max_batch=batch))
    ort = load_backend("onnxruntime", model, card, BackendOptions(max_batch=batch))
    try:
        return ov.infer(x), ort.infer(x)
    finally:
        ov.close()
        ort.close()


def test_openvino_matches_onnxruntime_on_tiny_cnn(tmp_path: Path) -> None:
    pytest.importorskip("openvino")
    from spinelevel.selftest import tiny_cnn_onnx

    model = tiny_cnn_onnx(tmp_path / "cnn.onnx", size=32)  # card output: logits
    x = np.random.default_rng(1).random((10, 3, 32, 32), dtype=np.float32)
    p_ov, p_ort = _both(model, x, batch=4)  # 10 = 4 + 4 + 2: the last batch is short
    assert p_ov.shape == (10, 7) and np.allclose(p_ov.sum(1), 1.0, atol=1e-5)
    assert float(np.abs(p_ov - p_ort).max()) <= TOLERANCE
    assert (p_ov.argmax(1) == p_ort.argmax(1)).all()


def test_openvino_pads_a_fixed_batch_model(tmp_path: Path) -> None:
    pytest.importorskip("openvino")
    model = build_model(tmp_path / "fixed.onnx", fixed_batch=4)
    x = np.random.default_rng(2).random((6, 3, 32, 32), dtype=np.float32)
    card = read_card(model)
    backend = load_backend("openvino", model, card, BackendOptions(max_batch=16))
    assert backend.max_batch == 4
    assert float(np.abs(backend.infer(x) - reference_probs(x)).max()) <= TOLERANCE


@pytest.mark.skipif(not DEMO.is_file(), reason="bundled demo model not present")
def test_openvino_matches_onnxruntime_on_demo_model() -> None:
    pytest.importorskip("openvino")
    from spinelevel.builders.onnx_export import parity_slices

    x = parity_slices(read_card(DEMO), n=16, seed=3)  # phantom slices through the engine's preprocessing
    p_ov, p_ort = _both(DEMO, x)
    assert float(np.abs(p_ov - p_ort).max()) <= TOLERANCE
    assert (p_ov.argmax(1) == p_ort.argmax(1)).all()
