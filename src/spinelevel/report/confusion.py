"""The confusion-matrix figure: counts and row-normalised, side by side (paper Fig. 3)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from spinelevel.report.figure import save_figure

__all__ = ["normalise_rows", "plot_confusion"]


def normalise_rows(cm: np.ndarray) -> np.ndarray:
    """Each row divided by its sum (rows = truth; an empty row stays 0)."""
    cm = np.asarray(cm, dtype=np.float64)
    sums = cm.sum(axis=1, keepdims=True)
    return np.divide(cm, sums, out=np.zeros_like(cm), where=sums > 0)


def plot_confusion(cm: np.ndarray, classes: Sequence[str], path: Path, title: str = "") -> Path:
    """Write a two-panel PNG: counts and row-normalised (recall on the diagonal).

    Args:
        cm: counts, rows = truth, columns = prediction, in ``classes`` order.
        classes: class names.
        path: the PNG to write.
        title: figure title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(cm)
    k = len(classes)
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.2))
    for ax, data, name, fmt in ((axes[0], cm, "Counts", "d"), (axes[1], normalise_rows(cm), "Row-normalised", ".2f")):
        vmax = float(data.max()) if data.size and data.max() > 0 else 1.0
        im = ax.imshow(data, cmap="Blues", vmin=0, vmax=vmax)
        ax.set_xticks(range(k), list(classes))
        ax.set_yticks(range(k), list(classes))
        ax.set_xlabel("predicted level")
        ax.set_ylabel("true level")
        ax.set_title(name)
        for i in range(k):
            for j in range(k):
                v = data[i, j]
                text = format(int(v), "d") if fmt == "d" else format(float(v), fmt)
                ax.text(j, i, text, ha="center", va="center", fontsize=8, color="white" if v > 0.5 * vmax else "black")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return save_figure(fig, path, title)
