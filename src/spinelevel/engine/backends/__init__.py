"""Inference backends: a registry of the runtimes that can execute a model, and the choice among them.

Each backend module has ``is_available()``, ``REQUIRES`` (the packages it needs) and a ``load``
function; they are imported only when asked for, so a missing optional runtime costs nothing.
:func:`choose_backend` resolves ``--backend auto`` from the model file and what this machine has.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from spinelevel.card import ModelCard
from spinelevel.errors import BackendUnavailableError, InputError

__all__ = ["Backend", "BackendOptions", "BACKENDS", "available_backends", "load_backend", "BackendChoice", "choose_backend"]


@runtime_checkable
class Backend(Protocol):
    """What the pipeline needs from a runtime."""

    name: str
    card: ModelCard
    max_batch: int

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """(n, C, H, W) float32 -> (n, classes) float32 probabilities."""
        ...

    def close(self) -> None:
        """Release the runtime."""
        ...


@dataclass(frozen=True)
class BackendOptions:
    """How a backend runs."""

    # Largest batch handed to the runtime in one call.
    max_batch: int = 16
    # Intra-op CPU threads (None: the runtime's default, usually all cores).
    threads: int | None = None
    # GPU backends: "cuda", "cuda:1" or "cpu" (torch only); None picks the first CUDA device.
    device: str | None = None
    # GPU backends: capture a CUDA graph per batch size.
    cuda_graphs: bool = False
    # torch backend: torch.compile the model.
    compile: bool = False
    # onnxruntime backend: let idle intra-op threads spin waiting for work (None: ONNX Runtime's
    # default, on). Off hands the cores back to the decode workers between batches: a whole CPU run
    # with 2 decode workers on 2 cores was 1.6x faster (BENCHMARKS.md, issue 17).
    spinning: bool | None = None


# Backend name -> module implementing it.
BACKENDS: dict[str, str] = {
    "onnxruntime": "spinelevel.engine.backends.onnxruntime",
    "tensorrt": "spinelevel.engine.backends.tensorrt",
    "torch": "spinelevel.engine.backends.torch",
    "openvino": "spinelevel.engine.backends.openvino",
}


def _module(name: str):  # noqa: ANN202
    if name not in BACKENDS:
        raise InputError(f"unknown backend {name!r}; choose one of: {', '.join(sorted(BACKENDS))}")
    return importlib.import_module(BACKENDS[name])


def available_backends() -> dict[str, bool]:
    """Every known backend and whether its packages are importable here."""
    return {name: bool(_module(name).is_available()) for name in BACKENDS}


def load_backend(name: str, model: Path, card: ModelCard, options: BackendOptions = BackendOptions()) -> Backend:
    """Load ``model`` once on backend ``name``.

    Raises:
        BackendUnavailableError: the backend's packages are not installed (the message names them).
        ModelError: the model cannot be loaded or does not fit its card.
    """
    module = _module(name)
    reason = module.unavailable_reason() if hasattr(module, "unavailable_reason") else None
    if reason:
        raise BackendUnavailableError(f"backend {name!r} cannot run here: {reason}")
    if not module.is_available():
        raise BackendUnavailableError(
            f"backend {name!r} needs the package(s) {', '.join(module.REQUIRES)}; "
            f"install them (pip install {' '.join(module.REQUIRES)})"
        )
    return module.load(Path(model), card, options)


def _have(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing or broken
        return False


@dataclass(frozen=True)
class BackendChoice:
    """Which backend runs a model, on what file, and why (recorded in run.json)."""

    # Backend registry name.
    name: str
    # The model file that backend loads (an ONNX model's sibling engine may be picked).
    model: str
    # One sentence: why this backend (and why not the faster ones).
    reason: str

    def to_dict(self) -> dict[str, str]:
        """JSON-ready."""
        return {"name": self.name, "model": self.model, "reason": self.reason}


def choose_backend(model: Any, requested: str = "auto") -> BackendChoice:
    """Resolve ``--backend`` (``auto`` or a name) for ``model``.

    ``auto`` picks TensorRT, then torch on CUDA, then ONNX Runtime, by what the model file is and
    what this machine has: a ``.engine``/``.plan`` file needs TensorRT; a ``.safetensors``
    checkpoint runs on torch; an ONNX model uses the sibling ``<stem>.engine`` when TensorRT and a
    GPU are here and that engine's card names this ONNX's sha256, else ONNX Runtime (the reason
    says how to get the faster path). A named backend is returned as asked, with the model file
    unchanged.
    """
    from spinelevel.engine import cuda

    path = Path(model)
    if requested != "auto":
        return BackendChoice(requested, str(path), f"--backend {requested} was given")
    suffix = path.suffix.lower()
    gpu_reason = cuda.cuda_unavailable_reason()
    have_trt = _have("tensorrt") and cuda.cuda_python_available()
    if suffix in (".engine", ".plan", ".trt"):
        return BackendChoice("tensorrt", str(path), "the model is a TensorRT engine")
    if suffix in (".safetensors", ".pt", ".pth"):
        torch_cuda = False
        if _have("torch"):
            import torch

            torch_cuda = bool(torch.cuda.is_available())
        why = "the model is a PyTorch checkpoint; " + ("torch sees a CUDA GPU" if torch_cuda else "no CUDA GPU for torch, running on the CPU")
        return BackendChoice("torch", str(path), why)
    if suffix != ".onnx":
        raise InputError(f"{path}: cannot tell the model type from its extension (.onnx, .engine, .safetensors); name --backend")
    why_not_trt = _why_not_engine(path, have_trt, gpu_reason)
    if why_not_trt is None:
        engine = path.with_suffix(".engine")
        return BackendChoice("tensorrt", str(engine), f"TensorRT engine {engine.name} was built from this ONNX model and a GPU is usable")
    checkpoint = path.with_suffix(".safetensors")
    if checkpoint.is_file() and _have("torch") and _have("timm") and _have("safetensors"):
        import torch

        if torch.cuda.is_available():
            return BackendChoice("torch", str(checkpoint), f"{why_not_trt}; torch on CUDA with the sibling checkpoint {checkpoint.name}")
    return BackendChoice("onnxruntime", str(path), f"{why_not_trt}; ONNX Runtime on the CPU")


def _why_not_engine(path: Any, have_trt: bool, gpu_reason: str | None) -> str | None:
    """Why the sibling TensorRT engine of an ONNX model cannot be used, or None when it can."""
    from spinelevel.card import file_sha256, read_card

    if not have_trt:
        return "TensorRT is not installed (tensorrt, cuda-python)"
    if gpu_reason is not None:
        return f"TensorRT is installed but no GPU is usable ({gpu_reason})"
    engine = path.with_suffix(".engine")
    if not engine.is_file():
        return f"no TensorRT engine was built (run 'spinelevel build {path} --out {engine}')"
    try:
        built_from = read_card(engine).extra.get("engine", {}).get("onnx_sha256")
    except Exception as exc:  # noqa: BLE001 - a broken sidecar means "do not use this engine"
        return f"{engine} has no readable card ({exc})"
    if built_from != file_sha256(path):
        return f"{engine} was built from another ONNX file (sha256 differs): rebuild it"
    return None
