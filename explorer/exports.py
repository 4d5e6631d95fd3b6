"""Downloads: the numbers behind the views as .npz with a JSON sidecar that records every setting of the view."""
from __future__ import annotations

import re

import numpy as np

import visualizer
from analysis import STAT_LABELS, Analysis, HeadStatistics


def safe_stem(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "image"


def numbers(analysis: Analysis, layer: int, head: "int | str", token: int | None = None,
            settings: dict | None = None, statistics: HeadStatistics | None = None) -> tuple[bytes, bytes]:
    """Every layer × head class-token map, the rollout (with the settings' fusion and discard ratio), head statistics
    (the analysis's own unless given), token norms and (given a token) its row and column; the sidecar names every
    setting."""
    settings = {"fusion": "mean", "discard_ratio": 0.0, **(settings or {})}
    statistics = statistics or analysis.statistics
    g = analysis.geometry
    arrays = {
        "cls_attention": np.stack([analysis.cls_maps(layer_) for layer_ in range(analysis.num_layers)]),
        **({"cls_self_attention": analysis.cls_attention[:, :, 0]} if analysis.summary.class_token else {}),
        "rollout": analysis.rollout_map(settings["fusion"], settings["discard_ratio"]),
        "token_norms": analysis.to_grid(analysis.token_norms),
        **{f"stat_{name}": values for name, values in statistics.as_dict().items()},
    }
    if analysis.summary.pooling:
        arrays["pooling_attention"] = analysis.to_grid(analysis.pooling_attention)
    if analysis.summary.distillation:
        arrays["distillation_attention"] = analysis.to_grid(analysis.distillation_attention)
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
        "num_prefix_tokens": analysis.num_prefix_tokens, "dtype": analysis.dtype, "summary": analysis.summary.to_dict(),
        "layer": layer, "head": head, "rollout_fusion": settings["fusion"],
        "rollout_discard_ratio": settings["discard_ratio"], "settings": settings,
        "query_token": token,
        "query_patch": None if token is None else list(divmod(token - analysis.num_prefix_tokens, g.grid_w)),
        "axes": {"cls_attention": "layer, head, row, column (what `summary` says stands for the class token)",
                 "pooling_attention": "head, row, column", "distillation_attention": "layer, head, row, column",
                 "stat_*": "layer, head",
                 "token_norms": "depth (0 = embeddings), row, column"},
        "statistics": STAT_LABELS, "statistics_queries": statistics.num_queries,
    }
    return visualizer.npz_bytes(arrays, metadata)
