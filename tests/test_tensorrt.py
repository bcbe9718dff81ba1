"""TensorRT builder and backend logic that runs without TensorRT or a GPU (fakes where needed)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from spinelevel.builders import tensorrt as trtb
from spinelevel.card import read_card, sidecar_path
from spinelevel.engine import backends, cuda
from spinelevel.engine.backends import BackendOptions, load_backend
from spinelevel.engine.backends import trt_compat
from spinelevel.errors import BackendUnavailableError, InputError, ModelError
from spinelevel.selftest import tiny_cnn_onnx
from trt_fakes import HostMemory

INFO = trtb.EngineInfo(tensorrt="10.13.0.35", gpu="NVIDIA H100 80GB HBM3", compute_capability="9.0", onnx_sha256="ab" * 32, precision="fp16-flag", min_batch=1, opt_batch=16, max_batch=32)


# --- options, card, compatibility ------------------------------------------------------------------


def test_profile_must_be_ordered() -> None:
    with pytest.raises(InputError, match="opt"):
        trtb.EngineBuildOptions(max_batch=8, opt_batch=16)
    with pytest.raises(InputError, match="workspace"):
        trtb.EngineBuildOptions(workspace_gb=0)


def test_engine_card_round_trip(tmp_path: Path) -> None:
    onnx_model = tiny_cnn_onnx(tmp_path / "m.onnx", size=32)
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"not really an engine")
    trtb.write_engine_card(engine, trtb.engine_card(read_card(onnx_model), INFO))
    card = read_card(engine)  # through the sidecar
    assert card == read_card(onnx_model)
    assert trtb.engine_info(card, engine) == INFO
    assert json.loads(sidecar_path(engine).read_text())["engine"]["compute_capability"] == "9.0"


def test_other_architecture_is_refused_with_rebuild_hint() -> None:
    with pytest.raises(ModelError, match=r"architecture 9\.0.*compute capability 8\.6.*spinelevel build"):
        trtb.check_engine_compatible(Path("m.engine"), INFO, "10.13.0.35", "NVIDIA A10", (8, 6))


def test_other_tensorrt_version_is_refused_with_rebuild_hint() -> None:
    with pytest.raises(ModelError, match=r"TensorRT 10\.13\.0\.35 but TensorRT 11\.0\.0 .*rebuild"):
        trtb.check_engine_compatible(Path("m.engine"), INFO, "11.0.0", INFO.gpu, (9, 0))


def test_same_architecture_other_model_only_warns(caplog: pytest.LogCaptureFixture) -> None:
    trtb.check_engine_compatible(Path("m.engine"), INFO, INFO.tensorrt, "NVIDIA H100 NVL", (9, 0))
    assert "rebuild for best speed" in caplog.text


def test_card_without_engine_section_is_refused(tmp_path: Path) -> None:
    card = read_card(tiny_cnn_onnx(tmp_path / "m.onnx", size=32))
    with pytest.raises(ModelError, match="no 'engine' section"):
        trtb.engine_info(card, tmp_path / "m.engine")


# --- parser errors ------------------------------------------------------------------------------------


class _Err:
    def __init__(self, desc: str, node: int = -1, name: str = "", op: str = "") -> None:
        self._d, self._n, self._name, self._op = desc, node, name, op

    def desc(self) -> str:
        return self._d

    def node(self) -> int:
        return self._n

    def node_name(self) -> str:
        return self._name

    def node_operator(self) -> str:
        return self._op


class _Parser:
    def __init__(self, errors: list) -> None:  # noqa: ANN401
        self._errors = errors
        self.parsed: list[str] = []

    @property
    def num_errors(self) -> int:
        return len(self._errors)

    def get_error(self, i: int):  # noqa: ANN201
        return self._errors[i]

    def parse_from_file(self, path: str) -> bool:
        self.parsed.append(path)
        return not self._errors


def test_parser_errors_collects_every_error() -> None:
    parser = _Parser([_Err("Unsupported op", 4, "/head/Foo", "Foo"), _Err("shape\n mismatch", 7), _Err("generic")])
    assert trtb.parser_errors(parser) == ["node '/head/Foo' (Foo): Unsupported op", "node #7: shape mismatch", "generic"]


# --- build_engine with a fake tensorrt module ----------------------------------------------------------


def _fake_trt(version: str, parser_errors: list, with_fp16_flag: bool, cache_matches: bool = True, cache_attached: bool = True) -> SimpleNamespace:
    """TensorRT's builder API with its real return types (see tests/trt_fakes.py for the sources).

    ``cache_matches=False``: set_timing_cache refuses a non-empty cache (made on another GPU) and
    returns False; ``cache_attached=False``: get_timing_cache returns None.
    """
    record: dict = {"flags": [], "profiles": [], "cache_in": None, "cache_calls": []}
    made: dict = {}

    class Network:
        num_inputs = 1

        def get_input(self, i: int):  # noqa: ANN202
            return SimpleNamespace(name="image", shape=(-1, 3, 32, 32))

    class Profile:
        def set_shape(self, name, lo, opt, hi) -> None:  # noqa: ANN001
            record["profiles"].append((name, lo, opt, hi))

    class Cache:
        def __init__(self, data: bytes) -> None:
            self.data = data

        def serialize(self) -> HostMemory:
            return HostMemory.of(b"timing-cache-v2")

    class Config:
        def set_memory_pool_limit(self, pool, size) -> None:  # noqa: ANN001
            record["workspace"] = size

        def set_flag(self, flag) -> None:  # noqa: ANN001
            record["flags"].append(flag)

        def add_optimization_profile(self, p) -> None:  # noqa: ANN001
            pass

        def create_timing_cache(self, data: bytes) -> Cache:
            if record["cache_in"] is None:
                record["cache_in"] = data
            record["cache_calls"].append(bytes(data))
            return Cache(bytes(data))

        def set_timing_cache(self, cache, ignore_mismatch) -> bool:  # noqa: ANN001
            record["ignore_mismatch"] = ignore_mismatch
            ok = ignore_mismatch or cache_matches or not cache.data
            if ok:
                self._cache = cache
            return ok

        def get_timing_cache(self):  # noqa: ANN202 - ITimingCache or None
            return getattr(self, "_cache", None) if cache_attached else None

    class Builder:
        def __init__(self, logger) -> None:  # noqa: ANN001
            pass

        def create_network(self, flags: int) -> Network:
            record["network_flags"] = flags
            return Network()

        def create_builder_config(self) -> Config:
            return Config()

        def create_optimization_profile(self) -> Profile:
            return Profile()

        def build_serialized_network(self, network, config) -> HostMemory:  # noqa: ANN001
            return HostMemory.of(b"ENGINE")

    def onnx_parser(network, logger):  # noqa: ANN001, ANN202
        made["parser"] = _Parser(parser_errors)
        return made["parser"]

    flags = SimpleNamespace(FP16="FP16") if with_fp16_flag else SimpleNamespace()
    return SimpleNamespace(
        __version__=version,
        Logger=None,  # replaced by _logger_fix
        Builder=Builder,
        OnnxParser=onnx_parser,
        # 1 in 10.x (after the deprecated EXPLICIT_BATCH = 0); 0 in 11.x (deprecated, ignored)
        NetworkDefinitionCreationFlag=SimpleNamespace(STRONGLY_TYPED=0 if version.startswith("11.") else 1),
        BuilderFlag=flags,
        MemoryPoolType=SimpleNamespace(WORKSPACE="WORKSPACE"),
        record=record,
        made=made,
    )


@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cuda, "require_cuda", lambda what: None)
    monkeypatch.setattr(cuda, "gpu_info", lambda index=0: cuda.GpuInfo(0, "NVIDIA H100 80GB HBM3", (9, 0), 80 << 30))


def _logger_fix(fake: SimpleNamespace) -> SimpleNamespace:
    fake.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})
    return fake


def test_build_reports_all_parser_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_gpu: None) -> None:
    fake = _logger_fix(_fake_trt("10.13.0.35", [_Err("No importer for op Foo", 3, "foo", "Foo"), _Err("bad weights", 9)], True))
    monkeypatch.setattr(trtb, "_import_tensorrt", lambda: fake)
    model = tiny_cnn_onnx(tmp_path / "m.onnx", size=32)
    with pytest.raises(ModelError) as exc:
        trtb.build_engine(model, tmp_path / "m.engine")
    msg = str(exc.value)
    assert "2 error(s)" in msg and "node 'foo' (Foo): No importer for op Foo" in msg and "node #9: bad weights" in msg
    assert not (tmp_path / "m.engine").exists()


def test_build_tensorrt10_uses_fp16_flag_profile_and_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_gpu: None) -> None:
    fake = _logger_fix(_fake_trt("10.11.0.33", [], True))
    monkeypatch.setattr(trtb, "_import_tensorrt", lambda: fake)
    model = tiny_cnn_onnx(tmp_path / "m.onnx", size=32)
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"old-cache")
    out = trtb.build_engine(model, tmp_path / "m.engine", trtb.EngineBuildOptions(max_batch=8, opt_batch=4, workspace_gb=1, timing_cache=cache))
    rec = fake.record
    assert rec["flags"] == ["FP16"] and rec["network_flags"] == 0
    assert rec["profiles"] == [("image", (1, 3, 32, 32), (4, 3, 32, 32), (8, 3, 32, 32))]
    assert rec["cache_in"] == b"old-cache" and cache.read_bytes() == b"timing-cache-v2"
    assert rec["workspace"] == 1 << 30
    assert fake.made["parser"].parsed == [str(model)]
    assert out.read_bytes() == b"ENGINE"
    info = trtb.engine_info(read_card(out), out)
    assert (info.tensorrt, info.compute_capability, info.precision, info.max_batch) == ("10.11.0.33", "9.0", "fp16-flag", 8)
    assert info.onnx_sha256 == trtb.file_sha256(model)


def test_build_tensorrt11_parses_an_fp16_copy_strongly_typed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_gpu: None) -> None:
    pytest.importorskip("onnxconverter_common")
    import onnx

    fake = _logger_fix(_fake_trt("11.0.0.1", [], False))
    seen: list[int] = []
    parser_cls = fake.OnnxParser

    def parser(network, logger):  # noqa: ANN001, ANN202
        p = parser_cls(network, logger)
        original = p.parse_from_file

        def parse(path: str) -> bool:
            proto = onnx.load(path)
            seen.extend(t.data_type for t in proto.graph.initializer)
            return original(path)

        p.parse_from_file = parse
        return p

    fake.OnnxParser = parser
    monkeypatch.setattr(trtb, "_import_tensorrt", lambda: fake)
    out = trtb.build_engine(tiny_cnn_onnx(tmp_path / "m.onnx", size=32), tmp_path / "m.engine", trtb.EngineBuildOptions(max_batch=4, opt_batch=2))
    assert fake.record["flags"] == []
    assert fake.record["network_flags"] == 1 << 0  # STRONGLY_TYPED is 0 in 11.x (and ignored there)
    assert set(seen) == {onnx.TensorProto.FLOAT16}
    assert trtb.engine_info(read_card(out), out).precision == "fp16-strongly-typed"


def test_build_tensorrt_10_12_is_strongly_typed_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_gpu: None) -> None:
    # BuilderFlag.FP16 still exists in 10.12+ but is deprecated ("superseded by strong typing")
    pytest.importorskip("onnxconverter_common")
    fake = _logger_fix(_fake_trt("10.13.0.35", [], True))
    monkeypatch.setattr(trtb, "_import_tensorrt", lambda: fake)
    out = trtb.build_engine(tiny_cnn_onnx(tmp_path / "m.onnx", size=32), tmp_path / "m.engine", trtb.EngineBuildOptions(max_batch=4, opt_batch=2))
    assert fake.record["flags"] == [] and fake.record["network_flags"] == 1 << 1  # STRONGLY_TYPED = 1 in 10.x
    assert trtb.engine_info(read_card(out), out).precision == "fp16-strongly-typed"


def test_timing_cache_from_another_gpu_is_replaced_by_a_fresh_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_gpu: None, caplog: pytest.LogCaptureFixture) -> None:
    # defect 1: set_timing_cache returns False for a cache made on another device
    fake = _logger_fix(_fake_trt("10.11.0.33", [], True, cache_matches=False))
    monkeypatch.setattr(trtb, "_import_tensorrt", lambda: fake)
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"cache-from-an-A100")
    trtb.build_engine(tiny_cnn_onnx(tmp_path / "m.onnx", size=32), tmp_path / "m.engine", trtb.EngineBuildOptions(max_batch=4, opt_batch=2, timing_cache=cache))
    assert fake.record["cache_calls"] == [b"cache-from-an-A100", b""] and fake.record["ignore_mismatch"] is False
    assert "refused this timing cache" in caplog.text
    assert cache.read_bytes() == b"timing-cache-v2"


def test_missing_timing_cache_after_build_still_writes_the_card(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_gpu: None, caplog: pytest.LogCaptureFixture) -> None:
    # defect 1: get_timing_cache may return None; the engine's card must be written regardless
    fake = _logger_fix(_fake_trt("10.11.0.33", [], True, cache_attached=False))
    monkeypatch.setattr(trtb, "_import_tensorrt", lambda: fake)
    out = trtb.build_engine(tiny_cnn_onnx(tmp_path / "m.onnx", size=32), tmp_path / "m.engine", trtb.EngineBuildOptions(max_batch=4, opt_batch=2, timing_cache=tmp_path / "t.cache"))
    assert trtb.engine_info(read_card(out), out).max_batch == 4
    assert not (tmp_path / "t.cache").exists() and "no timing cache to save" in caplog.text


# --- what is missing here -----------------------------------------------------------------------------


@pytest.mark.skipif(trtb.tensorrt_available(), reason="TensorRT is installed here")
def test_registry_names_missing_tensorrt(tmp_path: Path) -> None:
    model = tiny_cnn_onnx(tmp_path / "m.onnx", size=32)
    with pytest.raises(BackendUnavailableError, match="tensorrt"):
        load_backend("tensorrt", model, read_card(model), BackendOptions())


@pytest.mark.skipif(trtb.tensorrt_available(), reason="TensorRT is installed here")
def test_build_without_tensorrt_names_it(tmp_path: Path) -> None:
    with pytest.raises(BackendUnavailableError, match="tensorrt.*cuda-python"):
        trtb.build_engine(tmp_path / "m.onnx", tmp_path / "m.engine")


def test_backend_reports_missing_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    from spinelevel.engine.backends import tensorrt as backend

    monkeypatch.setattr(trt_compat, "tensorrt_available", lambda: True)
    monkeypatch.setattr(cuda, "cuda_unavailable_reason", lambda: "no usable NVIDIA driver or GPU (test)")
    assert backend.unavailable_reason() == "no usable NVIDIA driver or GPU (test)"
    with pytest.raises(BackendUnavailableError, match="no usable NVIDIA driver"):
        backend.TensorRTBackend(Path("m.engine"), None)  # type: ignore[arg-type]


# --- auto choice -----------------------------------------------------------------------------------


def test_auto_choice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_cnn_onnx(tmp_path / "m.onnx", size=32)
    assert backends.choose_backend(tmp_path / "x.engine").name == "tensorrt"
    assert backends.choose_backend(model, "onnxruntime").reason == "--backend onnxruntime was given"
    assert cuda.choose_backend is backends.choose_backend  # the old import path still works
    monkeypatch.setattr(backends, "_have", lambda m: m != "tensorrt")
    choice = backends.choose_backend(model)
    assert choice.name == "onnxruntime" and "TensorRT is not installed" in choice.reason
    monkeypatch.setattr(backends, "_have", lambda m: m != "torch")
    monkeypatch.setattr(cuda, "cuda_python_available", lambda: True)
    monkeypatch.setattr(cuda, "cuda_unavailable_reason", lambda: None)
    choice = backends.choose_backend(model)
    assert choice.name == "onnxruntime" and "spinelevel build" in choice.reason
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"E")
    trtb.write_engine_card(engine, trtb.engine_card(read_card(model), INFO))  # sha256 of another ONNX
    assert "rebuild" in backends.choose_backend(model).reason
    good = trtb.EngineInfo(**{**INFO.to_dict(), "onnx_sha256": trtb.file_sha256(model)})
    trtb.write_engine_card(engine, trtb.engine_card(read_card(model), good))
    choice = backends.choose_backend(model)
    assert (choice.name, choice.model) == ("tensorrt", str(engine))


def test_runtime_does_not_import_the_builder() -> None:
    # layout: the backend and backend choice use trt_compat, never spinelevel.builders
    import subprocess

    code = "import sys, spinelevel.engine.backends.tensorrt, spinelevel.engine.backends as b; b.choose_backend('m.engine'); print(any(m.startswith('spinelevel.builders') for m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


# --- CUDA glue pieces that need no device ------------------------------------------------------------


def test_check_raises_named_cuda_error() -> None:
    cudart = cuda.runtime()
    assert cuda.check((cudart.cudaError_t.cudaSuccess, 42), "x") == 42
    with pytest.raises(cuda.CudaError, match="cudaMalloc failed.*cudaErrorMemoryAllocation"):
        cuda.check((cudart.cudaError_t.cudaErrorMemoryAllocation, None), "cudaMalloc")


def test_device_pointer_reads_the_interface() -> None:
    obj = SimpleNamespace(__cuda_array_interface__={"data": (1234, False), "shape": (2, 3, 4, 4), "typestr": "<f4", "strides": None, "version": 3})
    assert cuda.device_pointer(obj) == (1234, (2, 3, 4, 4), np.dtype("<f4"), True)
    obj.__cuda_array_interface__["strides"] = (4, 8 * 4 * 4 * 4, 4 * 4 * 4, 4 * 4)  # not C order
    assert cuda.device_pointer(obj)[3] is False
    with pytest.raises(TypeError):
        cuda.device_pointer(np.zeros(3))


@pytest.mark.skipif(cuda.cuda_available(), reason="a GPU is present")
def test_probe_says_why_there_is_no_gpu() -> None:
    pr = cuda.probe()
    assert not pr.cuda_device and pr.cuda_reason and pr.gpu is None
    with pytest.raises(BackendUnavailableError, match="needs an NVIDIA GPU"):
        cuda.require_cuda("this test")
