"""Labelled grids: tiles (e.g. the heads of one layer) under their labels, and the layer × head atlas."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from .colormaps import colorize, normalize_map
from .overlay import upsample
from .text import fitting_font, font

BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)
SELECTED = (0, 200, 255)


def head_grid(tiles: list[Image.Image], labels: list[str], columns: int | None = None, tile_width: int = 256,
              title: str | None = None) -> Image.Image:
    """Tiles fitted into `tile_width`-wide cells (the first tile's aspect), in rows, a label above each, on white.

    Args:
        columns: tiles per row; by default about the square root of their number.
    """
    if len(tiles) != len(labels):
        raise ValueError(f"{len(tiles)} tiles but {len(labels)} labels")
    if not tiles:
        raise ValueError("no tiles to lay out")
    columns = min(columns or math.ceil(math.sqrt(len(tiles))), len(tiles))
    rows = math.ceil(len(tiles) / columns)
    tile_height = max(1, round(tile_width * tiles[0].height / tiles[0].width))
    label_size, pad = max(12, tile_width // 14), max(4, tile_width // 40)
    label_h = round(label_size * 1.3)
    title_h = round(label_size * 1.6) + pad if title else 0
    width = columns * (tile_width + pad) + pad
    canvas = Image.new("RGB", (width, title_h + rows * (label_h + tile_height + pad) + pad), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((pad, pad), title, fill=INK, font=fitting_font(draw, title, width - 2 * pad, label_size + 4))
    for i, (tile, label) in enumerate(zip(tiles, labels)):
        row, col = divmod(i, columns)
        x = pad + col * (tile_width + pad)
        y = title_h + pad + row * (label_h + tile_height + pad)
        draw.text((x + tile_width // 2, y + label_h // 2), label, fill=INK, anchor="mm",
                  font=fitting_font(draw, label, tile_width, label_size))
        fitted = ImageOps.contain(tile.convert("RGB"), (tile_width, tile_height), Image.Resampling.BILINEAR)
        canvas.paste(fitted, (x + (tile_width - fitted.width) // 2, y + label_h + (tile_height - fitted.height) // 2))
    return canvas


@dataclass(frozen=True)
class AtlasLayout:
    """Where each layer × head thumbnail lies in the atlas image: rows are layers, columns are heads."""

    layers: int
    heads: int
    thumb_w: int
    thumb_h: int
    margin_left: int
    margin_top: int
    gap: int = 2
    margin_end: int = 4  # right of the last column and below the last row

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the whole atlas image."""
        return (self.margin_left + self.heads * (self.thumb_w + self.gap) + self.margin_end,
                self.margin_top + self.layers * (self.thumb_h + self.gap) + self.margin_end)

    @property
    def font_size(self) -> int:
        """Pixel size of the row and column labels."""
        return max(11, self.thumb_w // 6)

    def cell_at(self, x: float, y: float) -> tuple[int, int] | None:
        """(layer, head) under pixel (x, y) of the atlas, or None in a margin or gap."""
        col, dx = divmod(x - self.margin_left, self.thumb_w + self.gap)
        row, dy = divmod(y - self.margin_top, self.thumb_h + self.gap)
        if not (0 <= col < self.heads and 0 <= row < self.layers and dx < self.thumb_w and dy < self.thumb_h):
            return None
        return int(row), int(col)

    def box(self, layer: int, head: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of one thumbnail, right and bottom exclusive."""
        left = self.margin_left + head * (self.thumb_w + self.gap)
        top = self.margin_top + layer * (self.thumb_h + self.gap)
        return left, top, left + self.thumb_w, top + self.thumb_h


def atlas_layout(layers: int, heads: int, grid_h: int, grid_w: int, thumb_width: int = 72) -> AtlasLayout:
    """The layout `atlas` draws for maps of shape (layers, heads, grid_h, grid_w), without drawing it."""
    layout = AtlasLayout(layers, heads, thumb_width, max(8, round(thumb_width * grid_h / grid_w)), 0, 0)
    label_w = math.ceil(font(layout.font_size).getlength(f"L{layers - 1}"))
    return replace(layout, margin_left=label_w + 10, margin_top=layout.font_size + 10)


def atlas(maps: np.ndarray, cmap: str = "inferno", normalize: str = "minmax", thumb_width: int = 72,
          selected: tuple[int, int] | None = None,
          value_range: tuple[float, float] | None = None) -> tuple[Image.Image, AtlasLayout]:
    """(layers, heads, grid_h, grid_w) maps as thumbnails; rows "L0…", columns "H0…".

    Each thumbnail is scaled on its own by `normalize`, or all of them by one `value_range`.
    Returns the image and its layout (layout.cell_at(x, y) turns a click into (layer, head)).
    """
    if np.ndim(maps) != 4:
        raise ValueError(f"maps must be (layers, heads, grid_h, grid_w), got shape {np.shape(maps)}")
    layers, heads, grid_h, grid_w = maps.shape
    layout = atlas_layout(layers, heads, grid_h, grid_w, thumb_width)
    pixels = np.full((*layout.size[::-1], 3), BACKGROUND, dtype=np.uint8)
    for layer in range(layers):
        for head in range(heads):
            scaled = normalize_map(maps[layer, head], normalize, value_range=value_range)
            thumb = upsample(scaled, (layout.thumb_w, layout.thumb_h), smooth=False)
            left, top, right, bottom = layout.box(layer, head)
            pixels[top:bottom, left:right] = colorize(thumb, cmap)
    canvas = Image.fromarray(pixels)
    draw = ImageDraw.Draw(canvas)
    head_font = fitting_font(draw, f"H{heads - 1}", layout.thumb_w + layout.gap - 2, layout.font_size)
    for head in range(heads):
        left, top, right, _ = layout.box(0, head)
        draw.text(((left + right) // 2, top - 4), f"H{head}", fill=INK, font=head_font, anchor="md")
    for layer in range(layers):
        left, top, _, bottom = layout.box(layer, 0)
        draw.text((left - 5, (top + bottom) // 2), f"L{layer}", fill=INK, font=font(layout.font_size), anchor="rm")
    if selected is not None:
        left, top, right, bottom = layout.box(*selected)
        draw.rectangle((left - 2, top - 2, right + 1, bottom + 1), outline=SELECTED, width=2)
    return canvas, layout
