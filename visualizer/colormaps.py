"""Maps to colours: normalisation and matplotlib colormaps applied with numpy (no pyplot)."""
from __future__ import annotations

import numpy as np
from matplotlib import colormaps

PREFERRED_COLORMAPS = ("inferno", "viridis", "magma", "plasma", "turbo", "jet", "hot", "coolwarm", "gray")
NORMALIZATIONS = ("robust", "minmax", "max", "none")


def available_colormaps() -> list[str]:
    """Perceptual colormaps first, then every other matplotlib colormap."""
    rest = sorted(name for name in colormaps if name not in PREFERRED_COLORMAPS and not name.endswith("_r"))
    return [*PREFERRED_COLORMAPS, *rest]


def normalize_map(values: np.ndarray, mode: str = "minmax") -> np.ndarray:
    """Scales a map to [0, 1]: by its range ("minmax"), from its minimum to its 99th percentile, clipped
    ("robust": a few sink tokens do not wash out the rest), by its maximum ("max"), or clipped as is ("none")."""
    values = np.asarray(values, dtype=np.float32)
    if mode == "robust":
        low, high = float(values.min()), float(np.percentile(values, 99))
        return np.clip((values - low) / (high - low), 0.0, 1.0) if high > low else normalize_map(values, "minmax")
    if mode == "none":
        return np.clip(values, 0.0, 1.0)
    if mode == "max":
        high = float(values.max())
        return np.clip(values / high, 0.0, 1.0) if high > 0 else np.zeros_like(values)
    if mode == "minmax":
        low, high = float(values.min()), float(values.max())
        return (values - low) / (high - low) if high > low else np.zeros_like(values)
    raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {mode!r}")


def colorize(values01: np.ndarray, cmap: str) -> np.ndarray:
    """(h, w) values in [0, 1] → (h, w, 3) uint8 colours of matplotlib colormap `cmap`."""
    if cmap not in colormaps:
        raise ValueError(f"unknown colormap {cmap!r}; try one of {', '.join(PREFERRED_COLORMAPS)}")
    lut = (colormaps[cmap](np.linspace(0.0, 1.0, 256))[:, :3] * 255 + 0.5).astype(np.uint8)  # (256, 3)
    index = np.clip(np.asarray(values01, dtype=np.float32) * 255 + 0.5, 0, 255).astype(np.uint8)
    return lut[index]
