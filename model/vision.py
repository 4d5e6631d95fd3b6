"""The IDEFICS vision tower: a CLIP-style ViT with the parameter names of transformers' checkpoints."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .config import IdeficsVisionConfig
from .posemb import bucketed_position_ids, resample_patch_posemb

CHUNK_ELEMENTS = 1 << 24  # scores held at once by the chunked fallback: 16M floats, 64 MB in fp32


class AttentionObserver(Protocol):
    """Receives what each layer's attention needs to be recomputed row by row, never an N×N matrix."""

    def observe_layer(self, layer: int, query: torch.Tensor, key: torch.Tensor, lse: torch.Tensor,
                      scale: float) -> None:
        """query, key: (B, heads, N, head_dim) projections; lse: (B, heads, N) fp32 log-sum-exp of each score row."""

    def observe_output(self, layer: int, out: torch.Tensor) -> None:
        """The heads' outputs softmax(scale·QKᵀ)·V as the kernel returned them: (B, heads, N, head_dim); optional."""

    def observe_pooling(self, probs: torch.Tensor) -> None:
        """An attention-pooling head's probe attention over every token: (B, heads, N) (SigLIP); optional."""

    def observe_hidden(self, index: int, x: torch.Tensor) -> None:
        """Layer `index`'s input (B, N, D) (index = layers: the last layer's output) while the forward holds it;
        optional."""


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact softmax attention plus the fp32 log-sum-exp of every score row, without an N×N matrix.

    Uses the fused kernels that return the log-sum-exp (CPU flash attention, CUDA memory-efficient attention);
    elsewhere falls back to exact attention in blocks of query rows.
    """
    try:
        if q.device.type == "cpu":
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, scale=scale)[:2]
            return out, lse.float()
        if q.device.type == "cuda":
            out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
                q, k, v, None, True, scale=scale)[:2]
            return out, lse[..., :q.shape[-2]].float()
    except (RuntimeError, NotImplementedError):  # an op missing from this build or dtype: use the exact fallback
        pass
    return chunked_attention_with_lse(q, k, v, scale)


def chunked_attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference path of `attention_with_lse`: blocks of query rows, softmax in fp32."""
    batch, heads, tokens, _ = q.shape
    rows = max(1, CHUNK_ELEMENTS // (batch * heads * k.shape[-2]))
    out = torch.empty_like(q)
    lse = torch.empty(batch, heads, tokens, dtype=torch.float32, device=q.device)
    key_t = k.transpose(-1, -2)
    for start in range(0, tokens, rows):
        scores = torch.matmul(q[:, :, start:start + rows], key_t).float().mul_(scale)  # (B, heads, rows, N)
        lse[:, :, start:start + rows] = torch.logsumexp(scores, dim=-1)
        probs = torch.softmax(scores, dim=-1)
        out[:, :, start:start + rows] = torch.matmul(probs.to(v.dtype), v)
    return out, lse


@dataclass
class VisionOutput:
    last_hidden_state: torch.Tensor  # (B, N, D): after post_layernorm or before it (config.post_norm_tokens)
    pooler_output: torch.Tensor  # (B, D): the family's pooled output (see config.post_norm_tokens)
    hidden_states: tuple[torch.Tensor, ...] | None = None  # embeddings after pre-norm, then every layer's output
    attentions: tuple[torch.Tensor, ...] | None = None  # (B, heads, N, N) per layer, only when asked for

    def to_tuple(self) -> tuple:
        return tuple(v for v in (self.last_hidden_state, self.pooler_output, self.hidden_states, self.attentions)
                     if v is not None)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


ACTIVATION_FNS = {
    "gelu": F.gelu,
    "quick_gelu": quick_gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


class IdeficsVisionEmbeddings(nn.Module):
    """Patch conv + position embeddings, then the prefix tokens: [class][distillation][registers…][patches]."""

    def __init__(self, config: IdeficsVisionConfig):
        super().__init__()
        self.config = config
        dim = config.hidden_size
        if config.class_token:
            self.class_embedding = nn.Parameter(torch.randn(dim))
        if config.distillation_token:  # its position embedding is folded in: prefix positions never resample
            self.distillation_token = nn.Parameter(torch.zeros(1, 1, dim))
        if config.num_register_tokens:
            self.register_tokens = nn.Parameter(torch.zeros(1, config.num_register_tokens, dim))
        self.patch_embedding = nn.Conv2d(config.num_channels, dim, config.patch_size, config.patch_size,
                                         bias=config.patch_bias)
        num_positions = int(config.class_token) + config.native_grid ** 2  # a class slot, then the patches
        self.position_embedding = nn.Embedding(num_positions, dim)

    def patch_positions(self, grid_h: int, grid_w: int, square: bool) -> torch.Tensor:
        """(1, grid_h * grid_w, D) patch position embeddings; `square`: the input's height equals its width."""
        table = self.position_embedding.weight[int(self.config.class_token):].unsqueeze(0)
        native = self.config.native_grid
        if self.config.pos_interpolation == "idefics2":
            return table[:, bucketed_position_ids(grid_h, grid_w, native, table.device)]
        if (grid_h, grid_w) == (native, native) and square:  # the rule of the seed and of transformers
            return table
        return resample_patch_posemb(table, grid_h, grid_w, self.config.pos_interpolation)

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        batch, _, height, width = pixel_values.shape
        size = self.config.image_size
        resamples = self.config.pos_interpolation != "idefics2"  # IDEFICS2/3 take any size as it is
        if resamples and not interpolate_pos_encoding and (height != size or width != size):
            raise ValueError(f"input is {height}x{width} but the model expects {size}x{size}; "
                             "pass interpolate_pos_encoding=True for other sizes")
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # (B, D, grid_h, grid_w)
        grid_h, grid_w = patches.shape[-2:]
        patches = patches.flatten(2).transpose(1, 2) + self.patch_positions(grid_h, grid_w, height == width)
        prefix = []
        if self.config.class_token:
            prefix.append((self.class_embedding + self.position_embedding.weight[0]).expand(batch, 1, -1))
        if self.config.distillation_token:
            prefix.append(self.distillation_token.expand(batch, -1, -1))
        if self.config.num_register_tokens:
            prefix.append(self.register_tokens.expand(batch, -1, -1))
        return torch.cat(prefix + [patches], dim=1)  # (B, num_prefix_tokens + grid_h * grid_w, D)


class IdeficsVisionAttention(nn.Module):
    def __init__(self, config: IdeficsVisionConfig, layer_idx: int):
        super().__init__()
        dim = config.hidden_size
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim ** -0.5
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        return x.view(batch, tokens, self.num_heads, self.head_dim).transpose(1, 2)  # (B, heads, N, head_dim)

    def query_key(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The queries and keys of normalised tokens x (B, N, D), exactly as the forward computes them."""
        return self._split_heads(self.q_proj(x)), self._split_heads(self.k_proj(x))

    def forward(self, x: torch.Tensor, output_attentions: bool = False,
                observer: AttentionObserver | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, tokens, dim = x.shape
        q, k = self.query_key(x)
        v = self._split_heads(self.v_proj(x))
        weights = None
        if observer is not None:
            out, lse = attention_with_lse(q, k, v, self.scale)
            observer.observe_layer(self.layer_idx, q, k, lse, self.scale)
            observe_output = getattr(observer, "observe_output", None)
            if observe_output is not None:
                observe_output(self.layer_idx, out)
        elif output_attentions:
            scores = torch.matmul(q, k.transpose(-1, -2)) * self.scale  # (B, heads, N, N)
            weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)  # as transformers' eager path
            out = torch.matmul(weights, v)
        else:
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        out = out.transpose(1, 2).reshape(batch, tokens, dim)
        return self.out_proj(out), weights


class IdeficsVisionMLP(nn.Module):
    def __init__(self, config: IdeficsVisionConfig):
        super().__init__()
        self.activation = ACTIVATION_FNS[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(x)))


class IdeficsVisionEncoderLayer(nn.Module):
    def __init__(self, config: IdeficsVisionConfig, layer_idx: int):
        super().__init__()
        self.self_attn = IdeficsVisionAttention(config, layer_idx)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = IdeficsVisionMLP(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def query_key(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's attention queries and keys, (B, heads, N, head_dim) each, rebuilt from its input x (B, N, D)."""
        return self.self_attn.query_key(self.layer_norm1(x))

    def forward(self, x: torch.Tensor, output_attentions: bool = False,
                observer: AttentionObserver | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        attn, weights = self.self_attn(self.layer_norm1(x), output_attentions, observer)
        x = x + attn
        x = x + self.mlp(self.layer_norm2(x))
        return x, weights


class IdeficsVisionEncoder(nn.Module):
    def __init__(self, config: IdeficsVisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(IdeficsVisionEncoderLayer(config, i) for i in range(config.num_hidden_layers))


class PoolingAttention(nn.Module):
    """nn.MultiheadAttention's parameters (fused in-projection, out_proj), computed explicitly for one query."""

    def __init__(self, config: IdeficsVisionConfig):
        super().__init__()
        dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, probe: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """probe (B, 1, D) attends over x (B, N, D): the output (B, 1, D) and the fp32 probabilities (B, heads, N)."""
        batch, tokens, dim = x.shape
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        q = F.linear(probe, w_q, b_q).view(batch, 1, self.num_heads, -1).transpose(1, 2)  # (B, heads, 1, head_dim)
        k = F.linear(x, w_k, b_k).view(batch, tokens, self.num_heads, -1).transpose(1, 2)  # (B, heads, N, head_dim)
        v = F.linear(x, w_v, b_v).view(batch, tokens, self.num_heads, -1).transpose(1, 2)
        scores = torch.matmul(q, k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5  # (B, heads, 1, N)
        probs = torch.softmax(scores, dim=-1)[:, :, 0]  # (B, heads, N): what the output is computed from (and
        out = torch.matmul(probs.unsqueeze(2).to(v.dtype), v).transpose(1, 2).reshape(batch, 1, dim)  # its gradient)
        return self.out_proj(out), probs


class IdeficsVisionPoolingHead(nn.Module):
    """SigLIP's attention pooling (MAP): a learned probe attends over every token, then a residual MLP."""

    def __init__(self, config: IdeficsVisionConfig):
        super().__init__()
        self.probe = nn.Parameter(torch.randn(1, 1, config.hidden_size))
        self.attention = PoolingAttention(config)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = IdeficsVisionMLP(config)

    def forward(self, x: torch.Tensor, observer: AttentionObserver | None = None) -> torch.Tensor:
        pooled, probs = self.attention(self.probe.expand(len(x), -1, -1), x)  # (B, 1, D), (B, heads, N)
        observe = getattr(observer, "observe_pooling", None)
        if observe is not None:
            observe(probs)
        pooled = pooled + self.mlp(self.layernorm(pooled))
        return pooled[:, 0]


class IdeficsVisionTransformer(nn.Module):
    """CLIP-style ViT: patch conv + prefix tokens + position embeddings, pre-norm layers, post-norm, pooling."""

    def __init__(self, config: IdeficsVisionConfig):
        super().__init__()
        self.config = config
        self.embeddings = IdeficsVisionEmbeddings(config)
        self.pre_layrnorm = (nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
                             if config.use_pre_layernorm else nn.Identity())
        self.encoder = IdeficsVisionEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        if config.pooling_head:
            self.head = IdeficsVisionPoolingHead(config)
        if config.projection_dim:
            self.proj = nn.Parameter(torch.zeros(config.hidden_size, config.projection_dim))

    def forward(self, pixel_values: torch.Tensor, output_attentions: bool = False,
                output_hidden_states: bool = False, interpolate_pos_encoding: bool = False,
                return_dict: bool = True, observer: AttentionObserver | None = None) -> VisionOutput | tuple:
        """Runs the tower; `observer`, when given, sees every layer's attention without N×N matrices being kept."""
        x = self.pre_layrnorm(self.embeddings(pixel_values, interpolate_pos_encoding))  # (B, N, D)
        hidden_states = [x] if output_hidden_states else None
        attentions = [] if output_attentions else None
        observe_hidden = getattr(observer, "observe_hidden", None)
        for index, layer in enumerate(self.encoder.layers):
            if observe_hidden is not None:
                observe_hidden(index, x)
            x, weights = layer(x, output_attentions, observer)
            if hidden_states is not None:
                hidden_states.append(x)
            if attentions is not None:
                attentions.append(weights)
        if observe_hidden is not None:
            observe_hidden(len(self.encoder.layers), x)
        last_hidden_state, pooled = self.pool(x, observer)
        output = VisionOutput(last_hidden_state, pooled, tuple(hidden_states) if hidden_states is not None else None,
                              tuple(attentions) if attentions is not None else None)
        return output if return_dict else output.to_tuple()

    def pool(self, x: torch.Tensor, observer: AttentionObserver | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The last layer's output x (B, N, D) → (last_hidden_state, pooler_output), as the family defines them."""
        config = self.config
        normed = self.post_layernorm(x)
        if config.pooling_head:
            pooled = self.head(normed, observer)
        elif config.class_token:  # DeiT distilled: the mean of the class and distillation tokens, as timm's
            pooled = normed[:, :1 + config.distillation_token].mean(dim=1)
        else:
            pooled = normed[:, config.num_prefix_tokens:].mean(dim=1)
        if config.projection_dim:
            pooled = pooled @ self.proj
        return (normed if config.post_norm_tokens else x), pooled
