"""PNG plots of a finished run: curves, LR schedule, confusion matrix (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(epochs: list[dict[str, Any]], out: Path) -> None:
    plt = _plt()
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    xs = [r["epoch"] for r in epochs]
    for key in ("train_loss", "val_loss"):
        pts = [(x, r[key]) for x, r in zip(xs, epochs, strict=True) if key in r]
        if pts:
            ax_loss.plot(*zip(*pts, strict=True), marker="o", label=key)
    for key in ("train_acc", "val_acc"):
        pts = [(x, r[key]) for x, r in zip(xs, epochs, strict=True) if key in r]
        if pts:
            ax_acc.plot(*zip(*pts, strict=True), marker="o", label=key)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="top-1 accuracy", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def plot_lr(steps: list[int], lrs: list[float], out: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, lrs)
    ax.set(xlabel="optimiser step", ylabel="learning rate", title="LR schedule")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def plot_confusion(matrix: np.ndarray, classes: list[str], out: Path) -> None:
    plt = _plt()
    n = len(classes)
    size = 6 if n <= 20 else 12
    fig, ax = plt.subplots(figsize=(size, size))
    norm = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    if n <= 20:
        ax.set_xticks(range(n), classes, rotation=45, ha="right")
        ax.set_yticks(range(n), classes)
        for i in range(n):
            for j in range(n):
                ax.text(
                    j,
                    i,
                    int(matrix[i, j]),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if norm[i, j] > 0.5 else "black",
                )
    ax.set(xlabel="predicted", ylabel="true", title="confusion matrix (row-normalised)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
