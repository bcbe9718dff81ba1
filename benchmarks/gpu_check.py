"""One prepared GPU check (issue 16): torch FP16 throughput, GPU JPEG 2000 decoding, end to end.

Made for a lent GPU machine with PyTorch (CUDA), timm, ONNX Runtime (CPU), CuPy, pyarrow and typer,
but without TensorRT, DALI or pydicom. It needs five small wheels carried along (about 35 MB,
listed in benchmarks/gpu_check_wheels.txt; install with ``pip install --no-deps wheels/*.whl``):
nvImageCodec with its nvJPEG2000 extension (the GPU decoder) and pydicom, pylibjpeg and
pylibjpeg-openjpeg (the phantom archive is real DICOM and ``spinelevel run`` reads it with pydicom;
openjpeg is the CPU reference). pydicom is carried rather than replaced by a private codestream
parser, because the end-to-end step runs the real engine, which needs it anyway.

Writes benchmarks/results/gpu_check.json (``--out``) with:

* ``machine.gpu``;
* ``torch_fp16.<arch>_<size>.slices_per_s``: compute only, FP16, channels_last, CUDA graphs, best of
  batch 16/32/64/128 (``tf_efficientnetv2_m`` at 512, ``tf_efficientnetv2_b0`` at 256; random
  weights: speed only);
* ``j2k_gpu_decode.slices_per_s`` and ``.bit_exact`` (nvImageCodec, to host memory, against
  openjpeg on every frame) and ``j2k_cpu_decode.slices_per_s_per_core`` (openjpeg, one thread) on
  the same codestreams: the 512 x 512 lossless JPEG 2000 slices of a phantom archive, plus signed and
  unsigned 12-bit synthetic CT codestreams so both storage kinds are checked;
* ``end_to_end_gpu.slices_per_s`` (``spinelevel run`` on the phantom archive: torch backend on CUDA,
  CUDA graphs, ``--j2k-decoder nvimgcodec``, wall time of the run as run.json records it) and
  ``.compute_only_slices_per_s`` (the same backend and batch on device input, in this process).

Every step has a time budget (the whole script stops within ``--budget-s``, default 450 s); a step
that cannot run records why, never a number it did not measure. ``--cpu-smoke`` runs the same code
with tiny sizes on the CPU (no GPU numbers; checks the script).

Usage:
    pip install --no-deps wheels/*.whl && python benchmarks/gpu_check.py
    python benchmarks/gpu_check.py --cpu-smoke --out /tmp/smoke.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from spinelevel.bench.machine import emit_json  # noqa: E402

WHEELS = ROOT / "benchmarks" / "gpu_check_wheels.txt"


def _have(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _compute(model, batch: int, chw: tuple, device, dtype, graphs: bool, seconds: float) -> dict:  # noqa: ANN001
    """Slices/s of one model at one batch size (timm benchmark.py style: warm-up, sync, clock)."""
    import torch

    x = torch.randn((batch, *chw), device=device).to(dtype)
    if device.type == "cuda":
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
        _sync()
        iters, t0 = 0, time.perf_counter()
        while True:
            step()
            iters += 1
            if iters % 5 == 0:
                _sync()
                if time.perf_counter() - t0 >= seconds:
                    break
        _sync()
        dt = time.perf_counter() - t0
    return {"batch": batch, "slices_per_s": round(batch * iters / dt, 1), "ms_per_batch": round(1000 * dt / iters, 3)}


def torch_fp16(arch: str, size: int, batches: list[int], device, seconds: float, deadline: float) -> dict:  # noqa: ANN001
    import timm
    import torch

    on_cuda = device.type == "cuda"
    dtype = torch.float16 if on_cuda else torch.float32
    model = timm.create_model(arch, num_classes=7, pretrained=False, exportable=True).eval().to(device, dtype=dtype)
    if on_cuda:
        model = model.to(memory_format=torch.channels_last)
    rows = []
    for b in batches:
        if time.perf_counter() > deadline:
            rows.append({"batch": b, "skipped": "time budget"})
            continue
        try:
            rows.append(_compute(model, b, (3, size, size), device, dtype, on_cuda, seconds))
        except torch.OutOfMemoryError:
            rows.append({"batch": b, "error": "out of memory"})
            torch.cuda.empty_cache()
    done = [r for r in rows if "slices_per_s" in r]
    best = max(done, key=lambda r: r["slices_per_s"]) if done else None
    del model
    if on_cuda:
        torch.cuda.empty_cache()
    return {
        "slices_per_s": best["slices_per_s"] if best else None,
        "best_batch": best["batch"] if best else None,
        "precision": "fp16" if on_cuda else "fp32 (cpu smoke)",
        "channels_last": on_cuda,
        "cuda_graphs": on_cuda,
        "by_batch": rows,
    }


def _phantom(out: Path, studies: int, size: int) -> dict:
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "spinelevel", "phantom", str(out), "--studies", str(studies), "--size", str(size), "--compression", "jpeg2000", "--workers", str(os.cpu_count() or 1), "-q"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT / "src")))
    if proc.returncode != 0:
        raise RuntimeError(f"spinelevel phantom failed: {proc.stderr.strip()[-400:]}")
    files = [p for p in out.rglob("*") if p.is_file() and p.suffix not in (".parquet", ".json", ".md")]
    return {"studies": studies, "size": size, "files": len(files), "seconds": round(time.perf_counter() - t0, 1)}


def _phantom_frames(root: Path, limit: int) -> list:
    """Codestreams of the phantom's JPEG 2000 CT slices (pydicom extracts them; nothing is decoded)."""
    import pydicom

    from spinelevel.engine.gpu_j2k import extract_frame, is_j2k

    frames = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path, force=True)
        except Exception:  # noqa: BLE001 - labels and other non-DICOM files
            continue
        tsyntax = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", ""))
        if ds.get("Modality") != "CT" or not is_j2k(tsyntax) or "PixelData" not in ds or int(ds.get("Rows", 0)) < 256:
            continue
        frames.append(extract_frame(ds, 0, tsyntax))
        if len(frames) >= limit:
            break
    return frames


def _synthetic_frames(size: int, count: int) -> list:
    """Signed 12-bit and unsigned 12-bit CT-like slices, lossless, so both storage kinds are checked."""
    import openjpeg

    from spinelevel.engine.gpu_j2k import frame_from_codestream
    from spinelevel.selftest import synthetic_slices

    raw, _, _ = synthetic_slices(count, size, seed=11)
    frames = []
    for i, r in enumerate(raw):
        hu = np.clip(r.astype(np.int32), -2048, 2047)
        if i % 2:
            stored, signed = (hu + 2048).astype(np.uint16), False
        else:
            stored, signed = hu.astype(np.int16), True
        frames.append(frame_from_codestream(openjpeg.encode(stored, bits_stored=12), size, size, 12, signed))
    return frames


def j2k(frames: list, batch: int, on_gpu: bool, deadline: float) -> tuple[dict, dict]:
    import openjpeg

    from spinelevel.engine.gpu_j2k import NvImageCodecDecoder, nvimgcodec_unavailable_reason, to_stored

    t0 = time.perf_counter()
    refs = [openjpeg.decode(f.codestream) for f in frames]  # one thread: this process, no pool
    cpu_dt = time.perf_counter() - t0
    kinds = sorted({f.describe() for f in frames})
    cpu = {"slices": len(frames), "slices_per_s_per_core": round(len(frames) / cpu_dt, 1), "decoder": f"openjpeg (pylibjpeg-openjpeg {_version('pylibjpeg-openjpeg')}), one thread", "kinds": kinds}
    reason = nvimgcodec_unavailable_reason() if on_gpu else "cpu smoke: no GPU"
    if reason is not None:
        return {"skipped": reason, "wheels": str(WHEELS.relative_to(ROOT))}, cpu
    decoder = NvImageCodecDecoder(0)
    decoder.decode(frames[:batch])  # warm-up: CUDA context, nvJPEG2000 buffers
    t0, outs = time.perf_counter(), []
    for start in range(0, len(frames), batch):
        outs.extend(decoder.decode(frames[start : start + batch]))
    dt = time.perf_counter() - t0
    by_kind: dict[str, dict] = {}
    for f, ref, out in zip(frames, refs, outs):
        k = by_kind.setdefault(f.describe(), {"frames": 0, "exact": 0, "failed": 0})
        k["frames"] += 1
        if out is None:
            k["failed"] += 1
            continue
        stored = to_stored(out, f)
        k["exact"] += int(stored.dtype == ref.dtype and np.array_equal(stored, ref))
    exact = all(k["exact"] == k["frames"] for k in by_kind.values())
    gpu = {
        "slices": len(frames),
        "slices_per_s": round(len(frames) / dt, 1),
        "batch": batch,
        "bit_exact": exact,
        "by_kind": by_kind,
        "includes": "codestream parse, nvJPEG2000 decode, copy to host memory (what the numpy path uses)",
        "decoder": f"nvImageCodec {_version('nvidia-nvimgcodec-cu13')} / nvJPEG2000 {_version('nvidia-nvjpeg2k-cu13')}",
        "speedup_vs_one_cpu_core": round((len(frames) / dt) / cpu["slices_per_s_per_core"], 1),
    }
    return gpu, cpu


def _version(dist: str) -> str | None:
    import importlib.metadata as md

    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def end_to_end(archive: Path, work: Path, arch: str, size: int, batch: int, on_gpu: bool, seconds: float) -> dict:
    import torch

    from spinelevel.card import read_card
    from spinelevel.engine.backends.torch import TorchBackend, TorchOptions
    from spinelevel.selftest import make_timm_checkpoint

    device = "cuda" if on_gpu else "cpu"
    checkpoint, _ = make_timm_checkpoint(work / "ckpt", arch, size=size, seed=0, export_onnx=False, device=device)
    out = work / "run-out"
    cmd = [sys.executable, "-m", "spinelevel", "run", str(archive), "--model", str(checkpoint), "--backend", "torch", "--device", device, "--batch-size", str(batch), "--workers", str(os.cpu_count() or 1), "--sampling", "full", "--out", str(out), "--quiet"]
    if on_gpu:
        cmd += ["--cuda-graphs", "--j2k-decoder", "nvimgcodec"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT / "src")))
    if proc.returncode != 0:
        return {"error": f"spinelevel run failed ({proc.returncode}): {proc.stderr.strip()[-600:]}", "command": " ".join(cmd[1:])}
    entry = json.loads((out / "run.json").read_text())["runs"][-1]
    slices = int(entry["counts"].get("slices", 0))
    # compute only: the same backend, options and batch, on input already on the device
    backend = TorchBackend(checkpoint, read_card(checkpoint), TorchOptions(max_batch=batch, device=device, cuda_graphs=on_gpu))
    x = torch.randn((batch, 3, size, size), device=device)
    backend.infer(x)
    _sync()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        backend.infer(x)
        n += batch
    _sync()
    compute = n / (time.perf_counter() - t0)
    backend.close()
    result = {
        "slices": slices,
        "seconds": entry.get("seconds"),
        "slices_per_s": round(slices / entry["seconds"], 1) if entry.get("seconds") else None,
        "compute_only_slices_per_s": round(compute, 1),
        "model": f"{arch} at {size} (random weights, BatchNorm calibrated)",
        "batch": batch,
        "command": " ".join(cmd[1:]),
        "backend": entry.get("backend"),
        "j2k_decode": entry.get("j2k_decode"),
        "note": "slices_per_s is the whole run's wall time as run.json records it (scan, decode, preprocess, inference, writing)",
    }
    if result["slices_per_s"]:
        result["ratio_to_compute_only"] = round(result["slices_per_s"] / result["compute_only_slices_per_s"], 3)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU (checks the script, no GPU numbers)")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/gpu_check.json; smoke: stdout only)")
    ap.add_argument("--budget-s", type=float, default=450.0, help="stop starting new steps after this many seconds")
    ap.add_argument("--studies", type=int, default=None, help="phantom studies (default 40, about 2000 slices of 512 x 512)")
    ap.add_argument("--j2k-frames", type=int, default=None, help="phantom JPEG 2000 frames decoded (default 512)")
    args = ap.parse_args()
    start = time.perf_counter()
    deadline = start + args.budget_s

    import torch

    smoke = args.cpu_smoke
    on_gpu = not smoke and torch.cuda.is_available()
    if not smoke and not on_gpu:
        print(json.dumps({"error": "torch sees no CUDA device; use --cpu-smoke"}))
        sys.exit(1)
    device = torch.device("cuda" if on_gpu else "cpu")
    if on_gpu:
        torch.backends.cudnn.benchmark = True
    result: dict = {
        "script": "benchmarks/gpu_check.py",
        "mode": "gpu" if on_gpu else "cpu-smoke",
        "machine": {
            "gpu": torch.cuda.get_device_name(0) if on_gpu else None,
            "compute_capability": ".".join(map(str, torch.cuda.get_device_capability(0))) if on_gpu else None,
            "cpu_cores": os.cpu_count(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "python": platform.python_version(),
        },
        "packages": {m: _have(m) for m in ("pydicom", "openjpeg", "nvidia.nvimgcodec", "nvidia.nvjpeg2k", "timm", "onnxruntime", "cupy", "tensorrt", "nvidia.dali")},
    }
    seconds = 0.3 if smoke else 2.0
    batches = [2, 4] if smoke else [16, 32, 64, 128]
    models = [("test_efficientnet", 64)] if smoke else [("tf_efficientnetv2_m", 512), ("tf_efficientnetv2_b0", 256)]
    result["torch_fp16"] = {}
    for arch, size in models:
        try:
            result["torch_fp16"][f"{arch}_{size}"] = torch_fp16(arch, size, batches, device, seconds, deadline - 150)
        except Exception as exc:  # noqa: BLE001 - recorded; the other steps still run
            result["torch_fp16"][f"{arch}_{size}"] = {"error": f"{type(exc).__name__}: {exc}"[:400]}

    missing = [m for m in ("pydicom", "openjpeg") if not _have(m)]
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = Path(tmp)
        archive = work / "phantom"
        if missing:
            why = f"not installed here: {', '.join(missing)} (carry the wheels in {WHEELS.relative_to(ROOT)})"
            result["j2k_gpu_decode"] = result["j2k_cpu_decode"] = result["end_to_end_gpu"] = {"skipped": why}
        else:
            try:
                result["phantom"] = _phantom(archive, args.studies or (1 if smoke else 40), 64 if smoke else 512)
                frames = _phantom_frames(archive, args.j2k_frames or (8 if smoke else 512)) if not smoke else []
                frames += _synthetic_frames(64 if smoke else 512, 4 if smoke else 32)
                result["j2k_gpu_decode"], result["j2k_cpu_decode"] = j2k(frames, 4 if smoke else 64, on_gpu, deadline)
            except Exception as exc:  # noqa: BLE001
                result.setdefault("j2k_gpu_decode", {"error": f"{type(exc).__name__}: {exc}"[:400]})
            if time.perf_counter() > deadline - 60:
                result["end_to_end_gpu"] = {"skipped": "time budget"}
            elif archive.exists():
                arch, size = models[0]
                try:
                    result["end_to_end_gpu"] = end_to_end(archive, work, arch, size, 8 if smoke else 64, on_gpu, seconds * 2)
                except Exception as exc:  # noqa: BLE001
                    result["end_to_end_gpu"] = {"error": f"{type(exc).__name__}: {exc}"[:400]}
    result["seconds"] = round(time.perf_counter() - start, 1)
    out = args.out or (None if smoke else ROOT / "benchmarks" / "results" / "gpu_check.json")
    emit_json(result, out)


if __name__ == "__main__":
    main()
