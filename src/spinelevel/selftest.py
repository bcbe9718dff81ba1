"""`spinelevel selftest`: does the chosen inference path work on this machine, and how fast?

It builds (or loads) a small model, runs generated CT-like slices through the chosen path and through
the ONNX Runtime float32 reference, and returns a verdict with the measured agreement and
throughput:

* ``onnxruntime``: the engine's ORT backend (batched, all graph optimisations) against a plain ORT
  session (no optimisations, one slice at a time) on a small CNN built with onnx.helper.
* ``dali``: DALI preprocessing (GPU graph when a GPU is here, else the CPU graph) against the numpy
  preprocessing, both followed by the same ORT model; also the largest input difference.
* ``tensorrt``: an FP16 engine built from the small CNN against ORT float32.
* ``torch``: a BatchNorm-calibrated timm checkpoint (tf_efficientnetv2_b0 by default) on CUDA in
  FP16 against its ONNX export on ORT float32.

Pass rule: argmax agreement >= 99.5 % and max probability difference <= 0.01 for FP16 paths
(tensorrt, torch on CUDA); <= 1e-3 for float32 paths. Nothing here imports pydicom, TensorRT, DALI
or torch at module level.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from spinelevel.builders.fp16 import Parity, parity
from spinelevel.card import ModelCard, sidecar_path, write_onnx_card
from spinelevel.engine.preprocess import PreprocessSpec, preprocess_batch
from spinelevel.errors import BackendUnavailableError, InputError

__all__ = [
    "SELFTEST_BACKENDS",
    "SelftestOptions",
    "SelftestResult",
    "missing_requirements",
    "synthetic_slices",
    "tiny_cnn_onnx",
    "make_timm_checkpoint",
    "run_selftest",
]

log = logging.getLogger(__name__)

SELFTEST_BACKENDS = ("onnxruntime", "dali", "tensorrt", "torch")
CLASSES = ("T", "L1", "L2", "L3", "L4", "L5", "S")
WINDOWS = ((40.0, 400.0), (400.0, 1800.0), (-600.0, 1500.0))


@dataclass(frozen=True)
class SelftestOptions:
    """What `spinelevel selftest` runs."""

    # Path under test: onnxruntime, dali, tensorrt or torch.
    backend: str = "onnxruntime"
    # Generated slices pushed through both paths.
    slices: int = 256
    # Model input size (square); slices are generated at twice this and resized.
    size: int = 64
    # Slices per inference call.
    batch: int = 32
    # Torch path: "cuda", "cpu" or None (CUDA required).
    device: str | None = None
    # Torch path: timm architecture of the generated checkpoint.
    architecture: str = "tf_efficientnetv2_b0"
    # Where models are written (None: a temporary directory, removed afterwards).
    workdir: Path | None = None
    # Seed of the generated slices and weights.
    seed: int = 0

    def __post_init__(self) -> None:
        if self.backend not in SELFTEST_BACKENDS:
            raise InputError(f"selftest backend {self.backend!r}: choose one of {', '.join(SELFTEST_BACKENDS)}")
        if self.slices < 1 or self.batch < 1 or not 16 <= self.size <= 1024:
            raise InputError("selftest needs --slices >= 1, --batch >= 1 and 16 <= --size <= 1024")


@dataclass(frozen=True)
class SelftestResult:
    """The verdict."""

    # Path tested.
    backend: str
    # True when agreement and difference are within the bounds.
    passed: bool
    # Measured agreement with the reference.
    parity: Parity
    # Bounds applied.
    min_agreement: float
    max_diff: float
    # Slices per second through the tested path (inference, or preprocessing for dali).
    throughput: float
    # Slices per second through the reference on the same slices.
    reference_throughput: float
    # What ran (devices, versions, precision, input differences).
    details: dict[str, Any] = field(default_factory=dict)

    def verdict(self) -> str:
        """One line a user reads first."""
        word = "PASS" if self.passed else "FAIL"
        speed = f"{self.throughput:.0f} slices/s (reference {self.reference_throughput:.0f} slices/s"
        speed += f", x{self.throughput / self.reference_throughput:.2f})" if self.reference_throughput > 0 else ")"
        return (
            f"{word} {self.backend} vs {self.details.get('reference', 'onnxruntime')}: argmax agreement "
            f"{self.parity.argmax_agreement * 100:.2f}% (>= {self.min_agreement * 100:.1f}%), max |dp| "
            f"{self.parity.max_abs_diff:.2e} (<= {self.max_diff:g}) on {self.parity.n} slices; {speed}"
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "backend": self.backend,
            "passed": self.passed,
            "verdict": self.verdict(),
            "parity": self.parity.to_dict(),
            "min_agreement": self.min_agreement,
            "max_diff": self.max_diff,
            "throughput": self.throughput,
            "reference_throughput": self.reference_throughput,
            "details": self.details,
        }


def _have(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def missing_requirements(backend: str, device: str | None = None) -> list[str]:
    """Everything the path needs that this machine lacks, one readable item each ([] = ready)."""
    from spinelevel.engine import cuda

    missing = []
    if not _have("onnxruntime"):
        missing.append("package onnxruntime (the reference)")
    if backend == "tensorrt":
        if not _have("tensorrt"):
            missing.append("package tensorrt (pip install tensorrt-cu12 from NVIDIA's package index, or an NGC container)")
        if not cuda.cuda_python_available():
            missing.append("package cuda-python (pip install 'cuda-python>=12.6')")
        else:
            reason = cuda.cuda_unavailable_reason()
            if reason:
                missing.append(f"an NVIDIA GPU with a working driver: {reason}")
        if _have("tensorrt"):
            import tensorrt as trt

            from spinelevel.builders.tensorrt import uses_strong_typing

            if uses_strong_typing(trt) and not _have("onnxconverter_common"):
                missing.append("package onnxconverter-common (TensorRT 11 builds from an FP16 ONNX copy)")
    elif backend == "torch":
        for pkg, mod in (("torch", "torch"), ("timm", "timm"), ("safetensors", "safetensors")):
            if not _have(mod):
                missing.append(f"package {pkg}")
        if _have("torch") and (device is None or str(device).startswith("cuda")):
            import torch

            if not torch.cuda.is_available():
                missing.append(f"a CUDA GPU visible to torch (torch {torch.__version__}, CUDA build {torch.version.cuda}, torch.cuda.is_available() is False; --device cpu runs the float32 CPU check)")
    elif backend == "dali":
        if not _have("nvidia.dali"):
            missing.append("package nvidia-dali-cuda130 (pip install nvidia-dali-cuda130)")
    return missing


def synthetic_slices(n: int, size: int, seed: int = 0) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """CT-like axial slices from head to feet, as stored int16 values with slope/intercept.

    Body ellipse (fat and muscle), lungs in the upper third, a vertebral body and canal whose size
    grows downwards, iliac wings in the lower quarter, Gaussian noise; no pydicom involved.

    Returns:
        (raw slices int16 (size, size), slopes float32 (n,), intercepts float32 (n,)).
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    slices, slopes, intercepts = [], [], []
    for i in range(n):
        z = i / max(1, n - 1)
        hu = np.full((size, size), -1000.0, dtype=np.float32)
        body = (xx / 0.42) ** 2 + (yy / 0.30) ** 2 < 1
        hu[body] = -90.0
        hu[(xx / 0.36) ** 2 + (yy / 0.25) ** 2 < 1] = 45.0
        if z < 0.35:
            for side in (-0.16, 0.16):
                hu[((xx - side) / 0.12) ** 2 + ((yy + 0.02) / 0.16) ** 2 < 1] = -820.0
        r = 0.05 + 0.04 * z
        hu[(xx**2 + (yy - 0.12) ** 2) < r**2] = 250.0 + 500.0 * (1 - z)
        hu[(xx**2 + (yy - 0.12 - 1.5 * r) ** 2) < (0.4 * r) ** 2] = 20.0
        if z > 0.75:
            for side in (-0.22, 0.22):
                hu[((xx - side) / 0.08) ** 2 + ((yy - 0.05) / 0.05) ** 2 < 1] = 600.0
        hu += rng.normal(0.0, 12.0, size=hu.shape).astype(np.float32)
        slope, intercept = (1.0, -1024.0) if i % 2 == 0 else (0.5, -1024.0)
        raw = np.clip(np.round((hu - intercept) / slope), -32768, 32767).astype(np.int16)
        slices.append(raw)
        slopes.append(slope)
        intercepts.append(intercept)
    return slices, np.asarray(slopes, dtype=np.float32), np.asarray(intercepts, dtype=np.float32)


def _card(size: int, output: str, **extra: Any) -> ModelCard:
    return ModelCard(classes=CLASSES, input_size=(size, size), windows=WINDOWS, output=output, extra=extra)


def tiny_cnn_onnx(path: Path, size: int = 64, seed: int = 0) -> Path:
    """A small float32 CNN (3 stride-2 convs, ReLU, global pooling, linear) with a card, via onnx.helper.

    Outputs logits scaled so the classes are well separated (FP16 argmax flips stay rare).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    inits, nodes, prev, cin = [], [], "image", 3
    for i, cout in enumerate((16, 32, 64)):
        w = rng.normal(0.0, np.sqrt(2.0 / (cin * 9)), size=(cout, cin, 3, 3)).astype(np.float32)
        b = rng.normal(0.0, 0.05, size=(cout,)).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        nodes += [
            helper.make_node("Conv", [prev, f"w{i}", f"b{i}"], [f"c{i}"], strides=[2, 2], pads=[1, 1, 1, 1], name=f"conv{i}"),
            helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}"),
        ]
        prev, cin = f"r{i}", cout
    fc = rng.normal(0.0, 4.0 / np.sqrt(cin), size=(len(CLASSES), cin)).astype(np.float32)
    inits += [numpy_helper.from_array(fc, "fc_w"), numpy_helper.from_array(np.zeros(len(CLASSES), np.float32), "fc_b")]
    nodes += [
        helper.make_node("GlobalAveragePool", [prev], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], axis=1, name="flatten"),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], transB=1, name="fc"),
    ]
    graph = helper.make_graph(
        nodes,
        "selftest_cnn",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", len(CLASSES)])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    write_onnx_card(path, _card(size, "logits", architecture="selftest-cnn"))
    return path


def make_timm_checkpoint(
    out_dir: Path,
    architecture: str = "tf_efficientnetv2_b0",
    size: int = 64,
    seed: int = 0,
    calibration: np.ndarray | None = None,
    export_onnx: bool = True,
    device: str = "cpu",
) -> tuple[Path, Path | None]:
    """A checkpoint in `spinelevel train`'s format, BatchNorm calibrated, and its ONNX export.

    Random weights with untrained BatchNorm statistics overflow in FP16 (DESIGN.md 5), so a few
    train-mode forward passes on ``calibration`` (model inputs; generated slices by default) set the
    running statistics first.

    Args:
        out_dir: where ``model.safetensors`` (+ card sidecar) and ``model.onnx`` go.
        architecture: timm model name.
        size: input size of the card.
        seed: weight seed.
        calibration: (n, C, size, size) model inputs for the BatchNorm statistics.
        export_onnx: also export ONNX (needs the onnx package for the card).
        device: where the calibration passes run ("cuda" for large models).

    Returns:
        (``model.safetensors`` with its ``.card.json`` sidecar, ``model.onnx`` with the card or None).
    """
    import safetensors.torch
    import timm
    import torch

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = timm.create_model(architecture, num_classes=len(CLASSES), pretrained=False, exportable=True)
    card = _card(size, "logits", architecture=architecture)
    if calibration is None:
        raw, slopes, intercepts = synthetic_slices(64, 2 * size, seed + 1)
        calibration = preprocess_batch([r.astype(np.float32) * s + c for r, s, c in zip(raw, slopes, intercepts)], PreprocessSpec.from_card(card))
    x = torch.from_numpy(np.ascontiguousarray(calibration, dtype=np.float32))
    model.to(device).train()
    with torch.no_grad():
        for _ in range(3):
            for start in range(0, len(x), 16):
                model(x[start : start + 16].to(device))
    model.cpu().eval()
    checkpoint = out_dir / "model.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(checkpoint))
    sidecar_path(checkpoint).write_text(card.to_json(), encoding="utf-8")
    onnx_path = None
    if export_onnx:
        onnx_path = out_dir / "model.onnx"
        with torch.no_grad():
            # dynamo=False: the TorchScript exporter, fast and without onnxscript; fp16.convert_fp16 keeps
            # its "same"-padding shape arithmetic in float32.
            torch.onnx.export(
                model, x[:2], str(onnx_path), input_names=["image"], output_names=["logits"],
                dynamic_axes={"image": {0: "N"}, "logits": {0: "N"}}, opset_version=17, dynamo=False,
            )
        write_onnx_card(onnx_path, card)
    return checkpoint, onnx_path


def _timed(fn: Callable[[np.ndarray], np.ndarray], batch: np.ndarray, step: int) -> tuple[np.ndarray, float]:
    """Run ``fn`` over ``batch`` in chunks (one warm-up chunk first); probabilities and slices/s."""
    fn(batch[:step])
    t0 = time.perf_counter()
    out = np.concatenate([fn(batch[i : i + step]) for i in range(0, len(batch), step)])
    return out, len(batch) / max(time.perf_counter() - t0, 1e-9)


def _ort_reference(model: Path, output: str) -> Callable[[np.ndarray], np.ndarray]:
    import onnxruntime as ort

    from spinelevel.engine.backends.onnxruntime import softmax

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(batch: np.ndarray) -> np.ndarray:
        rows = [np.asarray(session.run(None, {name: batch[i : i + 1].astype(np.float32)})[0]) for i in range(len(batch))]
        y = np.concatenate(rows).astype(np.float32)
        return softmax(y) if output == "logits" else y

    return run


def run_selftest(options: SelftestOptions) -> SelftestResult:
    """Run the self-test of one path.

    Raises:
        BackendUnavailableError: something the path needs is missing; the message lists all of it.
    """
    missing = missing_requirements(options.backend, options.device)
    if missing:
        raise BackendUnavailableError(f"selftest --backend {options.backend} cannot run here; missing: " + "; ".join(missing))
    if options.workdir is not None:
        Path(options.workdir).mkdir(parents=True, exist_ok=True)
        return _run(options, Path(options.workdir))
    with tempfile.TemporaryDirectory(prefix="spinelevel-selftest-") as tmp:
        return _run(options, Path(tmp))


def _run(options: SelftestOptions, work: Path) -> SelftestResult:
    from spinelevel.engine.backends import BackendOptions, load_backend

    size = options.size
    raw, slopes, intercepts = synthetic_slices(options.slices, 2 * size, options.seed)
    spec = PreprocessSpec.from_card(_card(size, "logits"))
    hu = [r.astype(np.float32) * s + c for r, s, c in zip(raw, slopes, intercepts)]
    t0 = time.perf_counter()
    batch = preprocess_batch(hu, spec)
    numpy_pre_rate = len(batch) / max(time.perf_counter() - t0, 1e-9)
    details: dict[str, Any] = {"reference": "onnxruntime float32", "slices": options.slices, "input_size": size}
    fp16 = False

    if options.backend == "torch":
        from spinelevel.engine.backends.torch import TorchBackend, TorchOptions

        checkpoint, onnx_model = make_timm_checkpoint(work / "torch", options.architecture, size, options.seed, calibration=batch[: min(64, len(batch))])
        card = ModelCard.from_json(sidecar_path(checkpoint).read_text(encoding="utf-8"))
        backend = TorchBackend(checkpoint, card, TorchOptions(max_batch=options.batch, device=options.device))
        fp16 = backend.half
        details.update(device=str(backend.device), precision="fp16" if backend.half else "fp32", architecture=options.architecture)
        model = onnx_model
    else:
        model = tiny_cnn_onnx(work / "selftest.onnx", size, options.seed)
        card = _card(size, "logits")
        if options.backend == "tensorrt":
            from spinelevel.builders.tensorrt import EngineBuildOptions, build_engine, tensorrt_version

            engine = build_engine(model, work / "selftest.engine", EngineBuildOptions(max_batch=options.batch, opt_batch=options.batch))
            backend = load_backend("tensorrt", engine, ModelCard.from_json(sidecar_path(engine).read_text(encoding="utf-8")), BackendOptions(max_batch=options.batch))
            fp16 = True
            details.update(precision="fp16", tensorrt=tensorrt_version())
        else:
            backend = load_backend("onnxruntime", model, card, BackendOptions(max_batch=options.batch))
            details.update(precision="fp32")
    assert model is not None
    reference = _ort_reference(model, "logits")
    try:
        if options.backend == "dali":
            from spinelevel.engine.dali import DaliOptions, DaliPreprocessor, pack_slice
            from spinelevel.engine.cuda import cuda_available

            device = "gpu" if cuda_available() else "cpu"
            pre = DaliPreprocessor(spec, DaliOptions(device=device, batch_size=options.batch))
            packed = [pack_slice(r, s, c) for r, s, c in zip(raw, slopes, intercepts)]
            pre.run(packed[: options.batch])  # warm-up
            t0 = time.perf_counter()
            dali_batch = np.concatenate([pre.run(packed[i : i + options.batch]) for i in range(0, len(packed), options.batch)])
            rate = len(packed) / max(time.perf_counter() - t0, 1e-9)
            pre.close()
            input_diff = float(np.abs(dali_batch - batch).max())
            details.update(reference="numpy preprocessing + onnxruntime", dali_device=device, input_max_abs_diff=input_diff, preprocess_tolerance=1e-4)
            got = backend.infer(dali_batch)
            want = backend.infer(batch)
            par = parity(got, want)
            max_diff = 1e-3
            passed = par.ok(0.995, max_diff) and input_diff <= 1e-4
            return SelftestResult("dali", passed, par, 0.995, max_diff, rate, numpy_pre_rate, details)
        got, rate = _timed(backend.infer, batch, options.batch)
        want, ref_rate = _timed(reference, batch, options.batch)
    finally:
        backend.close()
    max_diff = 0.01 if fp16 else 1e-3
    par = parity(got, want)
    return SelftestResult(options.backend, par.ok(0.995, max_diff), par, 0.995, max_diff, rate, ref_rate, details)


def result_json(result: SelftestResult) -> str:
    """The result as one JSON object."""
    return json.dumps(result.to_dict(), indent=2)
