"""Per layer × head statistics of the attention, computed a block of query rows at a time."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import numpy as np
import torch

from .record import AttentionRecord, LayerAttention

DEFAULT_STAT_QUERIES = 512  # patch queries averaged per layer (evenly spread); every one when there are fewer
QUERY_SUMS = ("mean_entropy", "mean_distance", "mean_distance_px", "cls_mass")  # summed over query rows

STAT_LABELS = {
    "cls_entropy": ("entropy of the class token's whole row, prefix tokens included (without a class token: of the "
                    "mean attention each token receives) (nats)"),
    "cls_patch_entropy": ("entropy of the class token's patch map as drawn (without a class token: of the mean "
                          "attention received), renormalised over the patches (nats)"),
    "mean_entropy": "entropy of a patch query's whole row, averaged over patch queries (nats)",
    "mean_distance": ("mean attention distance: Σ attention × distance over patch keys, renormalised over them, "
                      "averaged over patch queries (patches)"),
    "mean_distance_px": ("mean attention distance as in Dosovitskiy et al. 2021, fig. 7: Σ attention × distance "
                         "between patch centres over patch keys, prefix keys dropped without renormalising, "
                         "averaged over patch queries (pixels of the model input)"),
    "cls_mass": ("attention of a patch query to the class token, averaged over patch queries (NaN without a class "
                 "token)"),
}


@dataclass
class HeadStatistics:
    """Each field is (layers, heads); see STAT_LABELS. `num_queries` patch queries were averaged."""

    cls_entropy: np.ndarray
    cls_patch_entropy: np.ndarray
    mean_entropy: np.ndarray
    mean_distance: np.ndarray
    mean_distance_px: np.ndarray
    cls_mass: np.ndarray
    num_queries: int

    def as_dict(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in STAT_LABELS}

    @property
    def nbytes(self) -> int:
        return sum(values.nbytes for values in self.as_dict().values())

    @classmethod
    def stack(cls, layers: list[dict[str, torch.Tensor]], num_queries: int) -> "HeadStatistics":
        """From one `layer_statistics` result per layer."""
        names = [f.name for f in fields(cls) if f.name != "num_queries"]
        return cls(num_queries=num_queries,
                   **{name: torch.stack([layer[name] for layer in layers]).cpu().numpy() for name in names})


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


def layer_statistics(attention: LayerAttention, rows: torch.Tensor, num_prefix: int, grid_w: int,
                     patch_size: int, summary_row: torch.Tensor | None = None,
                     class_token: bool = True) -> dict[str, torch.Tensor]:
    """Every statistic of STAT_LABELS for one layer, (heads,) each, averaged over the patch query `rows`.

    Args:
        summary_row: (heads, N), the row the class-token entropies describe; None: the class token's, row 0.
        class_token: False: there is none, and cls_mass is NaN.
    """
    cls_row = attention.probs(slice(0, 1))[:, 0] if summary_row is None else summary_row  # (heads, N)
    patch_map = cls_row[:, num_prefix:]
    out = {"cls_entropy": torch.special.entr(cls_row).sum(-1),
           "cls_patch_entropy": torch.special.entr(patch_map / patch_map.sum(-1, keepdim=True)).sum(-1)}
    sums = torch.zeros(len(QUERY_SUMS), attention.num_heads, device=rows.device)
    for block in rows.split(attention.block_rows()):
        distances = patch_distances(block, num_prefix, grid_w, attention.num_tokens - num_prefix)
        for head in range(attention.num_heads):
            sums[:, head] += _query_sums(attention.log_probs(block, head), distances, num_prefix, patch_size)
    if not class_token:
        sums[QUERY_SUMS.index("cls_mass")] = float("nan")
    return out | dict(zip(QUERY_SUMS, sums / len(rows)))


def _query_sums(log_probs: torch.Tensor, distances: torch.Tensor, num_prefix: int, patch_size: int) -> torch.Tensor:
    """QUERY_SUMS summed over one head's block of query rows, from their log-probabilities (rows, N)."""
    probs = log_probs.exp()
    patch_probs = probs[:, num_prefix:]
    weighted = torch.einsum("rn,rn->r", patch_probs, distances)  # Σ attention × distance over the patch keys
    return torch.stack([-log_probs.mul_(probs).sum(), (weighted / patch_probs.sum(-1)).sum(),
                        weighted.sum() * patch_size, probs[:, 0].sum()])


def head_statistics(record: AttentionRecord, num_prefix: int, grid_w: int,
                    max_queries: int | None = DEFAULT_STAT_QUERIES,
                    progress: Callable[[float], None] | None = None, summary_rows: torch.Tensor | None = None,
                    class_token: bool = True) -> HeadStatistics:
    """Entropies, attention distances (Dosovitskiy et al. 2021, fig. 7) and class-token mass for every head.

    Args:
        summary_rows: (layers, heads, N), the rows the class-token entropies describe; None: each layer's row 0.
        class_token: False: there is none, and cls_mass is NaN.
    """
    rows = stat_query_rows(num_prefix, record.num_tokens - num_prefix, max_queries).to(record.device)
    layers = []
    for layer in range(record.num_layers):
        summary_row = None if summary_rows is None else summary_rows[layer].to(record.device)
        layers.append(layer_statistics(record.layer(layer), rows, num_prefix, grid_w, record.patch_size, summary_row,
                                       class_token))
        record.release_between_layers()
        if progress is not None:
            progress((layer + 1) / record.num_layers)
    return HeadStatistics.stack(layers, len(rows))
