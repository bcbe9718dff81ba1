"""PyTorch backend: the training checkpoint (timm + safetensors) on CUDA in FP16, channels_last.

It serves GPUs without TensorRT and is the baseline TensorRT is measured against. On CUDA the model
runs in FP16 with channels_last memory format, optionally through ``torch.compile`` and CUDA graphs
(one graph per batch size, captured on first use). It also runs on the CPU in float32 (tests, and
machines without a GPU), where FP16, channels_last, compile and graphs are off.

Checkpoint contract (``spinelevel train`` writes it): ``MODEL.safetensors`` holds the timm
state_dict; ``MODEL.safetensors.card.json`` is its card with ``output == "logits"`` and
``architecture`` (the timm model name, built with ``timm.create_model(name,
num_classes=len(card.classes), pretrained=False, exportable=True)``).
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from spinelevel.card import ModelCard
from spinelevel.errors import BackendUnavailableError, ModelError

__all__ = ["REQUIRES", "TorchOptions", "is_available", "load", "load_checkpoint_model", "TorchBackend"]

log = logging.getLogger(__name__)

# Packages this backend imports.
REQUIRES = ("torch", "timm", "safetensors")


def is_available() -> bool:
    """True when torch, timm and safetensors can be imported (CUDA is optional)."""
    return all(importlib.util.find_spec(m) is not None for m in ("torch", "timm", "safetensors"))


@dataclass(frozen=True)
class TorchOptions:
    """How the torch backend runs."""

    # Largest batch per forward pass.
    max_batch: int = 16
    # "cuda", "cuda:1", "cpu"; None: CUDA when torch sees a GPU, else the CPU.
    device: str | None = None
    # FP16 weights and activations; None: on for CUDA, off on the CPU.
    half: bool | None = None
    # channels_last memory format (faster convolutions on tensor cores); None: on for CUDA.
    channels_last: bool | None = None
    # Wrap the model in torch.compile (slow first batches; then faster).
    compile: bool = False
    # Capture one CUDA graph per batch size and replay it (CUDA only).
    cuda_graphs: bool = False
    # CPU intra-op threads (None: torch's default).
    threads: int | None = None


def load_checkpoint_model(checkpoint: Path, card: ModelCard) -> Any:
    """Build the card's timm architecture and load the safetensors state_dict into it (CPU, eval).

    Raises:
        ModelError: no architecture in the card, unknown to timm, or weights that do not fit.
    """
    import safetensors.torch
    import timm

    arch = card.extra.get("architecture")
    if not arch or not isinstance(arch, str):
        raise ModelError(f"{checkpoint}: the card has no 'architecture' (the timm model name); set it with 'spinelevel card set'")
    try:
        model = timm.create_model(arch, num_classes=len(card.classes), pretrained=False, exportable=True)
    except Exception as exc:  # timm raises RuntimeError for unknown names
        raise ModelError(f"{checkpoint}: timm cannot build architecture {arch!r} ({exc})") from None
    try:
        state = safetensors.torch.load_file(str(checkpoint), device="cpu")
    except Exception as exc:  # safetensors raises SafetensorError / OSError
        raise ModelError(f"{checkpoint}: not a readable safetensors checkpoint ({type(exc).__name__}: {exc})") from None
    # torch.compile and DataParallel wrappers prefix the keys; the contract is the bare state_dict.
    state = {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in state.items()}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches raise even with strict=False
        first = " ".join(str(exc).split())[:300]
        raise ModelError(f"{checkpoint}: weights do not fit {arch!r} with {len(card.classes)} classes ({first})") from None
    if missing or unexpected:
        raise ModelError(
            f"{checkpoint}: weights do not fit {arch!r} with {len(card.classes)} classes "
            f"({len(missing)} missing, e.g. {missing[:3]}; {len(unexpected)} unexpected, e.g. {unexpected[:3]})"
        )
    return model.eval()


class TorchBackend:
    """A timm model from a checkpoint, loaded once."""

    name = "torch"

    def __init__(self, checkpoint: Path, card: ModelCard, options: TorchOptions = TorchOptions()) -> None:
        if not is_available():
            raise BackendUnavailableError(f"backend 'torch' needs the package(s) {', '.join(REQUIRES)} (pip install 'spinelevel[train]')")
        import torch

        if card.output not in ("logits", "probabilities"):
            raise ModelError(f"{checkpoint}: card output {card.output!r} unknown")
        self.card = card
        device = options.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise BackendUnavailableError(f"backend 'torch' was asked for {device} but torch sees no CUDA device (torch {torch.__version__}, built for CUDA {torch.version.cuda})")
        self.device = torch.device(device)
        on_cuda = self.device.type == "cuda"
        self.half = on_cuda if options.half is None else bool(options.half and on_cuda)
        self.channels_last = on_cuda if options.channels_last is None else bool(options.channels_last)
        self.cuda_graphs = bool(options.cuda_graphs and on_cuda)
        if options.threads and not on_cuda:
            torch.set_num_threads(int(options.threads))
        self.dtype = torch.float16 if self.half else torch.float32
        self.max_batch = max(1, int(options.max_batch))
        self._chw = (card.channels, int(card.input_size[0]), int(card.input_size[1]))
        self._classes = len(card.classes)
        model = load_checkpoint_model(Path(checkpoint), card).to(self.device, dtype=self.dtype)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if options.compile:
            # "max-autotune-no-cudagraphs": our own graphs (cuda_graphs) stay in charge of replay.
            model = torch.compile(model, mode="max-autotune-no-cudagraphs" if on_cuda else "default", dynamic=False)
        self._model = model
        self._graphs: dict[int, tuple[Any, Any, Any]] = {}
        log.debug("torch backend on %s: %s, fp16=%s, channels_last=%s, compile=%s, graphs=%s", self.device, card.extra.get("architecture"), self.half, self.channels_last, options.compile, self.cuda_graphs)

    def _forward(self, x: Any) -> Any:
        import torch

        if not self.cuda_graphs:
            return self._model(x)
        n = x.shape[0]
        entry = self._graphs.get(n)
        if entry is None:
            # Warm-up and capture on this backend's GPU: torch.cuda.graph() captures on the current
            # device's streams and torch.cuda.Stream() is made there, so on "cuda:1" both must run
            # under torch.cuda.device (PyTorch CUDA semantics: "operations ... on the currently
            # selected device"; the CUDA graphs notes capture on a side stream after warm-up).
            with torch.cuda.device(self.device):
                static_in = torch.empty_like(x).copy_(x)
                side = torch.cuda.Stream(self.device)
                side.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(side):  # warm-up outside capture (cuDNN autotuning, allocations)
                    for _ in range(3):
                        self._model(static_in)
                torch.cuda.current_stream(self.device).wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    static_out = self._model(static_in)
            entry = self._graphs[n] = (graph, static_in, static_out)
        graph, static_in, static_out = entry
        with torch.cuda.device(self.device):
            static_in.copy_(x)
            graph.replay()
            return static_out.clone()

    def to_device(self, batch: Any) -> Any:
        """A host array or tensor -> the model's device, dtype and memory format."""
        import torch

        x = batch if isinstance(batch, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
        x = x.to(self.device, non_blocking=True).to(self.dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def infer(self, batch: Any) -> np.ndarray:
        """(n, C, H, W) numpy array or torch tensor (any device) -> (n, classes) float32 probabilities."""
        import torch

        n = int(batch.shape[0])
        if tuple(int(v) for v in batch.shape[1:]) != self._chw:
            raise ModelError(f"batch shape {tuple(batch.shape)} does not match the card input (N, {self._chw[0]}, {self._chw[1]}, {self._chw[2]})")
        out = np.empty((n, self._classes), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, n, self.max_batch):
                x = self.to_device(batch[start : start + self.max_batch])
                y = self._forward(x).float()
                if y.shape[-1] != self._classes:
                    raise ModelError(f"model output has {y.shape[-1]} values per slice but the card lists {self._classes} classes")
                if self.card.output == "logits":
                    y = torch.softmax(y, dim=1)
                out[start : start + x.shape[0]] = y.cpu().numpy()
        return out

    def close(self) -> None:
        """Drop the model and graphs (frees GPU memory at the next collection)."""
        self._graphs.clear()
        self._model = None


def load(model: Path, card: ModelCard, options: Any) -> TorchBackend:
    """Registry entry point (``options`` is a BackendOptions; torch fields read when present)."""
    return TorchBackend(
        Path(model),
        card,
        TorchOptions(
            max_batch=int(getattr(options, "max_batch", 16)),
            device=getattr(options, "device", None),
            compile=bool(getattr(options, "compile", False)),
            cuda_graphs=bool(getattr(options, "cuda_graphs", False)),
            threads=getattr(options, "threads", None),
        ),
    )
