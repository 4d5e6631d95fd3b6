"""The named special cases of checkpoint conversion: tensor surgery no name swap can do, and the readers of each
format's own config file. `formats.py` ties them to the formats."""
from __future__ import annotations

import math
import re

import torch

Tensors = dict[str, torch.Tensor]
HEAD_WIDTH = 64  # where no config names the head count: width // 64 (open_clip's and timm's ViT default) …
HEAD_WIDTHS = {1280: 80, 1408: 88, 1664: 104}  # … except ViT-H, ViT-g and ViT-bigG, whose 16 heads are wider
L = r"encoder\.layers\.(\d+)\."  # our layer prefix
CLASS, DISTILLATION = "embeddings.class_embedding", "embeddings.distillation_token"
REGISTERS = "embeddings.register_tokens"


# ---- building blocks ----
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


def fuse_pooling_qkv(state: Tensors) -> None:
    """timm's attention pool projects the probe (q) and the tokens (kv) apart; SigLIP's head stacks q, k, v."""
    if "head.attention.q.weight" not in state:
        return
    w_q, w_kv = state.pop("head.attention.q.weight"), state.pop("head.attention.kv.weight")
    zeros = torch.zeros(len(w_q) + len(w_kv), dtype=w_q.dtype)  # qkv_bias=False: no biases
    b_q = state.pop("head.attention.q.bias", zeros[:len(w_q)])
    b_kv = state.pop("head.attention.kv.bias", zeros[len(w_q):])
    state["head.attention.in_proj_weight"] = torch.cat([w_q, w_kv])
    state["head.attention.in_proj_bias"] = torch.cat([b_q, b_kv])


def zero_missing_biases(state: Tensors) -> None:
    """q/k/v projections saved without a bias (ViT's qkv_bias=False) get zero ones."""
    for key in [k for k in state if re.fullmatch(L + r"self_attn\.[qkv]_proj\.weight", k)]:
        state.setdefault(key[: -len("weight")] + "bias", torch.zeros(state[key].shape[0], dtype=state[key].dtype))


def position_table(state: Tensors, key: str, num_prefix_in_table: int) -> None:
    """A (1, P, D) table → our nn.Embedding weight: a class slot (with a class token), then the patches.

    The table's slots after the class slot belong to the distillation token and the registers, in token order.
    Prefix positions never resample, so they fold into those tokens exactly. A class token whose table has no slot
    for it (timm's no_embed_class) gets a zero one.
    """
    dim = state["embeddings.patch_embedding.weight"].shape[0]
    table = state.pop(key).reshape(-1, dim)
    prefix, patches = table[:num_prefix_in_table], table[num_prefix_in_table:]
    has_class = CLASS in state
    if len(prefix) > has_class:
        tokens = [k for k in (DISTILLATION, REGISTERS) if k in state]
        sizes = [state[k].shape[1] for k in tokens]
        if sum(sizes) != len(prefix) - has_class:
            raise ValueError(f"{len(prefix)} prefix positions for a class token and {sum(sizes)} other prefix tokens")
        for token, positions in zip(tokens, prefix[int(has_class):].split(sizes)):
            state[token] = state[token] + positions.unsqueeze(0)
    class_slot = (prefix[:1] if len(prefix) else torch.zeros_like(table[:1])) if has_class else table[:0]
    state["embeddings.position_embedding.weight"] = torch.cat([class_slot, patches])


def head_count(width: int) -> int:
    return max(1, width // HEAD_WIDTHS.get(width, HEAD_WIDTH))


def shape_fields(state: Tensors) -> dict:
    """The architecture read off a renamed state dict's shapes (the head count by `head_count`'s rule)."""
    patch = state["embeddings.patch_embedding.weight"]  # (D, C, patch, patch)
    positions = state["embeddings.position_embedding.weight"].shape[0] - int(CLASS in state)
    grid = math.isqrt(positions)
    if grid * grid != positions or patch.shape[-1] != patch.shape[-2]:
        raise ValueError(f"{positions} patch positions of {tuple(patch.shape[-2:])} patches: not a square grid")
    layers = [int(m.group(1)) for k in state if (m := re.match(L, k))]
    return dict(hidden_size=patch.shape[0], intermediate_size=state["encoder.layers.0.mlp.fc1.weight"].shape[0],
                num_hidden_layers=1 + max(layers), num_attention_heads=head_count(patch.shape[0]),
                patch_size=patch.shape[-1], image_size=grid * patch.shape[-1])


def switches_from_keys(state: Tensors) -> dict:
    """The config switches that the weights themselves decide."""
    registers = state.get(REGISTERS)
    return dict(num_channels=state["embeddings.patch_embedding.weight"].shape[1],
                patch_bias="embeddings.patch_embedding.bias" in state,
                use_pre_layernorm="pre_layrnorm.weight" in state,
                class_token=CLASS in state, distillation_token=DISTILLATION in state,
                num_register_tokens=registers.shape[1] if registers is not None else 0,
                pooling_head="head.probe" in state,
                projection_dim=state["proj"].shape[1] if "proj" in state else None)


def _class_token_as_vector(state: Tensors) -> None:
    if CLASS in state:  # (1, 1, D) elsewhere, (D,) in our layout
        state[CLASS] = state[CLASS].reshape(-1)


def _fold_layer_scales(state: Tensors, attn_scale: str, mlp_scale: str) -> None:
    """LayerScale after attention and after the MLP, folded into their output projections."""
    fold_layer_scale(state, attn_scale, "self_attn.out_proj")
    fold_layer_scale(state, mlp_scale, "mlp.fc2")


# ---- named special cases: weights ----
def clip(state: Tensors) -> Tensors:
    if "proj" in state:  # visual_projection (P, D) is applied to the pooled token as `pooled @ proj`
        state["proj"] = state["proj"].T
    return state


def vit(state: Tensors) -> Tensors:
    """transformers ViT and DeiT: (1, 1, D) tokens, a table with a slot per prefix token, optional q/k/v biases."""
    _class_token_as_vector(state)
    position_table(state, "embeddings.position_embeddings", 1 + (DISTILLATION in state))
    zero_missing_biases(state)
    return state


def dinov2(state: Tensors) -> Tensors:
    _class_token_as_vector(state)
    _fold_layer_scales(state, ".layer_scale1.lambda1", ".layer_scale2.lambda1")
    position_table(state, "embeddings.position_embeddings", 1)
    return state


def open_clip(state: Tensors) -> Tensors:
    split_fused_qkv(state, "self_attn.in_proj_weight", "self_attn.in_proj_bias")
    _class_token_as_vector(state)
    _fold_layer_scales(state, ".ls_1.gamma", ".ls_2.gamma")
    position_table(state, "embeddings.positional_embedding", 1)
    return state


def timm(state: Tensors) -> Tensors:
    split_fused_qkv(state, "self_attn.qkv.weight", "self_attn.qkv.bias")
    fuse_pooling_qkv(state)
    _class_token_as_vector(state)
    _fold_layer_scales(state, ".ls1.gamma", ".ls2.gamma")
    positions = state["embeddings.pos_embed"].shape[1]
    prefix = (CLASS in state) + (DISTILLATION in state) + (state[REGISTERS].shape[1] if REGISTERS in state else 0)
    # the table holds the prefix tokens' slots, or a class slot only, or (timm's no_embed_class) none
    candidates = tuple(dict.fromkeys((prefix, int(CLASS in state), 0)))
    in_table = next((n for n in candidates if positions > n and math.isqrt(positions - n) ** 2 == positions - n), None)
    if in_table is None:
        raise ValueError(f"pos_embed has {positions} rows: no square patch grid after {candidates} prefix rows")
    position_table(state, "embeddings.pos_embed", in_table)
    return state


# ---- named special cases: config files and defaults read off the keys ----
BUCKETED_MODEL_TYPES = {"idefics2", "idefics3", "smolvlm", "idefics2_vision", "idefics3_vision", "smolvlm_vision"}
TIMM_ACTIVATIONS = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_tanh": "gelu_pytorch_tanh"}
TIMM_ARCHITECTURES = (  # timm's own definitions (timm/models/vision_transformer.py) of what the weights can't tell
    (r"_clip_", {"layer_norm_eps": 1e-5}),  # CLIP towers: LayerNorm(eps=1e-5), where timm's ViT default is 1e-6
    (r"quickgelu", {"hidden_act": "quick_gelu"}),  # OpenAI-trained CLIP towers
)


def transformers_fields(config: dict) -> dict:
    """config.json of CLIP, IDEFICS, IDEFICS2/3, SmolVLM, SigLIP (`vision_config` inside), ViT, DeiT or DINOv2."""
    values = dict(config.get("vision_config") or config)
    if values.get("use_swiglu_ffn"):
        raise ValueError("DINOv2 checkpoints with a SwiGLU MLP (ViT-g) are not supported")
    if "mlp_ratio" in values and "intermediate_size" not in values:
        values["intermediate_size"] = int(values.get("hidden_size", values.get("embed_dim")) * values["mlp_ratio"])
    if isinstance(values.get("image_size"), (list, tuple)):
        height, width = values["image_size"]
        if height != width:
            raise ValueError(f"non-square native size {height}x{width} is not supported")
        values["image_size"] = height
    if {config.get("model_type"), values.get("model_type")} & BUCKETED_MODEL_TYPES:
        values["pos_interpolation"] = "idefics2"  # a bare IDEFICS2/3 tower looks like SigLIP but for this
    return values


def open_clip_fields(config: dict) -> dict:
    """open_clip_config.json: heads from `head_width`, quick_gelu for the OpenAI-trained models."""
    model = config.get("model_cfg", {})
    vision = model.get("vision_cfg", {})
    values = {"hidden_act": "quick_gelu"} if model.get("quick_gelu") else {}
    if "width" in vision:
        values["num_attention_heads"] = vision["width"] // vision.get("head_width", HEAD_WIDTH)
    return values


def timm_fields(config: dict) -> dict:
    """timm's config.json: what its architecture name implies, then the `model_args` it was built with."""
    architecture = config.get("architecture", "")
    values = {k: v for pattern, fields in TIMM_ARCHITECTURES if re.search(pattern, architecture)
              for k, v in fields.items()}
    args = config.get("model_args") or {}
    if "num_heads" in args:
        values["num_attention_heads"] = args["num_heads"]
    if args.get("act_layer") in TIMM_ACTIVATIONS:
        values["hidden_act"] = TIMM_ACTIVATIONS[args["act_layer"]]
    return values


def timm_key_defaults(state: Tensors) -> dict:
    """Without a config file: every timm ViT with a pre-norm (`norm_pre`) is a CLIP tower, LayerNorm eps 1e-5."""
    return {"layer_norm_eps": 1e-5} if "pre_layrnorm.weight" in state else {}
