"""What a TensorRT engine is tied to, read from its sidecar card, and the check that refuses a mismatch.

Shared by the builder (which writes the ``engine`` object of ``<engine>.card.json``) and the
TensorRT backend and backend choice (which read it). It imports neither TensorRT nor CUDA, so the
runtime never depends on the build code (DESIGN.md 1: engine never imports builders).
"""

from __future__ import annotations

import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spinelevel.card import ModelCard, sidecar_path
from spinelevel.errors import ModelError

__all__ = [
    "EngineInfo",
    "tensorrt_available",
    "engine_card",
    "engine_info",
    "check_engine_compatible",
    "write_engine_card",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineInfo:
    """What an engine is tied to (the ``engine`` object of its sidecar card)."""

    # TensorRT version that built it ("10.13.0.35").
    tensorrt: str
    # GPU it was built on.
    gpu: str
    # Compute capability of that GPU, "major.minor".
    compute_capability: str
    # sha256 of the ONNX model it was built from.
    onnx_sha256: str
    # "fp16-flag" (TensorRT < 10.12 weak typing) or "fp16-strongly-typed" (FP16 ONNX, TensorRT >= 10.12).
    precision: str
    # Profile batch sizes.
    min_batch: int
    opt_batch: int
    max_batch: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "tensorrt": self.tensorrt,
            "gpu": self.gpu,
            "compute_capability": self.compute_capability,
            "onnx_sha256": self.onnx_sha256,
            "precision": self.precision,
            "min_batch": self.min_batch,
            "opt_batch": self.opt_batch,
            "max_batch": self.max_batch,
        }


def tensorrt_available() -> bool:
    """True when the tensorrt package can be imported (a GPU is checked separately)."""
    try:
        return importlib.util.find_spec("tensorrt") is not None
    except (ImportError, ValueError):
        return False


def engine_card(card: ModelCard, info: EngineInfo) -> ModelCard:
    """The engine's card: the ONNX card plus the ``engine`` provenance object."""
    return card.with_extra(engine=info.to_dict())


def engine_info(card: ModelCard, engine: Path) -> EngineInfo:
    """Read the ``engine`` object of an engine's card.

    Raises:
        ModelError: the card has no (complete) ``engine`` object.
    """
    data = card.extra.get("engine")
    if not isinstance(data, dict):
        raise ModelError(
            f"{engine}: its card ({sidecar_path(engine)}) has no 'engine' section (TensorRT version, GPU); "
            "rebuild it with 'spinelevel build MODEL.onnx --out ENGINE'"
        )
    try:
        return EngineInfo(
            tensorrt=str(data["tensorrt"]),
            gpu=str(data["gpu"]),
            compute_capability=str(data["compute_capability"]),
            onnx_sha256=str(data.get("onnx_sha256", "")),
            precision=str(data.get("precision", "")),
            min_batch=int(data.get("min_batch", 1)),
            opt_batch=int(data.get("opt_batch", data.get("max_batch", 1))),
            max_batch=int(data["max_batch"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"{engine}: the 'engine' section of its card is incomplete ({exc}); rebuild it with 'spinelevel build'") from None


def check_engine_compatible(engine: Path, info: EngineInfo, tensorrt: str, gpu_name: str, compute_capability: tuple[int, int]) -> None:
    """Refuse an engine built for another GPU architecture or TensorRT version.

    A serialized engine holds kernels for one compute capability, deserialisable only by the
    TensorRT version that wrote it. Another GPU model of the same architecture works (a warning
    says it may be slower than one built there).

    Raises:
        ModelError: architecture or TensorRT version differs; the message says how to rebuild.
    """
    have_cc = f"{compute_capability[0]}.{compute_capability[1]}"
    onnx_hint = "the ONNX model it came from"
    rebuild = f"rebuild it on this machine: spinelevel build {onnx_hint} --out {engine}"
    if info.compute_capability != have_cc:
        raise ModelError(
            f"{engine}: engine was built for GPU architecture {info.compute_capability} ({info.gpu}) but this GPU "
            f"is {gpu_name} (compute capability {have_cc}); TensorRT engines do not move between "
            f"architectures: {rebuild}"
        )
    if info.tensorrt != tensorrt:
        raise ModelError(
            f"{engine}: engine was built with TensorRT {info.tensorrt} but TensorRT {tensorrt} is installed; "
            f"engines only load in the TensorRT version that built them: {rebuild}"
        )
    if info.gpu != gpu_name:
        log.warning("%s was built on %s, running on %s (same architecture %s): rebuild for best speed", engine, info.gpu, gpu_name, have_cc)


def write_engine_card(engine: Path, card: ModelCard) -> Path:
    """Write ``<engine>.card.json`` atomically."""
    path = sidecar_path(engine)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(card.to_dict(), indent=2), encoding="utf-8")
    tmp.replace(path)
    return path
