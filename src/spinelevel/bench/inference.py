"""Inference throughput per backend and batch size, against PyTorch eager on the same machine."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from spinelevel.card import read_card
from spinelevel.engine.backends import BackendOptions, available_backends, load_backend

__all__ = ["bench_inference"]


def _rate(fn, n_images: int, min_seconds: float) -> tuple[float, float]:  # noqa: ANN001
    fn()  # warm-up (graph optimisation, allocator)
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds and calls >= 2:
            return calls * n_images / elapsed, 1000.0 * elapsed / calls


def bench_inference(arch: str, input_size: int, batch_sizes: tuple[int, ...], work: Path, min_seconds: float = 3.0) -> dict:
    """Images/s of every available CPU backend and of PyTorch eager, same weights and inputs."""
    import torch

    from spinelevel.bench.models import untrained_checkpoint, untrained_onnx
    from spinelevel.training.train import load_checkpoint

    onnx_path = untrained_onnx(arch, input_size, work)
    model, _ = load_checkpoint(untrained_checkpoint(arch, input_size, work))
    model.eval()
    rows = []
    rng = np.random.default_rng(0)
    for bs in batch_sizes:
        x = rng.normal(size=(bs, 3, input_size, input_size)).astype(np.float32)
        row: dict = {"batch_size": bs}
        tx = torch.from_numpy(x)
        with torch.inference_mode():
            ips, ms = _rate(lambda: model(tx), bs, min_seconds)
        row["torch_eager"] = {"images_per_s": round(ips, 2), "ms_per_batch": round(ms, 1)}
        for name, ok in available_backends().items():
            if not ok or name in ("tensorrt",):
                continue
            # the torch backend runs the training checkpoint; the others the exported ONNX
            model_file = untrained_checkpoint(arch, input_size, work) if name == "torch" else onnx_path
            try:
                backend = load_backend(name, model_file, read_card(model_file), BackendOptions(max_batch=bs, device="cpu"))
            except Exception as exc:  # a backend that cannot run here is reported, not fatal
                row[name] = {"error": f"{type(exc).__name__}: {exc}"[:200]}
                continue
            try:
                ips_b, ms_b = _rate(lambda: backend.infer(x), bs, min_seconds)
            finally:
                backend.close()
            row[name] = {"images_per_s": round(ips_b, 2), "ms_per_batch": round(ms_b, 1), "vs_torch_eager": round(ips_b / ips, 2)}
        rows.append(row)
    return {"model": arch, "input_size": input_size, "torch_threads": torch.get_num_threads(), "results": rows}
