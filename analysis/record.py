"""What one forward pass keeps: each layer's input and the log-sum-exp of its score rows, nothing N×N.

Any row or column of any head is rebuilt from these exactly: the layer's queries and keys come back from its
input through `layer.query_key` (the function the forward itself used, O(N·D²)), and row i of a head is
exp(scale · q_i · Kᵀ − lse_i), O(N·D) once the projections exist.

Asked to (`keep_outputs`, for an explanation that follows) and where they fit KEEP_OUTPUTS_BYTES, each layer's
heads' outputs O (the fused kernel's result) are kept as well, so that the relevance sweep backpropagates through the
attention without recomputing its forward.

What is kept is copied, layer by layer, into buffers of all the layers allocated at the first layer, not held as
the forward's own tensors: those would lie among each layer's short-lived buffers, and the holes they leave are too
small for the next layer's, so the heap would grow by about a layer's working memory per layer (460 MB resident at
1022 px for 105 MB kept). With nothing kept among them, each layer reuses the last one's freed memory, and the
forward trims between layers only where a layer's working memory is large (`analysis.memory`).
"""
from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable, Hashable, Sequence
from typing import Any, Protocol

import torch
from torch import nn

from .memory import release_free_memory, trims_between_layers

BLOCK_ELEMENTS = 1 << 21  # one head's attention probabilities held at once when sweeping a layer: 8 MB
# Every layer's heads' outputs O, layers × N × D elements, are kept, where asked, when they fit this: the relevance
# sweep then skips its recomputed attention forward (~10 % of a map). Only analyses made for an explanation ask (the
# /relevance and /faithfulness endpoints, the CLI's --explain): the page's stay at their inputs and log-sum-exps.
# The default model in fp32: 12 × 5329 × 384 × 4 bytes = 98 MB at 1022 px (kept), 393 MB at 2044 px (not: the record
# stays as small as its layers' inputs there).
KEEP_OUTPUTS_BYTES = 128 << 20
FUSIONS = ("mean", "max", "min")
_SERIALS = itertools.count()  # names a record in the layer cache (an id() could be reused by a later record)


class LayerStore(Protocol):
    """Where rebuilt layers are kept between requests (the explorer's byte-budget cache); keys are tuples."""

    def get(self, key: Hashable) -> Any | None: ...

    def put(self, key: Hashable, item: Any) -> None: ...

    def drop(self, which: Callable[[Hashable], bool]) -> None: ...


class LayerAttention:
    """One layer's queries and keys (heads, N, head_dim), its fp32 row log-sum-exps (heads, N) and scale."""

    def __init__(self, query: torch.Tensor, key: torch.Tensor, lse: torch.Tensor, scale: float):
        self.query = query  # the model's dtype; blocks of rows are upcast when used
        self.key = key.float()
        self.lse = lse.float()
        self.scale = scale

    @property
    def num_heads(self) -> int:
        return self.query.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.query.shape[1]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.query, self.key, self.lse))

    def log_probs(self, rows: torch.Tensor | slice, head: int | None = None) -> torch.Tensor:
        """Log attention probabilities of the given query rows: (heads, rows, N), or (rows, N) of one head; fp32."""
        if head is None:
            return torch.baddbmm(-self.lse[:, rows].unsqueeze(-1), self.query[:, rows].float(),
                                 self.key.transpose(-1, -2), alpha=self.scale)
        return torch.addmm(-self.lse[head, rows].unsqueeze(-1), self.query[head, rows].float(), self.key[head].T,
                           alpha=self.scale)

    def probs(self, rows: torch.Tensor | slice, head: int | None = None) -> torch.Tensor:
        """Attention probabilities of the given query rows: (heads, rows, N), or (rows, N) of one head; fp32."""
        return self.log_probs(rows, head).exp_()

    def fused_probs(self, rows: torch.Tensor | slice, head: "int | str") -> torch.Tensor:
        """fuse_heads(self.probs(rows), head), built one head at a time: (rows, N), fp32."""
        index = head_index(head)
        if index is not None:
            return self.probs(rows, index)
        fused = self.probs(rows, 0)
        combine = {"mean": torch.add, "max": torch.maximum, "min": torch.minimum}[head]
        for other in range(1, self.num_heads):
            combine(fused, self.probs(rows, other), out=fused)
        return fused.div_(self.num_heads) if head == "mean" else fused

    def column(self, token: int) -> torch.Tensor:
        """How much every query attends to `token`: (heads, N), fp32."""
        key = self.key[:, token:token + 1]  # (heads, 1, head_dim)
        return torch.baddbmm(-self.lse.unsqueeze(-1), self.query.float(), key.transpose(-1, -2),
                             alpha=self.scale)[..., 0].exp_()

    def mean_row(self) -> torch.Tensor:
        """The mean of every query row, per head (the mean attention each token receives): (heads, N), fp32."""
        total = torch.zeros(self.num_heads, self.num_tokens, device=self.key.device)
        step = self.block_rows()
        for head in range(self.num_heads):
            for start in range(0, self.num_tokens, step):
                total[head] += self.probs(slice(start, start + step), head).sum(0)
        return total.div_(self.num_tokens)

    def block_rows(self) -> int:
        """Query rows per block when sweeping the whole layer one head at a time."""
        return max(1, BLOCK_ELEMENTS // self.num_tokens)


class AttentionRecord:
    """Observes a forward pass (one image); keeps per layer its fp32 row log-sum-exps, then the hidden states.

    hidden_states[l] is layer l's input (the embeddings for l = 0) and hidden_states[-1] the last layer's output.
    The record holds the encoder layers that ran, so queries and keys are rebuilt with the forward's own weights
    and dtype; layers rebuilt with `keep=True` go to `store` (none: nothing is kept), keyed ("layer", serial, index).
    outputs[l] is layer l's heads' outputs (heads, N, head_dim), in the model's dtype, when `keep_outputs` asks and
    every layer's fit KEEP_OUTPUTS_BYTES (a record given no layers keeps none); otherwise outputs is empty.
    """

    def __init__(self, layers: Sequence[nn.Module] | None, patch_size: int,
                 on_layer: Callable[[int, LayerAttention], None] | None = None, store: LayerStore | None = None,
                 keep_outputs: bool = False):
        self.layers = layers
        self.keep_outputs = keep_outputs
        self.patch_size = patch_size  # pixels of the model input per patch side, for distances in pixels
        self.on_layer = on_layer  # sees each layer's attention (the forward's own q, k) while it exists
        self.lse: list[torch.Tensor] = []
        self.scales: list[float] = []
        self.first_queries: list[torch.Tensor] = []  # token 0's query per layer: checks every rebuild
        self.outputs: list[torch.Tensor] = []
        self.hidden_states: tuple[torch.Tensor, ...] = ()
        self.pooling: torch.Tensor | None = None  # an attention-pooling head's probe attention (heads, N)
        self.serial = next(_SERIALS)
        self.store = store
        if store is not None:
            serial = self.serial
            weakref.finalize(self, store.drop, lambda key: key[:2] == ("layer", serial))

    def observe_hidden(self, index: int, x: torch.Tensor) -> None:
        """Copies layer `index`'s input x (1, N, D) (index = layers: the last layer's output) into the buffer of them
        all, allocated at the embeddings (index 0)."""
        if x.shape[0] != 1:
            raise ValueError("the analysis records one image at a time")
        if index == 0:
            self._hidden = x.new_empty((len(self.layers) + 1, *x.shape[1:]))
        self._hidden[index].copy_(x[0])
        if index == len(self.layers):
            self.hidden_states = tuple(self._hidden.unbind(0))

    def observe_layer(self, layer: int, query: torch.Tensor, key: torch.Tensor, lse: torch.Tensor,
                      scale: float) -> None:
        if query.shape[0] != 1:
            raise ValueError("the analysis records one image at a time")
        if layer == 0:
            self._lse = torch.empty((len(self.layers), *lse.shape[1:]), dtype=torch.float32, device=lse.device)
            self._first_queries = torch.empty((len(self.layers), query.shape[1], query.shape[3]), dtype=torch.float32,
                                              device=query.device)
        self.lse.append(self._lse[layer].copy_(lse[0]))  # a copy: a kernel's lse may be a view of a padded one
        self.scales.append(scale)
        self.first_queries.append(self._first_queries[layer].copy_(query[0, :, 0]))
        if self.on_layer is not None:
            self.on_layer(layer, LayerAttention(query[0], key[0], lse[0], scale))

    def observe_output(self, layer: int, out: torch.Tensor) -> None:
        """Keeps a copy of the kernel's output when asked to and every layer's fit KEEP_OUTPUTS_BYTES."""
        if (self.keep_outputs and self.layers is not None
                and len(self.layers) * out[0].numel() * out.element_size() <= KEEP_OUTPUTS_BYTES):
            if layer == 0:
                self._outputs = out.new_empty((len(self.layers), *out.shape[1:]))
            self.outputs.append(self._outputs[layer].copy_(out[0]))

    def observe_pooling(self, probs: torch.Tensor) -> None:
        if probs.shape[0] != 1:
            raise ValueError("the analysis records one image at a time")
        self.pooling = probs[0].float()

    def moved(self, device: "str | torch.device", layers: Sequence[nn.Module] | None,
              store: LayerStore | None = None) -> "AttentionRecord":
        """A copy with every kept tensor on `device`, rebuilding with `layers` (the same weights, wherever they are):
        what crosses back from a GPU worker (ZeroGPU) holds tensors only, and is given the CPU model's layers."""
        moved = AttentionRecord(layers, self.patch_size, store=store)
        moved.lse = [t.to(device) for t in self.lse]
        moved.scales = list(self.scales)
        moved.first_queries = [t.to(device) for t in self.first_queries]
        moved.outputs = [t.to(device) for t in self.outputs]
        moved.hidden_states = tuple(t.to(device) for t in self.hidden_states)
        moved.pooling = None if self.pooling is None else self.pooling.to(device)
        return moved

    @property
    def device(self) -> torch.device:
        return self.lse[0].device

    @property
    def num_layers(self) -> int:
        return len(self.lse)

    @property
    def num_heads(self) -> int:
        return self.lse[0].shape[0]

    @property
    def num_tokens(self) -> int:
        return self.lse[0].shape[1]

    def release_between_layers(self) -> None:
        """After a layer of a sweep: freed memory handed back where the layers' working memory is large (see
        `analysis.memory`)."""
        mlp = self.layers[0].mlp.fc1  # its weights are in the forward's dtype: the analysis never casts the model
        if trims_between_layers(self.num_tokens, mlp.out_features, mlp.weight.element_size()):
            release_free_memory()

    @property
    def nbytes(self) -> int:
        kept = [*self.hidden_states, *self.lse, *self.first_queries, *self.outputs,
                *([] if self.pooling is None else [self.pooling])]
        return sum(t.numel() * t.element_size() for t in kept)

    def layer(self, index: int, keep: bool = False) -> LayerAttention:
        """Layer `index`'s attention, from the store or rebuilt from its input (then stored if `keep`)."""
        key = ("layer", self.serial, index)
        found = self.store.get(key) if self.store is not None else None
        if found is not None:
            return found
        attention = self._rebuild(index)
        if keep and self.store is not None:
            self.store.put(key, attention)
        return attention

    @torch.inference_mode()
    def _rebuild(self, index: int) -> LayerAttention:
        layer_input = self.hidden_states[index]
        query, key = self.layers[index].query_key(layer_input.unsqueeze(0))  # (1, heads, N, head_dim)
        query, key = query[0].float(), key[0].float()
        expected = self.first_queries[index]
        tolerance = max(1e-3, 8 * torch.finfo(layer_input.dtype).eps)  # any rounding; a wrong input is off by O(1)
        if not torch.allclose(query[:, 0], expected, rtol=tolerance, atol=tolerance * float(expected.abs().max())):
            raise RuntimeError(f"layer {index}'s queries rebuilt from hidden_states[{index}] differ from the "
                               "forward's: this model's hidden states are not its layers' inputs")
        return LayerAttention(query, key, self.lse[index], self.scales[index])


def head_index(head: "int | str") -> int | None:
    """The index of a single head (an int or a digit string), None for a fusion; anything else is refused."""
    if isinstance(head, int) or (isinstance(head, str) and head.isdigit()):
        return int(head)
    if head in FUSIONS:
        return None
    raise ValueError(f"head must be a head index or one of {FUSIONS}, got {head!r}")


def fuse_heads(probs: torch.Tensor, head: "int | str") -> torch.Tensor:
    """One head's rows, or the heads fused by mean, max or min: (heads, ...) → (...)."""
    index = head_index(head)
    if index is not None:
        return probs[index]
    if head == "mean":
        return probs.mean(0)
    if head == "max":
        return probs.amax(0)
    return probs.amin(0)
