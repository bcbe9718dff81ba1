"""The training history figure: loss and accuracy per epoch, training and validation (paper Fig. 2)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from spinelevel.report.figure import save_figure

__all__ = ["plot_history"]


def plot_history(rows: Sequence[Mapping[str, float]], path: Path, title: str = "") -> Path:
    """Write a two-panel PNG (loss, accuracy per epoch) from history rows.

    Args:
        rows: dicts with ``epoch, train_loss, train_acc, val_loss, val_acc`` (val may be NaN).
        path: the PNG to write.
        title: figure title (architecture, data).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [int(r["epoch"]) for r in rows]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, name in ((ax_loss, "loss", "Loss"), (ax_acc, "acc", "Accuracy")):
        ax.plot(epochs, [float(r[f"train_{key}"]) for r in rows], "o-", ms=3, label="training")
        ax.plot(epochs, [float(r[f"val_{key}"]) for r in rows], "s-", ms=3, label="validation")
        ax.set_xlabel("epoch")
        ax.set_ylabel(name.lower())
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend()
    return save_figure(fig, path, title)
