"""Ray overhead: slices/s of a local Ray Data run against the single-process run, same archive and model.

Usage::

    python benchmarks/ray_overhead.py [--studies 2] [--size 256] [--input-size 224] [--repeats 2] [--out ray.json]

Both runs classify the same phantom archive with the same untrained EfficientNetV2-B0 ONNX model
(timing only) and full sampling, into fresh output directories, in this process. The single-process
run (``spinelevel run``: decode pool of all cores, ONNX Runtime in the main process) is the baseline;
the Ray run starts one local Ray instance first (its start-up is reported apart, not counted) and then
runs ``run_on_ray`` with CPU decode tasks and one ONNX Runtime actor. Each setting runs once to warm
up (file cache, imports) and then ``--repeats`` times; the best wall time counts. Prints JSON with the
machine description and writes it to --out if given. Not collected by pytest.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from spinelevel.bench.end_to_end import phantom_archive
from spinelevel.bench.machine import describe_machine, emit_json
from spinelevel.bench.models import untrained_onnx
from spinelevel.engine.pipeline import RunOptions, run
from spinelevel.engine.ray_runner import RayOptions, run_on_ray
from spinelevel.engine.sampling import SamplingOptions


def _best(fn, repeats: int) -> dict:  # noqa: ANN001
    fn()  # warm-up
    times, summary = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        summary = fn()
        times.append(time.perf_counter() - t0)
    best = min(times)
    return {"slices": summary.slices, "series": summary.series_ok, "seconds": round(best, 3), "all_seconds": [round(t, 3) for t in times], "slices_per_s": round(summary.slices / best, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=2)
    parser.add_argument("--size", type=int, default=256, help="phantom image size (pixels)")
    parser.add_argument("--input-size", type=int, default=224, help="model input size")
    parser.add_argument("--arch", default="tf_efficientnetv2_b0")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "spinelevel-bench")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    import ray

    cores = os.cpu_count() or 1
    archive = phantom_archive(args.cache, args.studies, args.size, coverage="lumbar", second_recon_probability=0)
    model = untrained_onnx(args.arch, args.input_size, args.cache / "models")
    options = RunOptions(workers=cores, batch_size=args.batch_size, sampling=SamplingOptions(mode="full"))
    work = Path(tempfile.mkdtemp(prefix="ray-overhead-"))
    counter = iter(range(1_000_000))
    try:
        single = _best(lambda: run([archive], model, work / f"single{next(counter)}", options), args.repeats)
        t0 = time.perf_counter()
        ray.init(num_cpus=cores, object_store_memory=500 * 2**20, include_dashboard=False, log_to_driver=False, configure_logging=False)
        ray_init_s = time.perf_counter() - t0
        try:
            on_ray = _best(lambda: run_on_ray([archive], model, work / f"ray{next(counter)}", options, RayOptions()), args.repeats)
        finally:
            ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = {
        "benchmark": "ray_overhead",
        "machine": describe_machine(),
        "ray": ray.__version__,
        "archive": {"studies": args.studies, "size": args.size, "slices": single["slices"]},
        "model": {"arch": args.arch, "input_size": args.input_size, "batch_size": args.batch_size, "backend": "onnxruntime"},
        "single_process": single | {"decode_workers": cores},
        "ray_local": on_ray | {"ray_init_seconds": round(ray_init_s, 2), "inference_actors": 1},
        "ratio_ray_to_single": round(on_ray["slices_per_s"] / single["slices_per_s"], 3),
    }
    emit_json(report, args.out)


if __name__ == "__main__":
    main()
