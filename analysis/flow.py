"""Attention flow (Abnar & Zuidema 2020): the max-flow from each input token to the class token at the top.

The graph has a node per (depth, token); depth l-1 token j feeds depth l token i with capacity Â_l[i, j], the
same residual-augmented, row-normalised attention that rollout chains. One max-flow per input token, so it is
offered only for small token counts.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import maximum_flow

from .record import AttentionRecord
from .rollout import residual_attention

MAX_FLOW_TOKENS = 577  # DINOv2-S/14 at 336 px (24 × 24 patches): 69 s on two CPU cores
CAPACITY_SCALE = 1 << 30  # scipy's max-flow takes integer capacities; attention weights are in [0, 1]


def check_flow_size(num_tokens: int) -> None:
    if num_tokens > MAX_FLOW_TOKENS:
        raise ValueError(f"attention flow needs one max-flow per token and is offered up to {MAX_FLOW_TOKENS} "
                         f"tokens; this image has {num_tokens} at this resolution: lower the resolution (or use "
                         "rollout, which has no such limit)")


def flow_graph(record: AttentionRecord, fusion: str) -> csr_matrix:
    """Capacities of the layered graph; node l·N + i is token i at depth l, the sink is the class token on top."""
    n, layers = record.num_tokens, record.num_layers
    rows, cols, caps = [], [], []
    for layer in range(layers):
        top = layer == layers - 1  # only the class token matters at the last depth
        attention = residual_attention(record.layer(layer), fusion, 0, 1 if top else n).cpu().numpy()  # (targets, N)
        targets, sources = np.nonzero(attention)
        rows.append(layer * n + sources)
        cols.append((layer + 1) * n + targets)
        caps.append(attention[targets, sources])
    capacities = np.round(np.concatenate(caps) * CAPACITY_SCALE).astype(np.int32)
    size = (layers + 1) * n
    return csr_matrix((capacities, (np.concatenate(rows), np.concatenate(cols))), shape=(size, size))


def attention_flow(record: AttentionRecord, fusion: str = "mean",
                   progress: Callable[[float], None] | None = None) -> np.ndarray:
    """Max-flow from each input token to the top class token: (N,) in [0, 1]."""
    n = record.num_tokens
    check_flow_size(n)
    graph = flow_graph(record, fusion)
    sink = record.num_layers * n
    values = np.zeros(n)
    for token in range(n):
        values[token] = maximum_flow(graph, token, sink, method="dinic").flow_value / CAPACITY_SCALE
        if progress is not None and (token % 16 == 15 or token == n - 1):
            progress((token + 1) / n)
    return values
