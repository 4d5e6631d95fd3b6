"""From an analysis to what the page shows: each view is a few visualizer calls on one analysis quantity."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image

import visualizer
from analysis import FUSIONS, STAT_LABELS, Analysis

DISPLAY_LONG_SIDE = 1280  # overlays in the page are drawn on the original image at most this large
THUMB_LONG_SIDE = 224  # head-grid tiles
HEAD_CHOICES_FUSED = ("mean", "max", "min")


@dataclass(frozen=True)
class Style:
    opacity: float = 0.6
    cmap: str = "inferno"
    smooth: bool = True
    normalize: str = "robust"


@dataclass
class Scene:
    """The original image, and copies of it small enough to redraw on quickly."""

    original: Image.Image
    display: Image.Image
    thumb: Image.Image

    @classmethod
    def of(cls, image: Image.Image) -> "Scene":
        return cls(image, _shrunk(image, DISPLAY_LONG_SIDE), _shrunk(image, THUMB_LONG_SIDE))

    def to_original(self, x: float, y: float) -> tuple[float, float]:
        """Pixel (x, y) on the display copy → the same point on the original image."""
        return x * self.original.width / self.display.width, y * self.original.height / self.display.height


def paint(base: Image.Image, values: np.ndarray, style: Style) -> Image.Image:
    """A (grid_h, grid_w) map over `base` in the chosen style."""
    return visualizer.overlay(base, values, style.opacity, style.cmap, style.normalize, style.smooth)


def _shrunk(image: Image.Image, long_side: int) -> Image.Image:
    scale = long_side / max(image.size)
    if scale >= 1:
        return image
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)


def head_choices(num_heads: int) -> list[str]:
    return [*HEAD_CHOICES_FUSED, *(str(h) for h in range(num_heads))]


def parse_head(value: "int | str", num_heads: int) -> "int | str":
    """A head index or a fusion name, checked against the model."""
    text = str(value).strip().lower().removeprefix("head ")
    if text in FUSIONS:
        return text
    if text.isdigit() and int(text) < num_heads:
        return int(text)
    raise ValueError(f"head must be one of {', '.join(FUSIONS)} or 0–{num_heads - 1}, got {value!r}")


def check_layer(analysis: Analysis, layer: int) -> int:
    if not 0 <= int(layer) < analysis.num_layers:
        raise ValueError(f"layer must be in 0–{analysis.num_layers - 1}, got {layer}")
    return int(layer)


def head_label(head: "int | str") -> str:
    return f"head {head}" if isinstance(head, int) else f"{head} of heads"


def cls_view(analysis: Analysis, scene: Scene, layer: int, head: "int | str", style: Style,
             with_grid: bool = True) -> tuple[Image.Image, Image.Image | None]:
    """The class token's attention in `layer` for `head` over the image, and the labelled grid of every head."""
    layer = check_layer(analysis, layer)
    overlay = paint(scene.display, analysis.cls_map(layer, head), style)
    if not with_grid:
        return overlay, None
    maps = analysis.cls_maps(layer)
    tiles = [paint(scene.thumb, m, style) for m in maps]
    tiles.append(paint(scene.thumb, maps.mean(0), style))
    labels = [f"head {h}" for h in range(len(maps))] + ["mean"]
    return overlay, visualizer.head_grid(tiles, labels)


def cls_maps_payload(analysis: Analysis, layer: int) -> dict:
    """Every head's class-token map of `layer` as nested lists, with the grid and geometry."""
    layer = check_layer(analysis, layer)
    maps = analysis.cls_maps(layer)
    return {"model": analysis.model_name, "layer": layer, "num_heads": len(maps),
            "grid_h": analysis.geometry.grid_h, "grid_w": analysis.geometry.grid_w,
            "geometry": analysis.geometry.to_dict(), "cls_self_attention": analysis.cls_attention[layer, :, 0].tolist(),
            "maps": maps.round(7).tolist()}


def rollout_view(analysis: Analysis, scene: Scene, fusion: str, discard_ratio: float, style: Style,
                 progress: Callable[[float], None] | None = None) -> Image.Image:
    values = analysis.rollout_map(fusion, discard_ratio, progress=progress)
    return paint(scene.display, values, style)


def flow_view(analysis: Analysis, scene: Scene, fusion: str, style: Style,
              progress: Callable[[float], None] | None = None) -> Image.Image:
    return paint(scene.display, analysis.flow_map(fusion, progress), style)


def patch_at(analysis: Analysis, x: float, y: float) -> tuple[int, int, int]:
    """(row, col, token) of the patch under pixel (x, y) of the original image."""
    g = analysis.geometry
    if not (0 <= x < g.orig_w and 0 <= y < g.orig_h):
        raise ValueError(f"({x}, {y}) is outside the {g.orig_w}×{g.orig_h} image")
    row, col = g.patch_at(x, y)
    return row, col, analysis.token_at(row, col)


def _mark(analysis: Analysis, scene: Scene, image: Image.Image, row: int, col: int) -> Image.Image:
    return visualizer.mark_patch(image, _scaled_box(analysis, scene, row, col))


def patch_view(analysis: Analysis, scene: Scene, x: float, y: float, layer: int, head: "int | str",
               direction: str, style: Style) -> tuple[Image.Image, np.ndarray, tuple[int, int]]:
    """What the patch under original-image pixel (x, y) attends to (row) or is attended by (column)."""
    layer = check_layer(analysis, layer)
    row, col, token = patch_at(analysis, x, y)
    values = analysis.query_map(token, layer, head, direction)
    overlay = paint(scene.display, values, style)
    return _mark(analysis, scene, overlay, row, col), values, (row, col)


def atlas_view(analysis: Analysis, style: Style,
               selected: tuple[int, int] | None = None) -> tuple[Image.Image, visualizer.AtlasLayout]:
    """Every layer × head class-token map as thumbnails (rows: layers, columns: heads), with its layout."""
    maps = np.stack([analysis.cls_maps(layer) for layer in range(analysis.num_layers)])
    return visualizer.atlas(maps, cmap=style.cmap, selected=selected)


STAT_COLUMNS = ["layer", "head", *STAT_LABELS]


def stats_rows(analysis: Analysis) -> list[list]:
    """One row per layer × head: the head statistics, rounded for a table."""
    stats = analysis.statistics.as_dict()
    return [[layer, head, *(round(float(stats[name][layer, head]), 4) for name in STAT_LABELS)]
            for layer in range(analysis.num_layers) for head in range(analysis.num_heads)]


def stats_chart(analysis: Analysis, statistic: str) -> Image.Image:
    values = analysis.statistics.as_dict()[statistic]
    return visualizer.stats_heatmap(values, title=STAT_LABELS[statistic], cmap="viridis")


def hidden_views(analysis: Analysis, scene: Scene, layer: int, x: float, y: float,
                 style: Style) -> tuple[Image.Image, Image.Image, Image.Image, int]:
    """Token norms with outliers outlined, PCA of the features as RGB, cosine similarity to the patch at (x, y)."""
    layer = check_layer(analysis, layer)
    norms, outliers = analysis.norm_map(layer)
    norm_image = paint(scene.display, norms, replace(style, normalize="minmax", smooth=False))
    boxes = [_scaled_box(analysis, scene, r, c) for r, c in zip(*np.nonzero(outliers))]
    if boxes:
        norm_image = visualizer.mark_patches(norm_image, boxes, color=(255, 64, 64))
    pca = visualizer.rgb_image(analysis.pca_map(layer), scene.display.size)
    row, col, token = patch_at(analysis, x, y)
    similarity = paint(scene.display, analysis.similarity_map(layer, token), style)
    return norm_image, pca, _mark(analysis, scene, similarity, row, col), len(boxes)


def _scaled_box(analysis: Analysis, scene: Scene, row: int, col: int) -> tuple[float, float, float, float]:
    """A patch's box on the display copy of the image."""
    left, top, right, bottom = analysis.geometry.patch_box(row, col)
    sx, sy = scene.display.width / scene.original.width, scene.display.height / scene.original.height
    return left * sx, top * sy, right * sx, bottom * sy


def layer_frames(analysis: Analysis, scene: Scene, mode: str, head: "int | str", style: Style,
                 progress: Callable[[float], None] | None = None) -> tuple[list[Image.Image], list[str]]:
    """One overlay per layer: the class-token map of `head` ("cls"), or rollout up to that layer ("rollout")."""
    frames, captions = [], []
    fusion = head if isinstance(head, str) else "mean"
    for layer in range(analysis.num_layers):
        values = analysis.cls_map(layer, head) if mode == "cls" else analysis.rollout_map(fusion, last_layer=layer)
        frames.append(paint(scene.display, values, style))
        captions.append(f"layer {layer}" + (f" · {head_label(head)}" if mode == "cls" else f" · rollout ({fusion})"))
        if progress is not None:
            progress((layer + 1) / analysis.num_layers)
    return frames, captions
