"""Attention rollout (Abnar & Zuidema 2020), streamed over blocks of query rows: no N×N matrix is kept."""
from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from .record import AttentionRecord, LayerAttention

HIGH_BITS = 15  # the k-th smallest value is found from two histograms of the float's bit pattern


def rollout(record: AttentionRecord, fusion: str = "mean", discard_ratio: float = 0.0,
            last_layer: int | None = None, token: int = 0,
            progress: Callable[[float], None] | None = None, top: torch.Tensor | None = None) -> torch.Tensor:
    """Row `token` of Â_last ··· Â_0, where Â = rownorm(drop(fuse(A)) + I), as vit-explain defines it.

    drop() zeroes the `discard_ratio` fraction of smallest entries of the fused matrix, never entry (0, 0).
    Returns (N,) fp32. Unlike vit-explain, rows are normalised by their own sums (its broadcast divides by
    the sum of the row with the column's index).

    Args:
        top: (N,) weights over the tokens at the top, giving top · Â_last ··· Â_0 instead (`token` unused): what
            stands in for the class token in models without one (see `summary.top_vector`).
    """
    if not 0.0 <= discard_ratio < 1.0:
        raise ValueError(f"discard_ratio must be in [0, 1), got {discard_ratio}")
    last = record.num_layers - 1 if last_layer is None else last_layer
    n = record.num_tokens
    if top is None:
        weights = torch.zeros(n, device=record.device)
        weights[token] = 1.0
    else:
        if top.shape != (n,):
            raise ValueError(f"top must have one weight per token, shape ({n},), got {tuple(top.shape)}")
        weights = top.float().to(record.device)
    for step, layer in enumerate(range(last, -1, -1)):
        attention = record.layer(layer)  # one rebuild serves the threshold's passes and the propagation
        threshold = discard_threshold(attention, fusion, discard_ratio)
        weights = _propagate(attention, fusion, threshold, weights)
        del attention  # freed before the next layer is rebuilt
        record.release_between_layers()
        if progress is not None:
            progress((step + 1) / (last + 1))
    return weights


def _propagate(attention: LayerAttention, fusion: str, threshold: float | None,
               weights: torch.Tensor) -> torch.Tensor:
    """weights · Â, computing only the row blocks whose weight is not zero."""
    out = torch.zeros_like(weights)
    step = attention.block_rows()
    for start in range(0, attention.num_tokens, step):
        w = weights[start:start + step]
        if not torch.any(w):
            continue
        out += w @ residual_attention(attention, fusion, start, step, threshold)
    return out


def residual_attention(attention: LayerAttention, fusion: str, start: int, step: int,
                       threshold: float | None = None) -> torch.Tensor:
    """Rows start..start+step of Â = rownorm(drop(fuse(A)) + I), the matrix rollout and flow chain: (rows, N)."""
    fused = _fused_block(attention, fusion, start, step, threshold)
    rows = torch.arange(fused.shape[0], device=fused.device)
    fused[rows, start + rows] += 1.0
    return fused / fused.sum(-1, keepdim=True)


def _fused_block(attention: LayerAttention, fusion: str, start: int, step: int,
                 threshold: float | None) -> torch.Tensor:
    fused = attention.fused_probs(slice(start, start + step), fusion)  # (rows, N)
    if threshold is not None:
        keep_cls = start == 0
        cls_value = fused[0, 0].clone() if keep_cls else None
        fused[fused <= threshold] = 0.0
        if keep_cls:
            fused[0, 0] = cls_value
    return fused


def discard_threshold(attention: LayerAttention, fusion: str, discard_ratio: float) -> float | None:
    """The value at or below which entries are dropped: the k-th smallest of the fused N×N matrix."""
    n = attention.num_tokens
    k = int(n * n * discard_ratio)
    if k == 0:
        return None

    def blocks() -> Iterator[torch.Tensor]:
        step = attention.block_rows()
        for start in range(0, n, step):
            yield _fused_block(attention, fusion, start, step, None)

    return kth_smallest(blocks, k)


def kth_smallest(blocks: Callable[[], Iterator[torch.Tensor]], k: int) -> float:
    """Exact k-th smallest (1-based) of non-negative floats streamed in blocks, in two passes.

    A non-negative float32's bit pattern orders like the float: the first pass counts its high bits,
    the second counts the low bits of the values that share the chosen high bits.
    """
    high_counts = None
    for block in blocks():
        bits = block.float().contiguous().view(torch.int32).flatten()
        counts = torch.bincount(bits >> HIGH_BITS, minlength=1 << (31 - HIGH_BITS))
        high_counts = counts if high_counts is None else high_counts + counts
    cumulative = high_counts.cumsum(0)
    high = int(torch.searchsorted(cumulative, torch.tensor(k, device=cumulative.device)))
    below = int(cumulative[high - 1]) if high > 0 else 0
    low_counts = torch.zeros(1 << HIGH_BITS, dtype=torch.int64, device=cumulative.device)
    for block in blocks():
        bits = block.float().contiguous().view(torch.int32).flatten()
        low_counts += torch.bincount(bits[(bits >> HIGH_BITS) == high] & ((1 << HIGH_BITS) - 1),
                                     minlength=1 << HIGH_BITS)
    low = int(torch.searchsorted(low_counts.cumsum(0), torch.tensor(k - below, device=cumulative.device)))
    return torch.tensor([(high << HIGH_BITS) | low], dtype=torch.int32).view(torch.float32).item()
