"""One prepared GPU check: the torch backend end to end, parity with ONNX Runtime, slices/s.

For a lent GPU machine that has PyTorch with CUDA, timm, onnxruntime (CPU), cupy, pyarrow and typer,
but not pydicom, TensorRT or DALI. It imports only spinelevel modules that need none of those
(selftest, card, preprocess, torch backend, torch preprocessing) and generates CT-like slices
procedurally (512 x 512 int16 with slope/intercept) instead of reading phantom DICOM.

What it measures, for EfficientNetV2-M (timm ``tf_efficientnetv2_m``, BatchNorm calibrated on the
generated slices, random head) at 512 x 512:

1. parity: the torch backend (CUDA, FP16, channels_last) against the same weights exported to ONNX
   and run by ONNX Runtime float32 on the CPU (argmax agreement, max probability difference);
2. compute-only slices/s and ms/batch at several batch sizes: FP32 eager (the baseline, same
   process), FP16 channels_last eager, FP16 channels_last with CUDA graphs;
3. end-to-end slices/s on a phantom series: int16 slices from host memory -> GPU -> torch
   preprocessing (the card math) -> FP16 model -> probabilities on the host, against the CPU
   preprocessing (numpy) + the same GPU model.

Prints one JSON object. ``--cpu-smoke`` runs the same code with a tiny model on the CPU.

Usage:
    python benchmarks/gpu_check.py                 # on the GPU machine
    python benchmarks/gpu_check.py --cpu-smoke     # anywhere, ~1 minute
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from spinelevel.bench.machine import emit_json  # noqa: E402
from spinelevel.card import ModelCard, sidecar_path  # noqa: E402
from spinelevel.engine.backends.torch import TorchBackend, TorchOptions  # noqa: E402
from spinelevel.engine.preprocess import PreprocessSpec, preprocess_batch  # noqa: E402
from spinelevel.engine.torch_preprocess import hu_from_raw, preprocess_torch  # noqa: E402
from spinelevel.selftest import make_timm_checkpoint, parity, synthetic_slices  # noqa: E402


def _sync(device) -> None:  # noqa: ANN001
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _export_onnx(model, example, path: Path) -> str | None:  # noqa: ANN001
    import torch

    try:
        with torch.no_grad():
            torch.onnx.export(model, example, str(path), input_names=["image"], output_names=["logits"], dynamic_axes={"image": {0: "N"}, "logits": {0: "N"}}, opset_version=17, dynamo=False)
    except Exception as exc:  # noqa: BLE001 - recorded in the JSON, the rest still runs
        return f"{type(exc).__name__}: {exc}"[:300]
    return None


def _ort_probs(path: Path, batch: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    rows = [session.run(None, {name: batch[i : i + 4]})[0] for i in range(0, len(batch), 4)]
    logits = np.concatenate(rows).astype(np.float32)
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _compute_only(model, device, dtype, channels_last: bool, batch: int, iters: int, graphs: bool, chw) -> dict:  # noqa: ANN001
    import torch

    x = torch.randn((batch, *chw), device=device).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        if graphs:
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(3):
                    model(x)
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                model(x)
            step = graph.replay
        else:
            def step() -> None:
                model(x)
        for _ in range(3):
            step()
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            step()
        _sync(device)
        dt = time.perf_counter() - t0
    return {"batch": batch, "slices_per_s": round(batch * iters / dt, 1), "ms_per_batch": round(1000 * dt / iters, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny model on the CPU (checks the script, no real numbers)")
    ap.add_argument("--arch", default=None, help="timm architecture (default tf_efficientnetv2_m; smoke: test_efficientnet)")
    ap.add_argument("--size", type=int, default=None, help="input size (default 512; smoke: 64)")
    ap.add_argument("--batches", default=None, help="comma-separated batch sizes (default 8,16,32,64)")
    ap.add_argument("--iters", type=int, default=None, help="timed iterations per batch size (default 20)")
    ap.add_argument("--e2e-slices", type=int, default=None, help="slices in the end-to-end series (default 512)")
    ap.add_argument("--parity-slices", type=int, default=None, help="slices compared with ONNX Runtime (default 16)")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = ap.parse_args()

    import torch

    smoke = args.cpu_smoke
    arch = args.arch or ("test_efficientnet" if smoke else "tf_efficientnetv2_m")
    size = args.size or (64 if smoke else 512)
    batches = [int(b) for b in (args.batches or ("2,4" if smoke else "8,16,32,64")).split(",")]
    iters = args.iters or (3 if smoke else 20)
    e2e_n = args.e2e_slices or (16 if smoke else 512)
    parity_n = args.parity_slices or (8 if smoke else 16)
    if not smoke and not torch.cuda.is_available():
        print(json.dumps({"error": "torch sees no CUDA device; use --cpu-smoke"}))
        sys.exit(1)
    device = torch.device("cpu" if smoke else "cuda")
    result: dict = {
        "script": "benchmarks/gpu_check.py",
        "mode": "cpu-smoke" if smoke else "gpu",
        "architecture": arch,
        "input_size": size,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
        "compute_capability": ".".join(map(str, torch.cuda.get_device_capability(0))) if device.type == "cuda" else None,
    }
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = Path(tmp)
        # Phantom series: CT-sized int16 slices (512 x 512 like scanner output), head to feet.
        raw, slopes, intercepts = synthetic_slices(max(e2e_n, parity_n, 64), 512 if not smoke else 2 * size, seed=7)
        card_spec = PreprocessSpec(windows=((40.0, 400.0), (400.0, 1800.0), (-600.0, 1500.0)), input_size=(size, size))
        hu = [r.astype(np.float32) * s + c for r, s, c in zip(raw, slopes, intercepts)]
        calib = preprocess_batch(hu[:32], card_spec)
        t0 = time.perf_counter()
        checkpoint, _ = make_timm_checkpoint(work, arch, size=size, seed=0, calibration=calib, export_onnx=False, device=str(device))
        card = ModelCard.from_json(sidecar_path(checkpoint).read_text())
        result["checkpoint_seconds"] = round(time.perf_counter() - t0, 1)

        # 1. parity with ONNX Runtime float32 (CPU)
        backend = TorchBackend(checkpoint, card, TorchOptions(max_batch=max(batches), device=str(device)))
        result["backend"] = {"device": str(backend.device), "fp16": backend.half, "channels_last": backend.channels_last}
        from spinelevel.engine.backends.torch import load_checkpoint_model

        fp32_model = load_checkpoint_model(checkpoint, card)
        parity_batch = preprocess_batch(hu[:parity_n], card_spec)
        onnx_path = work / "model.onnx"
        t0 = time.perf_counter()
        err = _export_onnx(fp32_model, torch.from_numpy(parity_batch[:2]), onnx_path)
        if err is None:
            try:
                ref = _ort_probs(onnx_path, parity_batch)
                par = parity(backend.infer(parity_batch), ref)
                result["parity"] = {**par.to_dict(), "bounds": {"min_agreement": 0.995, "max_diff": 0.01 if backend.half else 1e-3}, "passed": par.ok(0.995, 0.01 if backend.half else 1e-3), "reference": "onnxruntime float32 CPU"}
            except Exception as exc:  # noqa: BLE001
                result["parity"] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        else:
            result["parity"] = {"error": f"ONNX export failed: {err}"}
        result["parity_seconds"] = round(time.perf_counter() - t0, 1)

        # 2. compute-only throughput: FP32 baseline, FP16 channels_last, + CUDA graphs
        chw = (card.channels, size, size)
        variants = [("fp32", torch.float32, False, False)]
        if device.type == "cuda":
            variants += [("fp16_channels_last", torch.float16, True, False), ("fp16_channels_last_cuda_graphs", torch.float16, True, True)]
        compute: dict = {}
        for name, dtype, cl, graphs in variants:
            model = load_checkpoint_model(checkpoint, card).to(device, dtype=dtype)
            if cl:
                model = model.to(memory_format=torch.channels_last)
            rows = []
            for b in batches:
                try:
                    rows.append(_compute_only(model, device, dtype, cl, b, iters, graphs, chw))
                except torch.OutOfMemoryError:
                    rows.append({"batch": b, "error": "out of memory"})
                    torch.cuda.empty_cache()
            compute[name] = rows
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
        result["compute_only"] = compute

        # 3. end to end on the phantom series: host int16 -> GPU preprocessing -> FP16 model -> host
        best = max(batches)
        series = np.stack(raw[:e2e_n])
        sl = torch.from_numpy(slopes[:e2e_n])
        ic = torch.from_numpy(intercepts[:e2e_n])
        pinned = torch.from_numpy(series).pin_memory() if device.type == "cuda" else torch.from_numpy(series)

        def gpu_pre() -> np.ndarray:
            outs = []
            for i in range(0, e2e_n, best):
                x = pinned[i : i + best].to(device, non_blocking=True)
                x = preprocess_torch(hu_from_raw(x, sl[i : i + best], ic[i : i + best]), card_spec)
                outs.append(backend.infer(x))
            return np.concatenate(outs)

        def cpu_pre() -> np.ndarray:
            outs = []
            for i in range(0, e2e_n, best):
                b = preprocess_batch([series[j].astype(np.float32) * slopes[j] + intercepts[j] for j in range(i, min(i + best, e2e_n))], card_spec)
                outs.append(backend.infer(b))
            return np.concatenate(outs)

        e2e = {"slices": e2e_n, "batch": best, "source_size": list(series.shape[1:])}
        for name, fn in (("gpu_preprocessing", gpu_pre), ("numpy_preprocessing", cpu_pre)):
            fn()  # warm-up
            _sync(device)
            t0 = time.perf_counter()
            probs = fn()
            _sync(device)
            dt = time.perf_counter() - t0
            e2e[name] = {"slices_per_s": round(e2e_n / dt, 1), "seconds": round(dt, 3)}
            e2e[f"{name}_probs"] = probs
        agree = parity(e2e.pop("gpu_preprocessing_probs"), e2e.pop("numpy_preprocessing_probs"))
        e2e["gpu_vs_numpy_preprocessing"] = agree.to_dict()
        e2e["speedup"] = round(e2e["gpu_preprocessing"]["slices_per_s"] / e2e["numpy_preprocessing"]["slices_per_s"], 2)
        result["end_to_end"] = e2e
        backend.close()

    emit_json(result, args.out)


if __name__ == "__main__":
    main()
