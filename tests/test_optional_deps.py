"""Both sides of the optional dependencies: the engine runs with torch, timm and DALI absent."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq

_BLOCK = "import sys\nfor m in ('torch', 'timm', 'torchvision', 'nvidia', 'nvidia.dali', 'tensorrt', 'matplotlib'):\n    sys.modules[m] = None\n"


def _run_blocked(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _BLOCK + code], capture_output=True, text=True, timeout=300)


def test_engine_runs_without_torch_or_gpu_packages(tmp_path: Path, series_dir: Path, model_path: Path) -> None:
    out = tmp_path / "out"
    code = (
        "from spinelevel.cli import main\n"
        f"sys.argv = ['spinelevel', 'run', {str(series_dir)!r}, '--model', {str(model_path)!r}, '--out', {str(out)!r}, '--workers', '0']\n"
        "main()\n"
    )
    proc = _run_blocked(code)
    assert proc.returncode == 0, proc.stderr
    assert pq.read_table(out / "series").num_rows == 2


def test_missing_optional_packages_give_clear_errors(tmp_path: Path, series_dir: Path, model_path: Path) -> None:
    code = (
        "from spinelevel.cli import main\n"
        f"sys.argv = ['spinelevel', 'run', {str(series_dir)!r}, '--model', {str(model_path)!r}, '--out', {str(tmp_path / 'o')!r}, '--workers', '0', '--preprocess', 'dali']\n"
        "main()\n"
    )
    proc = _run_blocked(code)
    assert proc.returncode == 1
    assert "nvidia-dali-cuda130" in proc.stderr and "Traceback" not in proc.stderr
    code = (
        "from spinelevel.cli import main\n"
        f"sys.argv = ['spinelevel', 'run', {str(series_dir)!r}, '--model', {str(model_path)!r}, '--out', {str(tmp_path / 't')!r}, '--backend', 'torch']\n"
        "main()\n"
    )
    proc = _run_blocked(code)
    assert proc.returncode == 1
    assert "torch" in proc.stderr and "Traceback" not in proc.stderr
