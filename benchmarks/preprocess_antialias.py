"""What card preprocessing version 3 (the antialiasing low-pass before the resize) costs per slice.

``spinelevel.engine.preprocess.preprocess_slice`` of the bundled model's card (128 px, three windows,
400 mm field of view) with preprocessing 2 and 3, interleaved for ``--rounds`` rounds in one process
(the machines are shared and noisy: compare medians of the same rounds), on slices of the sizes real
CT comes in: 512 x 512 at 0.78 mm (abdomen), 512 x 512 at 0.98 mm, 768 x 768 at 0.5 mm (thin, fine
matrix) and 256 x 256 at 1.6 mm (the phantoms); milliseconds per slice, one thread, with OpenCV when
it is installed (the engine's path) and with the numpy fallback.

Usage::

    python benchmarks/preprocess_antialias.py --out benchmarks/results/preprocess_antialias.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

import spinelevel.engine.preprocess as pre
from spinelevel.card import read_card
from spinelevel.models import resolve_model

SIZES = {"512px_0.78mm": (512, 0.78125), "512px_0.98mm": (512, 0.9765625), "768px_0.5mm": (768, 0.5), "256px_1.6mm": (256, 1.5625)}


def _time(hu: np.ndarray, spec: pre.PreprocessSpec, spacing: tuple[float, float], n: int) -> float:
    pre.preprocess_slice(hu, spec, spacing)  # warm
    t0 = time.perf_counter()
    for _ in range(n):
        pre.preprocess_slice(hu, spec, spacing)
    return (time.perf_counter() - t0) / n * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--slices", type=int, default=40, help="slices timed per round and variant")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/preprocess_antialias.json"))
    a = ap.parse_args()
    try:
        import cv2

        cv2.setNumThreads(1)
    except ImportError:
        cv2 = None
    v2 = pre.PreprocessSpec.from_card(read_card(resolve_model("demo")))
    v3 = replace(v2, antialias=True)
    rng = np.random.default_rng(0)
    results: dict[str, dict] = {}
    paths = [("opencv", pre._cv2)] if cv2 is not None else []
    paths.append(("numpy", lambda: None))
    real_cv2 = pre._cv2
    for path, getter in paths:
        pre._cv2 = getter
        for name, (n, mm) in SIZES.items():
            hu = rng.normal(40.0, 300.0, (n, n)).astype(np.float32)
            rounds = {"v2_ms": [], "v3_ms": []}
            for _ in range(a.rounds):
                rounds["v2_ms"].append(_time(hu, v2, (mm, mm), a.slices))
                rounds["v3_ms"].append(_time(hu, v3, (mm, mm), a.slices))
            med2, med3 = statistics.median(rounds["v2_ms"]), statistics.median(rounds["v3_ms"])
            results[f"{path}/{name}"] = {**rounds, "v2_median_ms": med2, "v3_median_ms": med3, "v3_over_v2": med3 / med2,
                                        "sigma_px": pre.antialias_sigmas(*pre.fov_box(n, n, (mm, mm), v2.fov_mm)[:2], v2.input_size)}
            print(f"{path:6s} {name:14s} v2 {med2:6.2f} ms  v3 {med3:6.2f} ms  x{med3 / med2:.2f}", flush=True)
    pre._cv2 = real_cv2
    out = {"benchmark": "preprocess_antialias", "rounds": a.rounds, "slices_per_round": a.slices, "threads": 1,
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
           "card": {"input_size": list(v2.input_size), "fov_mm": v2.fov_mm, "windows": [list(w) for w in v2.windows]}, "results": results}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
