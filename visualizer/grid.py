"""Labelled grids: the heads of one layer, and the layer × head atlas."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .colormaps import colorize, normalize_map
from .overlay import upsample

BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)


def font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def head_grid(tiles: list[Image.Image], labels: list[str], columns: int | None = None, tile_width: int = 256,
              title: str | None = None) -> Image.Image:
    """Tiles resized to `tile_width`, laid out in rows with a label above each (and an optional title)."""
    if len(tiles) != len(labels):
        raise ValueError(f"{len(tiles)} tiles but {len(labels)} labels")
    if not tiles:
        raise ValueError("no tiles to lay out")
    columns = columns or math.ceil(math.sqrt(len(tiles)))
    rows = math.ceil(len(tiles) / columns)
    tile_height = round(tile_width * tiles[0].height / tiles[0].width)
    label_size = max(12, tile_width // 14)
    label_h, pad = label_size + 8, max(4, tile_width // 40)
    title_h = label_size + 16 if title else 0
    canvas = Image.new("RGB", (columns * (tile_width + pad) + pad, title_h + rows * (label_h + tile_height + pad) + pad),
                       BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((pad, 6), title, fill=INK, font=font(label_size + 2))
    for i, (tile, label) in enumerate(zip(tiles, labels)):
        row, col = divmod(i, columns)
        x = pad + col * (tile_width + pad)
        y = title_h + pad + row * (label_h + tile_height + pad)
        draw.text((x, y + 2), label, fill=INK, font=font(label_size))
        canvas.paste(tile.convert("RGB").resize((tile_width, tile_height), Image.Resampling.BILINEAR), (x, y + label_h))
    return canvas


@dataclass(frozen=True)
class AtlasLayout:
    """Where each layer × head thumbnail lies in the atlas image."""

    layers: int
    heads: int
    thumb_w: int
    thumb_h: int
    margin_left: int
    margin_top: int
    gap: int = 2

    def cell_at(self, x: float, y: float) -> tuple[int, int] | None:
        """(layer, head) under pixel (x, y) of the atlas, or None outside every thumbnail."""
        col, dx = divmod(x - self.margin_left, self.thumb_w + self.gap)
        row, dy = divmod(y - self.margin_top, self.thumb_h + self.gap)
        if not (0 <= col < self.heads and 0 <= row < self.layers and dx < self.thumb_w and dy < self.thumb_h):
            return None
        return int(row), int(col)

    def box(self, layer: int, head: int) -> tuple[int, int, int, int]:
        left = self.margin_left + head * (self.thumb_w + self.gap)
        top = self.margin_top + layer * (self.thumb_h + self.gap)
        return left, top, left + self.thumb_w, top + self.thumb_h


def atlas(maps: np.ndarray, cmap: str = "inferno", thumb_width: int = 72,
          selected: tuple[int, int] | None = None) -> tuple[Image.Image, AtlasLayout]:
    """(layers, heads, grid_h, grid_w) maps as thumbnails, one row per layer, one column per head."""
    layers, heads, grid_h, grid_w = maps.shape
    thumb_h = max(8, round(thumb_width * grid_h / grid_w))
    size = max(11, thumb_width // 6)
    layout = AtlasLayout(layers, heads, thumb_width, thumb_h, margin_left=3 * size + 8, margin_top=size + 10)
    width = layout.margin_left + heads * (thumb_width + layout.gap) + 4
    height = layout.margin_top + layers * (thumb_h + layout.gap) + 4
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for head in range(heads):
        left, _, right, _ = layout.box(0, head)
        draw.text(((left + right) // 2, 4), f"H{head}", fill=INK, font=font(size), anchor="mt")
    for layer in range(layers):
        _, top, _, bottom = layout.box(layer, 0)
        draw.text((layout.margin_left - 6, (top + bottom) // 2), f"L{layer}", fill=INK, font=font(size), anchor="rm")
        for head in range(heads):
            values = upsample(normalize_map(maps[layer, head]), (thumb_width, thumb_h), smooth=False)
            canvas.paste(Image.fromarray(colorize(values, cmap)), layout.box(layer, head)[:2])
    if selected is not None:
        left, top, right, bottom = layout.box(*selected)
        draw.rectangle((left - 2, top - 2, right + 1, bottom + 1), outline=(0, 200, 255), width=2)
    return canvas, layout
