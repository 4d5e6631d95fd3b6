"""Charts of per-layer × head numbers, drawn with matplotlib's object API (never pyplot)."""
from __future__ import annotations

import io

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image


def _render(figure: Figure) -> Image.Image:
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def stats_heatmap(values: np.ndarray, title: str, cmap: str = "viridis") -> Image.Image:
    """A (layers, heads) table of numbers as a labelled heatmap with a colour bar."""
    layers, heads = values.shape
    figure = Figure(figsize=(max(4.0, 0.5 * heads + 2), max(3.0, 0.3 * layers + 1.5)))
    axes = figure.add_subplot()
    image = axes.imshow(values, cmap=cmap, aspect="auto", interpolation="nearest")
    axes.set_xlabel("head")
    axes.set_ylabel("layer")
    axes.set_xticks(range(heads))
    axes.set_yticks(range(layers))
    axes.set_title(title, fontsize=10)
    figure.colorbar(image, ax=axes)
    return _render(figure)


def line_chart(series: dict[str, np.ndarray], xlabel: str, ylabel: str, title: str) -> Image.Image:
    """One line per named series, over the same x (0 … n-1)."""
    figure = Figure(figsize=(6, 3.5))
    axes = figure.add_subplot()
    for name, values in series.items():
        axes.plot(np.arange(len(values)), values, marker="o", markersize=3, label=name)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title, fontsize=10)
    axes.grid(alpha=0.3)
    if len(series) > 1:
        axes.legend(fontsize=7, ncols=2)
    return _render(figure)
