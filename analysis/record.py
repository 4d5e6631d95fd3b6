"""What one forward pass keeps so that any attention row or column can be recomputed exactly, in O(N·D)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

BLOCK_ELEMENTS = 1 << 22  # attention probabilities held at once when sweeping a layer: 4M floats, 16 MB
FUSIONS = ("mean", "max", "min")


@dataclass
class AttentionRecord:
    """Per layer, augmented queries [q·scale, −lse] and keys [k, 1], each (heads, N, head_dim + 1).

    Their product is exactly the log-softmax, so row i of a head is exp(q̃_i · K̃ᵀ): the attention
    probabilities rebuilt by one matrix product, without any reduction over the row.
    """

    queries: list[torch.Tensor] = field(default_factory=list)
    keys: list[torch.Tensor] = field(default_factory=list)
    on_layer: Callable[[int], None] | None = None  # progress hook, called as each layer is recorded

    def observe_layer(self, layer: int, query: torch.Tensor, key: torch.Tensor, lse: torch.Tensor,
                      scale: float) -> None:
        if query.shape[0] != 1:
            raise ValueError("the analysis records one image at a time")
        query, key = query[0].float(), key[0].float()  # (heads, N, head_dim)
        self.queries.append(torch.cat([query * scale, -lse[0].float().unsqueeze(-1)], dim=-1))
        self.keys.append(torch.cat([key, torch.ones_like(key[..., :1])], dim=-1))
        if self.on_layer is not None:
            self.on_layer(layer)

    @property
    def device(self) -> torch.device:
        return self.queries[0].device

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
        return sum(t.numel() * t.element_size() for t in (*self.queries, *self.keys))

    def log_probs(self, layer: int, rows: torch.Tensor | slice) -> torch.Tensor:
        """Log attention probabilities of the given query rows: (heads, rows, N), fp32."""
        return torch.matmul(self.queries[layer][:, rows], self.keys[layer].transpose(-1, -2))

    def probs(self, layer: int, rows: torch.Tensor | slice) -> torch.Tensor:
        """Attention probabilities of the given query rows: (heads, rows, N), fp32."""
        return self.log_probs(layer, rows).exp_()

    def column(self, layer: int, token: int) -> torch.Tensor:
        """How much every query attends to `token`: (heads, N), fp32."""
        key = self.keys[layer][:, token:token + 1]  # (heads, 1, head_dim + 1)
        return torch.matmul(self.queries[layer], key.transpose(-1, -2))[..., 0].exp_()

    def block_rows(self) -> int:
        return max(1, BLOCK_ELEMENTS // (self.num_heads * self.num_tokens))


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
