"""Attention flow (Abnar & Zuidema 2020): the max-flow from each input token to the class token at the top.

The graph has a node per (depth, token); depth l-1 token j feeds depth l token i with capacity Â_l[i, j], the
same residual-augmented, row-normalised attention that rollout chains. Without a class token, a super-sink is fed
by every top-depth token i with capacity top[i], the vector rollout starts from. One max-flow per input token, so
it is offered only for small token counts.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import maximum_flow

from .record import AttentionRecord
from .rollout import residual_attention

MAX_FLOW_TOKENS = 577  # DINOv2-S/14 at 336 px (24 × 24 patches): 81 s on two CPU cores (bench_analysis --flow 336)
CAPACITY_SCALE = 1 << 30  # scipy's max-flow takes integer capacities; attention weights are in [0, 1]


def check_flow_size(num_tokens: int) -> None:
    if num_tokens > MAX_FLOW_TOKENS:
        raise ValueError(f"attention flow needs one max-flow per token and is offered up to {MAX_FLOW_TOKENS} "
                         f"tokens; this image has {num_tokens} at this resolution: lower the resolution (or use "
                         "rollout, which has no such limit)")


def flow_graph(record: AttentionRecord, fusion: str, top: np.ndarray | None = None) -> tuple[csr_matrix, int]:
    """Capacities of the layered graph and its sink; node l·N + i is token i at depth l.

    The sink is the class token at the top depth, or, given `top` (N,), a node of its own after the others, fed by
    every top-depth token i with capacity top[i].
    """
    n, layers = record.num_tokens, record.num_layers
    rows, cols, caps = [], [], []
    for layer in range(layers):
        class_sink = top is None and layer == layers - 1  # only the class token matters at the last depth
        attention = residual_attention(record.layer(layer), fusion, 0, 1 if class_sink else n).cpu().numpy()
        targets, sources = np.nonzero(attention)  # attention is (targets, N)
        rows.append(layer * n + sources)
        cols.append((layer + 1) * n + targets)
        caps.append(attention[targets, sources])
    size, sink = (layers + 1) * n, layers * n
    if top is not None:
        size, sink = size + 1, size
        tokens = np.nonzero(top)[0]
        rows.append(layers * n + tokens)
        cols.append(np.full(len(tokens), sink))
        caps.append(top[tokens])
    capacities = np.round(np.concatenate(caps) * CAPACITY_SCALE).astype(np.int32)
    graph = csr_matrix((capacities, (np.concatenate(rows), np.concatenate(cols))), shape=(size, size))
    return graph, sink


def attention_flow(record: AttentionRecord, fusion: str = "mean",
                   progress: Callable[[float], None] | None = None, top: np.ndarray | None = None) -> np.ndarray:
    """Max-flow from each input token to the top class token, or to a super-sink fed as `top` says: (N,) in [0, 1]."""
    n = record.num_tokens
    check_flow_size(n)
    if top is not None and top.shape != (n,):
        raise ValueError(f"top must have one weight per token, shape ({n},), got {top.shape}")
    graph, sink = flow_graph(record, fusion, top)
    values = np.zeros(n)
    for token in range(n):
        values[token] = maximum_flow(graph, token, sink, method="dinic").flow_value / CAPACITY_SCALE
        if progress is not None and (token % 16 == 15 or token == n - 1):
            progress((token + 1) / n)
    return values
