"""Patch maps laid over the original image, and patches outlined."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from .colormaps import colorize, normalize_map


def upsample(values: np.ndarray, size: tuple[int, int], smooth: bool) -> np.ndarray:
    """A (grid_h, grid_w[, C]) float map stretched over `size` = (width, height): bilinear or nearest (crisp patches)."""
    values = np.asarray(values, dtype=np.float32)
    resample = Image.Resampling.BILINEAR if smooth else Image.Resampling.NEAREST
    if values.ndim == 2:
        return np.asarray(Image.fromarray(values, mode="F").resize(size, resample))
    return np.stack([upsample(values[..., c], size, smooth) for c in range(values.shape[-1])], axis=-1)


def overlay(image: Image.Image, heatmap: np.ndarray, opacity: float = 0.6, cmap: str = "inferno",
            normalize: str = "robust", smooth: bool = True) -> Image.Image:
    """The map coloured and alpha-blended over the whole image, at the image's own size."""
    if not 0.0 <= opacity <= 1.0:
        raise ValueError(f"opacity must be in [0, 1], got {opacity}")
    values = normalize_map(heatmap, normalize)
    colours = colorize(upsample(values, image.size, smooth), cmap).astype(np.float32)
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    blended = base * (1.0 - opacity) + colours * opacity
    return Image.fromarray(np.clip(blended + 0.5, 0, 255).astype(np.uint8))


def rgb_image(rgb: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """A (grid_h, grid_w, 3) map in [0, 1] shown as crisp patches at `size` = (width, height)."""
    values = np.clip(upsample(rgb, size, smooth=False), 0.0, 1.0)
    return Image.fromarray((values * 255 + 0.5).astype(np.uint8))


def _outline_width(image: Image.Image) -> int:
    return max(2, round(max(image.size) / 300))


def mark_patches(image: Image.Image, boxes: list[tuple[float, float, float, float]],
                 color: tuple[int, int, int] = (0, 255, 255), width: int | None = None) -> Image.Image:
    """A copy of the image with each (left, top, right, bottom) box outlined."""
    marked = image.convert("RGB").copy()
    draw = ImageDraw.Draw(marked)
    width = width or _outline_width(image)
    for left, top, right, bottom in boxes:
        draw.rectangle((round(left), round(top), max(round(left), round(right) - 1),
                        max(round(top), round(bottom) - 1)), outline=color, width=width)
    return marked


def mark_patch(image: Image.Image, box: tuple[float, float, float, float],
               color: tuple[int, int, int] = (0, 255, 255), width: int | None = None) -> Image.Image:
    """A copy of the image with one patch outlined."""
    return mark_patches(image, [box], color, width)
