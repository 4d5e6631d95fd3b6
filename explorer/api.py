"""The named API endpoints: every view for an image sent by a client (gradio_client), no page state needed.

Every parameter arrives as raw JSON and is checked in `explorer.handlers` / `explorer.inputs`; images must be
uploads (gradio_client's handle_file). Annotations are real types (no `from __future__ import annotations`):
Gradio reads them to document the endpoints."""
import gradio as gr
from gradio.data_classes import FileData

import visualizer
from analysis import FUSIONS, STAT_LABELS

from . import exports, views
from .handlers import Handlers, check_discard, check_stat_mode, check_style, guarded, layer_and_head, point, statistics
from .inputs import UserError, choice, layer_index
from .session import DEFAULT_RESOLUTION

MODES = ("cls", "rollout")
API_STYLE = views.Style()


class Api(Handlers):
    def cls_attention(self, image: FileData, layer: int = -1, head: str = "mean", resolution: int = DEFAULT_RESOLUTION,
                      opacity: float = 0.6, colormap: str = "inferno",
                      model: str = "default") -> tuple[FileData, FileData, dict]:
        """The class token's attention in `layer` (negative counts from the end): the overlay for `head`
        (an index, or mean/max/min), the grid of all heads, and every head's map as numbers."""
        _, scene, analysis, _ = self.open(image, resolution, model)
        layer, head = layer_and_head(analysis, layer, head)
        style = check_style(opacity, colormap)
        overlay = views.cls_view(analysis, scene.large, layer, head, style)
        grid = views.head_grid(analysis, scene.thumb, layer, style)
        maps = analysis.cls_maps(layer)
        payload = {"model": analysis.model_name, "summary": analysis.summary.to_dict(), "layer": layer,
                   "num_heads": len(maps), "grid_h": analysis.geometry.grid_h, "grid_w": analysis.geometry.grid_w,
                   "geometry": analysis.geometry.to_dict(), "maps": maps.round(7).tolist()}
        if analysis.summary.class_token:
            payload["cls_self_attention"] = analysis.cls_attention[layer, :, 0].tolist()
        if analysis.summary.pooling:
            payload["pooling_maps"] = analysis.to_grid(analysis.pooling_attention).round(7).tolist()
        return self.png(overlay, "cls_attention"), self.png(grid, "head_grid"), payload

    def patch_attention(self, image: FileData, x: float, y: float, layer: int = -1, head: str = "mean",
                        direction: str = "row", resolution: int = DEFAULT_RESOLUTION, opacity: float = 0.6,
                        colormap: str = "inferno", model: str = "default") -> tuple[FileData, dict]:
        """What the patch under pixel (x, y) of the original image attends to (direction "row") or what
        attends to it ("column"), in `layer` for `head`."""
        _, scene, analysis, _ = self.open(image, resolution, model)
        layer, head = layer_and_head(analysis, layer, head)
        row, col, _ = views.patch_at(analysis, *point(x, y, analysis))
        direction = choice(direction, "direction", ("row", "column"))
        style = check_style(opacity, colormap)
        overlay, values = views.patch_view(analysis, scene.large, row, col, layer, head, direction, style)
        return self.png(overlay, "patch_attention"), {"row": row, "col": col, "layer": layer, "head": head,
                                                      "direction": direction, "map": values.round(7).tolist()}

    def rollout(self, image: FileData, fusion: str = "mean", discard_ratio: float = 0.0,
                resolution: int = DEFAULT_RESOLUTION, model: str = "default") -> tuple[FileData, dict]:
        """Attention rollout of the class token over all layers, heads fused by mean, max or min."""
        _, scene, analysis, _ = self.open(image, resolution, model)
        fusion, discard = choice(fusion, "fusion", FUSIONS), check_discard(discard_ratio)
        overlay = views.rollout_view(analysis, scene.large, fusion, discard, API_STYLE)
        values = analysis.rollout_map(fusion, discard)
        return self.png(overlay, "rollout"), {"fusion": fusion, "discard_ratio": discard,
                                              "summary": analysis.summary.to_dict(), "map": values.round(8).tolist()}

    def attention_flow(self, image: FileData, fusion: str = "mean", resolution: int = 336,
                       model: str = "default") -> tuple[FileData, dict]:
        """Attention flow (max-flow) to the class token from each patch; up to 577 tokens."""
        _, scene, analysis, key = self.open(image, resolution, model)
        fusion = choice(fusion, "fusion", FUSIONS)
        note, offered = self.flow_offer(analysis, scene, key)
        if not offered:
            raise UserError(note.replace("**", ""))
        overlay = views.flow_view(analysis, scene.large, fusion, API_STYLE)
        return self.png(overlay, "attention_flow"), {"fusion": fusion, "summary": analysis.summary.to_dict(),
                                                     "map": analysis.flow_map(fusion).round(7).tolist()}

    def head_statistics(self, image: FileData, resolution: int = DEFAULT_RESOLUTION, queries: str = "spread",
                        model: str = "default") -> dict:
        """Per layer × head statistics (see "labels"): over 512 patch queries spread over the grid ("spread"),
        or over every query ("all", exact)."""
        _, _, analysis, _ = self.open(image, resolution, model)
        stats = statistics(analysis, check_stat_mode(queries))
        return visualizer.jsonable({"labels": STAT_LABELS, "summary": analysis.summary.to_dict(),
                                    "num_queries": stats.num_queries,
                                    **{name: values.round(6) for name, values in stats.as_dict().items()}})

    def attention_distance(self, image: FileData, resolution: int = DEFAULT_RESOLUTION, queries: str = "spread",
                           model: str = "default") -> tuple[FileData, dict]:
        """Dosovitskiy et al. 2021, fig. 7: every head's mean attention distance (pixels of the model input)
        against layer depth, as a scatter plot and as numbers."""
        _, _, analysis, _ = self.open(image, resolution, model)
        stats = statistics(analysis, check_stat_mode(queries))
        figure = views.distance_figure(stats)
        return self.png(figure, "mean_attention_distance"), {
            "definition": STAT_LABELS["mean_distance_px"], "num_queries": stats.num_queries,
            "patch_size": analysis.geometry.patch_size, "mean_distance_px": stats.mean_distance_px.round(4).tolist()}

    def hidden_states(self, image: FileData, layer: int = -1, x: float = 0.0, y: float = 0.0,
                      resolution: int = DEFAULT_RESOLUTION,
                      model: str = "default") -> tuple[FileData, FileData, FileData, dict]:
        """After `layer`: token norms with outliers outlined, PCA as RGB, cosine similarity to the patch at (x, y)."""
        _, scene, analysis, _ = self.open(image, resolution, model)
        layer = layer_index(layer, analysis.num_layers)
        row, col, _ = views.patch_at(analysis, *point(x, y, analysis))
        norms, pca, similarity, _ = views.hidden_views(analysis, scene.large, layer, (row, col), API_STYLE)
        values, flags = analysis.norm_map(layer)
        return (self.png(norms, "token_norms"), self.png(pca, "pca"), self.png(similarity, "similarity"),
                {"layer": layer, "norms": values.round(5).tolist(), "outliers": flags.tolist()})

    def layer_animation(self, image: FileData, mode: str = "cls", head: str = "mean",
                        resolution: int = DEFAULT_RESOLUTION, model: str = "default") -> FileData:
        """A GIF through the layers: the class-token map of `head` ("cls") or rollout up to each layer."""
        _, scene, analysis, _ = self.open(image, resolution, model)
        mode, (_, head) = choice(mode, "mode", MODES), layer_and_head(analysis, -1, head)
        frames, captions = views.layer_frames(analysis, scene.page, mode, head, API_STYLE)
        return self.file(visualizer.animation_gif(frames, 500, captions=captions), f"{mode}_layers.gif")

    def export(self, image: FileData, layer: int = -1, head: str = "mean", x: float = 0.0, y: float = 0.0,
               resolution: int = DEFAULT_RESOLUTION, fusion: str = "mean", discard_ratio: float = 0.0,
               model: str = "default") -> tuple[FileData, FileData]:
        """The numbers behind the views as .npz with a .json sidecar (model, resolution, grid, alignment, settings)."""
        _, _, analysis, _ = self.open(image, resolution, model)
        layer, head = layer_and_head(analysis, layer, head)
        token = views.patch_at(analysis, *point(x, y, analysis))[2]
        settings = {"fusion": choice(fusion, "fusion", FUSIONS), "discard_ratio": check_discard(discard_ratio)}
        npz, sidecar = exports.numbers(analysis, layer, head, token, settings)
        return self.file(npz, "analysis.npz"), self.file(sidecar, "analysis.json")

    def register(self) -> None:
        """Adds the endpoints to the Blocks being built, all in the one concurrency group that runs the model."""
        for endpoint in (self.cls_attention, self.patch_attention, self.rollout, self.attention_flow,
                         self.head_statistics, self.attention_distance, self.hidden_states, self.layer_animation,
                         self.export):
            gr.api(guarded(endpoint), api_name=endpoint.__name__, concurrency_id="model")
