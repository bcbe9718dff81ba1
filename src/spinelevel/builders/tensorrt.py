"""ONNX -> FP16 TensorRT engine with a dynamic-batch optimisation profile, and its sidecar card.

Precision by TensorRT version (DESIGN.md 5):

* TensorRT >= 10.12 (and every 11.x): an FP16 copy of the ONNX with float32 I/O is written first
  (:func:`spinelevel.builders.fp16.convert_fp16`) and parsed into a strongly typed network.
  ``BuilderFlag.FP16`` is deprecated since 10.12 ("Superseded by strong typing", NvInfer.h of
  release/10.12) and removed in 11.0, so 10.12+ and 11.x engines are built the same way.
* TensorRT 10.0-10.11: the float32 ONNX is parsed and ``BuilderFlag.FP16`` lets the builder pick FP16
  kernels (weak typing; I/O stays float32).

``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` is 1 in 10.x (``kEXPLICIT_BATCH`` = 0 is the
deprecated bit before it) and 0 in 11.x, where it is deprecated and ignored because strong typing is
always on (NvInfer.h of release/10.13 and release/11.1); the bit is always taken from the enum.

The engine's sidecar ``<engine>.card.json`` is the ONNX card plus an ``engine`` object
(:mod:`spinelevel.engine.backends.trt_compat`, shared with the backend, which must not import this
builder): TensorRT version, GPU name, compute capability, ONNX sha256, precision mode and profile.

TensorRT is imported lazily; everything except :func:`build_engine` runs (and is tested) without it.
Return types followed here (TensorRT 10.13 / 11.1 Python bindings and docstrings,
``python/docstrings/infer/pyCoreDoc.h``): ``IBuilderConfig.set_timing_cache(cache, ignore_mismatch)``
returns a bool (False when the cache was made with other CUDA device properties and
``ignore_mismatch`` is False); ``get_timing_cache()`` returns the cache or None;
``ITimingCache.serialize()`` and ``Builder.build_serialized_network`` return an ``IHostMemory``
(buffer protocol, not bytes) or None on failure; ``OnnxParser.parse_from_file`` returns a bool and
``num_errors/get_error(i)`` give ``IParserError`` (``desc/node/node_name/node_operator``).
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spinelevel.card import ModelCard, file_sha256, read_card
from spinelevel.engine.backends.trt_compat import (
    EngineInfo,
    check_engine_compatible,
    engine_card,
    engine_info,
    tensorrt_available,
    write_engine_card,
)
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


def _import_tensorrt() -> Any:
    if not tensorrt_available():
        raise BackendUnavailableError(f"TensorRT is not installed (needs the packages {', '.join(TENSORRT_REQUIRES)}): {_INSTALL_HINT}")
    import tensorrt as trt

    return trt


def tensorrt_version() -> str:
    """The installed TensorRT version string."""
    return str(_import_tensorrt().__version__)


def _version_tuple(version: str) -> tuple[int, int]:
    parts = str(version).split(".")
    try:
        return int(parts[0]), int(parts[1]) if len(parts) > 1 else 0
    except ValueError:
        return 0, 0


# First TensorRT that deprecates weak typing (BuilderFlag.FP16): from here on, FP16 ONNX + strong typing.
STRONG_TYPING_SINCE = (10, 12)


def uses_strong_typing(trt: Any) -> bool:
    """True when FP16 comes from an FP16 ONNX built strongly typed (TensorRT >= 10.12, or no ``BuilderFlag.FP16``)."""
    return _version_tuple(getattr(trt, "__version__", "0")) >= STRONG_TYPING_SINCE or not hasattr(trt.BuilderFlag, "FP16")


def _strongly_typed_flags(trt: Any) -> int:
    """``create_network`` flags of a strongly typed network: the bit of the enum value (1 in 10.x, 0 in 11.x)."""
    flag = getattr(getattr(trt, "NetworkDefinitionCreationFlag", None), "STRONGLY_TYPED", None)
    return 0 if flag is None else 1 << int(flag)


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
    network = builder.create_network(_strongly_typed_flags(trt) if strong else 0)
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
        config.set_flag(trt.BuilderFlag.FP16)  # TensorRT < 10.12 only; deprecated in 10.12, removed in 11.0
    profile = builder.create_optimization_profile()
    profile.set_shape(name, (options.min_batch, *chw), (options.opt_batch, *chw), (options.max_batch, *chw))
    config.add_optimization_profile(profile)
    cache_path = Path(options.timing_cache) if options.timing_cache else None
    if cache_path is not None:
        _attach_timing_cache(config, cache_path)
    log.info("building %s engine for %s on %s (batch %d/%d/%d)", "strongly typed FP16" if strong else "FP16", model, gpu.name, options.min_batch, options.opt_batch, options.max_batch)
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        raise ModelError(f"{model}: TensorRT could not build an engine (see the TensorRT messages above; try a larger --workspace-gb)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_name(f".{out.name}.tmp")
    with open(tmp_out, "wb") as fh:
        fh.write(memoryview(blob))  # IHostMemory exposes the buffer protocol
    tmp_out.replace(out)
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
    # The card before the cache: an engine without its card cannot be loaded, a lost cache only
    # makes the next build slower.
    write_engine_card(out, engine_card(card, info))
    if cache_path is not None:
        _save_timing_cache(config, cache_path)
    return out


def _attach_timing_cache(config: Any, cache_path: Path) -> None:
    """Load ``cache_path`` (when it exists) into the config; a cache TensorRT refuses is replaced by a fresh one.

    ``set_timing_cache(cache, ignore_mismatch=False)`` returns False when the cache was written with
    other CUDA device properties (another GPU); using it anyway (``ignore_mismatch=True``) "may lead
    to functional/performance bugs" (TensorRT docstring), so a fresh cache is started instead.
    """
    data = cache_path.read_bytes() if cache_path.is_file() else b""
    cache = config.create_timing_cache(data)
    if cache is not None and config.set_timing_cache(cache, False):
        return
    if data:
        log.warning("%s: TensorRT refused this timing cache (made on another GPU or TensorRT version); starting a fresh one, which will replace it", cache_path)
        cache = config.create_timing_cache(b"")
        if cache is not None and config.set_timing_cache(cache, False):
            return
    log.warning("%s: TensorRT could not attach a timing cache; building without one", cache_path)


def _save_timing_cache(config: Any, cache_path: Path) -> None:
    """Write the config's timing cache to ``cache_path`` atomically; warn (no error) when there is none."""
    cache = config.get_timing_cache()  # None when no cache is attached
    serialized = cache.serialize() if cache is not None else None
    if serialized is None:
        log.warning("%s: no timing cache to save (the engine and its card are written)", cache_path)
        return
    tmp_cache = cache_path.with_name(f".{cache_path.name}.tmp")
    tmp_cache.write_bytes(bytes(memoryview(serialized)))
    tmp_cache.replace(cache_path)
