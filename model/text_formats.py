"""Where image-text checkpoints keep their text tower, and its conversion onto `text.TextTower`'s names: transformers
`CLIPModel` and `SiglipModel` (`text_model.*`), open_clip and OpenAI CLIP (`token_embedding`, `transformer.*`, …).
Only these keys are ever read beside the vision tower: a VLM's language model never is."""
from __future__ import annotations

import re
from dataclasses import dataclass, field, fields

from .conversions import HEAD_WIDTH, Tensors, fold_layer_scale, split_fused_qkv
from .text import ARGMAX, EOS, LAST, TextConfig
from .tokenizer import PromptTokenizer


@dataclass(frozen=True)
class TextFormat:
    name: str
    sentinels: tuple[str, ...]  # all present → this format
    keys: str  # fullmatch regex of the keys it owns
    swaps: tuple[tuple[str, str], ...] = ()
    dropped: tuple[str, ...] = ()
    defaults: dict = field(default_factory=dict)


LAYER_SWAPS = (  # open_clip's residual blocks → the encoder layers' names
    (r"^transformer\.resblocks\.(\d+)\.", r"encoder.layers.\1."), (r"\.ln_1\.", ".layer_norm1."),
    (r"\.ln_2\.", ".layer_norm2."), (r"\.attn\.out_proj\.", ".self_attn.out_proj."),
    (r"\.attn\.in_proj_", ".self_attn.in_proj_"), (r"\.mlp\.c_fc\.", ".mlp.fc1."), (r"\.mlp\.c_proj\.", ".mlp.fc2."),
)
TEXT_FORMATS = (
    TextFormat("transformers SigLIP", ("text_model.embeddings.token_embedding.weight", "text_model.head.weight"),
               r"text_model\..*|logit_scale|logit_bias",
               swaps=((r"^text_model\.head\.", "projection."), (r"^text_model\.", "")),
               dropped=(r"text_model\.embeddings\.position_ids",),
               defaults=dict(hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, causal=False, pooling=LAST,
                             projection_bias=True)),
    TextFormat("transformers CLIP", ("text_model.embeddings.token_embedding.weight", "text_projection.weight"),
               r"text_model\..*|text_projection\.weight|logit_scale",
               swaps=((r"^text_projection\.", "projection."), (r"^text_model\.", "")),
               dropped=(r"text_model\.embeddings\.position_ids",), defaults=dict(hidden_act="quick_gelu")),
    TextFormat("open_clip / OpenAI CLIP", ("token_embedding.weight", "positional_embedding", "ln_final.weight",
                                           "text_projection"),
               r"token_embedding\.weight|positional_embedding|transformer\.resblocks\..*|ln_final\..*|"
               r"text_projection|logit_scale|logit_bias|attn_mask",
               swaps=((r"^token_embedding\.", "embeddings.token_embedding."),
                      (r"^positional_embedding$", "embeddings.position_embedding.weight"),
                      (r"^ln_final\.", "final_layer_norm."), (r"^text_projection$", "projection.weight"),
                      *LAYER_SWAPS),
               dropped=(r"attn_mask",), defaults=dict(hidden_act="gelu")),
)
FAMILIES = "CLIP (transformers CLIPModel, OpenAI and open_clip checkpoints) and SigLIP (transformers SiglipModel)"
TEXT_FIELDS = {f.name for f in fields(TextConfig)}
CLIP_EOS = 49407  # transformers' CLIPTextConfig default end token


@dataclass
class TextWeights:
    """A text tower's config and state dict in our names, and the checkpoint's tokenizer (None: no files)."""

    config: TextConfig
    state_dict: Tensors
    tokenizer: PromptTokenizer | None


def detect_text(keys: "set[str] | list[str]") -> TextFormat | None:
    keys = set(keys)
    return next((fmt for fmt in TEXT_FORMATS if all(s in keys for s in fmt.sentinels)), None)


def text_keys(keys: "set[str] | list[str]") -> list[str]:
    """The keys of an image-text model's text tower, projection and logit scale (none for other models)."""
    fmt = detect_text(keys)
    return [k for k in keys if re.fullmatch(fmt.keys, k)] if fmt else []


def convert_text(raw: Tensors, fmt: TextFormat, config_file: dict | None, open_clip_file: dict | None) -> tuple[
        TextConfig, Tensors]:
    """The text tower's config and state dict in our names, from a checkpoint's keys and its config file."""
    state = {}
    for key in text_keys(raw):
        if any(re.fullmatch(d, key) for d in fmt.dropped):
            continue
        value = raw[key]
        for pattern, replacement in fmt.swaps:
            key = re.sub(pattern, replacement, key)
        state[key] = value.float() if value.is_floating_point() else value
    if fmt.name.startswith("open_clip"):
        split_fused_qkv(state, "self_attn.in_proj_weight", "self_attn.in_proj_bias")
        fold_layer_scale(state, ".ls_1.gamma", "self_attn.out_proj")
        fold_layer_scale(state, ".ls_2.gamma", "mlp.fc2")
        state["projection.weight"] = state["projection.weight"].T.contiguous()  # x @ text_projection
    for name in ("logit_scale", "logit_bias"):
        if name in state:
            state[name] = state[name].reshape(())  # SigLIP keeps them as (1,)
    values = {**fmt.defaults, **_shape_fields(state), **_file_fields(fmt, config_file, open_clip_file, state)}
    values["logit_bias"] = "logit_bias" in state
    return TextConfig(**{k: v for k, v in values.items() if k in TEXT_FIELDS}), state


def _shape_fields(state: Tensors) -> dict:
    vocab, width = state["embeddings.token_embedding.weight"].shape
    layers = {int(m.group(1)) for k in state if (m := re.match(r"encoder\.layers\.(\d+)\.", k))}
    return dict(vocab_size=vocab, hidden_size=width, num_hidden_layers=len(layers),
                intermediate_size=state["encoder.layers.0.mlp.fc1.weight"].shape[0],
                context_length=state["embeddings.position_embedding.weight"].shape[0],
                projection_dim=state["projection.weight"].shape[0], projection_bias="projection.bias" in state,
                num_attention_heads=max(1, width // HEAD_WIDTH))


def _file_fields(fmt: TextFormat, config_file: dict | None, open_clip_file: dict | None, state: Tensors) -> dict:
    """transformers' `text_config` (heads, activation, eps, CLIP's end token), or open_clip's `text_cfg`."""
    if fmt.name.startswith("open_clip"):
        model = (open_clip_file or {}).get("model_cfg", {})
        text = model.get("text_cfg", {})
        values = {"hidden_act": "quick_gelu"} if model.get("quick_gelu") else {}
        if "heads" in text:
            values["num_attention_heads"] = text["heads"]
        if text.get("no_causal_mask"):
            values["causal"] = False
        pool = text.get("pool_type", ARGMAX)
        if pool not in (ARGMAX, LAST):
            raise ValueError(f"open_clip text pool_type {pool!r} is not supported (only argmax and last)")
        return {**values, "pooling": pool}
    text = dict((config_file or {}).get("text_config") or {})
    values = {k: text[k] for k in ("num_attention_heads", "hidden_act", "layer_norm_eps") if k in text}
    if fmt.name == "transformers CLIP":
        eos = text.get("eos_token_id", CLIP_EOS)
        values |= {"pooling": ARGMAX} if eos == 2 else {"pooling": EOS, "eos_token_id": eos}  # transformers' rule
    return values
