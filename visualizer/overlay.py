"""Patch maps stretched over the original image, blended onto it, and patches outlined."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from .colormaps import colorize, normalize_map

Box = tuple[float, float, float, float]  # (left, top, right, bottom) in image pixels


def nearest_index(n_out: int, n_in: int) -> np.ndarray:
    """For each of n_out pixels, the cell (of n_in) under its centre: floor((i + 0.5) · n_in / n_out), in integers."""
    return np.minimum((2 * np.arange(n_out) + 1) * n_in // (2 * n_out), n_in - 1)


def upsample(values: np.ndarray, size: tuple[int, int], smooth: bool) -> np.ndarray:
    """A (grid_h, grid_w[, C]) float map stretched over `size` = (width, height): bilinear, or nearest (crisp patches,
    pixel (x, y) takes the cell under its centre, as ImageGeometry.patch_at(x + 0.5, y + 0.5))."""
    values = np.asarray(values, dtype=np.float32)
    width, height = size
    if not smooth:
        return values[nearest_index(height, values.shape[0])][:, nearest_index(width, values.shape[1])]
    if values.ndim == 2:
        return np.asarray(Image.fromarray(values, mode="F").resize(size, Image.Resampling.BILINEAR))
    return np.stack([upsample(values[..., c], size, smooth) for c in range(values.shape[-1])], axis=-1)


def overlay(image: Image.Image, heatmap: np.ndarray, opacity: float = 0.6, cmap: str = "inferno",
            normalize: str = "minmax", smooth: bool = True, value_range: tuple[float, float] | None = None,
            mask: np.ndarray | None = None) -> Image.Image:
    """The (grid_h, grid_w) map normalised, coloured and alpha-blended over the whole image, at the image's own size.

    Args:
        value_range: the (low, high) sent to the colormap's ends, instead of the one `normalize` picks.
        mask: (grid_h, grid_w) booleans; patches outside it show the image darkened, without colour.
    """
    if not 0.0 <= opacity <= 1.0:
        raise ValueError(f"opacity must be in [0, 1], got {opacity}")
    if np.ndim(heatmap) != 2:
        raise ValueError(f"the heatmap must be (grid_h, grid_w), got shape {np.shape(heatmap)}")
    values = upsample(normalize_map(heatmap, normalize, value_range=value_range), image.size, smooth)
    colours = colorize(values, cmap).astype(np.float32)
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    blended = base * (1.0 - opacity) + colours * opacity
    if mask is not None:
        inside = upsample(np.asarray(mask, dtype=np.float32), image.size, smooth=False)[..., None] > 0.5
        blended = np.where(inside, blended, base * 0.35)
    return Image.fromarray(np.clip(blended + 0.5, 0, 255).astype(np.uint8))


def top_mass_mask(values: np.ndarray, fraction: float) -> np.ndarray:
    """The smallest set of cells holding `fraction` of the map's total mass (DINO's visualize_attention threshold)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"the mass fraction must be in (0, 1], got {fraction}")
    flat = np.clip(np.asarray(values, dtype=np.float64).ravel(), 0.0, None)
    total = flat.sum()
    if total <= 0:
        return np.ones(np.shape(values), dtype=bool)
    order = np.argsort(flat)[::-1]  # largest first
    kept = np.searchsorted(np.cumsum(flat[order]) / total, fraction - 1e-12) + 1
    mask = np.zeros(flat.shape, dtype=bool)
    mask[order[:kept]] = True
    return mask.reshape(np.shape(values))


def rgb_image(rgb: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """A (grid_h, grid_w, 3) map in [0, 1] (e.g. PCA components as colours) as crisp patches at `size` = (w, h)."""
    values = np.clip(upsample(rgb, size, smooth=False), 0.0, 1.0)
    return Image.fromarray((values * 255 + 0.5).astype(np.uint8))


def mark_patches(image: Image.Image, boxes: list[Box], color: tuple[int, int, int] = (0, 255, 255),
                 width: int | None = None) -> Image.Image:
    """A copy of the image with each (left, top, right, bottom) box outlined inside its edges."""
    marked = image.convert("RGB")
    draw = ImageDraw.Draw(marked)
    width = width or max(2, round(max(image.size) / 300))
    for left, top, right, bottom in boxes:
        x0, y0 = round(left), round(top)
        draw.rectangle((x0, y0, max(x0, round(right) - 1), max(y0, round(bottom) - 1)), outline=color, width=width)
    return marked


def mark_patch(image: Image.Image, box: Box, color: tuple[int, int, int] = (0, 255, 255),
               width: int | None = None) -> Image.Image:
    """A copy of the image with one patch outlined."""
    return mark_patches(image, [box], color, width)
