"""`spinelevel selftest` through the CLI: real verdicts here, exact missing parts where it cannot run."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from spinelevel.cli import app
from spinelevel.engine.cuda import cuda_available
from spinelevel.engine.dali import dali_available
from spinelevel.selftest import SelftestOptions, missing_requirements, run_selftest

runner = CliRunner()


def test_onnxruntime_selftest_passes() -> None:
    result = runner.invoke(app, ["selftest", "--backend", "onnxruntime", "--slices", "64", "--size", "32", "--batch", "16"])
    assert result.exit_code == 0, result.output
    assert "PASS onnxruntime" in result.output and "argmax agreement 100.00%" in result.output and "slices/s" in result.output


@pytest.mark.skipif(not dali_available(), reason="nvidia-dali-cuda130 is not installed")
def test_dali_selftest_passes_on_the_cpu_graph() -> None:
    result = runner.invoke(app, ["selftest", "--backend", "dali", "--slices", "48", "--size", "32", "--batch", "16", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["passed"] and data["details"]["dali_device"] == ("gpu" if cuda_available() else "cpu")
    assert data["details"]["input_max_abs_diff"] <= 1e-4


@pytest.mark.skipif(cuda_available(), reason="a GPU is present")
def test_tensorrt_selftest_says_what_is_missing() -> None:
    result = runner.invoke(app, ["selftest", "--backend", "tensorrt"])
    assert result.exit_code == 1
    text = " ".join(result.output.split())
    assert "missing:" in text and "an NVIDIA GPU with a working driver" in text
    assert "PASS" not in text
    assert ("package tensorrt" in text) == (not _have_trt())


def _have_trt() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorrt") is not None


def test_torch_selftest_without_cuda_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    missing = missing_requirements("torch")
    assert any("CUDA GPU visible to torch" in m for m in missing)
    assert missing_requirements("torch", device="cpu") == []


def test_torch_selftest_on_cpu() -> None:
    pytest.importorskip("timm")
    result = run_selftest(SelftestOptions(backend="torch", device="cpu", architecture="test_efficientnet", size=32, slices=32, batch=16))
    assert result.passed, result.verdict()
    assert result.details["precision"] == "fp32" and result.max_diff == 1e-3


def test_unknown_backend_is_refused() -> None:
    result = runner.invoke(app, ["selftest", "--backend", "cuda"])
    assert result.exit_code != 0
