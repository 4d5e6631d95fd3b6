"""Checks on every field a request sends. Page events, API endpoints and the command line all pass their values
through here, once: raw JSON can be forged by anyone, so each value is refused with a message that names the field
and what it allows. The choice lists the page offers are defined here too, once."""
from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import visualizer
from analysis import FUSIONS, METHODS, REMOVALS, STAT_LABELS, Analysis
from analysis.stats import DEFAULT_STAT_QUERIES

from .drawing import Style

FILE_META = {"_type": "gradio.FileData"}
SHOWN_CHARS = 40  # a refused value is quoted in the message up to this length
MAX_PATH_CHARS = 1024  # longer paths are refused before any normalisation (realpath's work grows with the length)
MIN_RESOLUTION, MAX_RESOLUTION, DEFAULT_RESOLUTION = 224, 2048, 518
NORMALIZATIONS = ("robust", "minmax", "max")  # map scaling (see visualizer.scale_range)
DIRECTIONS = ("row", "column")  # a clicked patch: what it attends to, or what attends to it
ANIMATIONS = ("cls", "rollout")  # what the layer animation shows
STAT_MODES = {"spread": DEFAULT_STAT_QUERIES, "all": None}  # head statistics over 512 spread queries, or every one
PRECISIONS = ("float32", "float16", "bfloat16")
MAX_PROMPTS, MAX_PROMPT_CHARS = 32, 300  # prompts per request, characters per prompt
DEFAULT_TEMPLATE = "a photo of a {}"  # the page's labels become prompts through it ("{}": the label)
DEFAULT_LABELS = "cat\ndog\ncar"
ORDERS = ("ascending", "descending")  # how a table is sorted


class UserError(ValueError):
    """A request the app refuses; the message is meant for the person who sent it."""


def shown(value: Any) -> str:
    """A short, safe rendering of a refused value for a message."""
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS - 1] + "…"


def plain_path(path: Any) -> bool:
    """Whether `path` is text a file system takes, short enough to normalise at once: at most MAX_PATH_CHARS
    characters, no NUL byte, no lone surrogate."""
    if not isinstance(path, str) or not 0 < len(path) <= MAX_PATH_CHARS or "\0" in path:
        return False
    try:
        path.encode()
    except UnicodeEncodeError:
        return False
    return True


def uploaded_file(value: Any, name: str, roots: Iterable[Path]) -> Path:
    """The path of a file that arrived through Gradio's upload handling (or one of our own examples).

    Accepts only Gradio's file object ({"path": ..., "meta": {"_type": "gradio.FileData"}}) whose real path lies
    under one of `roots`. The refusal is the same whether or not the path exists, so it tells nothing about the
    server's files.
    """
    if hasattr(value, "model_dump"):
        value = value.model_dump()
    path = value.get("path") if isinstance(value, dict) else None
    if not isinstance(value, dict) or value.get("meta") != FILE_META or not plain_path(path):
        raise UserError(f"{name}: send an image file as an upload (gradio_client: handle_file(...)); paths, URLs "
                        "and other references are not accepted.")
    real = Path(os.path.realpath(path))
    if not any(real.is_relative_to(root) for root in roots) or not real.is_file():
        raise UserError(f"{name}: this file was not uploaded to this server (or has expired): upload it again.")
    return real


def server_folder(value: Any, name: str) -> Path:
    """A folder on the server named by the person running it (never in public mode: the caller refuses first)."""
    if not plain_path(value) or not value.strip():
        raise UserError(f"{name} must be a folder's path: text of at most {MAX_PATH_CHARS} characters.")
    folder = Path(value.strip()).expanduser()
    if not folder.is_dir():
        raise UserError(f"{name}: {shown(value.strip())} is not a folder on this server.")
    return folder


def number(value: Any, name: str, low: float, high: float, *, whole: bool = False) -> float:
    """A finite number in [low, high] (an int when `whole`); numeric strings are accepted."""
    kind = "a whole number" if whole else "a number"
    refused = UserError(f"{name} must be {kind} from {low:g} to {high:g}, got {shown(value)}.")
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise refused from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise refused
    if whole and value != int(value) or not low <= value <= high:
        raise refused
    return int(value) if whole else float(value)


def whole(value: Any, name: str, low: int, high: int) -> int:
    return int(number(value, name, low, high, whole=True))


def choice(value: Any, name: str, options: Sequence[str]) -> str:
    """One of `options`, exactly."""
    if not isinstance(value, str) or value not in options:
        raise UserError(f"{name} must be one of {', '.join(options)}; got {shown(value)}.")
    return value


def flag(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise UserError(f"{name} must be true or false, got {shown(value)}.")
    return value


def text(value: Any, name: str, max_chars: int = 200) -> str:
    """A short string, stripped; None counts as empty."""
    if value is None:
        return ""
    if not isinstance(value, str) or len(value) > max_chars:
        raise UserError(f"{name} must be text of at most {max_chars} characters, got {shown(value)}.")
    return value.strip()


def prompt_list(value: Any, name: str = "prompts") -> list[str]:
    """One prompt per line, blank lines skipped, each kept as typed (case, punctuation) but for its ends' spaces:
    1 to MAX_PROMPTS prompts of at most MAX_PROMPT_CHARS characters each."""
    if not isinstance(value, str):
        raise UserError(f"{name} must be text, one prompt per line; got {shown(value)}.")
    if len(value) > MAX_PROMPTS * (MAX_PROMPT_CHARS + 2):
        raise UserError(f"{name}: at most {MAX_PROMPTS} prompts of at most {MAX_PROMPT_CHARS} characters each.")
    prompts = [line.strip() for line in value.splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"{name}: give at least one prompt (one per line), e.g. 'a photo of a cat'.")
    if len(prompts) > MAX_PROMPTS:
        raise UserError(f"{name}: at most {MAX_PROMPTS} prompts, got {len(prompts)}.")
    for prompt in prompts:
        check_prompt(prompt, name)
    return prompts


def check_prompt(prompt: str, name: str) -> str:
    if len(prompt) > MAX_PROMPT_CHARS:
        raise UserError(f"{name}: each prompt has at most {MAX_PROMPT_CHARS} characters; {shown(prompt)} has "
                        f"{len(prompt)}.")
    return prompt


def templated_prompts(template: Any, labels: Any) -> list[str]:
    """The page's prompts: each label (one per line) put into the template where it says "{}" (a template without
    "{}" is left out: the labels are the prompts); none for blank labels."""
    template = text(template, "template", MAX_PROMPT_CHARS)
    if isinstance(labels, str) and not labels.strip():
        return []
    labels = prompt_list(labels, "labels")
    if "{}" not in template:
        return labels
    return [check_prompt(template.replace("{}", label), "prompts") for label in labels]


def layer_index(value: Any, num_layers: int) -> int:
    """A layer index; negative values count from the end (-1 is the last layer)."""
    layer = whole(value, "layer", -num_layers, num_layers - 1)
    return layer + num_layers if layer < 0 else layer


def head_choice(value: Any, num_heads: int, fusions: Sequence[str]) -> "int | str":
    """A head index (an int or its digits) or the name of a fusion of heads."""
    if isinstance(value, str) and value.strip().lower() in fusions:
        return value.strip().lower()
    allowed = f"one of {', '.join(fusions)} or a head index from 0 to {num_heads - 1}"
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < num_heads:
        raise UserError(f"head must be {allowed}, got {shown(value)}.")
    return value


def check_resolution(value: Any) -> int:
    return whole(value, "resolution", MIN_RESOLUTION, MAX_RESOLUTION)


def resolution_limits(patch_size: int) -> tuple[int, int]:
    """The smallest and largest long side a slider stepping by `patch_size` from MIN_RESOLUTION can reach."""
    return MIN_RESOLUTION, MIN_RESOLUTION + (MAX_RESOLUTION - MIN_RESOLUTION) // patch_size * patch_size


def model_name(value: Any) -> str:
    if value is None:
        return "default"
    if not isinstance(value, str) or len(value) > 200:
        raise UserError("model must be 'default' or a model id (org/name), in at most 200 characters.")
    return value.strip() or "default"


def point(x: Any, y: Any, analysis: Analysis) -> tuple[float, float]:
    """A pixel of the original image, checked."""
    g = analysis.geometry
    return number(x, "x", 0, g.orig_w - 1e-6), number(y, "y", 0, g.orig_h - 1e-6)


def click_position(index: Any) -> tuple[float, float]:
    """The (x, y) pixel of a click on a drawn image, as Gradio's select event gives it."""
    if not isinstance(index, (list, tuple)) or len(index) != 2:
        index = (None, None)
    return number(index[0], "click x", 0, math.inf), number(index[1], "click y", 0, math.inf)


@dataclass(frozen=True)
class Controls:
    """The view controls, each checked against the analysis it applies to; what is not sent keeps its default."""

    layer: int
    head: "int | str" = "mean"
    direction: str = "row"
    style: Style = Style()
    fusion: str = "mean"
    discard: float = 0.0
    statistic: str = "mean_distance_px"
    atlas_shared: bool = False
    stat_mode: str = "spread"
    target: str = "top"  # what is explained, as `analysis.relevance` names it (a patch by its row and column)
    method: str = "relevance"
    removal: str = "drop"  # how the faithfulness curves remove a patch (see analysis.faithfulness)
    prompts: tuple[str, ...] = ()  # the page's prompts (template × labels); empty where no label is given

    @classmethod
    def parse(cls, analysis: Analysis, values: Mapping[str, Any]) -> "Controls":
        """From the named fields of a page event or an endpoint (see FIELDS); unknown names are refused."""
        unknown = set(values) - set(FIELDS)
        if unknown:
            raise UserError(f"unknown controls: {', '.join(sorted(map(str, unknown)))}.")
        v = {**DEFAULTS, **values}
        mass = number(v["mass"], "mass fraction", 0.05, 1.0) if flag(v["mass_on"], "threshold") else None
        style = Style(number(v["opacity"], "opacity", 0.0, 1.0), choice(v["cmap"], "colormap", COLORMAPS),
                      flag(v["smooth"], "smooth"), choice(v["normalize"], "map scaling", NORMALIZATIONS), mass)
        return cls(layer_index(v["layer"], analysis.num_layers), head_choice(v["head"], analysis.num_heads, FUSIONS),
                   choice(v["direction"], "direction", DIRECTIONS), style, choice(v["fusion"], "fusion", FUSIONS),
                   check_discard(v["discard"]), choice(v["statistic"], "statistic", tuple(STAT_LABELS)),
                   flag(v["atlas_shared"], "shared"), choice(v["stat_mode"], "statistics", tuple(STAT_MODES)),
                   explain_target(v["target"], analysis), choice(v["method"], "method", METHODS),
                   choice(v["removal"], "removal", REMOVALS), tuple(templated_prompts(v["template"], v["labels"])))


def explain_target(value: Any, analysis: Analysis) -> str:
    """What to explain: "top", "class:N", "embedding", "region" (a saliency decoder's own), "patch:X,Y", the patch
    under pixel (X, Y) of the original image, returned as "patch:ROW,COL", or "text:PROMPT" (an image-text model's
    similarity with the prompt, kept as typed)."""
    if isinstance(value, str) and (match := re.fullmatch(r"\s*text:(.*)", value, re.IGNORECASE | re.DOTALL)):
        prompt = match.group(1).strip()
        if not prompt or "\n" in prompt:
            raise UserError(f"target: text:PROMPT needs one prompt after 'text:', got {shown(value)}.")
        return f"text:{check_prompt(prompt, 'target')}"
    target = text(value, "target", 60).lower().replace(" ", "")
    if target in ("top", "embedding", "region") or re.fullmatch(r"class:\d+", target):
        return target
    if match := re.fullmatch(r"patch:([0-9.]+),([0-9.]+)", target):
        row, col = analysis.geometry.patch_at(*point(match.group(1), match.group(2), analysis))
        return f"patch:{row},{col}"
    raise UserError(f"target must be top, class:N, embedding, region, patch:X,Y (a pixel of the image) or text:PROMPT; "
                    f"got {shown(value)}.")


def check_discard(value: Any) -> float:
    return number(value, "discard ratio", 0.0, 0.99)


COLORMAPS = tuple(visualizer.available_colormaps())
DEFAULTS = {"layer": -1, "head": "mean", "direction": "row", "opacity": 0.6, "cmap": "inferno", "smooth": True,
            "normalize": "robust", "mass_on": False, "mass": 0.6, "fusion": "mean", "discard": 0.0,
            "statistic": "mean_distance_px", "atlas_shared": False, "stat_mode": "spread", "target": "top",
            "method": "relevance", "removal": "drop", "template": DEFAULT_TEMPLATE, "labels": DEFAULT_LABELS}
FIELDS = tuple(DEFAULTS)  # the controls' names: the page's components and the endpoints' parameters use them
