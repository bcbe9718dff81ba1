"""End to end on phantom archives: full against sparse sampling, and scaling with archive size.

Each run is a real ``spinelevel run`` subprocess; the summed resident memory of its process tree
(main process and decode workers) is sampled for the peak.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

from spinelevel.bench.machine import TreeRSS

__all__ = ["phantom_archive", "timed_run", "bench_full_vs_sparse", "bench_scaling"]


def phantom_archive(root: Path, studies: int, size: int, seed: int = 101, **kw) -> Path:  # noqa: ANN003
    """A phantom archive (cached by its parameters)."""
    from spinelevel.phantom import PhantomOptions, generate

    tag = "_".join(f"{k}{v}" for k, v in sorted(kw.items()))
    path = root / f"phantom_{studies}x{size}_s{seed}{'_' + tag if tag else ''}"
    if not (path / "labels.parquet").exists():
        if path.exists():
            shutil.rmtree(path)
        generate(path, PhantomOptions(studies=studies, seed=seed, size=size, **kw), workers=os.cpu_count() or 1)
    return path


def timed_run(archive: Path, model: Path, out: Path, sampling: str, workers: int | None = None) -> dict:
    """One ``spinelevel run`` in a subprocess: wall time, peak tree RSS, counts from run.json."""
    if out.exists():
        shutil.rmtree(out)
    cmd = [sys.executable, "-m", "spinelevel", "run", str(archive), "--model", str(model), "--out", str(out), "--sampling", sampling, "--quiet"]
    if workers is not None:
        cmd += ["--workers", str(workers)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    with TreeRSS(proc.pid) as rss:
        _, err = proc.communicate()
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"spinelevel run failed ({proc.returncode}): {err.strip()[-500:]}")
    run = json.loads((out / "run.json").read_text())["runs"][-1]
    series = pq.read_table(out / "series").to_pylist()
    ok = [s for s in series if s["status"] == "ok"]
    slices = run["counts"]["slices"]
    evaluated = sum(s["n_evaluated"] for s in ok)
    studies = len({s["study_uid"] for s in ok})
    return {
        "sampling": sampling,
        "wall_s": round(wall, 2),
        "slices": slices,
        "series": len(ok),
        "studies": studies,
        "slices_per_s": round(slices / wall, 1),
        "studies_per_min": round(60 * studies / wall, 2),
        "model_calls": run.get("model_calls", 0),
        "model_calls_per_study": round(run.get("model_calls", 0) / max(studies, 1), 1),
        "evaluated_slices": evaluated,
        "evaluated_fraction": round(evaluated / max(slices, 1), 3),
        "peak_rss_mib": rss.peak_mib,
    }


def _agreement(full_out: Path, sparse_out: Path) -> dict:
    full = {r["sop_uid"]: r["level"] for r in pq.read_table(full_out / "slices", columns=["sop_uid", "level"]).to_pylist()}
    sparse = {r["sop_uid"]: r["level"] for r in pq.read_table(sparse_out / "slices", columns=["sop_uid", "level"]).to_pylist()}
    same = sum(1 for k, v in full.items() if sparse.get(k) == v)
    fs = {r["series_uid"]: r["l3_index"] for r in pq.read_table(full_out / "series").to_pylist() if r["status"] == "ok"}
    ss = {r["series_uid"]: r["l3_index"] for r in pq.read_table(sparse_out / "series").to_pylist() if r["status"] == "ok"}
    l3_same = sum(1 for k, v in fs.items() if ss.get(k) == v)
    return {
        "slice_level_agreement": round(same / max(len(full), 1), 4),
        "l3_pick_identical": round(l3_same / max(len(fs), 1), 4),
        "series_compared": len(fs),
    }


def bench_full_vs_sparse(archive: Path, model: Path, work: Path, workers: int | None = None) -> dict:
    """Both sampling modes on the same archive and model, with their agreement."""
    full = timed_run(archive, model, work / "e2e_full", "full", workers)
    sparse = timed_run(archive, model, work / "e2e_sparse", "sparse", workers)
    return {
        "archive": archive.name,
        "model": str(model),
        "full": full,
        "sparse": sparse,
        "sparse_speedup": round(full["wall_s"] / sparse["wall_s"], 2),
        "agreement": _agreement(work / "e2e_full", work / "e2e_sparse"),
    }


def bench_scaling(work: Path, model: Path, sizes: tuple[int, ...], image_size: int, workers: int | None = None) -> dict:
    """Wall time and peak memory for archives of growing size (sparse sampling)."""
    rows = []
    for n in sizes:
        archive = phantom_archive(work, n, image_size)
        row = timed_run(archive, model, work / f"scale_{n}", "sparse", workers)
        row["studies_in_archive"] = n
        rows.append(row)
    base = rows[0]
    for row in rows:
        row["wall_per_study_vs_smallest"] = round((row["wall_s"] / row["studies_in_archive"]) / (base["wall_s"] / base["studies_in_archive"]), 2)
        row["rss_vs_smallest"] = round(row["peak_rss_mib"] / base["peak_rss_mib"], 2)
    return {"image_size": image_size, "runs": rows}
