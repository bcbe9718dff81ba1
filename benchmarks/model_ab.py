"""Two models on the same archive: what a model change costs per slice on ONNX Runtime CPU.

    python benchmarks/model_ab.py --a src/spinelevel/models/demo/levels_demo.onnx --b v9r192.onnx \
        --studies 2 --size 512 --rounds 3 --out benchmarks/results/model_ab_192px.json

Two measurements, each alternating A, B, A, B ... so both see the same machine load:

- ``inference``: the ONNX Runtime session the engine builds (``--backend onnxruntime``, default
  options) on one batch of the engine's preprocessed slices of the archive, repeated for at least
  ``--min-seconds``; slices per second and milliseconds per slice;
- ``end_to_end``: ``spinelevel run --sampling full`` of the whole archive (decode, preprocess,
  inference, decoding of the levels, Parquet) in a subprocess, wall seconds.

The result gives each model's best and median and the ratios B / A (time: above 1 means B is slower).
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from spinelevel.bench.end_to_end import phantom_archive
from spinelevel.bench.machine import describe_machine, emit_json

REPO = Path(__file__).resolve().parent.parent


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _batch(archive: Path, card, n: int) -> np.ndarray:  # noqa: ANN001
    """The first ``n`` labelled slices of the phantom archive as the engine decodes and preprocesses
    them for this card."""
    import pyarrow.parquet as pq
    import pydicom

    from spinelevel.engine.decode import decode_hu
    from spinelevel.engine.preprocess import PreprocessSpec, preprocess_batch

    paths = pq.read_table(archive / "labels.parquet", columns=["path"]).column("path").to_pylist()[:n]
    if len(paths) < n:
        raise SystemExit(f"{archive}: only {len(paths)} labelled slices, {n} asked for")
    datasets = [pydicom.dcmread(archive / p) for p in paths]
    spacings = [(float(ds.PixelSpacing[0]), float(ds.PixelSpacing[1])) for ds in datasets]
    return preprocess_batch([decode_hu(ds) for ds in datasets], PreprocessSpec.from_card(card), spacings)


def _inference_rate(backend, x: np.ndarray, min_seconds: float) -> float:  # noqa: ANN001
    backend.infer(x)  # warm-up
    n, start = 0, time.perf_counter()
    while True:
        backend.infer(x)
        n += len(x)
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return n / elapsed


def _run(archive: Path, model: Path, out: Path) -> float:
    if out.exists():
        shutil.rmtree(out)
    cmd = [sys.executable, "-m", "spinelevel", "run", str(archive), "--model", str(model), "--out", str(out), "--sampling", "full", "--quiet"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{model}: spinelevel run failed: {proc.stderr[-2000:]}")
    return wall


def _summary(values: list[float], higher_is_better: bool) -> dict:
    """Values, the best of them (the highest rate, the shortest time) and the median."""
    return {"values": values, "best": max(values) if higher_is_better else min(values), "median": statistics.median(values)}


def main(argv: list[str] | None = None) -> dict:
    from spinelevel.card import read_card
    from spinelevel.engine.backends import load_backend

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a", type=Path, required=True, help="model A (the baseline), ONNX")
    parser.add_argument("--b", type=Path, required=True, help="model B, ONNX")
    parser.add_argument("--studies", type=int, default=2)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32, help="slices per inference call")
    parser.add_argument("--min-seconds", type=float, default=5.0, help="per inference measurement")
    parser.add_argument("--work", type=Path, default=REPO / ".bench-work")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    args.work.mkdir(parents=True, exist_ok=True)
    archive = phantom_archive(args.work, args.studies, args.size)
    models = {"a": args.a.resolve(), "b": args.b.resolve()}
    cards = {k: read_card(p) for k, p in models.items()}
    backends = {k: load_backend("onnxruntime", p, cards[k]) for k, p in models.items()}
    batches = {k: _batch(archive, cards[k], args.batch) for k in models}
    rates: dict[str, list[float]] = {"a": [], "b": []}
    walls: dict[str, list[float]] = {"a": [], "b": []}
    with tempfile.TemporaryDirectory(prefix="spinelevel-model-ab-") as tmp:
        for k in models:  # page cache, imports
            _run(archive, models[k], Path(tmp) / "warm")
        for _ in range(args.rounds):
            for k in models:
                rates[k].append(_inference_rate(backends[k], batches[k], args.min_seconds))
                walls[k].append(_run(archive, models[k], Path(tmp) / f"out-{k}"))
    import pyarrow.parquet as pq

    slices = pq.read_table(archive / "labels.parquet").num_rows
    result = {
        "machine": describe_machine(),
        "archive": {"studies": args.studies, "size": args.size, "labelled_slices": slices},
        "models": {k: {"path": str(p), "sha256": _sha(p), "input_size": list(cards[k].input_size), "preprocess": cards[k].preprocess} for k, p in models.items()},
        "inference_slices_per_s": {k: _summary(v, higher_is_better=True) for k, v in rates.items()},
        "inference_ms_per_slice_best": {k: 1000.0 / max(v) for k, v in rates.items()},
        "end_to_end_wall_s": {k: _summary(v, higher_is_better=False) for k, v in walls.items()},
        "ratio_inference_time_b_over_a": max(rates["a"]) / max(rates["b"]),
        "ratio_end_to_end_b_over_a_best": min(walls["b"]) / min(walls["a"]),
        "ratio_end_to_end_b_over_a_median": statistics.median(walls["b"]) / statistics.median(walls["a"]),
        "note": "B / A time ratios: above 1 means model B is slower; rounds alternate A and B",
    }
    emit_json(result, args.out)
    return result


if __name__ == "__main__":
    main()
