"""Charts of per-layer × head numbers, drawn with matplotlib's object API (never pyplot)."""
from __future__ import annotations

import textwrap

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator
from PIL import Image

DPI = 100
SELECTED = "#00c8ff"  # the selected layer × head, as in the atlas
TITLE_CHARS_PER_INCH = 12  # at the titles' font size (10 pt): long titles, such as statistics' definitions, wrap


def render(figure: Figure) -> Image.Image:
    """Draws a figure with the Agg canvas and returns it as an RGB image."""
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return Image.fromarray(np.asarray(canvas.buffer_rgba())).convert("RGB")


def set_title(figure: Figure, axes, title: str) -> None:
    """The axes' title, wrapped to the figure's width."""
    width = max(20, int(figure.get_figwidth() * TITLE_CHARS_PER_INCH))
    axes.set_title(textwrap.fill(title, width), fontsize=10)


def distinct_colours(count: int) -> np.ndarray:
    """`count` RGBA colours, as distinct as the count allows: tab10, tab20, then turbo sampled evenly."""
    palette = colormaps["tab10" if count <= 10 else "tab20" if count <= 20 else "turbo"]
    return palette(np.arange(count) if palette.N <= 20 else np.linspace(0, 1, count))


def stats_heatmap(values: np.ndarray, title: str, cmap: str = "viridis", label: str = "",
                  selected: tuple[int, int] | None = None) -> Image.Image:
    """A (layers, heads) table of numbers as a heatmap, layers down and heads across, with a colour bar;
    the `selected` (layer, head) cell outlined."""
    if np.ndim(values) != 2:
        raise ValueError(f"values must be (layers, heads), got shape {np.shape(values)}")
    layers, heads = values.shape
    size = (float(np.clip(2.5 + 0.4 * heads, 4.5, 10.0)), float(np.clip(1.5 + 0.25 * layers, 3.5, 8.0)))
    figure = Figure(figsize=size, dpi=DPI, layout="constrained")
    axes = figure.add_subplot()
    image = axes.imshow(values, cmap=cmap, aspect="auto", interpolation="nearest")
    axes.set_xlabel("head")
    axes.set_ylabel("layer")
    axes.xaxis.set_major_locator(MaxNLocator(nbins=16, integer=True))
    axes.yaxis.set_major_locator(MaxNLocator(nbins=16, integer=True))
    set_title(figure, axes, title)
    if selected is not None:
        layer, head = selected
        axes.add_patch(Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor=SELECTED, linewidth=2.5))
    figure.colorbar(image, ax=axes, label=label)
    return render(figure)


def depth_scatter(values: np.ndarray, ylabel: str, title: str,
                  selected: tuple[int, int] | None = None) -> Image.Image:
    """Every head's value against layer depth, one dot per layer × head coloured by head, as Dosovitskiy et al.
    2021, fig. 7 draws the mean attention distance; `selected` (layer, head) is ringed in black."""
    if np.ndim(values) != 2:
        raise ValueError(f"values must be (layers, heads), got shape {np.shape(values)}")
    layers, heads = values.shape
    figure = Figure(figsize=(6.5, 3.8), dpi=DPI, layout="constrained")
    axes = figure.add_subplot()
    depth = np.arange(layers)
    for head, colour in zip(range(heads), distinct_colours(heads)):
        axes.scatter(depth, values[:, head], s=18, color=colour, label=f"head {head}", zorder=2)
    if selected is not None:
        layer, head = selected
        axes.scatter([layer], [values[layer, head]], s=110, facecolors="none", edgecolors="black", linewidths=2,
                     zorder=3)
    return finish_depth_plot(figure, axes, ylabel, title, heads)


def depth_intervals(means: np.ndarray, lows: np.ndarray, highs: np.ndarray, ylabel: str, title: str) -> Image.Image:
    """`depth_scatter` over many images: each head's mean against layer depth with its interval as an error bar,
    the heads of a layer side by side (Dosovitskiy et al. 2021, fig. 7, over a dataset)."""
    if np.ndim(means) != 2 or np.shape(lows) != np.shape(means) or np.shape(highs) != np.shape(means):
        raise ValueError(f"means, lows and highs must be (layers, heads) alike, got {np.shape(means)}, "
                         f"{np.shape(lows)} and {np.shape(highs)}")
    layers, heads = means.shape
    figure = Figure(figsize=(6.5, 3.8), dpi=DPI, layout="constrained")
    axes = figure.add_subplot()
    offsets = np.linspace(-0.3, 0.3, heads) if heads > 1 else np.zeros(1)
    for head, colour in zip(range(heads), distinct_colours(heads)):
        error = np.stack([means[:, head] - lows[:, head], highs[:, head] - means[:, head]])
        axes.errorbar(np.arange(layers) + offsets[head], means[:, head], yerr=np.nan_to_num(error), fmt="o",
                      markersize=3.5, elinewidth=1, capsize=1.5, color=colour, label=f"head {head}", zorder=2)
    return finish_depth_plot(figure, axes, ylabel, title, heads)


def finish_depth_plot(figure: Figure, axes, ylabel: str, title: str, heads: int) -> Image.Image:
    """The axes, title, grid and head legend that `depth_scatter` and `depth_intervals` share, rendered."""
    axes.set_xlabel("network depth (layer)")
    axes.set_ylabel(ylabel)
    set_title(figure, axes, title)
    axes.set_ylim(bottom=0)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(alpha=0.3)
    if heads <= 16:
        axes.legend(fontsize=7, ncols=1 + heads // 9, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return render(figure)


def perturbation_plot(fractions: np.ndarray, curves: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]],
                      areas: dict[str, tuple[float, float]], ylabel: str, title: str) -> Image.Image:
    """Positive (left: lower is better) and negative (right: higher is better) perturbation curves, one line per map
    with its area under the curve in the legend; a curve with a spread (random orders) dashed in grey with its ± band.

    Args:
        curves: name → (positive, negative, spread or None), each over `fractions`.
        areas: name → (positive area, negative area).
    """
    figure = Figure(figsize=(9.0, 3.9), dpi=DPI, layout="constrained")
    panels = figure.subplots(1, 2, sharey=True)
    named = [name for name, (_, _, spread) in curves.items() if spread is None]
    colours = dict(zip(named, distinct_colours(max(1, len(named)))))
    percent = 100 * np.asarray(fractions)
    for index, (axes, test, better) in enumerate(zip(panels, ("positive", "negative"), ("lower", "higher"))):
        for name, (*scores, spread) in curves.items():
            label = f"{name}: AUC {areas[name][index]:.3f}"
            if spread is None:
                axes.plot(percent, scores[index], marker="o", markersize=3, color=colours[name], label=label)
            else:
                axes.plot(percent, scores[index], linestyle="--", color="grey", label=label)
                axes.fill_between(percent, scores[index] - spread, scores[index] + spread, color="grey", alpha=0.2)
        axes.set_xlabel("patches removed (%)")
        axes.set_title(f"{test} perturbation ({better} AUC is better)", fontsize=10)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7, loc="best")
    panels[0].set_ylabel(ylabel)
    figure.suptitle(textwrap.fill(title, int(figure.get_figwidth() * TITLE_CHARS_PER_INCH)), fontsize=10)
    return render(figure)
