"""Phantom generation speed: axial slices written per second, per image size and compression.

Usage::

    python benchmarks/phantom_speed.py [--studies 2] [--sizes 256 512] [--out results.json]

Every setting writes the same studies (lumbar coverage, 2.5 mm, no extras) into a temporary folder, one
process, after a warm-up; the uncompressed setting of each size is the baseline of the ratios. Prints
JSON (machine, versions, slices/s per setting) and writes it to --out if given. Not collected by pytest.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom

from spinelevel.bench.machine import emit_json
from spinelevel.phantom import PhantomOptions, generate


def _machine() -> dict[str, object]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__,
            "pydicom": pydicom.__version__, "platform": platform.platform()}


def run(studies: int, sizes: list[int], compressions: list[str], seed: int) -> dict[str, object]:
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        warm = PhantomOptions(studies=1, seed=seed, size=64, coverage="lumbar", thickness_mm=5.0, second_recon_probability=0)
        generate(Path(tmp) / "warmup", warm)
        for size in sizes:
            baseline = None
            for comp in compressions:
                options = PhantomOptions(studies=studies, seed=seed, size=size, compression=comp, coverage="lumbar",
                                         thickness_mm=2.5, second_recon_probability=0, localizer_probability=0,
                                         dose_report_probability=0)
                out = Path(tmp) / f"{size}-{comp}"
                t0 = time.perf_counter()
                summary = generate(out, options)
                seconds = time.perf_counter() - t0
                rate = summary.slices / seconds
                baseline = baseline or rate
                size_mb = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 1e6
                results.append({"size": size, "compression": comp, "slices": summary.slices, "seconds": round(seconds, 3),
                                "slices_per_s": round(rate, 1), "ratio_to_uncompressed": round(rate / baseline, 3),
                                "megabytes": round(size_mb, 1)})
    return {"benchmark": "phantom_speed", "machine": _machine(), "workers": 1, "results": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=2)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--compressions", nargs="+", default=["none", "rle", "jpeg2000", "jpegls"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    report = run(args.studies, args.sizes, args.compressions, args.seed)
    emit_json(report, args.out)


if __name__ == "__main__":
    main()
