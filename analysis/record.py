"""What one forward pass keeps so that any attention row or column can be recomputed exactly, in O(N·D)."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

BLOCK_ELEMENTS = 1 << 23  # attention probabilities held at once when sweeping a layer: 8M floats, 32 MB
FUSIONS = ("mean", "max", "min")


@dataclass
class AttentionRecord:
    """Per layer: queries and keys (heads, N, head_dim) and each score row's log-sum-exp (heads, N).

    Row i of head h of layer l is exp(q_i · K^T · scale − lse_i): the exact softmax, rebuilt on demand.
    """

    queries: list[torch.Tensor] = field(default_factory=list)
    keys: list[torch.Tensor] = field(default_factory=list)
    lse: list[torch.Tensor] = field(default_factory=list)
    scale: float = 1.0
    on_layer: Callable[[int], None] | None = None  # progress hook, called as each layer is recorded

    def observe_layer(self, layer: int, query: torch.Tensor, key: torch.Tensor, lse: torch.Tensor,
                      scale: float) -> None:
        if query.shape[0] != 1:
            raise ValueError("the analysis records one image at a time")
        self.queries.append(query[0].contiguous())
        self.keys.append(key[0].contiguous())
        self.lse.append(lse[0].float())
        self.scale = scale
        if self.on_layer is not None:
            self.on_layer(layer)

    @property
    def num_layers(self) -> int:
        return len(self.queries)

    @property
    def num_heads(self) -> int:
        return self.queries[0].shape[0]

    @property
    def num_tokens(self) -> int:
        return self.queries[0].shape[1]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.queries, *self.keys, *self.lse))

    def probs(self, layer: int, rows: torch.Tensor | slice) -> torch.Tensor:
        """Attention probabilities of the given query rows: (heads, rows, N), fp32."""
        q = self.queries[layer][:, rows]
        scores = torch.matmul(q, self.keys[layer].transpose(-1, -2)).float().mul_(self.scale)
        return scores.sub_(self.lse[layer][:, rows].unsqueeze(-1)).exp_()

    def column(self, layer: int, token: int) -> torch.Tensor:
        """How much every query attends to `token`: (heads, N), fp32."""
        k = self.keys[layer][:, token:token + 1]  # (heads, 1, head_dim)
        scores = torch.matmul(self.queries[layer], k.transpose(-1, -2))[..., 0].float().mul_(self.scale)
        return scores.sub_(self.lse[layer]).exp_()

    def block_rows(self) -> int:
        return max(1, BLOCK_ELEMENTS // (self.num_heads * self.num_tokens))

    def blocks(self, layer: int) -> Iterator[tuple[int, torch.Tensor]]:
        """(start, probs of rows start..start+rows) over the whole layer, a block at a time."""
        step = self.block_rows()
        for start in range(0, self.num_tokens, step):
            yield start, self.probs(layer, slice(start, start + step))


def fuse_heads(probs: torch.Tensor, head: "int | str") -> torch.Tensor:
    """One head's rows, or the heads fused by mean, max or min: (heads, ...) → (...)."""
    if isinstance(head, int) or (isinstance(head, str) and head.isdigit()):
        return probs[int(head)]
    if head == "mean":
        return probs.mean(0)
    if head == "max":
        return probs.amax(0)
    if head == "min":
        return probs.amin(0)
    raise ValueError(f"head must be a head index or one of {FUSIONS}, got {head!r}")
