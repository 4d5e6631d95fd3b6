"""The text tower of an image-text model (CLIP, SigLIP, open_clip) with transformers' CLIP parameter names, its
projection and logit scale (and SigLIP's bias), and the scalar they give an image and a prompt:

    CLIP:    logit = exp(logit_scale) · cos(image embedding, text embedding)           (softmax over prompts)
    SigLIP:  logit = exp(logit_scale) · cos(image embedding, text embedding) + bias    (sigmoid per prompt)

The image embedding is the vision tower's pooled output (projected where the checkpoint projects it)."""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .config import IdeficsVisionConfig
from .tokenizer import PromptTokenizer
from .vision import IdeficsVisionEncoderLayer

EMBEDDINGS_KEPT = 1024  # text embeddings kept per model, by prompt: a new image never re-encodes its prompts
ARGMAX, EOS, LAST = "argmax", "eos", "last"  # pooled token: the largest id (CLIP's end token), the first
# `eos_token_id` (transformers CLIP with a corrected config), or the last position (SigLIP)


@dataclass
class TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    context_length: int  # rows of the position table: prompts are truncated to it
    projection_dim: int
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    causal: bool = True  # CLIP's tower is causal; SigLIP's attends both ways
    pooling: str = ARGMAX
    eos_token_id: int | None = None  # for EOS pooling
    projection_bias: bool = False  # SigLIP's `head` has one, CLIP's `text_projection` not
    logit_bias: bool = False  # SigLIP (and open_clip's SigLIP-style models): scores are per-prompt sigmoids

    def layer_config(self) -> IdeficsVisionConfig:
        """The fields an encoder layer reads (the vision tower's layers serve here too)."""
        return IdeficsVisionConfig(hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
                                   num_hidden_layers=self.num_hidden_layers,
                                   num_attention_heads=self.num_attention_heads, hidden_act=self.hidden_act,
                                   layer_norm_eps=self.layer_norm_eps)


class TextEmbeddings(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.context_length, config.hidden_size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(ids) + self.position_embedding.weight[: ids.shape[1]]  # (P, T, D)


class TextEncoder(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        layer_config = config.layer_config()
        self.layers = nn.ModuleList(IdeficsVisionEncoderLayer(layer_config, i)
                                    for i in range(config.num_hidden_layers))


class TextTower(nn.Module):
    """Token and position embeddings, pre-norm layers (causal for CLIP), final norm, the pooled token projected."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = config
        self.embeddings = TextEmbeddings(config)
        self.encoder = TextEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.projection = nn.Linear(config.hidden_size, config.projection_dim, bias=config.projection_bias)
        self.logit_scale = nn.Parameter(torch.zeros(()))  # log of the scale, as the checkpoints store it
        if config.logit_bias:
            self.logit_bias = nn.Parameter(torch.zeros(()))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids (P, T) → text embeddings (P, projection_dim), not normalised."""
        x = self.embeddings(ids)
        for layer in self.encoder.layers:
            x = self._layer(layer, x)
        x = self.final_layer_norm(x)
        return self.projection(x[torch.arange(len(ids)), self._pooled_positions(ids)])

    def _layer(self, layer: IdeficsVisionEncoderLayer, x: torch.Tensor) -> torch.Tensor:
        attn = layer.self_attn
        normed = layer.layer_norm1(x)
        query, key = attn.query_key(normed)  # (P, heads, T, head_dim)
        value = attn._split_heads(attn.v_proj(normed))
        heads = F.scaled_dot_product_attention(query, key, value, is_causal=self.config.causal, scale=attn.scale)
        x = x + attn.out_proj(heads.transpose(1, 2).reshape(x.shape))
        return x + layer.mlp(layer.layer_norm2(x))

    def _pooled_positions(self, ids: torch.Tensor) -> torch.Tensor:
        if self.config.pooling == LAST:
            return torch.full((len(ids),), ids.shape[1] - 1, device=ids.device)
        if self.config.pooling == EOS:
            return (ids == self.config.eos_token_id).int().argmax(dim=-1)
        return ids.argmax(dim=-1)

    def logits(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """(B, E) image and (P, E) text embeddings → (B, P): the scaled cosine (plus the bias), as the model has it."""
        image = F.normalize(image_features.float(), dim=-1)
        text = F.normalize(text_features.float(), dim=-1)
        logits = image @ text.T * self.logit_scale.float().exp()
        return logits + self.logit_bias.float() if self.config.logit_bias else logits


@dataclass
class TextModel:
    """A loaded text tower with its tokenizer, and the embeddings of the last EMBEDDINGS_KEPT prompts it encoded."""

    tower: TextTower
    tokenizer: PromptTokenizer
    _kept: OrderedDict = field(default_factory=OrderedDict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def sigmoid(self) -> bool:
        """Whether scores are per-prompt sigmoids (SigLIP's bias) rather than a softmax over the prompts."""
        return self.tower.config.logit_bias

    @torch.inference_mode()
    def embed(self, prompts: list[str]) -> torch.Tensor:
        """(P, E) float32 text embeddings of the prompts, not normalised; prompts encoded before are not again."""
        with self._lock:
            known = {p: self._kept[p] for p in prompts if p in self._kept}
        missing = list(dict.fromkeys(p for p in prompts if p not in known))
        if missing:
            device = self.tower.logit_scale.device
            known |= dict(zip(missing, self.tower(self.tokenizer(missing).to(device)).float()))
        with self._lock:
            for prompt in prompts:
                self._kept[prompt] = known[prompt]
                self._kept.move_to_end(prompt)
            while len(self._kept) > EMBEDDINGS_KEPT:
                self._kept.popitem(last=False)
        return torch.stack([known[p] for p in prompts])

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, P) logits → the model's zero-shot scores: softmax over the prompts (CLIP), or sigmoids (SigLIP)."""
        return logits.sigmoid() if self.sigmoid else logits.softmax(dim=-1)

    @property
    def nbytes(self) -> int:
        """The weights, and the most the kept embeddings take."""
        weights = sum(t.numel() * t.element_size() for t in (*self.tower.parameters(), *self.tower.buffers()))
        return weights + EMBEDDINGS_KEPT * self.tower.config.projection_dim * 4
