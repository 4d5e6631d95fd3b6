"""Checkpoint formats as data: sentinel keys pick a format, a table of name swaps maps its keys onto ours,
and a few named special cases (`conversions.py`: split qkv, fold LayerScale, position tables, config files)
do the rest."""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from . import conversions as c
from .conversions import Tensors
from .heads import CLASS, CLASS_AND_PATCH_MEAN, HeadFormat
from .preprocess import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, STANDARD_MEAN, STANDARD_STD
from .text_formats import text_keys


@dataclass(frozen=True)
class Format:
    name: str
    sentinels: tuple[str, ...]  # all present (after one of the prefixes) → this format
    prefixes: tuple[str, ...]  # stripped from keys; keys under none of them are ignored (text towers, LMs)
    swaps: tuple[tuple[str, str], ...] = ()  # regex → replacement, applied in order, on each stripped key
    dropped: tuple[str, ...] = ()  # regexes of keys that carry nothing we use (heads, mask tokens, buffers)
    special: Callable[[Tensors], Tensors] | None = None  # runs after the swaps
    defaults: dict = field(default_factory=dict)  # config fields of this family; a config file overrides them
    key_defaults: Callable[[Tensors], dict] | None = None  # family defaults that the converted keys reveal
    config_file: str | None = None  # the file, next to the weights, that describes the architecture
    config_fields: Callable[[dict], dict] | None = None  # that file's JSON → our config fields
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    head: HeadFormat | None = None  # where its classifier's keys are (among `dropped`: the tower never sees them)


def stripped(state: Tensors, fmt: Format) -> Tensors:
    """The keys under one of the format's prefixes, that prefix stripped."""
    out = {}
    for key, value in state.items():
        prefix = next((p for p in fmt.prefixes if key.startswith(p)), None)
        if prefix is not None:
            out[key[len(prefix):]] = value
    return out


def rename(state: Tensors, fmt: Format) -> Tensors:
    """Strips the format's prefix, drops what we don't use, applies the swaps."""
    out = {}
    for key, value in stripped(state, fmt).items():
        if any(re.fullmatch(d, key) for d in fmt.dropped):
            continue
        for pattern, replacement in fmt.swaps:
            key = re.sub(pattern, replacement, key)
        out[key] = value
    return out


HF_ATTENTION_SWAPS = (  # transformers' BERT-style attention names (ViT, DeiT, DINOv2)
    (r"^encoder\.layer\.(\d+)\.", r"encoder.layers.\1."),
    (r"\.attention\.attention\.([qkv])(?:uery|ey|alue)\.", r".self_attn.\1_proj."),  # on disk (4 and 5)
    (r"\.attention\.([qkv])_proj\.", r".self_attn.\1_proj."),  # transformers 5 in memory
    (r"\.attention\.(?:output\.dense|o_proj)\.", ".self_attn.out_proj."),
    (r"^embeddings\.cls_token$", "embeddings.class_embedding"),
    (r"^embeddings\.patch_embeddings\.projection\.", "embeddings.patch_embedding."),
    (r"^layernorm\.", "post_layernorm."),
)
DINOV2_SWAPS = HF_ATTENTION_SWAPS + ((r"\.norm1\.", ".layer_norm1."), (r"\.norm2\.", ".layer_norm2."))
VIT_SWAPS = HF_ATTENTION_SWAPS + (
    (r"\.layernorm_before\.", ".layer_norm1."), (r"\.layernorm_after\.", ".layer_norm2."),
    (r"\.intermediate\.dense\.", ".mlp.fc1."), (r"(layers\.\d+)\.output\.dense\.", r"\1.mlp.fc2."),
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
    (r"^dist_token$", "embeddings.distillation_token"),
    (r"^(reg_token|register_tokens)$", "embeddings.register_tokens"), (r"^pos_embed$", "embeddings.pos_embed"),
    (r"^norm_pre\.", "pre_layrnorm."), (r"^norm\.", "post_layernorm."), (r"^blocks\.(\d+)\.", r"encoder.layers.\1."),
    (r"\.norm1\.", ".layer_norm1."), (r"\.norm2\.", ".layer_norm2."), (r"\.attn\.qkv\.", ".self_attn.qkv."),
    (r"\.attn\.proj\.", ".self_attn.out_proj."),
    (r"^attn_pool\.latent$", "head.probe"), (r"^attn_pool\.(q|kv)\.", r"head.attention.\1."),  # SigLIP's MAP head
    (r"^attn_pool\.proj\.", "head.attention.out_proj."), (r"^attn_pool\.norm\.", "head.layernorm."),
    (r"^attn_pool\.mlp\.", "head.mlp."),
)
TRANSFORMERS = dict(config_file="config.json", config_fields=c.transformers_fields)
CLIP_LIKE = dict(mean=CLIP_MEAN, std=CLIP_STD, **TRANSFORMERS)
NORMED = {"post_norm_tokens": True}  # transformers' last_hidden_state is after the final norm in these families
SIGLIP_LIKE = dict(mean=STANDARD_MEAN, std=STANDARD_STD, **TRANSFORMERS)  # SigLIP and the IDEFICS2/3 towers
SIGLIP_DEFAULTS = {**NORMED, "class_token": False, "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6}
POSITION_IDS = r"embeddings\.position_ids"  # a buffer older transformers versions saved
PATCH_TOWER = ("embeddings.patch_embedding.weight", "embeddings.position_embedding.weight", "post_layernorm.weight")
VIT_LAYER = ("embeddings.cls_token", "encoder.layer.0.layernorm_before.weight")
HF_CLASSIFIER = r"(?:cls_)?classifier\.(weight|bias)"  # DeiT with teacher: cls_ and distillation_classifier
VIT_HEAD = HeadFormat(((HF_CLASSIFIER, r"classifier.\1"),
                       (r"distillation_classifier\.(weight|bias)", r"distillation_classifier.\1")), CLASS)
TIMM_HEAD = HeadFormat(((r"head\.(weight|bias)", r"classifier.\1"),
                        (r"head_dist\.(weight|bias)", r"distillation_classifier.\1")), None)  # global_pool decides
VIT = dict(swaps=VIT_SWAPS, special=c.vit, head=VIT_HEAD, **TRANSFORMERS,  # ViTConfig's and DeiTConfig's eps: 1e-12
           dropped=(r"embeddings\.mask_token", r"pooler\..*", r"(cls_|distillation_)?classifier\..*"),
           defaults={**NORMED, "pos_interpolation": "size", "layer_norm_eps": 1e-12})
DINOV2 = dict(prefixes=("dinov2.", "dinov2_with_registers.", ""), swaps=DINOV2_SWAPS,
              dropped=(r"embeddings\.mask_token", r"classifier\..*"),
              special=c.dinov2, head=HeadFormat(((HF_CLASSIFIER, r"classifier.\1"),), CLASS_AND_PATCH_MEAN),
              **TRANSFORMERS)
FORMATS = (  # the first format whose sentinels are all present wins
    Format("transformers IDEFICS", ("embeddings.class_embedding", "pre_layrnorm.weight"), ("model.vision_model.",),
           dropped=(POSITION_IDS,), defaults={"pos_interpolation": "idefics"}, **CLIP_LIKE),
    Format("transformers IDEFICS2/IDEFICS3", PATCH_TOWER, ("model.vision_model.",), dropped=(POSITION_IDS,),
           defaults={**SIGLIP_DEFAULTS, "pos_interpolation": "idefics2"}, **SIGLIP_LIKE),
    Format("transformers CLIP", ("embeddings.class_embedding", "pre_layrnorm.weight"), ("vision_model.", ""),
           swaps=((r"^visual_projection\.weight$", "proj"),),
           dropped=(POSITION_IDS, r"text_model\..*", r"text_projection\..*", r"logit_scale"),
           special=c.clip, defaults={"pos_interpolation": "size", "hidden_act": "quick_gelu"}, **CLIP_LIKE),
    Format("transformers SigLIP", PATCH_TOWER, ("vision_model.", ""),
           dropped=(POSITION_IDS, r"text_model\..*", r"logit_(scale|bias)", r"classifier\..*"),
           defaults={**SIGLIP_DEFAULTS, "pos_interpolation": "size"}, **SIGLIP_LIKE),
    Format("transformers DeiT", (*VIT_LAYER, "embeddings.distillation_token"), ("deit.", ""), **VIT),
    Format("transformers ViT", VIT_LAYER, ("vit.", ""), **VIT, mean=STANDARD_MEAN, std=STANDARD_STD),
    Format("transformers DINOv2 with registers", ("embeddings.cls_token", "embeddings.register_tokens"), **DINOV2,
           defaults={**NORMED, "pos_interpolation": "size_antialias", "layer_norm_eps": 1e-6}),
    Format("transformers DINOv2", ("embeddings.cls_token", "embeddings.position_embeddings"), **DINOV2,
           defaults={**NORMED, "pos_interpolation": "size", "layer_norm_eps": 1e-6}),
    Format("open_clip / OpenAI CLIP", ("conv1.weight", "class_embedding", "positional_embedding"), ("visual.",),
           swaps=OPEN_CLIP_SWAPS, special=c.open_clip, defaults={**NORMED, "pos_interpolation": "size_antialias"},
           config_file="open_clip_config.json", config_fields=c.open_clip_fields, mean=CLIP_MEAN, std=CLIP_STD),
    Format("timm ViT", ("pos_embed", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight"), ("",),
           swaps=TIMM_SWAPS, dropped=(r"head(_dist)?\..*", r"fc_norm\..*", r"mask_token"), special=c.timm,
           defaults={**NORMED, "pos_interpolation": "size_antialias", "layer_norm_eps": 1e-6},
           key_defaults=c.timm_key_defaults, config_file="config.json", config_fields=c.timm_fields, head=TIMM_HEAD),
)
CLASSIFIER_KEYS = r"(?:cls_|distillation_)?classifier\.(?:weight|bias)"  # transformers' *ForImageClassification
VISION_PREFIXES = tuple(dict.fromkeys([p for fmt in FORMATS for p in fmt.prefixes if p]
                                      + ["visual_projection."]))  # CLIPModel keeps its projection outside the tower


def detect(keys: set[str]) -> Format | None:
    """The first format all of whose sentinels appear under one of its prefixes."""
    for fmt in FORMATS:
        for prefix in fmt.prefixes:
            if all(prefix + s in keys for s in fmt.sentinels):
                return fmt
    return None


def vision_keys(keys: "set[str] | list[str]") -> list[str]:
    """The keys that hold vision weights: those under a vision prefix (IDEFICS: never the language model) and an
    image classifier's, or all of them when no key has a vision prefix (a vision-only model)."""
    vision = [k for k in keys if k.startswith(VISION_PREFIXES)]
    return vision + [k for k in keys if re.fullmatch(CLASSIFIER_KEYS, k)] if vision else list(keys)


def tower_keys(keys: "set[str] | list[str]") -> list[str]:
    """The keys read from a checkpoint: the vision tower's (`vision_keys`) and an image-text model's text tower's."""
    return list(dict.fromkeys(vision_keys(keys) + text_keys(keys)))
