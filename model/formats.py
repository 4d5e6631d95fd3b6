"""Checkpoint formats as data: sentinel keys pick a format, a table of name swaps maps its keys onto ours,
and a few named special cases (split qkv, fold LayerScale, infer the config from shapes) do the rest."""
from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .config import IdeficsVisionConfig
from .preprocess import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD

Tensors = dict[str, torch.Tensor]
HEAD_WIDTH = 64  # the head-count rule where no config says it: width // 64 (open_clip's and timm's ViT default)
L = r"encoder\.layers\.(\d+)\."  # our layer prefix, used by the swaps below


@dataclass(frozen=True)
class Format:
    name: str
    sentinels: tuple[str, ...]  # all present (after the prefix) → this format
    prefixes: tuple[str, ...]  # stripped from keys; keys under none of them are ignored (text towers, LMs)
    swaps: tuple[tuple[str, str], ...] = ()  # regex → replacement, applied in order, on each stripped key
    dropped: tuple[str, ...] = ()  # regexes of keys that carry nothing we use (heads, mask tokens, buffers)
    special: Callable[[Tensors], Tensors] | None = None  # runs after the swaps
    defaults: dict = field(default_factory=dict)  # config fields this family always has
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD


def rename(state: Tensors, fmt: Format) -> Tensors:
    """Strips the format's prefix, drops what we don't use, applies the swaps."""
    out = {}
    for key, value in state.items():
        prefix = next((p for p in fmt.prefixes if key.startswith(p)), None)
        if prefix is None:
            continue
        key = key[len(prefix):]
        if any(re.fullmatch(d, key) for d in fmt.dropped):
            continue
        for pattern, replacement in fmt.swaps:
            key = re.sub(pattern, replacement, key)
        out[key] = value
    return out


def fold_layer_scale(state: Tensors, scale_key: str, projection: str) -> None:
    """LayerScale after a projection folds into it exactly: W' = diag(λ)·W, b' = λ ⊙ b."""
    for key in [k for k in state if k.endswith(scale_key)]:
        scale = state.pop(key)
        prefix = f"{key[: -len(scale_key)]}.{projection}"
        state[f"{prefix}.weight"] = scale[:, None] * state[f"{prefix}.weight"]
        state[f"{prefix}.bias"] = scale * state.get(f"{prefix}.bias", torch.zeros_like(scale))


def split_fused_qkv(state: Tensors, weight_suffix: str, bias_suffix: str) -> None:
    """(3D, D) in-projections → q_proj, k_proj, v_proj (a missing bias becomes zeros)."""
    for key in [k for k in state if k.endswith(weight_suffix)]:
        layer = key[: -len(weight_suffix)]
        weight = state.pop(key)
        bias = state.pop(layer + bias_suffix, torch.zeros(weight.shape[0], dtype=weight.dtype))
        for name, w, b in zip(("q_proj", "k_proj", "v_proj"), weight.chunk(3), bias.chunk(3)):
            state[f"{layer}self_attn.{name}.weight"] = w
            state[f"{layer}self_attn.{name}.bias"] = b


def position_table(state: Tensors, key: str, num_prefix_in_table: int) -> None:
    """A (1, P, D) table → our (1 + grid², D) nn.Embedding weight; a table without a class slot gets zeros."""
    table = state.pop(key).reshape(-1, state["embeddings.class_embedding"].shape[-1])
    if num_prefix_in_table == 0:
        table = torch.cat([torch.zeros_like(table[:1]), table])
    elif num_prefix_in_table > 1:  # class + register slots: register positions fold into the register tokens
        registers = table[1:num_prefix_in_table]
        state["embeddings.register_tokens"] = state["embeddings.register_tokens"] + registers.unsqueeze(0)
        table = torch.cat([table[:1], table[num_prefix_in_table:]])
    state["embeddings.position_embedding.weight"] = table


def _count_layers(state: Tensors) -> int:
    return 1 + max(int(m.group(1)) for k in state if (m := re.match(L, k)))


def switches_from_keys(state: Tensors) -> dict:
    """The config switches that the weights themselves decide."""
    return dict(num_channels=state["embeddings.patch_embedding.weight"].shape[1],
                patch_bias="embeddings.patch_embedding.bias" in state,
                use_pre_layernorm="pre_layrnorm.weight" in state,
                num_register_tokens=state["embeddings.register_tokens"].shape[1] if "embeddings.register_tokens" in state else 0,
                projection_dim=state["proj"].shape[1] if "proj" in state else None)


def config_from_shapes(state: Tensors, overrides: dict, **fixed) -> IdeficsVisionConfig:
    """The config of a renamed state dict, read off its shapes; `overrides` (num_heads, hidden_act, …) win."""
    patch = state["embeddings.patch_embedding.weight"]
    width = patch.shape[0]
    positions = state["embeddings.position_embedding.weight"].shape[0] - 1
    grid = math.isqrt(positions)
    values = dict(hidden_size=width, intermediate_size=state["encoder.layers.0.mlp.fc1.weight"].shape[0],
                  num_hidden_layers=_count_layers(state), num_attention_heads=max(1, width // HEAD_WIDTH),
                  patch_size=patch.shape[-1], image_size=grid * patch.shape[-1], pos_interpolation="size",
                  **switches_from_keys(state), **fixed)
    overrides = dict(overrides)
    if "num_heads" in overrides:
        overrides["num_attention_heads"] = overrides.pop("num_heads")
    values.update({k: v for k, v in overrides.items() if v is not None})
    return IdeficsVisionConfig(**values)


# ---- named special cases ----
def _open_clip(state: Tensors) -> Tensors:
    state["embeddings.class_embedding"] = state["embeddings.class_embedding"].reshape(-1)
    split_fused_qkv(state, "self_attn.in_proj_weight", "self_attn.in_proj_bias")
    position_table(state, "embeddings.positional_embedding", 1)
    return state


def _timm(state: Tensors) -> Tensors:
    state["embeddings.class_embedding"] = state["embeddings.class_embedding"].reshape(-1)
    split_fused_qkv(state, "self_attn.qkv.weight", "self_attn.qkv.bias")
    fold_layer_scale(state, ".ls1.gamma", "self_attn.out_proj")
    fold_layer_scale(state, ".ls2.gamma", "mlp.fc2")
    positions = state["embeddings.pos_embed"].shape[1]
    registers = state["embeddings.register_tokens"].shape[1] if "embeddings.register_tokens" in state else 0
    # no_embed_class: the table covers the patches only; else the class slot, and maybe the registers' slots
    in_table = next(n for n in (0, 1, 1 + registers, positions) if math.isqrt(positions - n) ** 2 == positions - n)
    position_table(state, "embeddings.pos_embed", in_table)
    return state


def _dinov2(state: Tensors) -> Tensors:
    state["embeddings.class_embedding"] = state["embeddings.class_embedding"].reshape(-1)
    fold_layer_scale(state, ".layer_scale1.lambda1", "self_attn.out_proj")
    fold_layer_scale(state, ".layer_scale2.lambda1", "mlp.fc2")
    position_table(state, "embeddings.position_embeddings", 1)
    return state


def _clip(state: Tensors) -> Tensors:
    if "proj" in state:  # visual_projection (P, D) is applied to the pooled token as `pooled @ proj`
        state["proj"] = state["proj"].T
    return state


LAYER_SWAPS_DINOV2 = (
    (r"^encoder\.layer\.(\d+)\.", r"encoder.layers.\1."),
    (r"\.norm1\.", ".layer_norm1."), (r"\.norm2\.", ".layer_norm2."),
    (r"\.attention\.attention\.query\.", ".self_attn.q_proj."), (r"\.attention\.attention\.key\.", ".self_attn.k_proj."),
    (r"\.attention\.attention\.value\.", ".self_attn.v_proj."), (r"\.attention\.output\.dense\.", ".self_attn.out_proj."),
    (r"\.attention\.([qkv])_proj\.", r".self_attn.\1_proj."), (r"\.attention\.o_proj\.", ".self_attn.out_proj."),
    (r"^embeddings\.cls_token$", "embeddings.class_embedding"),
    (r"^embeddings\.patch_embeddings\.projection\.", "embeddings.patch_embedding."),
    (r"^layernorm\.", "post_layernorm."),
)

FORMATS = (
    Format("transformers IDEFICS", ("embeddings.class_embedding", "pre_layrnorm.weight"), ("model.vision_model.",),
           dropped=(r"embeddings\.position_ids",), defaults={"pos_interpolation": "idefics"},
           mean=CLIP_MEAN, std=CLIP_STD),
    Format("transformers CLIP", ("embeddings.class_embedding", "pre_layrnorm.weight"), ("vision_model.", ""),
           swaps=((r"^visual_projection\.weight$", "proj"),),
           dropped=(r"embeddings\.position_ids", r"text_model\..*", r"text_projection\..*", r"logit_scale"),
           special=_clip,
           defaults={"pos_interpolation": "size"}, mean=CLIP_MEAN, std=CLIP_STD),
    Format("transformers DINOv2", ("embeddings.cls_token", "embeddings.position_embeddings"), ("dinov2.", ""),
           swaps=LAYER_SWAPS_DINOV2 + ((r"^embeddings\.register_tokens$", "embeddings.register_tokens"),),
           dropped=(r"embeddings\.mask_token", r"classifier\..*"), special=_dinov2,
           defaults={"pos_interpolation": "size", "use_pre_layernorm": False, "patch_bias": True}),
    Format("open_clip / OpenAI CLIP", ("conv1.weight", "class_embedding", "positional_embedding"), ("visual.",),
           swaps=((r"^conv1\.", "embeddings.patch_embedding."), (r"^class_embedding$", "embeddings.class_embedding"),
                  (r"^positional_embedding$", "embeddings.positional_embedding"), (r"^ln_pre\.", "pre_layrnorm."),
                  (r"^ln_post\.", "post_layernorm."), (r"^transformer\.resblocks\.(\d+)\.", r"encoder.layers.\1."),
                  (r"\.ln_1\.", ".layer_norm1."), (r"\.ln_2\.", ".layer_norm2."), (r"\.attn\.out_proj\.", ".self_attn.out_proj."),
                  (r"\.attn\.in_proj_", ".self_attn.in_proj_"), (r"\.mlp\.c_fc\.", ".mlp.fc1."), (r"\.mlp\.c_proj\.", ".mlp.fc2.")),
           special=_open_clip, mean=CLIP_MEAN, std=CLIP_STD),
    Format("timm ViT", ("cls_token", "pos_embed", "patch_embed.proj.weight"), ("",),
           swaps=((r"^patch_embed\.proj\.", "embeddings.patch_embedding."), (r"^cls_token$", "embeddings.class_embedding"),
                  (r"^reg_token$", "embeddings.register_tokens"), (r"^pos_embed$", "embeddings.pos_embed"),
                  (r"^norm_pre\.", "pre_layrnorm."), (r"^norm\.", "post_layernorm."), (r"^blocks\.(\d+)\.", r"encoder.layers.\1."),
                  (r"\.norm1\.", ".layer_norm1."), (r"\.norm2\.", ".layer_norm2."), (r"\.attn\.qkv\.", ".self_attn.qkv."),
                  (r"\.attn\.proj\.", ".self_attn.out_proj.")),
           dropped=(r"head\..*", r"fc_norm\..*", r"head_drop\..*"), special=_timm,
           defaults={"layer_norm_eps": 1e-6}),
)


def detect(keys: set[str]) -> Format | None:
    """The first format all of whose sentinels appear under one of its prefixes."""
    for fmt in FORMATS:
        for prefix in fmt.prefixes:
            if all(prefix + s in keys for s in fmt.sentinels):
                return fmt
    return None
