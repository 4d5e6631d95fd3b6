"""Maps to colours: normalisation, matplotlib colormaps applied with numpy (no pyplot), and a legend strip."""
from __future__ import annotations

import numpy as np
from matplotlib import colormaps
from PIL import Image, ImageDraw

from .text import fitting_font

PREFERRED_COLORMAPS = ("inferno", "viridis", "magma", "plasma", "cividis", "turbo", "jet", "hot", "coolwarm", "gray")
NORMALIZATIONS = ("robust", "minmax", "max", "none")
ROBUST_PERCENTILE = 99.0


def available_colormaps() -> list[str]:
    """Perceptual colormaps first, then every other matplotlib colormap (reversed `_r` variants left out)."""
    rest = sorted(name for name in colormaps if name not in PREFERRED_COLORMAPS and not name.endswith("_r"))
    return [*PREFERRED_COLORMAPS, *rest]


def normalize_map(values: np.ndarray, mode: str = "minmax", clip_percentile: float | None = None) -> np.ndarray:
    """Scales a map to [0, 1] as float32; a constant map gives zeros.

    Args:
        mode: "minmax" (min → 0, max → 1), "max" (0 → 0, max → 1), "none" (values clipped to [0, 1] as they are),
            or "robust" ("minmax" with values above the 99th percentile clipped, so a few sink tokens do not wash out
            the rest).
        clip_percentile: clip values above this percentile (0-100] first; skipped where it would flatten the map.
    """
    if mode not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {mode!r}")
    values = np.asarray(values, dtype=np.float32)
    if mode == "robust":
        mode, clip_percentile = "minmax", clip_percentile or ROBUST_PERCENTILE
    if clip_percentile is not None:
        if not 0 < clip_percentile <= 100:
            raise ValueError(f"clip_percentile must be in (0, 100], got {clip_percentile}")
        clipped = np.minimum(values, np.percentile(values, clip_percentile))
        values = clipped if clipped.max() > clipped.min() else values
    if mode == "none":
        return np.clip(values, 0.0, 1.0)
    low = float(values.min()) if mode == "minmax" else 0.0
    high = float(values.max())
    if high <= low:
        return np.zeros_like(values)
    return np.clip((values - low) / (high - low), 0.0, 1.0)


def colorize(values01: np.ndarray, cmap: str) -> np.ndarray:
    """(...) values in [0, 1] → (..., 3) uint8 colours of matplotlib colormap `cmap`, exactly as matplotlib maps them."""
    if cmap not in colormaps:
        raise ValueError(f"unknown colormap {cmap!r}; try one of {', '.join(PREFERRED_COLORMAPS)}")
    values = np.clip(np.asarray(values01, dtype=np.float32), 0.0, 1.0)
    return colormaps[cmap](values, bytes=True)[..., :3]


def colorbar_image(cmap: str, width: int = 256, height: int = 48, vmin: float = 0.0, vmax: float = 1.0,
                   label: str = "") -> Image.Image:
    """A horizontal legend strip of exactly `width` × `height`: the gradient, vmin and vmax at its ends, a label below."""
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
