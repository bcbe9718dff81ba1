"""Model builders: PyTorch/timm checkpoints to ONNX with a card (:mod:`.onnx_export`).

Nothing here is imported by the engine; the builders need the 'train' extra (torch, timm).
"""

__all__: list[str] = []
