"""Checkpoint formats as data: sentinel keys pick a format, a table of name swaps maps its keys onto ours,
and a few named special cases (split qkv, fold LayerScale, position tables, config files) do the rest."""
from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .preprocess import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD

Tensors = dict[str, torch.Tensor]
HEAD_WIDTH = 64  # where no config names the head count: width // 64 (open_clip's and timm's ViT default) …
HEAD_WIDTHS = {1280: 80, 1408: 88, 1664: 104}  # … except ViT-H, ViT-g and ViT-bigG, whose 16 heads are wider
L = r"encoder\.layers\.(\d+)\."  # our layer prefix


@dataclass(frozen=True)
class Format:
    name: str
    sentinels: tuple[str, ...]  # all present (after one of the prefixes) → this format
    prefixes: tuple[str, ...]  # stripped from keys; keys under none of them are ignored (text towers, LMs)
    swaps: tuple[tuple[str, str], ...] = ()  # regex → replacement, applied in order, on each stripped key
    dropped: tuple[str, ...] = ()  # regexes of keys that carry nothing we use (heads, mask tokens, buffers)
    special: Callable[[Tensors], Tensors] | None = None  # runs after the swaps
    defaults: dict = field(default_factory=dict)  # config fields of this family; a config file overrides them
    config_file: str | None = None  # the file, next to the weights, that describes the architecture
    config_fields: Callable[[dict], dict] | None = None  # that file's JSON → our config fields
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


def fold_layer_scale(state: Tensors, scale_suffix: str, projection: str) -> None:
    """LayerScale after a projection folds into it exactly: W' = diag(λ)·W, b' = λ ⊙ b."""
    for key in [k for k in state if k.endswith(scale_suffix)]:
        scale = state.pop(key)
        prefix = f"{key[: -len(scale_suffix)]}.{projection}"
        state[f"{prefix}.weight"] = scale[:, None] * state[f"{prefix}.weight"]
        state[f"{prefix}.bias"] = scale * state.get(f"{prefix}.bias", torch.zeros_like(scale))


def split_fused_qkv(state: Tensors, weight_suffix: str, bias_suffix: str) -> None:
    """(3D, D) in-projections, stacked q, k, v → q_proj, k_proj, v_proj (a missing bias becomes zeros)."""
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


def head_count(width: int) -> int:
    return max(1, width // HEAD_WIDTHS.get(width, HEAD_WIDTH))


def shape_fields(state: Tensors) -> dict:
    """The architecture read off a renamed state dict's shapes (the head count by `head_count`'s rule)."""
    patch = state["embeddings.patch_embedding.weight"]  # (D, C, patch, patch)
    positions = state["embeddings.position_embedding.weight"].shape[0] - 1
    grid = math.isqrt(positions)
    if grid * grid != positions or patch.shape[-1] != patch.shape[-2]:
        raise ValueError(f"{positions} patch positions of {tuple(patch.shape[-2:])} patches: not a square grid")
    layers = [int(m.group(1)) for k in state if (m := re.match(L, k))]
    return dict(hidden_size=patch.shape[0], intermediate_size=state["encoder.layers.0.mlp.fc1.weight"].shape[0],
                num_hidden_layers=1 + max(layers), num_attention_heads=head_count(patch.shape[0]),
                patch_size=patch.shape[-1], image_size=grid * patch.shape[-1])


def switches_from_keys(state: Tensors) -> dict:
    """The config switches that the weights themselves decide."""
    registers = state.get("embeddings.register_tokens")
    return dict(num_channels=state["embeddings.patch_embedding.weight"].shape[1],
                patch_bias="embeddings.patch_embedding.bias" in state,
                use_pre_layernorm="pre_layrnorm.weight" in state,
                num_register_tokens=registers.shape[1] if registers is not None else 0,
                projection_dim=state["proj"].shape[1] if "proj" in state else None)


# ---- named special cases: weights ----
def _clip(state: Tensors) -> Tensors:
    if "proj" in state:  # visual_projection (P, D) is applied to the pooled token as `pooled @ proj`
        state["proj"] = state["proj"].T
    return state


def _class_token_and_layer_scales(state: Tensors, attn_scale: str, mlp_scale: str) -> None:
    """The class token as a (D,) vector; LayerScale after attention and MLP folded into their projections."""
    state["embeddings.class_embedding"] = state["embeddings.class_embedding"].reshape(-1)
    fold_layer_scale(state, attn_scale, "self_attn.out_proj")
    fold_layer_scale(state, mlp_scale, "mlp.fc2")


def _dinov2(state: Tensors) -> Tensors:
    _class_token_and_layer_scales(state, ".layer_scale1.lambda1", ".layer_scale2.lambda1")
    position_table(state, "embeddings.position_embeddings", 1)
    return state


def _open_clip(state: Tensors) -> Tensors:
    split_fused_qkv(state, "self_attn.in_proj_weight", "self_attn.in_proj_bias")
    _class_token_and_layer_scales(state, ".ls_1.gamma", ".ls_2.gamma")
    position_table(state, "embeddings.positional_embedding", 1)
    return state


def _timm(state: Tensors) -> Tensors:
    split_fused_qkv(state, "self_attn.qkv.weight", "self_attn.qkv.bias")
    _class_token_and_layer_scales(state, ".ls1.gamma", ".ls2.gamma")
    positions = state["embeddings.pos_embed"].shape[1]
    registers = state["embeddings.register_tokens"].shape[1] if "embeddings.register_tokens" in state else 0
    # the table holds class (and register) slots, or, with timm's no_embed_class, the patches only
    candidates = tuple(dict.fromkeys((1 + registers, 1, 0)))
    in_table = next((n for n in candidates if positions > n and math.isqrt(positions - n) ** 2 == positions - n), None)
    if in_table is None:
        raise ValueError(f"pos_embed has {positions} rows: no square patch grid after {candidates} prefix rows")
    position_table(state, "embeddings.pos_embed", in_table)
    return state


# ---- named special cases: config files ----
def _transformers_fields(config: dict) -> dict:
    """config.json of CLIPVisionModel, CLIPModel / IDEFICS (`vision_config` inside) or DINOv2."""
    values = dict(config.get("vision_config", config))
    if values.get("use_swiglu_ffn"):
        raise ValueError("DINOv2 checkpoints with a SwiGLU MLP (ViT-g) are not supported")
    if "mlp_ratio" in values and "intermediate_size" not in values:
        values["intermediate_size"] = int(values.get("hidden_size", values.get("embed_dim")) * values["mlp_ratio"])
    return values


def _open_clip_fields(config: dict) -> dict:
    """open_clip_config.json: heads from `head_width`, quick_gelu for the OpenAI-trained models."""
    model = config.get("model_cfg", {})
    vision = model.get("vision_cfg", {})
    values = {"hidden_act": "quick_gelu"} if model.get("quick_gelu") else {}
    if "width" in vision:
        values["num_attention_heads"] = vision["width"] // vision.get("head_width", HEAD_WIDTH)
    return values


def _timm_fields(config: dict) -> dict:
    """timm's config.json names the architecture; `*_quickgelu_*` ones are OpenAI CLIP towers."""
    return {"hidden_act": "quick_gelu"} if "quickgelu" in config.get("architecture", "") else {}


DINOV2_SWAPS = (
    (r"^encoder\.layer\.(\d+)\.", r"encoder.layers.\1."),
    (r"\.norm1\.", ".layer_norm1."), (r"\.norm2\.", ".layer_norm2."),
    (r"\.attention\.attention\.([qkv])(?:uery|ey|alue)\.", r".self_attn.\1_proj."),  # on disk (4 and 5)
    (r"\.attention\.([qkv])_proj\.", r".self_attn.\1_proj."),  # transformers 5 in memory
    (r"\.attention\.(?:output\.dense|o_proj)\.", ".self_attn.out_proj."),
    (r"^embeddings\.cls_token$", "embeddings.class_embedding"),
    (r"^embeddings\.patch_embeddings\.projection\.", "embeddings.patch_embedding."),
    (r"^layernorm\.", "post_layernorm."),
)
OPEN_CLIP_SWAPS = (
    (r"^conv1\.", "embeddings.patch_embedding."), (r"^class_embedding$", "embeddings.class_embedding"),
    (r"^positional_embedding$", "embeddings.positional_embedding"), (r"^ln_pre\.", "pre_layrnorm."),
    (r"^ln_post\.", "post_layernorm."), (r"^transformer\.resblocks\.(\d+)\.", r"encoder.layers.\1."),
    (r"\.ln_1\.", ".layer_norm1."), (r"\.ln_2\.", ".layer_norm2."), (r"\.attn\.out_proj\.", ".self_attn.out_proj."),
    (r"\.attn\.in_proj_", ".self_attn.in_proj_"), (r"\.mlp\.c_fc\.", ".mlp.fc1."), (r"\.mlp\.c_proj\.", ".mlp.fc2."),
)
TIMM_SWAPS = (
    (r"^patch_embed\.proj\.", "embeddings.patch_embedding."), (r"^cls_token$", "embeddings.class_embedding"),
    (r"^(reg_token|register_tokens)$", "embeddings.register_tokens"), (r"^pos_embed$", "embeddings.pos_embed"),
    (r"^norm_pre\.", "pre_layrnorm."), (r"^norm\.", "post_layernorm."), (r"^blocks\.(\d+)\.", r"encoder.layers.\1."),
    (r"\.norm1\.", ".layer_norm1."), (r"\.norm2\.", ".layer_norm2."), (r"\.attn\.qkv\.", ".self_attn.qkv."),
    (r"\.attn\.proj\.", ".self_attn.out_proj."),
)
TRANSFORMERS = dict(config_file="config.json", config_fields=_transformers_fields)
DINOV2 = dict(prefixes=("dinov2.", ""), swaps=DINOV2_SWAPS, dropped=(r"embeddings\.mask_token", r"classifier\..*"),
              special=_dinov2, **TRANSFORMERS)
FORMATS = (  # the first format whose sentinels are all present wins
    Format("transformers IDEFICS", ("embeddings.class_embedding", "pre_layrnorm.weight"), ("model.vision_model.",),
           dropped=(r"embeddings\.position_ids",), defaults={"pos_interpolation": "idefics"},
           mean=CLIP_MEAN, std=CLIP_STD, **TRANSFORMERS),
    Format("transformers CLIP", ("embeddings.class_embedding", "pre_layrnorm.weight"), ("vision_model.", ""),
           swaps=((r"^visual_projection\.weight$", "proj"),),
           dropped=(r"embeddings\.position_ids", r"text_model\..*", r"text_projection\..*", r"logit_scale"),
           special=_clip, defaults={"pos_interpolation": "size"}, mean=CLIP_MEAN, std=CLIP_STD, **TRANSFORMERS),
    Format("transformers DINOv2 with registers", ("embeddings.cls_token", "embeddings.register_tokens"), **DINOV2,
           defaults={"pos_interpolation": "size_antialias", "use_pre_layernorm": False, "layer_norm_eps": 1e-6}),
    Format("transformers DINOv2", ("embeddings.cls_token", "embeddings.position_embeddings"), **DINOV2,
           defaults={"pos_interpolation": "size", "use_pre_layernorm": False, "layer_norm_eps": 1e-6}),
    Format("open_clip / OpenAI CLIP", ("conv1.weight", "class_embedding", "positional_embedding"), ("visual.",),
           swaps=OPEN_CLIP_SWAPS, special=_open_clip, defaults={"pos_interpolation": "size_antialias"},
           config_file="open_clip_config.json", config_fields=_open_clip_fields, mean=CLIP_MEAN, std=CLIP_STD),
    Format("timm ViT", ("cls_token", "pos_embed", "patch_embed.proj.weight"), ("",), swaps=TIMM_SWAPS,
           dropped=(r"head\..*", r"fc_norm\..*", r"mask_token"), special=_timm,
           defaults={"pos_interpolation": "size_antialias", "layer_norm_eps": 1e-6},
           config_file="config.json", config_fields=_timm_fields),
)
VISION_PREFIXES = tuple(dict.fromkeys(p for fmt in FORMATS for p in fmt.prefixes if p))


def detect(keys: set[str]) -> Format | None:
    """The first format all of whose sentinels appear under one of its prefixes."""
    for fmt in FORMATS:
        for prefix in fmt.prefixes:
            if all(prefix + s in keys for s in fmt.sentinels):
                return fmt
    return None


def vision_entries(weight_map: dict[str, str]) -> dict[str, str]:
    """The {key: shard} entries of a sharded checkpoint that hold vision weights: those under a vision prefix
    (IDEFICS: never the language model), or all of them when no key has one (a vision-only model)."""
    vision = {k: shard for k, shard in weight_map.items() if k.startswith(VISION_PREFIXES)}
    return vision or dict(weight_map)
