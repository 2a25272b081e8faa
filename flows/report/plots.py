"""The report's figures as small PNGs (matplotlib's Agg canvas, no pyplot state, so it is
safe off the main thread and on machines without a display): loss curves, the spam
classifier's training, confusion matrices side by side, the judge's score histogram."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

#: Figure size (inches) and resolution: about 480×270 px, 15–30 kB per figure.
FIGSIZE = (6.0, 3.4)
DPI = 80
COLORS = {"train": "#1f77b4", "val": "#ff7f0e", "validation": "#ff7f0e", "test": "#2ca02c"}


@dataclass(frozen=True)
class Series:
    """One line: x and y values and a label."""

    label: str
    x: Sequence[float]
    y: Sequence[float]


def _figure(ncols: int = 1, width: float | None = None) -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width or FIGSIZE[0], FIGSIZE[1]), dpi=DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, axes


def _png(fig: Any) -> bytes:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


def _color(label: str) -> str | None:
    return COLORS.get(label.split()[0].lower())


def line_chart(series: Sequence[Series], *, title: str, xlabel: str, ylabel: str) -> bytes:
    """Lines of ``series`` on one axis (e.g. train/val loss against the step)."""
    fig, (ax,) = _figure()
    for s in series:
        ax.plot(s.x, s.y, label=s.label, color=_color(s.label))
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8)
    return _png(fig)


def spam_training(
    step_loss: Series | None,
    epoch_loss: Sequence[Series],
    epoch_accuracy: Sequence[Series],
) -> bytes:
    """The spam classifier: per-step training loss (thin) and per-epoch loss per split
    (left), per-epoch accuracy per split (right)."""
    fig, (left, right) = _figure(2, width=8.0)
    if step_loss is not None and len(step_loss.x):
        left.plot(step_loss.x, step_loss.y, color="#9aa5b1", lw=0.8, label="train (per step)")
    for s in epoch_loss:
        left.plot(s.x, s.y, marker="o", ms=4, color=_color(s.label), label=s.label)
    left.set(title="loss", xlabel="step", ylabel="cross-entropy")
    left.grid(alpha=0.3)
    left.legend(fontsize=7)
    for s in epoch_accuracy:
        right.plot(
            s.x, [100 * v for v in s.y], marker="o", ms=4, color=_color(s.label), label=s.label
        )
    right.set(title="accuracy", xlabel="step", ylabel="%", ylim=(0, 101))
    right.grid(alpha=0.3)
    right.legend(fontsize=7)
    return _png(fig)


def confusion_matrices(matrices: Mapping[str, Mapping[str, int]], *, split: str) -> bytes:
    """One 2×2 matrix per model (``{"tn", "fp", "fn", "tp"}``), side by side; rows are
    the true label, columns the prediction (ham, spam)."""
    import numpy as np

    fig, axes = _figure(len(matrices), width=3.2 * len(matrices) + 0.4)
    for ax, (name, m) in zip(axes, matrices.items(), strict=True):
        grid = np.array([[m["tn"], m["fp"]], [m["fn"], m["tp"]]], dtype=float)
        ax.imshow(grid, cmap="Blues", vmin=0, vmax=max(grid.max(), 1))
        for (i, j), v in np.ndenumerate(grid):
            dark = v > grid.max() / 2
            ax.text(
                j, i, f"{int(v):,}", ha="center", va="center", color="white" if dark else "black"
            )
        acc = (m["tn"] + m["tp"]) / max(grid.sum(), 1)
        ax.set_title(f"{name}\n{100 * acc:.1f} % on {split}", fontsize=9)
        ax.set_xticks([0, 1], ["ham", "spam"])
        ax.set_yticks([0, 1], ["ham", "spam"])
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
    return _png(fig)


def score_histogram(scores: Mapping[str, Sequence[float]]) -> bytes:
    """Judge scores 0–100 in ten-point bins, one bar group per judge model."""
    import numpy as np

    fig, (ax,) = _figure()
    bins = np.arange(0, 101, 10)
    names = list(scores)
    width = 10 / max(len(names), 1) * 0.9
    for k, name in enumerate(names):
        counts, _ = np.histogram(np.clip(np.asarray(scores[name], dtype=float), 0, 100), bins)
        ax.bar(bins[:-1] + k * width + 0.5, counts, width=width, align="edge", label=name)
    ax.set(title="judge scores", xlabel="score (0–100)", ylabel="responses", xlim=(0, 100))
    ax.set_xticks(bins)
    ax.grid(alpha=0.3, axis="y")
    if len(names) > 1:
        ax.legend(fontsize=8)
    return _png(fig)
