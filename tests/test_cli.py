"""The command line through Typer's CliRunner, and one real run of the installed entry point."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
from typer.testing import CliRunner

from modelgen import build_model
from spinelevel.cli import app

runner = CliRunner()


def test_help_lists_commands() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "run" in result.output and "card" in result.output


def test_run_writes_results_and_summary(tmp_path: Path, series_dir: Path, model_path: Path) -> None:
    out = tmp_path / "out"
    result = runner.invoke(app, ["run", str(series_dir), "--model", str(model_path), "--out", str(out), "--workers", "0", "--batch-size", "8"])
    assert result.exit_code == 0, result.output
    assert "2 series: 2 processed, 0 skipped, 0 failed, 0 already done; 60 slices" in result.output
    assert pq.read_table(out / "series").num_rows == 2


def test_quiet_prints_nothing(tmp_path: Path, series_dir: Path, model_path: Path) -> None:
    result = runner.invoke(app, ["run", str(series_dir), "-m", str(model_path), "-o", str(tmp_path / "o"), "--workers", "0", "--quiet"])
    assert result.exit_code == 0
    assert result.output == ""


def test_fatal_problems_are_one_line_and_nonzero(tmp_path: Path, series_dir: Path, model_path: Path) -> None:
    cases = [
        (["run", str(series_dir), "-m", str(tmp_path / "nope.onnx"), "-o", str(tmp_path / "a")], "model file not found"),
        (["run", str(tmp_path / "missing"), "-m", str(model_path), "-o", str(tmp_path / "b")], "no such file or directory"),
        (["run", str(series_dir), "-m", str(build_model(tmp_path / "bare.onnx", card=False)), "-o", str(tmp_path / "c")], "spinelevel card set"),
        (["run", str(series_dir), "-m", str(model_path), "-o", str(tmp_path / "d"), "--backend", "magic"], "unknown backend 'magic'"),
    ]
    for args, message in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 1, (args, result.output)
        assert message in result.output
        assert result.output.count("\n") <= 2, result.output
        assert "Traceback" not in result.output


def test_bad_option_values_are_rejected(tmp_path: Path, series_dir: Path, model_path: Path) -> None:
    result = runner.invoke(app, ["run", str(series_dir), "-m", str(model_path), "-o", str(tmp_path / "o"), "--batch-size", "0"])
    assert result.exit_code == 2
    assert "batch-size" in result.output


def test_rerun_resumes_and_force_redoes(tmp_path: Path, series_dir: Path, model_path: Path) -> None:
    args = ["run", str(series_dir), "-m", str(model_path), "-o", str(tmp_path / "o"), "--workers", "0"]
    assert runner.invoke(app, args).exit_code == 0
    again = runner.invoke(app, args)
    assert again.exit_code == 0
    assert "0 processed, 0 skipped, 0 failed, 2 already done" in again.output
    forced = runner.invoke(app, args + ["--force"])
    assert forced.exit_code == 0 and "2 processed" in forced.output
    assert pq.read_table(tmp_path / "o" / "slices").num_rows == 60


def test_min_slices_option(tmp_path: Path, series_dir: Path, model_path: Path) -> None:
    result = runner.invoke(app, ["run", str(series_dir), "-m", str(model_path), "-o", str(tmp_path / "o"), "--workers", "0", "--min-slices", "31", "-q"])
    assert result.exit_code == 0
    series = pq.read_table(tmp_path / "o" / "series").to_pylist()
    assert {s["status"] for s in series} == {"skipped"}
    assert all("fewer than --min-slices 31" in s["reason"] for s in series)


def test_installed_entry_point_runs(tmp_path: Path, series_dir: Path, model_path: Path) -> None:
    exe = shutil.which("spinelevel", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    assert exe, "the 'spinelevel' script is not installed next to this Python"
    out = tmp_path / "out"
    proc = subprocess.run([exe, "run", str(series_dir), "--model", str(model_path), "--out", str(out), "--workers", "2"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "2 processed" in proc.stderr
    assert pq.read_table(out / "slices").num_rows == 60
    bad = subprocess.run([exe, "run", str(series_dir), "--model", str(tmp_path / "none.onnx"), "--out", str(tmp_path / "x")], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1
    assert bad.stderr.strip().startswith("error:") and "none.onnx" in bad.stderr


def test_run_with_qc_writes_the_review_report(tmp_path: Path, series_dir: Path, model_path: Path) -> None:
    out = tmp_path / "o"
    result = runner.invoke(app, ["run", str(series_dir), "-m", str(model_path), "-o", str(out), "--workers", "0", "--qc"])
    assert result.exit_code == 0, result.output
    assert "review report:" in result.output
    index = out / "report" / "index.html"
    assert index.is_file()
    assert len(list((out / "report").rglob("*.png"))) >= 2


def test_spawned_workers_do_not_rerun_the_command_line_script(tmp_path: Path) -> None:
    """The installed script is re-run by every spawned worker unless main() says it is spinelevel.__main__."""
    import subprocess
    import sys

    (tmp_path / "probe_mod.py").write_text("def probe():\n    import sys\n    return 'typer' in sys.modules\n")
    script = (
        "import sys\n"
        "from spinelevel.cli import spawned_workers_skip_main\n"
        "import multiprocessing as mp\n"
        "from concurrent.futures import ProcessPoolExecutor\n"
        "import probe_mod\n"
        "if __name__ == '__main__':\n"
        "    if sys.argv[1] == 'skip':\n"
        "        spawned_workers_skip_main()\n"
        "    with ProcessPoolExecutor(1, mp_context=mp.get_context('spawn')) as ex:\n"
        "        print(ex.submit(probe_mod.probe).result())\n"
    )
    (tmp_path / "console.py").write_text(script)
    run = lambda mode: subprocess.run([sys.executable, str(tmp_path / "console.py"), mode], capture_output=True, text=True, timeout=120)  # noqa: E731
    before, after = run("plain"), run("skip")
    assert before.returncode == 0 and after.returncode == 0, before.stderr + after.stderr
    assert before.stdout.strip() == "True"  # the script imported spinelevel.cli (typer) in the worker
    assert after.stdout.strip() == "False"


def test_level_extents_option(tmp_path: Path, series_dir: Path, model_path: Path) -> None:
    import json

    for value, words in [("20", "shortest and longest"), ("55,20", "shortest < longest"), ("a,b", "shortest and longest"), ("10,inf", "finite")]:
        result = runner.invoke(app, ["run", str(series_dir), "-m", str(model_path), "-o", str(tmp_path / "bad"), "--level-extents", value])
        assert result.exit_code == 1 and words in result.output and value in result.output, (value, result.output)
        assert "Traceback" not in result.output
    assert not (tmp_path / "bad").exists()  # refused before any output
    for value, bounds in [("off", (0.0, None)), ("15,45", (15.0, 45.0))]:
        out = tmp_path / value.replace(",", "-")
        result = runner.invoke(app, ["run", str(series_dir), "-m", str(model_path), "-o", str(out), "--workers", "0", "-q", "--level-extents", value])
        assert result.exit_code == 0, result.output
        run = json.loads((out / "run.json").read_text())["runs"][-1]
        thresholds = run["options"]["thresholds"] if "options" in run else run["thresholds"]
        assert thresholds["level_min_mm"] == bounds[0]
        if bounds[1] is None:
            assert thresholds["level_max_mm"] is None and "between 20 mm" not in run["l3_definition"]
            assert "Infinity" not in (out / "run.json").read_text()  # strict JSON
        else:
            assert thresholds["level_max_mm"] == bounds[1] and "between 15 mm" in run["l3_definition"]
