"""Models shipped with the package, and how a ``--model`` argument names one.

``demo`` is a small EfficientNetV2-B0 trained on phantom studies only (see
``models/demo/MODEL_CARD.md``): it knows phantoms, not patients.
"""

from __future__ import annotations

from pathlib import Path

from spinelevel.errors import ModelError

__all__ = ["BUNDLED", "bundled_models", "resolve_model"]

_HERE = Path(__file__).resolve().parent

BUNDLED: dict[str, str] = {"demo": "demo/levels_demo.onnx"}
"""Name -> path (relative to this package) of every bundled model."""


def bundled_models() -> dict[str, Path]:
    """Name -> absolute path of the bundled models (whether or not the file is present)."""
    return {name: _HERE / rel for name, rel in BUNDLED.items()}


def resolve_model(name_or_path: str | Path) -> Path:
    """Turn a ``--model`` argument into a model file: a bundled name (``demo``) or a path.

    An existing file always wins over a bundled name, so a local file called ``demo`` still works.

    Raises:
        ModelError: the name is bundled but its file is missing from this installation.
    """
    path = Path(name_or_path)
    if path.exists():
        return path
    key = str(name_or_path)
    if key in BUNDLED:
        bundled = _HERE / BUNDLED[key]
        if not bundled.is_file():
            raise ModelError(f"bundled model {key!r} is missing from this installation ({bundled}); reinstall spinelevel")
        return bundled
    return path
