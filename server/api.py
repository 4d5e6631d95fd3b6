"""The named API endpoints: every view for an image sent by a client (gradio_client), no page state needed.

Each endpoint turns its parameters (names and defaults are the public API) into a `Subject` and `Controls`, then
calls the handler the page calls too (`server.handlers`). Every parameter arrives as raw JSON and is checked in
`explorer.inputs`; images must be uploads (gradio_client's handle_file). Annotations are real types (no
`from __future__ import annotations`): Gradio reads them to document the endpoints."""
import gradio as gr
from gradio.data_classes import FileData

import visualizer
from analysis import STAT_LABELS
from explorer import drawing
from explorer.inputs import ANIMATIONS, DEFAULT_RESOLUTION, Controls, choice, point, prompt_list, uploaded_file

from . import handlers
from .handlers import guarded, open_upload, write_png
from .workspace import Workspace


class Api:
    """The endpoints, bound to the shared workspace."""

    def __init__(self, workspace: Workspace):
        self.workspace = workspace

    def cls_attention(self, image: FileData, layer: int = -1, head: str = "mean", resolution: int = DEFAULT_RESOLUTION,
                      opacity: float = 0.6, colormap: str = "inferno",
                      model: str = "default") -> tuple[FileData, FileData, dict]:
        """The class token's attention in `layer` (negative counts from the end): the overlay for `head`
        (an index, or mean/max/min), the grid of all heads, and every head's map as numbers."""
        s = open_upload(self.workspace, image, resolution, model)
        c = Controls.parse(s.analysis, {"layer": layer, "head": head, "opacity": opacity, "cmap": colormap})
        drawn, a = handlers.class_token(s, c, page=False), s.analysis
        maps = a.cls_maps(c.layer)
        payload = {"model": a.model_name, "summary": a.summary.to_dict(), "layer": c.layer, "num_heads": len(maps),
                   "grid_h": a.geometry.grid_h, "grid_w": a.geometry.grid_w, "geometry": a.geometry.to_dict(),
                   "maps": maps.round(7).tolist()}
        if a.summary.class_token:
            payload["cls_self_attention"] = a.cls_attention[c.layer, :, 0].tolist()
        if a.summary.pooling:
            payload["pooling_maps"] = a.to_grid(a.pooling_attention).round(7).tolist()
        ws = self.workspace
        return write_png(ws, drawn["main"], "cls_attention"), write_png(ws, drawn["grid"], "head_grid"), payload

    def patch_attention(self, image: FileData, x: float, y: float, layer: int = -1, head: str = "mean",
                        direction: str = "row", resolution: int = DEFAULT_RESOLUTION, opacity: float = 0.6,
                        colormap: str = "inferno", model: str = "default") -> tuple[FileData, dict]:
        """What the patch under pixel (x, y) of the original image attends to (direction "row") or what
        attends to it ("column"), in `layer` for `head`."""
        s = open_upload(self.workspace, image, resolution, model)
        c = Controls.parse(s.analysis, {"layer": layer, "head": head, "direction": direction, "opacity": opacity,
                                        "cmap": colormap})
        row, col, _ = drawing.patch_at(s.analysis, *point(x, y, s.analysis))
        overlay, values, _ = handlers.patch(s, c, False, row, col)
        return write_png(self.workspace, overlay, "patch_attention"), {
            "row": row, "col": col, "layer": c.layer, "head": c.head, "direction": c.direction,
            "map": values.round(7).tolist()}

    def rollout(self, image: FileData, fusion: str = "mean", discard_ratio: float = 0.0,
                resolution: int = DEFAULT_RESOLUTION, model: str = "default") -> tuple[FileData, dict]:
        """Attention rollout of the class token over all layers, heads fused by mean, max or min."""
        s = open_upload(self.workspace, image, resolution, model)
        c = Controls.parse(s.analysis, {"fusion": fusion, "discard": discard_ratio})
        overlay, _ = handlers.rollout(s, c, False)
        return write_png(self.workspace, overlay, "rollout"), {
            "fusion": c.fusion, "discard_ratio": c.discard, "summary": s.analysis.summary.to_dict(),
            "map": s.analysis.rollout_map(c.fusion, c.discard).round(8).tolist()}

    def attention_flow(self, image: FileData, fusion: str = "mean", resolution: int = 336,
                       model: str = "default") -> tuple[FileData, dict]:
        """Attention flow (max-flow) to the class token from each patch; up to 577 tokens."""
        s = open_upload(self.workspace, image, resolution, model)
        c = Controls.parse(s.analysis, {"fusion": fusion})
        overlay = handlers.flow(self.workspace, s, c, False)
        return write_png(self.workspace, overlay, "attention_flow"), {
            "fusion": c.fusion, "summary": s.analysis.summary.to_dict(),
            "map": s.analysis.flow_map(c.fusion).round(7).tolist()}

    def head_statistics(self, image: FileData, resolution: int = DEFAULT_RESOLUTION, queries: str = "spread",
                        model: str = "default") -> dict:
        """Per layer × head statistics (see "labels"): over 512 patch queries spread over the grid ("spread"),
        or over every query ("all", exact)."""
        s = open_upload(self.workspace, image, resolution, model)
        stats = handlers.statistics(s, Controls.parse(s.analysis, {"stat_mode": queries}).stat_mode)
        return visualizer.jsonable({"labels": STAT_LABELS, "summary": s.analysis.summary.to_dict(),
                                    "num_queries": stats.num_queries,
                                    **{name: values.round(6) for name, values in stats.as_dict().items()}})

    def attention_distance(self, image: FileData, resolution: int = DEFAULT_RESOLUTION, queries: str = "spread",
                           model: str = "default") -> tuple[FileData, dict]:
        """Dosovitskiy et al. 2021, fig. 7: every head's mean attention distance (pixels of the model input)
        against layer depth, as a scatter plot and as numbers."""
        s = open_upload(self.workspace, image, resolution, model)
        stats = handlers.statistics(s, Controls.parse(s.analysis, {"stat_mode": queries}).stat_mode)
        return write_png(self.workspace, drawing.distance_figure(stats), "mean_attention_distance"), {
            "definition": STAT_LABELS["mean_distance_px"], "num_queries": stats.num_queries,
            "patch_size": s.analysis.geometry.patch_size, "mean_distance_px": stats.mean_distance_px.round(4).tolist()}

    def hidden_states(self, image: FileData, layer: int = -1, x: float = 0.0, y: float = 0.0,
                      resolution: int = DEFAULT_RESOLUTION,
                      model: str = "default") -> tuple[FileData, FileData, FileData, dict]:
        """After `layer`: token norms with outliers outlined, PCA as RGB, cosine similarity to the patch at (x, y)."""
        s = open_upload(self.workspace, image, resolution, model)
        c = Controls.parse(s.analysis, {"layer": layer})
        row, col, _ = drawing.patch_at(s.analysis, *point(x, y, s.analysis))
        drawn = handlers.hidden(s, c, False, row, col)
        values, flags = s.analysis.norm_map(c.layer)
        ws = self.workspace
        return (write_png(ws, drawn["norms"], "token_norms"), write_png(ws, drawn["pca"], "pca"),
                write_png(ws, drawn["similarity"], "similarity"),
                {"layer": c.layer, "norms": values.round(5).tolist(), "outliers": flags.tolist()})

    def layer_animation(self, image: FileData, mode: str = "cls", head: str = "mean",
                        resolution: int = DEFAULT_RESOLUTION, model: str = "default") -> FileData:
        """A GIF through the layers: the class-token map of `head` ("cls") or rollout up to each layer."""
        s = open_upload(self.workspace, image, resolution, model)
        mode = choice(mode, "mode", ANIMATIONS)
        return handlers.animation(self.workspace, s, Controls.parse(s.analysis, {"head": head}), mode)

    def export(self, image: FileData, layer: int = -1, head: str = "mean", x: float = 0.0, y: float = 0.0,
               resolution: int = DEFAULT_RESOLUTION, fusion: str = "mean", discard_ratio: float = 0.0,
               model: str = "default") -> tuple[FileData, FileData]:
        """The numbers behind the views as .npz with a .json sidecar (model, resolution, grid, alignment, settings)."""
        s = open_upload(self.workspace, image, resolution, model)
        c = Controls.parse(s.analysis, {"layer": layer, "head": head, "fusion": fusion, "discard": discard_ratio})
        token = drawing.patch_at(s.analysis, *point(x, y, s.analysis))[2]
        return handlers.export(self.workspace, s, c, token, {})

    def predict(self, image: FileData, resolution: int = DEFAULT_RESOLUTION, model: str = "default") -> dict:
        """The model's own output: the top 5 classes with their probabilities and logits (a classifier), or the
        saliency map over the model input as numbers (the default model's decoder); "kind" says which, "embedding"
        when the model has no head (explain its features instead)."""
        s = open_upload(self.workspace, image, resolution, model)
        out = handlers.prediction(self.workspace, s)
        if "saliency" in out:
            out["saliency"] = out["saliency"].round(5).tolist()
        return {"model": s.analysis.model_name, "geometry": s.analysis.geometry.to_dict(), **out}

    def zero_shot(self, image: FileData, prompts: str, resolution: int = DEFAULT_RESOLUTION,
                  model: str = "default") -> dict:
        """An image-text model's (CLIP, SigLIP, open_clip) scores for `prompts` (one per line, at most 32 of 300
        characters): "scores" in the prompts' order (softmax over them for CLIP, each prompt's sigmoid for SigLIP),
        "logits" (logit_scale·cos, plus SigLIP's bias) and "kind" ("softmax" or "sigmoid")."""
        uploaded_file(image, "image", self.workspace.upload_roots)  # an upload, checked first as everywhere
        checked = prompt_list(prompts)
        handlers.require_text(self.workspace, model)  # before any analysis
        s = open_upload(self.workspace, image, resolution, model)
        result = handlers.scores(self.workspace, s, checked)
        return {"model": s.analysis.model_name, "prompts": result.prompts, "scores": result.scores,
                "logits": result.logits, "kind": result.kind}

    def relevance(self, image: FileData, target: str = "top", method: str = "relevance",
                  resolution: int = DEFAULT_RESOLUTION, model: str = "default",
                  discard_ratio: float = 0.0) -> tuple[FileData, dict]:
        """Which patches made the output `target` ("top", "class:N", "embedding", "patch:X,Y" for the patch under
        pixel X,Y, "region" for the saliency decoder's predicted region, "text:PROMPT" for an image-text model's
        similarity with the prompt): the map of `method` ("relevance", "grad_rollout", "rollout", "attention") over
        the image, and its numbers on the patch grid."""
        s = open_upload(self.workspace, image, resolution, model, explain=method in ("relevance", "grad_rollout"))
        c = Controls.parse(s.analysis, {"target": target, "method": method, "discard": discard_ratio})
        overlay, e = handlers.explanation(self.workspace, s, c, False)
        out = {"target": str(e.target), "method": e.method, "explained": e.description, "discard_ratio": c.discard,
               "grid_h": s.analysis.geometry.grid_h, "grid_w": s.analysis.geometry.grid_w,
               "map": e.values.round(7).tolist()}
        predicted = handlers.prediction(self.workspace, s)
        if predicted["kind"] == "classes":
            out["top5"] = predicted["top5"]
        return write_png(self.workspace, overlay, f"{e.method}"), out

    def faithfulness(self, image: FileData, target: str = "top", removal: str = "drop",
                     resolution: int = DEFAULT_RESOLUTION, model: str = "default") -> tuple[FileData, dict]:
        """Which map to trust for `target` (the targets of /relevance): positive and negative perturbation curves
        (Chefer et al. 2021) of every /relevance method and of random orders, patches removed by dropping their
        tokens ("drop") or blacking their pixels ("pixels"). The dict: "fractions" (0, 0.1, … 0.9 of the patches
        removed), per map under "maps" the scores "positive" and "negative" at each fraction and their trapezoidal
        areas "positive_auc" (lower is better) and "negative_auc" (higher is better), "score" in words, "verdict"."""
        s = open_upload(self.workspace, image, resolution, model, explain=True)
        c = Controls.parse(s.analysis, {"target": target, "removal": removal})
        plot, result = handlers.perturbation(self.workspace, s, c)
        return write_png(self.workspace, plot, "faithfulness"), {**result.to_dict(),
                                                                 "verdict": handlers.verdict(result)}

    def register(self) -> None:
        """Adds the endpoints to the Blocks being built, all in the one concurrency group that runs the model."""
        for endpoint in (self.cls_attention, self.patch_attention, self.rollout, self.attention_flow,
                         self.head_statistics, self.attention_distance, self.hidden_states, self.layer_animation,
                         self.export, self.predict, self.relevance, self.faithfulness, self.zero_shot):
            gr.api(guarded(endpoint), api_name=endpoint.__name__, concurrency_id="model")

