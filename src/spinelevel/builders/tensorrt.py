"""ONNX -> FP16 TensorRT engine with a dynamic-batch optimisation profile, and its sidecar card.

Precision by TensorRT version (DESIGN.md 5):

* TensorRT 10.x: the float32 ONNX is parsed and ``BuilderFlag.FP16`` lets the builder pick FP16
  kernels (weak typing; I/O stays float32).
* TensorRT 11.x removed ``BuilderFlag.FP16`` (and every weak-typing flag): an FP16 copy of the ONNX
  with float32 I/O is written first (:func:`spinelevel.builders.fp16.convert_fp16`) and parsed into a
  network created with ``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` (accepted and implied in
  11.x, opt-in since 10.x).

The engine's sidecar ``<engine>.card.json`` is the ONNX card plus an ``engine`` object: TensorRT
version, GPU name, compute capability, ONNX sha256, precision mode and the batch profile.
:func:`check_engine_compatible` refuses an engine built for another GPU architecture or TensorRT
version with a message that says how to rebuild it.

TensorRT is imported lazily; everything except :func:`build_engine` runs (and is tested) without it.
API used (TensorRT 10.0-11.x Python, unchanged between them unless noted): ``trt.Builder``,
``Builder.create_network(flags)``, ``trt.OnnxParser(network, logger).parse_from_file``,
``OnnxParser.num_errors/get_error(i)`` (``IParserError.desc/node/node_name/node_operator``;
``node_name``/``node_operator`` exist since 10.0), ``IBuilderConfig.set_memory_pool_limit``,
``create_timing_cache/set_timing_cache/get_timing_cache``, ``Builder.create_optimization_profile``,
``IOptimizationProfile.set_shape``, ``Builder.build_serialized_network``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spinelevel.card import ModelCard, file_sha256, read_card, sidecar_path
from spinelevel.errors import BackendUnavailableError, InputError, ModelError

__all__ = [
    "TENSORRT_REQUIRES",
    "EngineBuildOptions",
    "EngineInfo",
    "tensorrt_available",
    "tensorrt_version",
    "uses_strong_typing",
    "parser_errors",
    "engine_card",
    "engine_info",
    "check_engine_compatible",
    "write_engine_card",
    "build_engine",
]

log = logging.getLogger(__name__)

# Packages the TensorRT builder and backend import; tensorrt comes from NVIDIA's index or a container.
TENSORRT_REQUIRES = ("tensorrt", "cuda-python")

_INSTALL_HINT = (
    "install TensorRT from NVIDIA (pip install tensorrt-cu12 from NVIDIA's package index, "
    "or tensorrt-cu13, or use an NGC TensorRT container) and cuda-python"
)


@dataclass(frozen=True)
class EngineBuildOptions:
    """How `spinelevel build` builds an engine."""

    # Largest batch the engine accepts (the profile's max shape).
    max_batch: int = 32
    # Batch size the builder optimises kernels for (the profile's opt shape).
    opt_batch: int = 16
    # Smallest batch (the profile's min shape): 1, so a series' last partial batch runs unpadded.
    min_batch: int = 1
    # Builder workspace (scratch memory for tactics) in GiB.
    workspace_gb: float = 4.0
    # Timing cache file: loaded when it exists, written back after the build (None: no cache).
    timing_cache: Path | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise InputError(
                f"batch profile needs 1 <= min ({self.min_batch}) <= opt ({self.opt_batch}) <= max "
                f"({self.max_batch}); lower --opt-batch or raise --max-batch"
            )
        if not self.workspace_gb > 0:
            raise InputError(f"--workspace-gb must be positive, got {self.workspace_gb}")


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
    # "fp16-flag" (TensorRT 10 weak typing) or "fp16-strongly-typed" (FP16 ONNX, TensorRT 11).
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


def _import_tensorrt() -> Any:
    if not tensorrt_available():
        raise BackendUnavailableError(f"TensorRT is not installed (needs the packages {', '.join(TENSORRT_REQUIRES)}): {_INSTALL_HINT}")
    import tensorrt as trt

    return trt


def tensorrt_version() -> str:
    """The installed TensorRT version string."""
    return str(_import_tensorrt().__version__)


def _major(version: str) -> int:
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        return 0


def uses_strong_typing(trt: Any) -> bool:
    """True when FP16 must come from an FP16 ONNX (TensorRT >= 11, or no ``BuilderFlag.FP16``)."""
    return _major(getattr(trt, "__version__", "0")) >= 11 or not hasattr(trt.BuilderFlag, "FP16")


def _call(obj: Any, name: str) -> Any:
    fn = getattr(obj, name, None)
    if fn is None:
        return None
    try:
        return fn() if callable(fn) else fn
    except Exception:  # noqa: BLE001 - a parser error accessor must not hide the error itself
        return None


def parser_errors(parser: Any) -> list[str]:
    """Every error an ``OnnxParser`` recorded, one line each: node, operator, description.

    Works with TensorRT 8.6-11 ``IParserError`` objects (``node_name``/``node_operator`` are read
    when present) and with any object offering ``num_errors`` and ``get_error(i)``.
    """
    lines = []
    for i in range(int(getattr(parser, "num_errors", 0))):
        err = parser.get_error(i)
        desc = " ".join(str(_call(err, "desc") or err).split())
        where = []
        node_name = _call(err, "node_name")
        op = _call(err, "node_operator")
        node = _call(err, "node")
        if node_name:
            where.append(f"node {node_name!r}")
        elif node is not None and node >= 0:
            where.append(f"node #{node}")
        if op:
            where.append(f"({op})")
        lines.append(f"{' '.join(where)}: {desc}" if where else desc)
    return lines


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


def _input_dims(network: Any, card: ModelCard, model: Path) -> tuple[str, tuple[int, int, int]]:
    if network.num_inputs != 1:
        raise ModelError(f"{model}: expected one input tensor, the network has {network.num_inputs}")
    tensor = network.get_input(0)
    shape = tuple(int(v) for v in tensor.shape)
    want = (card.channels, int(card.input_size[0]), int(card.input_size[1]))
    if len(shape) != 4 or any(have not in (-1, need) for have, need in zip(shape[1:], want)):
        raise ModelError(f"{model}: input {tensor.name!r} has shape {list(shape)} but the card asks for [N, {want[0]}, {want[1]}, {want[2]}]")
    return tensor.name, want


def build_engine(model: Path, out: Path, options: EngineBuildOptions = EngineBuildOptions()) -> Path:
    """Build an FP16 engine from an ONNX model with a card; write it and its sidecar card.

    Args:
        model: float32 ONNX model with a spinelevel card (dynamic batch axis).
        out: engine path (``.engine``); ``<out>.card.json`` is written beside it.
        options: batch profile, workspace, timing cache.

    Returns:
        ``out``.

    Raises:
        BackendUnavailableError: TensorRT, cuda-python or a GPU is missing (named).
        ModelError: the ONNX cannot be parsed (every parser error listed) or the build fails.
    """
    from spinelevel.engine.cuda import gpu_info, require_cuda

    trt = _import_tensorrt()
    require_cuda("building a TensorRT engine")
    model, out = Path(model), Path(out)
    card = read_card(model)
    gpu = gpu_info(0)
    strong = uses_strong_typing(trt)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # STRONGLY_TYPED: opt-in flag since TensorRT 10.0, implied (and still accepted) in 11.x.
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strong else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    with tempfile.TemporaryDirectory(prefix="spinelevel-build-") as tmp:
        source = model
        if strong:
            from spinelevel.builders.fp16 import convert_fp16

            source = convert_fp16(model, Path(tmp) / "model.fp16.onnx")
        # parse_from_file resolves external weight files relative to the model (parse(bytes) does not).
        if not parser.parse_from_file(str(source)):
            errors = parser_errors(parser) or ["the parser reported failure without details"]
            raise ModelError(f"{model}: TensorRT's ONNX parser found {len(errors)} error(s):\n  " + "\n  ".join(errors))
    name, chw = _input_dims(network, card, model)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_gb * (1 << 30)))
    if not strong:
        config.set_flag(trt.BuilderFlag.FP16)  # TensorRT 10.x only; removed in 11.0
    profile = builder.create_optimization_profile()
    profile.set_shape(name, (options.min_batch, *chw), (options.opt_batch, *chw), (options.max_batch, *chw))
    config.add_optimization_profile(profile)
    cache_path = Path(options.timing_cache) if options.timing_cache else None
    cache_bytes = cache_path.read_bytes() if cache_path is not None and cache_path.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, False)  # ignore_mismatch=False: a cache from another GPU is not used silently
    log.info("building %s engine for %s on %s (batch %d/%d/%d)", "strongly typed FP16" if strong else "FP16", model, gpu.name, options.min_batch, options.opt_batch, options.max_batch)
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        raise ModelError(f"{model}: TensorRT could not build an engine (see the TensorRT messages above; try a larger --workspace-gb)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_name(f".{out.name}.tmp")
    with open(tmp_out, "wb") as fh:
        fh.write(memoryview(blob))
    tmp_out.replace(out)
    if cache_path is not None:
        serialized = config.get_timing_cache().serialize()
        tmp_cache = cache_path.with_name(f".{cache_path.name}.tmp")
        tmp_cache.write_bytes(bytes(memoryview(serialized)))
        tmp_cache.replace(cache_path)
    info = EngineInfo(
        tensorrt=str(trt.__version__),
        gpu=gpu.name,
        compute_capability=f"{gpu.compute_capability[0]}.{gpu.compute_capability[1]}",
        onnx_sha256=file_sha256(model),
        precision="fp16-strongly-typed" if strong else "fp16-flag",
        min_batch=options.min_batch,
        opt_batch=options.opt_batch,
        max_batch=options.max_batch,
    )
    write_engine_card(out, engine_card(card, info))
    return out
