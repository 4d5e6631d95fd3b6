"""From an analysis to what is shown: each view is a few visualizer calls on one analysis quantity."""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image

import visualizer
from analysis import FUSIONS, Analysis, Faithfulness

PAGE_LONG_SIDE = 640  # maps in the page are drawn this large: a redraw stays fast
LARGE_LONG_SIDE = 1280  # maps returned by the API and written by the command line
THUMB_LONG_SIDE = 224  # head-grid tiles
WORKING_MAX_PIXELS = 4096 * 4096  # larger uploads are reduced (Lanczos) before the model sees them
Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Style:
    opacity: float = 0.6
    cmap: str = "inferno"
    smooth: bool = True
    normalize: str = "robust"
    mass: float | None = None  # show only the smallest set of patches holding this fraction of the map (DINO)


@dataclass
class Scene:
    """An uploaded image: the copy the model sees, and smaller copies to draw on quickly."""

    image: Image.Image  # the upload, reduced to at most WORKING_MAX_PIXELS
    original_size: tuple[int, int]  # (width, height) of the upload: the coordinates clients speak in
    page: Image.Image
    large: Image.Image
    thumb: Image.Image
    digest: str = ""  # of the decoded upload

    @classmethod
    def of(cls, image: Image.Image, digest: str = "") -> "Scene":
        """The scene of a decoded upload; `load_image` may have reduced it already, and then says the file's size in
        `image.info["original_size"]`, which stays the size clients' coordinates refer to."""
        working = _shrunk(image, max(image.size) * (WORKING_MAX_PIXELS / (image.width * image.height)) ** 0.5)
        original = tuple(image.info.get("original_size", image.size))
        return cls(working, original, _shrunk(working, PAGE_LONG_SIDE), _shrunk(working, LARGE_LONG_SIDE),
                   _shrunk(working, THUMB_LONG_SIDE), digest)

    @property
    def nbytes(self) -> int:
        return sum(3 * im.width * im.height for im in (self.image, self.page, self.large, self.thumb))

    def page_to_original(self, x: float, y: float) -> tuple[float, float]:
        """Pixel (x, y) of the page's copy → the same point of the upload."""
        width, height = self.original_size
        return x * width / self.page.width, y * height / self.page.height


def _shrunk(image: Image.Image, long_side: float) -> Image.Image:
    scale = long_side / max(image.size)
    if scale >= 1:
        return image
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)


def paint(base: Image.Image, values: np.ndarray, style: Style, legend: str | None = None,
          marker: Box | None = None) -> Image.Image:
    """A (grid_h, grid_w) map over `base` in the chosen style; with `legend`, a colour bar with its values below."""
    low, high = visualizer.scale_range(values, style.normalize)
    mask = visualizer.top_mass_mask(values, style.mass) if style.mass else None
    image = visualizer.overlay(base, values, style.opacity, style.cmap, smooth=style.smooth, value_range=(low, high),
                               mask=mask)
    if marker is not None:
        image = visualizer.mark_patch(image, marker)
    if legend is None:
        return image
    if style.mass:
        legend = f"{legend} · top {style.mass:.0%} of the mass ({int(mask.sum())} patches)"
    return visualizer.with_colorbar(image, style.cmap, low, high, legend)


def head_label(head: "int | str") -> str:
    return f"head {head}" if isinstance(head, int) else f"{head} of heads"


def head_choices(num_heads: int) -> list[str]:
    return [*FUSIONS, *(str(h) for h in range(num_heads))]


def patch_at(analysis: Analysis, x: float, y: float) -> tuple[int, int, int]:
    """(row, col, token) of the patch under pixel (x, y) of the original image."""
    g = analysis.geometry
    if not (0 <= x < g.orig_w and 0 <= y < g.orig_h):
        raise ValueError(f"({x:g}, {y:g}) is outside the {g.orig_w}×{g.orig_h} image")
    row, col = g.patch_at(x, y)
    return row, col, analysis.token_at(row, col)


def box_on(analysis: Analysis, base: Image.Image, row: int, col: int) -> Box:
    """A patch's box on `base`, a copy of the original image at any size."""
    left, top, right, bottom = analysis.geometry.patch_box(row, col)
    sx, sy = base.width / analysis.geometry.orig_w, base.height / analysis.geometry.orig_h
    return left * sx, top * sy, right * sx, bottom * sy


def summary_name(analysis: Analysis) -> str:
    """What the per-layer maps show: "class-token attention", or what stands in for it."""
    return "class-token attention" if analysis.summary.class_token else analysis.summary.kind


def cls_view(analysis: Analysis, base: Image.Image, layer: int, head: "int | str", style: Style,
             legend: bool = False, marker: tuple[int, int] | None = None) -> Image.Image:
    """The class token's attention in `layer` for `head` (or its stand-in, see `analysis.summary`) over `base`."""
    box = box_on(analysis, base, *marker) if marker else None
    text = f"{summary_name(analysis)} · layer {layer} · {head_label(head)}" if legend else None
    return paint(base, analysis.cls_map(layer, head), style, text, box)


def second_view(analysis: Analysis, base: Image.Image, layer: int, head: "int | str",
                style: Style) -> Image.Image | None:
    """The model's other summary, where it has one: the attention-pooling probe's map (after the last layer), or
    the distillation token's attention in `layer`."""
    if analysis.summary.pooling:
        return paint(base, analysis.pooling_map(head), style, f"attention-pooling probe · {head_label(head)}")
    if analysis.summary.distillation:
        return paint(base, analysis.distillation_map(layer, head), style,
                     f"distillation-token attention · layer {layer} · {head_label(head)}")
    return None


def head_grid(analysis: Analysis, thumb: Image.Image, layer: int, style: Style, legend: bool = False) -> Image.Image:
    """Every head's class-token map of `layer` and their mean, each scaled on its own (with its colour bar)."""
    maps = analysis.cls_maps(layer)
    tiles = [paint(thumb, m, style, "" if legend else None) for m in [*maps, maps.mean(0)]]
    labels = [*(f"head {h}" for h in range(len(maps))), "mean"]
    return visualizer.head_grid(tiles, labels, columns=math.ceil(math.sqrt(2 * len(tiles))), tile_width=224)


def patch_view(analysis: Analysis, base: Image.Image, row: int, col: int, layer: int, head: "int | str",
               direction: str, style: Style, legend: bool = False) -> tuple[Image.Image, np.ndarray]:
    """What patch (row, col) attends to (direction "row") or what attends to it ("column"), marked."""
    values = analysis.query_map(analysis.token_at(row, col), layer, head, direction)
    what = "what it attends to" if direction == "row" else "what attends to it"
    text = f"patch ({row}, {col}): {what} · layer {layer} · {head_label(head)}" if legend else None
    return paint(base, values, style, text, box_on(analysis, base, row, col)), values


def rollout_view(analysis: Analysis, base: Image.Image, fusion: str, discard_ratio: float, style: Style,
                 legend: bool = False, progress: Callable[[float], None] | None = None) -> Image.Image:
    values = analysis.rollout_map(fusion, discard_ratio, progress=progress)
    text = f"rollout · heads fused by {fusion} · discard ratio {discard_ratio:g}" if legend else None
    return paint(base, values, style, text)


def flow_view(analysis: Analysis, base: Image.Image, fusion: str, style: Style, legend: bool = False,
              progress: Callable[[float], None] | None = None) -> Image.Image:
    text = f"attention flow · heads fused by {fusion}" if legend else None
    return paint(base, analysis.flow_map(fusion, progress), style, text)


def atlas_view(analysis: Analysis, style: Style, selected: tuple[int, int] | None = None, shared: bool = False,
               thumb_width: int = 120) -> tuple[Image.Image, visualizer.AtlasLayout]:
    """Every layer × head class-token map as thumbnails (rows: layers, columns: heads), scaled as the main view."""
    maps = np.stack([analysis.cls_maps(layer) for layer in range(analysis.num_layers)])
    value_range = visualizer.scale_range(maps, style.normalize) if shared else None
    image, layout = visualizer.atlas(maps, style.cmap, style.normalize, thumb_width, selected, value_range)
    if value_range is None:  # each thumbnail from its own low to its own high value
        return visualizer.with_colorbar(image, style.cmap, 0, 1, f"{summary_name(analysis)}: each thumbnail from its "
                                        f"own low (0) to its own high (1), scaled '{style.normalize}'"), layout
    return visualizer.with_colorbar(image, style.cmap, *value_range, f"{summary_name(analysis)}, one scale"), layout


def distance_figure(statistics, selected: tuple[int, int] | None = None) -> Image.Image:
    """Dosovitskiy et al. 2021, fig. 7: each head's mean attention distance in pixels against layer depth."""
    return visualizer.depth_scatter(statistics.mean_distance_px, "mean attention distance (pixels)",
                                    f"Mean attention distance per head against depth ({statistics.num_queries} "
                                    "queries per layer)", selected)


def atlas_thumb_width(num_heads: int) -> int:
    return int(np.clip(840 // max(1, num_heads), 48, 120))


def hidden_views(analysis: Analysis, base: Image.Image, layer: int, marker: tuple[int, int], style: Style,
                 legend: bool = False) -> tuple[Image.Image, Image.Image, Image.Image, int]:
    """Token norms with outliers outlined, PCA of the features as RGB, cosine similarity to the marked patch."""
    norms, outliers = analysis.norm_map(layer)
    plain = replace(style, normalize="minmax", smooth=False, mass=None)
    norm_image = paint(base, norms, plain)
    boxes = [box_on(analysis, base, r, c) for r, c in zip(*np.nonzero(outliers))]
    if boxes:
        norm_image = visualizer.mark_patches(norm_image, boxes, color=(255, 64, 64))
    if legend:
        norm_image = visualizer.with_colorbar(norm_image, style.cmap, float(norms.min()), float(norms.max()),
                                              f"token norm after layer {layer}")
    pca = visualizer.rgb_image(analysis.pca_map(layer), base.size)
    token = analysis.token_at(*marker)
    similarity = paint(base, analysis.similarity_map(layer, token), replace(style, normalize="none", mass=None),
                       f"cosine similarity to patch {marker} after layer {layer}" if legend else None,
                       box_on(analysis, base, *marker))
    return norm_image, pca, similarity, len(boxes)


def layer_animation(analysis: Analysis, base: Image.Image, mode: str, head: "int | str", style: Style,
                    progress: Callable[[float], None] | None = None) -> bytes:
    """A GIF through the layers: the class-token map of `head` ("cls"), or rollout up to each layer ("rollout")."""
    frames, captions = [], []
    fusion = head if isinstance(head, str) else "mean"
    for layer in range(analysis.num_layers):
        values = analysis.cls_map(layer, head) if mode == "cls" else analysis.rollout_map(fusion, last_layer=layer)
        frames.append(paint(base, values, style))
        captions.append(f"layer {layer}" + (f" · {head_label(head)}" if mode == "cls" else f" · rollout ({fusion})"))
        if progress is not None:
            progress((layer + 1) / analysis.num_layers)
    return visualizer.animation_gif(frames, 500, captions=captions)


REMOVAL_LABELS = {"drop": "tokens dropped from the sequence",
                  "pixels": "pixels set to black before normalising (Chefer et al.'s code)"}


def faithfulness_plot(result: Faithfulness) -> Image.Image:
    """Every map's positive and negative perturbation curves with their areas, random orders with their spread."""
    curves = {name: (curve.positive, curve.negative, curve.spread) for name, curve in result.curves.items()}
    areas = {name: (curve.positive_auc, curve.negative_auc) for name, curve in result.curves.items()}
    return visualizer.perturbation_plot(result.fractions, curves, areas, result.score,
                                        f"Target {result.target}, patches removed as {REMOVAL_LABELS[result.removal]}")
