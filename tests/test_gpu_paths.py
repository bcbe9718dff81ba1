"""GPU parity tests (marker ``gpu``: skipped automatically without CUDA).

Bounds: FP16 paths against ONNX Runtime float32, argmax agreement >= 99.5 % and max probability
difference <= 0.01 (the selftest's rule).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from spinelevel.card import read_card
from spinelevel.engine.backends import BackendOptions, load_backend
from spinelevel.engine.preprocess import PreprocessSpec, preprocess_batch
from spinelevel.selftest import SelftestOptions, run_selftest, synthetic_slices, tiny_cnn_onnx

pytestmark = pytest.mark.gpu


def test_torch_cuda_fp16_selftest() -> None:
    pytest.importorskip("timm")
    result = run_selftest(SelftestOptions(backend="torch", device="cuda", size=64, slices=256, batch=32))
    assert result.details["precision"] == "fp16"
    assert result.passed, result.verdict()


def test_tensorrt_engine_matches_onnxruntime(tmp_path: Path) -> None:
    pytest.importorskip("tensorrt")
    from spinelevel.builders.tensorrt import EngineBuildOptions, build_engine

    model = tiny_cnn_onnx(tmp_path / "m.onnx", size=64)
    engine = build_engine(model, tmp_path / "m.engine", EngineBuildOptions(max_batch=16, opt_batch=8, workspace_gb=1, timing_cache=tmp_path / "t.cache"))
    assert (tmp_path / "t.cache").stat().st_size > 0
    card = read_card(engine)
    raw, slopes, intercepts = synthetic_slices(40, 128, 0)
    batch = preprocess_batch([r.astype(np.float32) * s + c for r, s, c in zip(raw, slopes, intercepts)], PreprocessSpec.from_card(card))
    ref = load_backend("onnxruntime", model, read_card(model)).infer(batch)
    from spinelevel.engine.backends.tensorrt import TensorRTBackend, TensorRTOptions

    for graphs in (False, True):
        backend = TensorRTBackend(engine, card, TensorRTOptions(max_batch=16, cuda_graphs=graphs))
        got = backend.infer(batch)  # 16 + 16 + 8: both slots and a short batch
        assert np.mean(got.argmax(1) == ref.argmax(1)) >= 0.995
        assert np.abs(got - ref).max() <= 0.01
        backend.close()


def test_tensorrt_takes_device_arrays(tmp_path: Path) -> None:
    pytest.importorskip("tensorrt")
    torch = pytest.importorskip("torch")
    from spinelevel.builders.tensorrt import EngineBuildOptions, build_engine

    model = tiny_cnn_onnx(tmp_path / "m.onnx", size=32)
    engine = build_engine(model, tmp_path / "m.engine", EngineBuildOptions(max_batch=8, opt_batch=8, workspace_gb=1))
    batch = np.random.default_rng(0).random((12, 3, 32, 32), dtype=np.float32)
    backend = load_backend("tensorrt", engine, read_card(engine), BackendOptions(max_batch=8))
    host = backend.infer(batch)
    device = backend.infer(torch.from_numpy(batch).cuda())
    np.testing.assert_allclose(device, host, atol=1e-6)
    backend.close()


def test_dali_gpu_graph_matches_numpy() -> None:
    dali = pytest.importorskip("spinelevel.engine.dali")
    if not dali.dali_available():
        pytest.skip("nvidia-dali-cuda130 is not installed")
    spec = PreprocessSpec(windows=((40.0, 400.0), (400.0, 1800.0), (-600.0, 1500.0)), input_size=(64, 64))
    raw, slopes, intercepts = synthetic_slices(8, 100, 1)
    pre = dali.DaliPreprocessor(spec, dali.DaliOptions(device="gpu", batch_size=8))
    out = pre.run([dali.pack_slice(r, s, c) for r, s, c in zip(raw, slopes, intercepts)])
    ref = preprocess_batch([r.astype(np.float32) * s + c for r, s, c in zip(raw, slopes, intercepts)], spec)
    assert np.abs(out - ref).max() <= 1e-4
    assert hasattr(pre.run_device([dali.pack_slice(raw[0])]), "__cuda_array_interface__")
