"""Inference backends: a registry of the runtimes that can execute a model.

Each backend module has ``is_available()``, ``REQUIRES`` (the packages it needs) and a ``load``
function; they are imported only when asked for, so a missing optional runtime costs nothing.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from spinelevel.card import ModelCard
from spinelevel.errors import BackendUnavailableError, InputError

__all__ = ["Backend", "BackendOptions", "BACKENDS", "available_backends", "load_backend"]


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


# Backend name -> module implementing it.
BACKENDS: dict[str, str] = {
    "onnxruntime": "spinelevel.engine.backends.onnxruntime",
    "tensorrt": "spinelevel.engine.backends.tensorrt",
    "torch": "spinelevel.engine.backends.torch",
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
