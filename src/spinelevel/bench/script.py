"""End to end against the naive script (issue 17), and the fixed start-up cost of a run.

Every row is a whole process (``python -m spinelevel run`` or ``python -m
spinelevel.bench.naive_script``) on the same archive and model, the rows interleaved round by round so
that each sees the same background load; best of ``rounds``. Ratios are against the script of the
same run. The load average before and after is recorded, since the machine may be shared.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["ENGINE_ROWS", "TRAINED_MODEL_ROWS", "bench_vs_script", "bench_startup"]

# Row name -> extra ``spinelevel run`` arguments. Full sampling: every slice decoded and inferred, as
# the script does (the default 'auto' sampling is sparse on CPU and is reported as its own row).
ENGINE_ROWS: dict[str, list[str]] = {
    "engine_processes": ["--sampling", "full"],
    "engine_threads": ["--sampling", "full", "--worker-kind", "threads"],
    "engine_one_process": ["--sampling", "full", "--workers", "0"],
    "engine_default_sampling": [],
}


# With a trained model (the demo model): the default run (sparse sampling) and full sampling.
TRAINED_MODEL_ROWS: dict[str, list[str]] = {
    "engine_default_sampling": [],
    "engine_processes": ["--sampling", "full"],
    "engine_threads": ["--sampling", "full", "--worker-kind", "threads"],
}


def _timed(cmd: list[str], env: dict[str, str] | None = None) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env} if env else None)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    return wall


def _run_cmd(archive: Path, model: Path, out: Path, extra: list[str]) -> list[str]:
    if out.exists():
        shutil.rmtree(out)
    return [*_spinelevel(), "run", str(archive), "--model", str(model), "--out", str(out), "--quiet", *extra]


def _spinelevel() -> list[str]:
    """The installed ``spinelevel`` script, as a user runs it (else ``python -m spinelevel``)."""
    script = Path(sys.executable).with_name("spinelevel")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "spinelevel"]


def bench_vs_script(archive: Path, model: Path, work: Path, rounds: int = 2, rows: dict[str, list[str]] | None = None, env: dict[str, dict[str, str]] | None = None) -> dict:
    """Wall seconds of the naive script and of ``spinelevel run`` variants, interleaved, best of rounds.

    ``env``: extra environment per row name (for example another checkout's PYTHONPATH, to time
    an older engine in the same run).
    """
    env = env or {}
    rows = ENGINE_ROWS if rows is None else rows
    script = [sys.executable, "-m", "spinelevel.bench.naive_script", str(archive), str(model)]
    best = {"naive_script": float("inf"), **{name: float("inf") for name in rows}}
    load_before = os.getloadavg()
    for _ in range(rounds):
        best["naive_script"] = min(best["naive_script"], _timed(script))
        for name, extra in rows.items():
            best[name] = min(best[name], _timed(_run_cmd(archive, model, work / f"vs_script_{name}", extra), env.get(name)))
    base = best["naive_script"]
    return {
        "archive": archive.name,
        "model": str(model),
        "rounds": rounds,
        "timing": "whole processes, interleaved, best of rounds",
        "load_average_before": [round(v, 2) for v in load_before],
        "load_average_after": [round(v, 2) for v in os.getloadavg()],
        "wall_s": {k: round(v, 2) for k, v in best.items()},
        "speedup_vs_script": {k: round(base / v, 2) for k, v in best.items() if k != "naive_script"},
        "processes_vs_threads": round(best["engine_threads"] / best["engine_processes"], 2) if {"engine_threads", "engine_processes"} <= best.keys() else None,
    }


def bench_startup(one_file_dir: Path, model: Path, work: Path, rounds: int = 3) -> dict:
    """Fixed cost of a run: the interpreter, the engine's imports, a one-file run (best of rounds)."""
    rows = {
        "python": [sys.executable, "-c", "pass"],
        "import_engine": [sys.executable, "-c", "import spinelevel.engine.pipeline, spinelevel.engine.backends"],
        "import_onnxruntime": [sys.executable, "-c", "import onnxruntime"],
        "one_file_run": None,
        "one_file_run_workers0": None,
    }
    best = {k: float("inf") for k in rows}
    for _ in range(rounds):
        for name, cmd in rows.items():
            if name == "one_file_run":
                cmd = _run_cmd(one_file_dir, model, work / "startup_run", ["--sampling", "full"])
            elif name == "one_file_run_workers0":
                cmd = _run_cmd(one_file_dir, model, work / "startup_run0", ["--sampling", "full", "--workers", "0"])
            best[name] = min(best[name], _timed(cmd))
    return {"rounds": rounds, "load_average": [round(v, 2) for v in os.getloadavg()], "wall_s": {k: round(v, 3) for k, v in best.items()}}
