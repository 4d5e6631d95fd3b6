"""One handler per view or endpoint, shared by the page (`server.page`) and the API (`server.api`): each takes a
`Subject` (an image analysed at the settings a request names) and the checked `Controls`, and returns what is
drawn and the numbers behind it. The page's adapters and the endpoints only turn their arguments into these."""
from __future__ import annotations

import dataclasses
import functools
import html
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gradio as gr
import numpy as np
import torch
from gradio.data_classes import FileData
from PIL import Image

import visualizer
from analysis import (DTYPES, METHODS, STAT_LABELS, Analysis, Explanation, Faithfulness, HeadStatistics, TargetError,
                      TextError, ZeroShot, explain, faithfulness, predicted_saliency, predictions, zero_shot)
from analysis.faithfulness import RANDOM, RANDOM_SEEDS
from analysis.text import text_model
from analysis.flow import MAX_FLOW_TOKENS
from explorer import drawing, exports
from explorer.drawing import Scene
from explorer.inputs import (MIN_RESOLUTION, STAT_MODES, Controls, UserError, check_resolution, choice, model_name,
                             resolution_limits)
from model import CheckpointError, InvalidImageError
from model.heads import ClassifierHead, SaliencyDecoder

from .workspace import AnalysisKey, View, Workspace

logger = logging.getLogger("vit-inspect")
USER_ERRORS = (UserError, InvalidImageError, CheckpointError, TargetError, TextError)
METHOD_LABELS = {"relevance": "relevance (Chefer et al. 2021b)", "grad_rollout": "gradient rollout (vit-explain)",
                 "rollout": "attention rollout", "attention": "last layer's attention"}
FLOW_SECONDS_AT_LIMIT = 81.0  # bench_analysis.py --flow 336: 12 layers, 577 tokens, 2-core CPU; ∝ layers × N³
Progress = Callable[[float], None]
# A page event's progress bar is sent at most this often: each message costs the visitor's page 10–50 ms of its main
# thread (Gradio's client updates the loading state of every component that has ever been an event's output), which
# on a machine shared with the server is taken from the model (a 518 px analysis sent 14, one a layer).
PROGRESS_EVERY_S = 0.5


def user_message(err: Exception) -> str:
    """What a visitor is told about a failure: our own messages as they are, anything else only that it happened."""
    if isinstance(err, gr.Error):
        return str(err.message)
    if isinstance(err, USER_ERRORS):
        return str(err)
    if isinstance(err, (MemoryError, torch.OutOfMemoryError)):
        return "Out of memory at this resolution: try a smaller one."
    logger.error("request failed", exc_info=err)
    return "Something went wrong on the server (it has been logged). Try another image or setting."


def guarded(fn: Callable) -> Callable:
    """Any failure becomes a plain message (never a stack trace or a server path); the app keeps serving."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except Exception as err:
            raise gr.Error(html.escape(user_message(err), quote=False), print_exception=False) from None
    return wrapper


def paced(progress: Callable[..., Any], desc: str | None = None, every: float = PROGRESS_EVERY_S,
          clock: Callable[[], float] = time.monotonic) -> Callable[..., None]:
    """`progress` (a gr.Progress) called as report(fraction[, desc]), passed on at most once every `every` seconds:
    the first call at once, the calls in between dropped (the bar shows the latest sent)."""
    sent = -math.inf

    def report(fraction: float, text: str | None = desc) -> None:
        nonlocal sent
        now = clock()
        if now - sent >= every:
            sent = now
            progress(fraction, desc=text)
    return report


def warn(message: str) -> None:
    gr.Warning(html.escape(message, quote=False))


@dataclass(frozen=True)
class Subject:
    """An image and the analysis a request names: what every view is drawn from."""

    key: AnalysisKey
    source: str  # the upload the image came from
    scene: Scene
    analysis: Analysis


def open_upload(ws: Workspace, image: Any, resolution: Any, model: Any = "default", dtype: Any = "float32",
                progress: Callable[[float, str], None] | None = None, explain: bool = False) -> Subject:
    """Checks an upload and the analysis settings; the (cached or new) analysis, which keeps its attention
    outputs too when it is made to `explain` an output (see `analyze`'s keep_outputs)."""
    source, scene = ws.upload(image, "image", warn)
    key = ws.key(scene, check_resolution(resolution), model_name(model), precision(ws, dtype))
    return Subject(key, source, scene, ws.analysis(key, source, progress, keep_outputs=explain))


def open_view(ws: Workspace, view: View) -> Subject:
    """What a page visitor is looking at (analysed again if the cache dropped it)."""
    analysis = ws.analysis(view.key, view.source)
    return Subject(view.key, view.source, ws.scene(view.source, digest=view.key.digest), analysis)


def precision(ws: Workspace, value: Any) -> str:
    dtype = choice(value, "precision", tuple(DTYPES))
    if dtype != "float32" and ws.models.device_type != "cuda":
        raise UserError("Half precision is offered on a GPU only; on this server the analysis runs in float32.")
    return dtype


def write(ws: Workspace, data: bytes, name: str) -> FileData:
    """Bytes written to the managed folder (by content: the same output twice is one file)."""
    return FileData(path=str(ws.files.put(data, name)))


def write_png(ws: Workspace, image: Image.Image, name: str) -> FileData:
    return write(ws, visualizer.png_bytes(image), f"{name}.png")


# ---- the views: `page` draws on the page's copy of the image with colour bars; else on the large copy, bare, so that
# a client's overlay has the original image's proportions ----
def base(s: Subject, page: bool) -> Image.Image:
    return s.scene.page if page else s.scene.large


def class_token(s: Subject, c: Controls, page: bool, marker: tuple[int, int] | None = None) -> dict:
    """The class token's map of the layer and head (with the clicked patch marked), every head of the layer, and the
    model's other summary where it has one (the pooling probe's or the distillation token's map)."""
    a = s.analysis
    second = drawing.second_view(a, base(s, page), c.layer, c.head, c.style)
    return {"main": class_token_map(s, c, page, marker),
            "grid": drawing.head_grid(a, s.scene.thumb, c.layer, c.style, legend=page),
            **({"second": second} if second is not None else {})}


def class_token_map(s: Subject, c: Controls, page: bool, marker: tuple[int, int] | None = None) -> Image.Image:
    """The class token's map of the layer and head alone (a new image's first map)."""
    return drawing.cls_view(s.analysis, base(s, page), c.layer, c.head, c.style, legend=page, marker=marker)


def patch(s: Subject, c: Controls, page: bool, row: int, col: int) -> tuple[Image.Image, np.ndarray, str]:
    """What the patch at (row, col) attends to, or what attends to it: the map, its values and a caption."""
    image, values = drawing.patch_view(s.analysis, base(s, page), row, col, c.layer, c.head, c.direction, c.style,
                                       legend=page)
    left, top, right, bottom = s.analysis.geometry.patch_box(row, col)
    caption = (f"Clicked patch: **row {row}, column {col}** (pixels x {left:.0f}–{right:.0f}, y {top:.0f}–"
               f"{bottom:.0f} of the original). Right: "
               f"{'what it attends to' if c.direction == 'row' else 'what attends to it'} in layer {c.layer}, "
               f"{drawing.head_label(c.head)}. Click either map to move it.")
    return image, values, caption


def rollout(s: Subject, c: Controls, page: bool, progress: Progress | None = None) -> tuple[Image.Image, str]:
    image = drawing.rollout_view(s.analysis, base(s, page), c.fusion, c.discard, c.style, legend=page,
                                 progress=progress)
    caption = (f"Rollout with heads fused by **{c.fusion}** and discard ratio **{c.discard:g}**, through all "
               f"{s.analysis.num_layers} layers, from {s.analysis.summary.rollout_top}.")
    return image, caption


def flow_offer(ws: Workspace, s: Subject) -> tuple[str, bool]:
    """What to say about attention flow for this analysis, and whether it is offered."""
    preprocessing = ws.models.get(s.key.model, s.key.dtype).preprocessing
    image = s.scene.image
    return describe_flow(s.analysis, lambda side: preprocessing.geometry(image.height, image.width, side),
                         s.key.resolution)


def flow(ws: Workspace, s: Subject, c: Controls, page: bool, progress: Progress | None = None) -> Image.Image:
    note, offered = flow_offer(ws, s)
    if not offered:
        raise UserError(note.replace("**", ""))
    return drawing.flow_view(s.analysis, base(s, page), c.fusion, c.style, legend=page, progress=progress)


def statistics(s: Subject, stat_mode: str, progress: Progress | None = None) -> HeadStatistics:
    """The head statistics over 512 spread patch queries, or over every one (exact; from the kept inputs)."""
    return s.analysis.statistics_for(STAT_MODES[stat_mode], progress)


def heads(s: Subject, c: Controls) -> dict:
    """The layer × head atlas, a statistic as a heatmap, fig. 7, and the statistics as a table."""
    a = s.analysis
    selected = (c.layer, c.head) if isinstance(c.head, int) else None
    atlas, _ = drawing.atlas_view(a, c.style, selected, c.atlas_shared, drawing.atlas_thumb_width(a.num_heads))
    stats = statistics(s, c.stat_mode)
    chart = visualizer.stats_heatmap(stats.as_dict()[c.statistic], STAT_LABELS[c.statistic], "viridis",
                                     selected=selected)
    return {"atlas": atlas, "chart": chart, "scatter": drawing.distance_figure(stats, selected),
            "table": stats_table(stats)}


def hidden(s: Subject, c: Controls, page: bool, row: int, col: int) -> dict:
    norms, pca, similarity, outliers = drawing.hidden_views(s.analysis, base(s, page), c.layer, (row, col), c.style,
                                                            legend=page)
    if outliers:
        found = f"**{outliers} high-norm token(s)** outlined in red on the norm map."
    else:
        found = ("No high-norm outlier token after this layer (none more than 6 robust deviations and twice the "
                 "median norm); models without registers show them mostly in the later layers.")
    caption = f"After layer {c.layer}. {found} PCA: the first three principal components of the patch features as RGB."
    return {"norms": norms, "pca": pca, "similarity": similarity, "hidden_caption": caption}


def prediction(ws: Workspace, s: Subject, saliency: bool = True) -> dict:
    """The model's own output for the image: its top 5 classes, its saliency map (input_h × input_w in [0, 1]; only
    the kind without `saliency`), or, without a head, nothing but the embedding targets."""
    loaded = ws.models.get(s.key.model, s.key.dtype)
    if isinstance(loaded.head, ClassifierHead):
        return {"kind": "classes", "top5": [dataclasses.asdict(p) for p in predictions(loaded, s.analysis, 5)]}
    if isinstance(loaded.head, SaliencyDecoder):
        return {"kind": "saliency", **({"saliency": predicted_saliency(loaded, s.analysis)} if saliency else {})}
    return {"kind": "embedding"}


def explanation(ws: Workspace, s: Subject, c: Controls, page: bool,
                progress: Progress | None = None) -> tuple[Image.Image, Explanation]:
    """The map of `c.method` for `c.target` over the image, with its colour bar on the page."""
    e = explain(ws.models.get(s.key.model, s.key.dtype), s.analysis, c.target, c.method, c.discard, progress)
    legend = f"{METHOD_LABELS[e.method]} · {e.description}" if page else None
    return drawing.paint(base(s, page), e.values, c.style, legend), e


def explanation_strip(ws: Workspace, s: Subject, c: Controls, progress: Progress | None = None) -> Image.Image:
    """The four maps of every method for the same target, side by side, each on its own scale."""
    loaded = ws.models.get(s.key.model, s.key.dtype)
    maps = [explain(loaded, s.analysis, c.target, method, c.discard, progress).values for method in METHODS]
    tiles = [drawing.paint(s.scene.thumb, values, c.style, "") for values in maps]
    return visualizer.head_grid(tiles, [METHOD_LABELS[m] for m in METHODS], columns=4, tile_width=224)


def perturbation(ws: Workspace, s: Subject, c: Controls, progress: Progress | None = None,
                 cached_only: bool = False) -> tuple[Image.Image | None, Faithfulness]:
    """Positive and negative perturbation curves of every offered map (and random orders) for `c.target`, removing
    patches as `c.removal` says, within the server's time limit for one analysis; and their plot (None when
    `cached_only` finds nothing computed yet)."""
    loaded = ws.models.get(s.key.model, s.key.dtype)
    pixels = (loaded.preprocessing(s.scene.image, s.key.resolution)[0]
              if c.removal == "pixels" and not cached_only else None)
    result = faithfulness(loaded, s.analysis, c.target, c.removal, pixels, c.layer, c.discard,
                          ws.limits.deadline().progress(progress), cached_only)
    if RANDOM not in result.curves:
        return None, result
    return drawing.faithfulness_plot(result), result


def verdict(result: Faithfulness) -> str:
    """One line naming the most faithful map for this image and target, and the maps that beat random orders."""
    positive, negative = result.most_faithful()
    best = f"**{positive}** by both tests" if positive == negative else (
        f"**{positive}** by positive perturbation, **{negative}** by negative")
    chance = result.curves[RANDOM]
    beating = [name for name, curve in result.curves.items() if name != RANDOM
               and curve.positive_auc < chance.positive_auc and curve.negative_auc > chance.negative_auc]
    return (f"Most faithful for this image and target: {best}. Better than a random order by both tests: "
            f"{', '.join(beating) or 'none'}.")


def require_text(ws: Workspace, model: Any) -> None:
    """Refuses, before any image is analysed, a model without a text tower (the message names those with one)."""
    text_model(ws.models.get(model_name(model)))


def scores(ws: Workspace, s: Subject, prompts: list[str]) -> ZeroShot:
    """The model's zero-shot scores of the prompts for the image (softmax over them for CLIP, sigmoids for SigLIP)."""
    return zero_shot(ws.models.get(s.key.model, s.key.dtype), s.analysis, prompts)


def prompt_strip(ws: Workspace, s: Subject, c: Controls, progress: Progress | None = None) -> Image.Image:
    """One map of `c.method` per prompt (target text:PROMPT), side by side, each on its own scale."""
    loaded = ws.models.get(s.key.model, s.key.dtype)
    maps = []
    for i, prompt in enumerate(c.prompts):
        step = None if progress is None else (lambda f, i=i: progress((i + f) / len(c.prompts)))
        maps.append(explain(loaded, s.analysis, f"text:{prompt}", c.method, c.discard, step).values)
    tiles = [drawing.paint(s.scene.thumb, values, c.style, "") for values in maps]
    labels = [p if len(p) <= 30 else p[:28] + "..." for p in c.prompts]
    return visualizer.head_grid(tiles, labels, columns=min(4, len(tiles)), tile_width=224)


def animation(ws: Workspace, s: Subject, c: Controls, mode: str, progress: Progress | None = None) -> FileData:
    """The GIF through the layers, written once per content."""
    gif = drawing.layer_animation(s.analysis, s.scene.page, mode, c.head, c.style, progress)
    return write(ws, gif, f"{mode}_layers.gif")


def export(ws: Workspace, s: Subject, c: Controls, token: int, settings: dict) -> tuple[FileData, FileData]:
    """The numbers behind the views as .npz with a .json sidecar that records `settings` (and the controls')."""
    settings = {"fusion": c.fusion, "discard_ratio": c.discard, "target": c.target, "method": c.method, **settings}
    npz, sidecar = exports.numbers(s.analysis, c.layer, c.head, token, settings, statistics(s, c.stat_mode))
    return write(ws, npz, "analysis.npz"), write(ws, sidecar, "analysis.json")


# ---- words and tables ----
STAT_COLUMNS = {  # short column titles with units; STAT_LABELS gives each definition in full
    "cls_entropy": "CLS entropy, whole row (nats)",
    "cls_patch_entropy": "CLS entropy, drawn map (nats)",
    "mean_entropy": "Query entropy (nats)",
    "mean_distance": "Attention distance (patches)",
    "mean_distance_px": "Attention distance, fig. 7 (px)",
    "cls_mass": "Attention to CLS",
}


def stats_table(stats: HeadStatistics) -> dict:
    """One row per layer × head, columns named in words with their units."""
    values = stats.as_dict()
    names = tuple(STAT_LABELS)
    layers, heads_ = values[names[0]].shape
    rows = [[layer, head, *(shown_number(values[name][layer, head]) for name in names)]
            for layer in range(layers) for head in range(heads_)]
    return {"headers": ["Layer", "Head", *(STAT_COLUMNS[name] for name in names)], "data": rows}


def shown_number(value: float) -> "float | str":
    """A statistic for the table: rounded, or "n/a" where it has no meaning (NaN)."""
    return round(float(value), 4) if np.isfinite(value) else "n/a"


def faithfulness_definition() -> str:
    """How the curves are made and scored, for beside the plot."""
    return ("Patches are removed in the order a map ranks them, 0 % to 90 % in steps of 10 % (at f, the first "
            "floor(f × patches)). **Positive**: most relevant first; a faithful map makes the score fall fast, lower "
            "area is better. **Negative**: least relevant first; higher is better. The score at 0 % is the "
            "unperturbed one; the area is the trapezoidal rule over 0–0.9, as Chefer et al. (2021) score theirs. "
            "**drop** takes the patches' tokens out of the sequence (the others keep their position embeddings; "
            "class and register tokens always stay); **pixels** sets the patches' pixels to black before "
            f"normalising. Random: the mean of {RANDOM_SEEDS} random orders (grey band: ± one standard deviation), "
            "the same for both tests. The score: a class's softmax probability; for an embedding, the cosine "
            "similarity of the final feature to the unperturbed one; for the saliency decoder, the mean predicted "
            "saliency inside its own region. Maps: relevance and gradient rollout for the target, rollout and the "
            "last layer's class-token attention, the selected layer's attention, and flow once computed.")


def stat_definitions() -> str:
    """Each statistic's short name and its definition, for the page."""
    return "\n".join(f"- **{STAT_COLUMNS[name]}**: {STAT_LABELS[name]}." for name in STAT_LABELS)


def status_line(analysis: Analysis) -> str:
    g = analysis.geometry
    tokens = g.grid_h * g.grid_w + analysis.num_prefix_tokens
    return (f"**{analysis.model_name}** · input {g.input_w}×{g.input_h} px · grid {g.grid_h}×{g.grid_w} "
            f"({g.grid_h * g.grid_w} patches, {tokens} tokens) · {analysis.num_layers} layers × "
            f"{analysis.num_heads} heads · analysed in {analysis.seconds:.2f} s")


def describe_flow(analysis: Analysis, geometry_at: Callable[[int], Any], resolution: int) -> tuple[str, bool]:
    """What to say about attention flow for this image, and whether it can be computed at this resolution.

    Args:
        geometry_at: the image's patch geometry at a given long side.
    """
    tokens = analysis.geometry.grid_h * analysis.geometry.grid_w + analysis.num_prefix_tokens
    if tokens <= MAX_FLOW_TOKENS:
        return (f"Attention flow at this resolution ({tokens} tokens) takes about "
                f"{_flow_seconds(analysis.num_layers, tokens):.0f} s.", True)
    patch_size = analysis.geometry.patch_size
    reachable = range(resolution_limits(patch_size)[1], MIN_RESOLUTION - 1, -patch_size)  # the slider's values
    for long_side in (side for side in reachable if side <= resolution):
        g = geometry_at(long_side)
        fits = g.grid_h * g.grid_w + analysis.num_prefix_tokens
        if fits <= MAX_FLOW_TOKENS:
            return (f"Attention flow needs at most {MAX_FLOW_TOKENS} tokens (one max-flow per token); this image has "
                    f"{tokens} at {resolution} px. The largest resolution that works for it is **{long_side} px** "
                    f"({fits} tokens, about {_flow_seconds(analysis.num_layers, fits):.0f} s).", False)
    return f"Attention flow needs at most {MAX_FLOW_TOKENS} tokens; this image has more at every resolution.", False


def _flow_seconds(layers: int, tokens: int) -> float:
    return max(1.0, FLOW_SECONDS_AT_LIMIT * layers / 12 * (tokens / MAX_FLOW_TOKENS) ** 3)
