"""Per layer × head statistics of the attention, computed a block of query rows at a time."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .record import AttentionRecord

DEFAULT_STAT_QUERIES = 512  # patch queries averaged per layer (evenly spread); every one when there are fewer

STAT_LABELS = {
    "cls_entropy": "entropy of the class token's row (nats)",
    "mean_entropy": "mean entropy of the patch queries' rows (nats)",
    "mean_distance": "mean attention distance (patches)",
    "cls_mass": "mean attention of patch queries to the class token",
}


@dataclass
class HeadStatistics:
    """Each field is (layers, heads); see STAT_LABELS. `num_queries` patch queries were averaged."""

    cls_entropy: np.ndarray
    mean_entropy: np.ndarray
    mean_distance: np.ndarray
    cls_mass: np.ndarray
    num_queries: int

    def as_dict(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in STAT_LABELS}


def stat_query_rows(num_prefix: int, num_patches: int, max_queries: int | None) -> torch.Tensor:
    """Patch-query token indices: all of them, or `max_queries` evenly spread over the grid."""
    if max_queries is None or num_patches <= max_queries:
        return torch.arange(num_prefix, num_prefix + num_patches)
    return num_prefix + torch.linspace(0, num_patches - 1, max_queries).round().long().unique()


def patch_distances(rows: torch.Tensor, num_prefix: int, grid_w: int, num_patches: int) -> torch.Tensor:
    """Euclidean distance, in patches, from each query row's patch to every patch: (rows, num_patches)."""
    index = torch.arange(num_patches, device=rows.device)
    keys = torch.stack([index // grid_w, index % grid_w], dim=1).float()
    queries = rows - num_prefix
    query_xy = torch.stack([queries // grid_w, queries % grid_w], dim=1).float()
    return torch.cdist(query_xy, keys)


def head_statistics(record: AttentionRecord, num_prefix: int, grid_w: int,
                    max_queries: int | None = DEFAULT_STAT_QUERIES,
                    progress: Callable[[float], None] | None = None) -> HeadStatistics:
    """Entropy, attention distance (Dosovitskiy et al. 2021, fig. 7) and class-token mass for every head."""
    num_patches = record.num_tokens - num_prefix
    device = record.device
    rows = stat_query_rows(num_prefix, num_patches, max_queries).to(device)
    layers, heads = record.num_layers, record.num_heads
    sums = {name: torch.zeros(layers, heads, device=device) for name in ("mean_entropy", "mean_distance", "cls_mass")}
    cls_entropy = torch.zeros(layers, heads, device=device)
    step = record.block_rows()
    for layer in range(layers):
        cls_row = record.probs(layer, slice(0, 1))[:, 0]  # (heads, N)
        cls_entropy[layer] = torch.special.entr(cls_row).sum(-1)
        for start in range(0, len(rows), step):
            block = rows[start:start + step]
            log_probs = record.log_probs(layer, block)  # (heads, r, N)
            probs = log_probs.exp()
            sums["mean_entropy"][layer] -= (probs * log_probs).sum((-1, -2))
            patch_probs = probs[..., num_prefix:]
            distance = torch.einsum("hrn,rn->hr", patch_probs,
                                    patch_distances(block, num_prefix, grid_w, num_patches))
            sums["mean_distance"][layer] += (distance / patch_probs.sum(-1)).sum(-1)
            sums["cls_mass"][layer] += probs[..., 0].sum(-1)
        if progress is not None:
            progress((layer + 1) / layers)
    means = {name: (total / len(rows)).cpu().numpy() for name, total in sums.items()}
    return HeadStatistics(cls_entropy=cls_entropy.cpu().numpy(), num_queries=len(rows), **means)
