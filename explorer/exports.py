"""Downloads: the numbers behind the views as .npz with a JSON sidecar, images as PNG, animations as GIF."""
from __future__ import annotations

import re
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

import visualizer
from analysis import STAT_LABELS, Analysis


def safe_stem(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "image"


def export_numbers(analysis: Analysis, stem: "str | Path", layer: int, head: "int | str",
                   token: int | None = None, fusion: str = "mean") -> tuple[Path, Path]:
    """Every layer × head CLS map, the rollout, head statistics, token norms and (given a token) its row and column."""
    g = analysis.geometry
    arrays = {
        "cls_attention": np.stack([analysis.cls_maps(layer_) for layer_ in range(analysis.num_layers)]),
        "cls_self_attention": analysis.cls_attention[:, :, 0],
        "rollout": analysis.rollout_map(fusion),
        "token_norms": analysis.to_grid(analysis.token_norms),
        **{f"stat_{name}": values for name, values in analysis.statistics.as_dict().items()},
    }
    if token is not None:
        arrays["query_row"] = analysis.query_map(token, layer, head, "row")
        arrays["query_column"] = analysis.query_map(token, layer, head, "column")
    metadata = {
        "model": analysis.model_name, "resolution": {"input_h": g.input_h, "input_w": g.input_w},
        "grid_h": g.grid_h, "grid_w": g.grid_w, "patch_size": g.patch_size,
        "original_size": {"height": g.orig_h, "width": g.orig_w},
        "alignment": ("the whole original image was resized, without cropping, to input_h × input_w; patch (r, c) "
                      "covers original rows [r·orig_h/grid_h, (r+1)·orig_h/grid_h) and columns "
                      "[c·orig_w/grid_w, (c+1)·orig_w/grid_w)"),
        "num_layers": analysis.num_layers, "num_heads": analysis.num_heads,
        "num_prefix_tokens": analysis.num_prefix_tokens, "dtype": analysis.dtype,
        "layer": layer, "head": head, "rollout_fusion": fusion,
        "query_token": token, "query_patch": None if token is None else list(divmod(token - analysis.num_prefix_tokens, g.grid_w)),
        "axes": {"cls_attention": "layer, head, row, column", "stat_*": "layer, head",
                 "token_norms": "depth (0 = embeddings), row, column"},
        "statistics": STAT_LABELS, "statistics_queries": analysis.statistics.num_queries,
    }
    return visualizer.export_npz(stem, arrays, metadata)


def new_export_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="vit-inspect-"))


def save_png(image: Image.Image, path: "str | Path") -> Path:
    path = Path(path)
    path.write_bytes(visualizer.png_bytes(image))
    return path


def save_gif(frames: list[Image.Image], captions: list[str], path: "str | Path", duration_ms: int = 500) -> Path:
    path = Path(path)
    path.write_bytes(visualizer.animation_gif(frames, duration_ms, captions=captions))
    return path
