"""What the page's events and the API's endpoints share: the guard that turns any failure into a plain message,
the checks of the view controls, and opening an analysis from an upload."""
from __future__ import annotations

import functools
import html
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gradio as gr
import torch
from gradio.data_classes import FileData
from PIL import Image

import visualizer
from analysis import DTYPES, FUSIONS, STAT_LABELS, Analysis
from analysis.flow import MAX_FLOW_TOKENS
from analysis.stats import DEFAULT_STAT_QUERIES
from model import CheckpointError, InvalidImageError

from . import views
from .inputs import UserError, choice, flag, head_choice, layer_index, number, whole
from .session import MAX_RESOLUTION, MIN_RESOLUTION, AnalysisKey, Workspace, resolution_limits

logger = logging.getLogger("vit-inspect")
NORMALIZATIONS = ("robust", "minmax", "max")
DIRECTIONS = ("row", "column")
STAT_MODES = {"spread": DEFAULT_STAT_QUERIES, "all": None}  # head statistics over 512 spread queries, or every one
USER_ERRORS = (UserError, InvalidImageError, CheckpointError)
FLOW_SECONDS_AT_LIMIT = 81.0  # bench_analysis.py --flow 336: 12 layers, 577 tokens, 2-core CPU; ∝ layers × N³


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


def warn(message: str) -> None:
    gr.Warning(html.escape(message, quote=False))


@dataclass(frozen=True)
class Controls:
    """The view controls of the page, checked against the analysis they apply to."""

    layer: int
    head: "int | str"
    direction: str = "row"
    style: views.Style = views.Style()
    fusion: str = "mean"
    discard: float = 0.0
    statistic: str = "mean_distance_px"
    atlas_shared: bool = False
    stat_mode: str = "spread"

    FIELDS = ("layer", "head", "direction", "opacity", "cmap", "smooth", "normalize", "mass_on", "mass", "fusion",
              "discard", "statistic", "atlas_shared", "stat_mode")  # the order the page passes them in

    @classmethod
    def parse(cls, analysis: Analysis, layer: Any, head: Any, direction: Any, opacity: Any, cmap: Any, smooth: Any,
              normalize: Any, mass_on: Any, mass: Any, fusion: Any, discard: Any, statistic: Any,
              atlas_shared: Any, stat_mode: Any) -> "Controls":
        mass_fraction = number(mass, "mass fraction", 0.05, 1.0) if flag(mass_on, "threshold") else None
        style = views.Style(number(opacity, "opacity", 0.0, 1.0), check_colormap(cmap), flag(smooth, "smooth"),
                            choice(normalize, "map scaling", NORMALIZATIONS), mass_fraction)
        return cls(*layer_and_head(analysis, layer, head), choice(direction, "direction", DIRECTIONS), style,
                   choice(fusion, "fusion", FUSIONS), check_discard(discard),
                   choice(statistic, "statistic", tuple(STAT_LABELS)), flag(atlas_shared, "shared"),
                   check_stat_mode(stat_mode))


def layer_and_head(analysis: Analysis, layer: Any, head: Any) -> tuple[int, "int | str"]:
    """A layer index (negative counts from the end) and a head index or fusion, checked against the model."""
    return layer_index(layer, analysis.num_layers), head_choice(head, analysis.num_heads, FUSIONS)


def check_style(opacity: Any, cmap: Any) -> views.Style:
    """The API's style: its opacity and colormap checked, the rest as the page's defaults."""
    return views.Style(opacity=number(opacity, "opacity", 0.0, 1.0), cmap=check_colormap(cmap))


def check_stat_mode(value: Any) -> str:
    return choice(value, "statistics", tuple(STAT_MODES))


def statistics(analysis: Analysis, stat_mode: str, progress: Callable[[float], None] | None = None):
    """The head statistics over 512 spread patch queries, or over every one (exact; from the kept inputs)."""
    return analysis.statistics_for(STAT_MODES[stat_mode], progress)


def check_colormap(value: Any) -> str:
    return choice(value, "colormap", visualizer.available_colormaps())


def check_discard(value: Any) -> float:
    return number(value, "discard ratio", 0.0, 0.99)


def check_resolution(value: Any) -> int:
    return whole(value, "resolution", MIN_RESOLUTION, MAX_RESOLUTION)


def describe_flow(analysis: Analysis, geometry_at: Callable[[int], Any], resolution: int) -> tuple[str, bool]:
    """What to say about attention flow for this image, and whether it can be computed at this resolution.

    Args:
        geometry_at: the image's patch geometry at a given long side.
    """
    tokens = analysis.geometry.grid_h * analysis.geometry.grid_w + analysis.num_prefix_tokens
    if tokens <= MAX_FLOW_TOKENS:
        return (f"Attention flow at this resolution ({tokens} tokens) takes about "
                f"{_flow_seconds(analysis.num_layers, tokens):.0f} s.", True)
    patch = analysis.geometry.patch_size
    reachable = range(resolution_limits(patch)[1], MIN_RESOLUTION - 1, -patch)  # the values the slider takes
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


class Handlers:
    """The plumbing shared by the page (`explorer.page`) and the API (`explorer.api`)."""

    def __init__(self, workspace: Workspace):
        self.workspace = workspace

    def open(self, image: Any, res: Any, model: Any = "default", dtype: Any = "float32",
             progress: Callable[[float, str], None] | None = None) -> tuple[str, views.Scene, Analysis, AnalysisKey]:
        """Checks an upload and the analysis settings, and returns the (cached or new) analysis."""
        source, scene = self.workspace.upload(image, "image", warn)
        key = self.workspace.key(scene, check_resolution(res), model_name(model), self.precision(dtype))
        return source, scene, self.workspace.analysis(key, source, progress), key

    def flow_offer(self, analysis: Analysis, scene: views.Scene, key: AnalysisKey) -> tuple[str, bool]:
        """What to say about attention flow for this analysis, and whether it is offered."""
        preprocessing = self.workspace.models.get(key.model, key.dtype).preprocessing
        geometry_at = lambda side: preprocessing.geometry(scene.image.height, scene.image.width, side)  # noqa: E731
        return describe_flow(analysis, geometry_at, key.resolution)

    def precision(self, value: Any) -> str:
        dtype = choice(value, "precision", tuple(DTYPES))
        if dtype != "float32" and self.workspace.models.device_type != "cuda":
            raise UserError("Half precision is offered on a GPU only; on this server the analysis runs in float32.")
        return dtype

    def file(self, data: bytes, name: str) -> FileData:
        """Bytes written to the managed folder (by content: the same output twice is one file)."""
        return FileData(path=str(self.workspace.files.put(data, name)))

    def png(self, image: Image.Image, name: str) -> FileData:
        return self.file(visualizer.png_bytes(image), f"{name}.png")


def model_name(value: Any) -> str:
    if value is None:
        return "default"
    if not isinstance(value, str) or len(value) > 200:
        raise UserError("model must be 'default' or a model id (org/name), in at most 200 characters.")
    return value.strip() or "default"


def point(x: Any, y: Any, analysis: Analysis) -> tuple[float, float]:
    """A pixel of the original image, checked."""
    g = analysis.geometry
    return (number(x, "x", 0, g.orig_w - 1e-6), number(y, "y", 0, g.orig_h - 1e-6))

