"""Maps to colours: normalisation, matplotlib colormaps applied with numpy (no pyplot), and a legend strip."""
from __future__ import annotations

import numpy as np
from matplotlib import colormaps
from PIL import Image, ImageDraw

from .text import fitting_font

SEQUENTIAL_COLORMAPS = ("inferno", "viridis", "magma", "plasma", "cividis", "gray")  # perceptually uniform
DIVERGING_COLORMAPS = ("coolwarm", "RdBu_r", "PuOr_r")
NORMALIZATIONS = ("robust", "minmax", "max", "none")
ROBUST_PERCENTILE = 99.0


def available_colormaps() -> list[str]:
    """The curated list offered to users: perceptually uniform sequential colormaps, then a few diverging ones."""
    return [*SEQUENTIAL_COLORMAPS, *DIVERGING_COLORMAPS]


def scale_range(values: np.ndarray, mode: str = "minmax", clip_percentile: float | None = None) -> tuple[float, float]:
    """The (low, high) values that `normalize_map` sends to 0 and 1.

    Args:
        mode: "minmax" (min → 0, max → 1), "max" (0 → 0, max → 1), "none" (0 → 0, 1 → 1), or "robust" ("minmax" up
            to the 99th percentile, so a few sink tokens do not wash out the rest).
        clip_percentile: values above this percentile (0-100] saturate; skipped where it would flatten the map.
    """
    if mode not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {mode!r}")
    values = np.asarray(values, dtype=np.float32)
    if mode == "none":
        return 0.0, 1.0
    if mode == "robust":
        mode, clip_percentile = "minmax", clip_percentile or ROBUST_PERCENTILE
    high = float(values.max())
    if clip_percentile is not None:
        if not 0 < clip_percentile <= 100:
            raise ValueError(f"clip_percentile must be in (0, 100], got {clip_percentile}")
        clipped = float(np.percentile(values, clip_percentile))
        high = clipped if clipped > float(values.min()) else high
    low = float(values.min()) if mode == "minmax" else 0.0
    return low, high


def normalize_map(values: np.ndarray, mode: str = "minmax", clip_percentile: float | None = None,
                  value_range: tuple[float, float] | None = None) -> np.ndarray:
    """Scales a map to [0, 1] as float32 by `scale_range` (or a given (low, high)); a constant map gives zeros
    (or ones under "max", where each value is the maximum)."""
    values = np.asarray(values, dtype=np.float32)
    low, high = value_range or scale_range(values, mode, clip_percentile)
    if high <= low:
        return np.zeros_like(values)
    return np.clip((values - low) / (high - low), 0.0, 1.0)


def colorize(values01: np.ndarray, cmap: str) -> np.ndarray:
    """(...) values in [0, 1] → (..., 3) uint8 colours of colormap `cmap`, exactly as matplotlib maps them."""
    if cmap not in colormaps:
        raise ValueError(f"unknown colormap {cmap!r}; try one of {', '.join(available_colormaps())}")
    values = np.clip(np.asarray(values01, dtype=np.float32), 0.0, 1.0)
    return colormaps[cmap](values, bytes=True)[..., :3]


def colorbar_image(cmap: str, width: int = 256, height: int = 48, vmin: float = 0.0, vmax: float = 1.0,
                   label: str = "") -> Image.Image:
    """A horizontal legend strip of exactly `width` × `height`: the gradient, vmin and vmax at its ends, a label."""
    if width < 32 or height < 24:
        raise ValueError(f"a colorbar needs at least 32 × 24 pixels, got {width} × {height}")
    strip_h = height // 2
    legend = Image.new("RGB", (width, height), (255, 255, 255))
    legend.paste(Image.fromarray(np.repeat(colorize(np.linspace(0, 1, width)[None, :], cmap), strip_h, axis=0)))
    draw = ImageDraw.Draw(legend)
    size = max(8, height - strip_h - 4)
    low, high = f"{vmin:.3g}", f"{vmax:.3g}"
    text_font = fitting_font(draw, f"{low} {label} {high}", width - 8, size)
    ink = (20, 20, 20)
    draw.text((1, strip_h + 2), low, fill=ink, font=text_font, anchor="la")
    draw.text((width - 2, strip_h + 2), high, fill=ink, font=text_font, anchor="ra")
    if label:
        draw.text((width // 2, strip_h + 2), label, fill=ink, font=text_font, anchor="ma")
    return legend


def with_colorbar(image: Image.Image, cmap: str, vmin: float, vmax: float, label: str = "",
                  height: int = 34) -> Image.Image:
    """The image with a legend strip of its full width below it: the colormap from vmin to vmax, and a label."""
    legend = colorbar_image(cmap, max(32, image.width), max(24, height), vmin, vmax, label)
    framed = Image.new("RGB", (image.width, image.height + legend.height), (255, 255, 255))
    framed.paste(image.convert("RGB"), (0, 0))
    framed.paste(legend, (0, image.height))
    return framed
