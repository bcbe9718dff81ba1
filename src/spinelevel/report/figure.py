"""Saving matplotlib figures the same way in every plot module."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["save_figure"]


def save_figure(fig: Any, path: Path | str, title: str | None = None) -> Path:
    """Title, tighten, write as PNG at 110 dpi and close ``fig``; returns the path."""
    import matplotlib.pyplot as plt

    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
