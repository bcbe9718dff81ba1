"""Shared fixtures: a tiny ONNX model with a card and small synthetic CT series."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from dicomgen import SeriesSpec, level_sequence, write_series
from modelgen import build_model

# 30 slices: T x5, L1-L2 x4, L3 x5, L4-S x4 -> decoded L3 run 13..17, pick 15.
LEVELS_30 = level_sequence({"T": 5, "L1": 4, "L2": 4, "L3": 5, "L4": 4, "L5": 4, "S": 4})
L3_PICK_30 = 15


@pytest.fixture(scope="session")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The nearest-center test model (32 x 32 input, probabilities out) with its card."""
    return build_model(tmp_path_factory.mktemp("model") / "tiny.onnx")


@pytest.fixture(scope="session")
def series_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two 30-slice series (uncompressed and RLE), nested folders, shuffled names without extensions."""
    from pydicom.uid import RLELossless

    root = tmp_path_factory.mktemp("series")
    study = "1.2.826.0.1.3680043.8.498.1"
    write_series(root, SeriesSpec(levels=LEVELS_30, study_uid=study, series_uid=study + ".1", seed=1))
    write_series(root, SeriesSpec(levels=LEVELS_30, study_uid=study, series_uid=study + ".2", syntax=RLELossless, signed=False, seed=2))
    return root


@pytest.fixture
def copy_of(tmp_path: Path):  # noqa: ANN201
    """Copy a session directory into this test's tmp_path (for tests that modify inputs)."""

    def _copy(src: Path, name: str = "in") -> Path:
        dst = tmp_path / name
        shutil.copytree(src, dst)
        return dst

    return _copy


def _gpu_unavailable_reason() -> str | None:
    """Why CUDA cannot be used here (cuda-python first, then torch), or None when it can."""
    from spinelevel.engine.cuda import cuda_unavailable_reason

    reason = cuda_unavailable_reason()
    if reason is None:
        return None
    try:
        import torch

        if torch.cuda.is_available():
            return None
    except ImportError:
        pass
    return reason


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip @pytest.mark.gpu tests where no CUDA device answers (torchvision's needs_cuda pattern)."""
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:
        return
    reason = _gpu_unavailable_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=f"needs an NVIDIA GPU with CUDA: {reason}")
    for item in gpu_items:
        item.add_marker(skip)
