"""Configuration of the IDEFICS vision tower (a CLIP-style ViT) and the switches other ViT families need."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

POS_INTERPOLATIONS = ("idefics", "size", "size_antialias", "idefics2")
ACTIVATIONS = ("gelu", "quick_gelu", "gelu_new", "gelu_pytorch_tanh", "relu")


@dataclass
class IdeficsVisionConfig:
    """Field names follow transformers' `IdeficsVisionConfig` / `CLIPVisionConfig` so their configs load as-is."""

    hidden_size: int = 768  # token width (`embed_dim` is accepted as an alias)
    intermediate_size: int = 3072  # MLP hidden width
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    image_size: int = 224  # native resolution: the position table covers (image_size // patch_size)**2 patches
    patch_size: int = 32
    num_channels: int = 3
    hidden_act: str = "gelu"  # "gelu" (exact), "quick_gelu" (OpenAI CLIP), "gelu_pytorch_tanh" (SigLIP), …
    layer_norm_eps: float = 1e-5
    # Switches for the ViT families that share this architecture.
    use_pre_layernorm: bool = True  # CLIP/IDEFICS have `pre_layrnorm`; DINOv2, ViT, SigLIP and most timm ViTs don't
    patch_bias: bool = False  # CLIP/IDEFICS convs have no bias; the other families' do
    pos_interpolation: str = "idefics"  # how the patch position table meets a grid other than the native one:
    # "idefics": bicubic with scale_factor (grid + 0.1) / native, as the seed does; "size": bicubic to
    # size=(grid_h, grid_w) (transformers CLIP, SigLIP, ViT, DeiT, DINOv2); "size_antialias": the same with
    # antialias=True (DINOv2-with-registers, timm, open_clip); "idefics2": no resampling, every patch takes the
    # native-grid row its fractional coordinates fall into (IDEFICS2, IDEFICS3, SmolVLM), at any size
    class_token: bool = True  # False for SigLIP and IDEFICS2/3: the sequence is the patches (and registers) only
    distillation_token: bool = False  # DeiT distilled: a second prefix token right after the class token
    num_register_tokens: int = 0  # DINOv2-with-registers: extra prefix tokens after the class (and distillation) token
    pooling_head: bool = False  # SigLIP's attention-pooling head (`head.*`): a probe attends over every token
    projection_dim: int | None = None  # open_clip/OpenAI `proj` applied to the pooled token, when present
    post_norm_tokens: bool = False  # what `last_hidden_state` is, following each library's own output. False: the
    # last layer's output, post_layernorm applied to the pooled token only (transformers CLIP and IDEFICS). True:
    # post_layernorm applied to every token, last_hidden_state after it (SigLIP, IDEFICS2/3, ViT, DeiT, DINOv2,
    # timm's forward_features, open_clip's tokens).
    # `pooler_output`, per family: post_layernorm(class token) (CLIP, IDEFICS, ViT, DINOv2, timm), times `proj` where
    # the checkpoint has one (CLIP with projection, open_clip); DeiT distilled: the mean of the normalised class and
    # distillation tokens (timm's pre-logits); SigLIP: the pooling head's output; no class token and no head
    # (IDEFICS2/3): the mean of the normalised patch tokens. ViTModel's and DeiTModel's tanh `pooler` is not loaded.

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by {self.num_attention_heads} heads")
        if self.pos_interpolation not in POS_INTERPOLATIONS:
            raise ValueError(f"pos_interpolation must be one of {POS_INTERPOLATIONS}, got {self.pos_interpolation!r}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act must be one of {ACTIVATIONS}, got {self.hidden_act!r}")

    @property
    def embed_dim(self) -> int:
        return self.hidden_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches: [class][distillation][registers…]."""
        return int(self.class_token) + int(self.distillation_token) + self.num_register_tokens

    @property
    def native_grid(self) -> int:
        return self.image_size // self.patch_size

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "IdeficsVisionConfig":
        """Builds a config from a transformers-style dict, ignoring keys this architecture does not use."""
        values = dict(values)
        if "embed_dim" in values:
            values.setdefault("hidden_size", values.pop("embed_dim"))
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
