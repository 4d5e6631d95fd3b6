"""Configuration of the IDEFICS vision tower (a CLIP-style ViT) and the switches other ViT families need."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

POS_INTERPOLATIONS = ("idefics", "size", "size_antialias")
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
    hidden_act: str = "gelu"  # "gelu" (exact) or "quick_gelu" (OpenAI CLIP), "gelu_new", "relu"
    layer_norm_eps: float = 1e-5
    attention_dropout: float = 0.0  # kept for checkpoint compatibility; the tool never trains
    # Switches for the ViT families that share this architecture.
    use_pre_layernorm: bool = True  # CLIP/IDEFICS have `pre_layrnorm`; DINOv2 and timm ViTs have none
    patch_bias: bool = False  # CLIP/IDEFICS convs have no bias; DINOv2 and timm ones do
    pos_interpolation: str = "idefics"  # "idefics": scale_factor with +0.1 (the seed); "size": size=(grid_h, grid_w)
    # as CLIP and DINOv2 do; "size_antialias": the same with antialias=True, as DINOv2-with-registers does
    num_register_tokens: int = 0  # DINOv2-with-registers: extra prefix tokens after the class token
    projection_dim: int | None = None  # open_clip/OpenAI `proj` applied to the pooled token, when present

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
        return 1 + self.num_register_tokens

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
