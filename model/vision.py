"""The IDEFICS vision tower: a CLIP-style ViT with the parameter names of transformers' checkpoints."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .config import IdeficsVisionConfig
from .posemb import resample_patch_posemb

CHUNK_ELEMENTS = 1 << 24  # scores held at once by the chunked fallback: 16M floats, 64 MB in fp32


class AttentionObserver(Protocol):
    """Receives what each layer's attention needs to be recomputed row by row, never an N×N matrix."""

    def observe_layer(self, layer: int, query: torch.Tensor, key: torch.Tensor, lse: torch.Tensor,
                      scale: float) -> None:
        """query, key: (B, heads, N, head_dim) projections; lse: (B, heads, N) fp32 log-sum-exp of each score row."""

    def observe_pooling(self, probs: torch.Tensor) -> None:
        """An attention-pooling head's probe attention over every token: (B, heads, N) (SigLIP); optional."""


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
    last_hidden_state: torch.Tensor  # (B, N, D), before post_layernorm
    pooler_output: torch.Tensor  # (B, D): post_layernorm(token 0), projected when the checkpoint has `proj`
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
    def __init__(self, config: IdeficsVisionConfig):
        super().__init__()
        self.config = config
        dim = config.hidden_size
        self.class_embedding = nn.Parameter(torch.randn(dim))
        self.patch_embedding = nn.Conv2d(config.num_channels, dim, config.patch_size, config.patch_size,
                                         bias=config.patch_bias)
        if config.num_register_tokens:
            self.register_tokens = nn.Parameter(torch.zeros(1, config.num_register_tokens, dim))
        self.num_positions = config.native_grid ** 2 + 1
        self.position_embedding = nn.Embedding(self.num_positions, dim)
        self.register_buffer("position_ids", torch.arange(self.num_positions).expand((1, -1)), persistent=False)

    def position_table(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """(1, 1 + grid_h * grid_w, D) position embeddings, resampled when the grid is not the native one."""
        table = self.position_embedding(self.position_ids)
        if grid_h * grid_w == self.num_positions - 1 and grid_h == grid_w:
            return table
        patches = resample_patch_posemb(table[:, 1:], grid_h, grid_w, self.config.pos_interpolation)
        return torch.cat([table[:, :1], patches], dim=1)

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        batch, _, height, width = pixel_values.shape
        size = self.config.image_size
        if not interpolate_pos_encoding and (height != size or width != size):
            raise ValueError(f"input is {height}x{width} but the model expects {size}x{size}; "
                             "pass interpolate_pos_encoding=True for other sizes")
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # (B, D, grid_h, grid_w)
        grid_h, grid_w = patches.shape[-2:]
        patches = patches.flatten(2).transpose(1, 2)  # (B, grid_h * grid_w, D)
        cls = self.class_embedding.expand(batch, 1, -1)
        tokens = torch.cat([cls, patches], dim=1) + self.position_table(grid_h, grid_w)
        if self.config.num_register_tokens:
            registers = self.register_tokens.expand(batch, -1, -1)
            tokens = torch.cat([tokens[:, :1], registers, tokens[:, 1:]], dim=1)
        return tokens


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
        elif output_attentions:
            weights = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * self.scale, dim=-1)  # (B, heads, N, N)
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


class IdeficsVisionTransformer(nn.Module):
    """CLIP-style ViT: patch conv + class token + position embeddings, pre-norm layers, post-norm on token 0."""

    def __init__(self, config: IdeficsVisionConfig):
        super().__init__()
        self.config = config
        self.embeddings = IdeficsVisionEmbeddings(config)
        self.pre_layrnorm = (nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
                             if config.use_pre_layernorm else nn.Identity())
        self.encoder = IdeficsVisionEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        if config.projection_dim:
            self.proj = nn.Parameter(torch.zeros(config.hidden_size, config.projection_dim))

    def forward(self, pixel_values: torch.Tensor, output_attentions: bool = False,
                output_hidden_states: bool = False, interpolate_pos_encoding: bool = False,
                return_dict: bool = True, observer: AttentionObserver | None = None) -> VisionOutput | tuple:
        """Runs the tower; `observer`, when given, sees every layer's attention without N×N matrices being kept."""
        x = self.pre_layrnorm(self.embeddings(pixel_values, interpolate_pos_encoding))  # (B, N, D)
        hidden_states = [x] if output_hidden_states else None
        attentions = [] if output_attentions else None
        for layer in self.encoder.layers:
            x, weights = layer(x, output_attentions, observer)
            if hidden_states is not None:
                hidden_states.append(x)
            if attentions is not None:
                attentions.append(weights)
        pooled = self.post_layernorm(x[:, 0])
        if self.config.projection_dim:
            pooled = pooled @ self.proj
        output = VisionOutput(x, pooled, tuple(hidden_states) if hidden_states is not None else None,
                              tuple(attentions) if attentions is not None else None)
        return output if return_dict else output.to_tuple()
