"""What the level-extent bounds of the decoding cost (issue 14, fourth round).

Two measurements, written to one JSON file:

1. the decoding alone: ``spinelevel.levels.decode_levels`` with the default bounds against the
   order-only ``decode_sequence`` on synthetic series of a clean model (300 slices of 3 mm, 1000 and
   2000 of 0.625 mm), every slice evaluated and one in eight evaluated (as in a sparse search), best
   of ``--repeats``;
2. end to end: ``spinelevel run`` on a phantom archive with ``--level-extents 20,55`` and ``off``,
   the two interleaved for ``--rounds`` rounds in this process's session (the machines are shared and
   noisy; compare the medians of the same rounds), default sampling, wall time including start-up.

Usage::

    spinelevel phantom held-out/ --studies 24 --seed 2000 --size 256
    python benchmarks/level_extents.py --archive held-out/ --out benchmarks/results/level_extents.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from spinelevel.levels import LevelThresholds, decode_levels, decode_sequence


def _series(n: int, spacing: float) -> tuple[np.ndarray, np.ndarray]:
    truth = np.repeat(np.arange(7), n // 7 + 1)[:n]
    probs = np.full((n, 7), 0.02)
    probs[np.arange(n), truth] = 0.88
    return np.log(probs), np.arange(n) * spacing


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def decode_timings(repeats: int) -> list[dict]:
    t = LevelThresholds()
    rows = []
    for n, spacing in ((300, 3.0), (1000, 0.625), (2000, 0.625)):
        log_probs, z = _series(n, spacing)
        sparse = np.zeros(n, dtype=bool)
        sparse[::8] = True
        sparse[-1] = True
        rows.append({
            "slices": n,
            "spacing_mm": spacing,
            "extents_all_ms": 1e3 * _best(lambda: decode_levels(log_probs, z, None, t.level_min_mm, t.level_max_mm), repeats),
            "order_only_all_ms": 1e3 * _best(lambda: decode_sequence(log_probs), repeats),
            "extents_one_in_8_ms": 1e3 * _best(lambda: decode_levels(log_probs, z, sparse, t.level_min_mm, t.level_max_mm), repeats),
        })
    return rows


def end_to_end(archive: Path, rounds: int, model: str) -> dict:
    exe = str(Path(sys.executable).with_name("spinelevel"))
    wall: dict[str, list[float]] = {"20,55": [], "off": []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(rounds):
            for setting in wall:
                out = Path(tmp) / setting.replace(",", "-")
                t0 = time.perf_counter()
                subprocess.run([exe, "run", str(archive), "--model", model, "--level-extents", setting, "--out", str(out), "--force", "-q"], check=True)
                wall[setting].append(time.perf_counter() - t0)
        slices = json.loads((Path(tmp) / "off" / "run.json").read_text())["runs"][-1]["counts"]["slices"]
    med = {k: statistics.median(v) for k, v in wall.items()}
    return {"archive": str(archive), "slices": slices, "rounds": rounds, "wall_s": wall, "median_s": med, "speed_ratio_extents_over_order_only": med["off"] / med["20,55"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archive", type=Path, required=True, help="phantom archive (spinelevel phantom)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/level_extents.json"))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--model", default="demo")
    a = p.parse_args()
    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "decode": decode_timings(a.repeats),
        "end_to_end": end_to_end(a.archive, a.rounds, a.model),
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
