"""Draw docs/cnn_tp.png: which channels of a ResNet BasicBlock live on which rank at tp=2.

    .venv/bin/python scripts/draw_cnn_tp.py [--out docs/cnn_tp.png]

Columns are the steps of one block (left to right); one lane per rank. Each step shows the
channel axis of its weight or activation as a bar: a rank's colour marks the channels (the
slice of the tensor) that rank holds, grey marks a whole replicated tensor.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, Rectangle  # noqa: E402

RANK_COLOURS = ("#4C78A8", "#F58518")
WHOLE = "#BBBBBB"
# (label, what the bar shows, layout): "whole" replicated, "split" the rank's channel half
STEPS = [
    ("input x\n(C channels)", "activation", "whole"),
    ("conv1\ncolumn-parallel\nW[C_out/2, C_in]", "weight: output ch.", "split"),
    ("norm1 + ReLU\nlocal stats", "activation", "split"),
    ("conv2\nrow-parallel\nW[C_out, C_in/2]", "weight: input ch.", "split"),
    ("all-reduce\n(sum of partials)", "activation", "whole"),
    ("norm2, + shortcut,\nReLU (replicated)", "activation", "whole"),
]


def draw(out: Path) -> None:
    fig, ax = plt.subplots(figsize=(12, 4.6))
    col_w, bar_w, bar_h, lane_h = 2.0, 0.5, 1.6, 2.2
    for r in range(2):
        y0 = (1 - r) * lane_h
        ax.text(
            -0.3,
            y0 + bar_h / 2,
            f"rank {r}",
            ha="right",
            va="center",
            fontsize=12,
            color=RANK_COLOURS[r],
            fontweight="bold",
        )
        for i, (_, what, layout) in enumerate(STEPS):
            x = i * col_w
            if layout == "whole":
                ax.add_patch(Rectangle((x, y0), bar_w, bar_h, color=WHOLE, ec="black"))
            else:  # channels [0, C/2) on rank 0, [C/2, C) on rank 1; the rest is elsewhere
                for half in range(2):
                    mine = half == r
                    ax.add_patch(
                        Rectangle(
                            (x, y0 + (1 - half) * bar_h / 2),
                            bar_w,
                            bar_h / 2,
                            fc=RANK_COLOURS[r] if mine else "white",
                            ec="black",
                            ls="-" if mine else ":",
                        )
                    )
            if i + 1 < len(STEPS):
                ax.add_patch(
                    FancyArrowPatch(
                        (x + bar_w + 0.05, y0 + bar_h / 2),
                        (x + col_w - 0.05, y0 + bar_h / 2),
                        arrowstyle="->",
                        mutation_scale=14,
                    )
                )
            if r == 1:
                ax.text(
                    x + bar_w / 2,
                    y0 - 0.15,
                    what,
                    ha="center",
                    va="top",
                    fontsize=8,
                    style="italic",
                )
    for i, (label, _, _) in enumerate(STEPS):
        ax.text(
            i * col_w + bar_w / 2, lane_h + bar_h + 0.2, label, ha="center", va="bottom", fontsize=9
        )
    # the two collectives: f (backward all-reduce of dx) and g (forward all-reduce)
    for col, text in (
        (1, "f: identity fwd,\nall-reduce dx bwd"),
        (4, "g: all-reduce fwd,\nidentity bwd"),
    ):
        ax.annotate(
            text, (col * col_w - 0.75, lane_h * 0.86), ha="center", fontsize=8, color="#555555"
        )
    ax.set_xlim(-1.4, len(STEPS) * col_w - 1.0)
    ax.set_ylim(-0.9, lane_h + bar_h + 1.3)
    ax.axis("off")
    ax.set_title(
        "CNN tensor parallel, tp=2: one ResNet BasicBlock (channel bar: top = first "
        "half of the channels)",
        fontsize=11,
    )
    handles = [Rectangle((0, 0), 1, 1, color=c) for c in (*RANK_COLOURS, WHOLE)]
    ax.legend(
        handles,
        ["held by rank 0", "held by rank 1", "replicated (whole)"],
        loc="lower center",
        ncol=3,
        fontsize=9,
        frameon=False,
        bbox_to_anchor=(0.5, -0.08),
    )
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path(__file__).parents[1] / "docs/cnn_tp.png")
    draw(ap.parse_args().out)


if __name__ == "__main__":
    main()
