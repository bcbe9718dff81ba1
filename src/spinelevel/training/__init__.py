"""Training, evaluation and label preparation for spinelevel's EfficientNetV2 slice classifier.

The submodules that need PyTorch (:mod:`.augment`, :mod:`.train`) import it inside; importing this
package, :mod:`.labels` or :mod:`.evaluate` never does, so evaluation runs in the engine's
dependencies (plus matplotlib for its figures).
"""

from __future__ import annotations

import importlib

from spinelevel.errors import SpineLevelError

__all__ = ["TrainingUnavailableError", "require_torch"]

# The packages of the 'train' extra, with the name pip knows them by.
_TRAIN_PACKAGES = (("torch", "torch"), ("timm", "timm"), ("safetensors", "safetensors"))


class TrainingUnavailableError(SpineLevelError):
    """Training or export was asked for but PyTorch, timm or safetensors is not installed."""


def require_torch() -> None:
    """Raise :class:`TrainingUnavailableError` naming the missing packages and the fix.

    Raises:
        TrainingUnavailableError: torch, timm or safetensors cannot be imported.
    """
    missing = []
    for module, package in _TRAIN_PACKAGES:
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(package)
    if missing:
        raise TrainingUnavailableError(
            f"training and export need {', '.join(missing)}, which is not installed; "
            "install the 'train' extra: pip install -e '.[train]'"
        )
