"""The torch backend on the CPU (float32) against ONNX Runtime, and the torch preprocessing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")
pytest.importorskip("safetensors")

from spinelevel.card import ModelCard, read_card, sidecar_path  # noqa: E402
from spinelevel.engine.backends import BackendOptions, load_backend  # noqa: E402
from spinelevel.engine.backends.torch import TorchBackend, TorchOptions  # noqa: E402
from spinelevel.engine.preprocess import PreprocessSpec, preprocess_batch, preprocess_slice  # noqa: E402
from spinelevel.engine.torch_preprocess import hu_from_raw, preprocess_torch  # noqa: E402
from spinelevel.errors import BackendUnavailableError, ModelError  # noqa: E402
from spinelevel.selftest import make_timm_checkpoint, synthetic_slices  # noqa: E402

ARCH = "test_efficientnet"  # timm's tiny test model: the same code path as EfficientNetV2, in a second


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_timm_checkpoint(tmp_path_factory.mktemp("ckpt"), ARCH, size=32, seed=2)


def _batch(card: ModelCard, n: int = 24) -> np.ndarray:
    raw, slopes, intercepts = synthetic_slices(n, 64, 5)
    return preprocess_batch([r.astype(np.float32) * s + c for r, s, c in zip(raw, slopes, intercepts)], PreprocessSpec.from_card(card))


def test_checkpoint_follows_the_contract(checkpoint: tuple[Path, Path]) -> None:
    ckpt, _ = checkpoint
    card = read_card(ckpt)  # through the sidecar
    assert card.output == "logits" and card.extra["architecture"] == ARCH
    assert sidecar_path(ckpt).is_file()


def test_cpu_backend_matches_onnxruntime(checkpoint: tuple[Path, Path]) -> None:
    ckpt, onnx_model = checkpoint
    card = read_card(ckpt)
    batch = _batch(card)
    backend = load_backend("torch", ckpt, card, BackendOptions(max_batch=10))
    assert isinstance(backend, TorchBackend) and backend.device.type == "cpu" and not backend.half
    got = backend.infer(batch)
    ref = load_backend("onnxruntime", onnx_model, read_card(onnx_model)).infer(batch)
    assert got.shape == (24, 7) and got.dtype == np.float32
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-5)  # logits -> probabilities
    assert np.abs(got - ref).max() <= 1e-4
    assert np.array_equal(got.argmax(1), ref.argmax(1))
    # torch tensors go in as they are
    np.testing.assert_allclose(backend.infer(torch.from_numpy(batch)), got, atol=1e-6)
    backend.close()


def test_card_without_architecture_is_refused(checkpoint: tuple[Path, Path]) -> None:
    ckpt, _ = checkpoint
    card = ModelCard(output="logits", input_size=(32, 32))
    with pytest.raises(ModelError, match="no 'architecture'"):
        TorchBackend(ckpt, card, TorchOptions(device="cpu"))


def test_weights_of_another_architecture_are_refused(checkpoint: tuple[Path, Path]) -> None:
    ckpt, _ = checkpoint
    card = read_card(ckpt).with_extra(architecture="test_resnet")
    with pytest.raises(ModelError, match="do not fit 'test_resnet'"):
        TorchBackend(ckpt, card, TorchOptions(device="cpu"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_asking_for_cuda_without_gpu_is_explained(checkpoint: tuple[Path, Path]) -> None:
    ckpt, _ = checkpoint
    with pytest.raises(BackendUnavailableError, match="no CUDA device"):
        TorchBackend(ckpt, read_card(ckpt), TorchOptions(device="cuda"))


@pytest.mark.parametrize("shape", [(64, 64), (37, 53), (20, 30)])
def test_torch_preprocessing_matches_numpy(shape: tuple[int, int]) -> None:
    spec = PreprocessSpec(windows=((40.0, 400.0), (400.0, 1800.0), (-600.0, 1500.0)), input_size=(48, 40), scale=1.0, mean=(0.1, 0.2, 0.3), std=(0.5, 0.6, 0.7))
    rng = np.random.default_rng(1)
    raw = rng.integers(-1024, 3000, size=(3, *shape)).astype(np.int16)
    slopes = torch.tensor([1.0, 0.5, 2.0])
    intercepts = torch.tensor([-1024.0, 0.0, 3.5])
    got = preprocess_torch(hu_from_raw(torch.from_numpy(raw), slopes, intercepts), spec).numpy()
    for i in range(3):
        ref = preprocess_slice(raw[i].astype(np.float32) * float(slopes[i]) + float(intercepts[i]), spec)
        assert np.abs(got[i] - ref).max() <= 1e-5


def test_cuda_graph_capture_runs_on_the_backends_device(checkpoint: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Defect 7: warm-up, capture and replay on "cuda:1" must happen with device 1 current.

    torch.cuda is faked (no GPU here): torch.cuda.device sets the current device, and the side
    stream, the capture and the replay record which device was current when they ran.
    """
    import contextlib

    ckpt, _ = checkpoint
    backend = TorchBackend(ckpt, read_card(ckpt), TorchOptions(device="cpu"))
    backend.cuda_graphs, backend.device = True, torch.device("cuda", 1)
    current, seen = [0], []

    @contextlib.contextmanager
    def device(dev):  # noqa: ANN001, ANN202
        prev, current[0] = current[0], torch.device(dev).index
        try:
            yield
        finally:
            current[0] = prev

    class Stream:
        def __init__(self, dev=None) -> None:  # noqa: ANN001
            seen.append(("stream", current[0]))

        def wait_stream(self, other) -> None:  # noqa: ANN001
            pass

    class Graph:
        def replay(self) -> None:
            seen.append(("replay", current[0]))

    @contextlib.contextmanager
    def graph(g):  # noqa: ANN001, ANN202
        seen.append(("capture", current[0]))
        yield

    monkeypatch.setattr(torch.cuda, "device", device)
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda dev=None: Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    with torch.inference_mode():
        backend._forward(torch.zeros((2, 3, 32, 32)))
    assert seen and all(dev == 1 for _, dev in seen), seen
