"""Benchmark models: an untrained timm EfficientNetV2 exported through the real export path."""

from __future__ import annotations

from pathlib import Path

from spinelevel.card import ModelCard, sidecar_path

__all__ = ["untrained_checkpoint", "untrained_onnx"]


def untrained_checkpoint(arch: str, input_size: int, out_dir: Path) -> Path:
    """A checkpoint in the training format (safetensors + card) with freshly initialised weights.

    Untrained weights are fine for timing; BatchNorm statistics are those of initialisation.
    """
    import timm
    import torch
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{arch}_{input_size}.safetensors"
    if path.exists():
        return path
    torch.manual_seed(0)
    card = ModelCard(input_size=(input_size, input_size), output="logits", extra={"architecture": arch, "training": {"note": "untrained, for benchmarks"}})
    model = timm.create_model(arch, num_classes=len(card.classes), pretrained=False, exportable=True).eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    sidecar_path(path).write_text(card.to_json())
    return path


def untrained_onnx(arch: str, input_size: int, out_dir: Path) -> Path:
    """The untrained checkpoint exported to ONNX with ``spinelevel export``'s code (parity checked)."""
    from spinelevel.builders.onnx_export import ExportOptions, export_checkpoint

    onnx_path = out_dir / f"{arch}_{input_size}.onnx"
    if not onnx_path.exists():
        ckpt = untrained_checkpoint(arch, input_size, out_dir)
        export_checkpoint(ckpt, onnx_path, options=ExportOptions(parity_slices=4, tolerance=1e-3))
    return onnx_path
