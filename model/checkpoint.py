"""A checkpoint in our layout, the error every loading path raises, and the file names checkpoints use."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from .config import IdeficsVisionConfig
from .preprocess import IMAGENET_MEAN, IMAGENET_STD

if TYPE_CHECKING:
    from .heads import HeadWeights
    from .text_formats import TextWeights

WEIGHT_FILES = (  # a folder's weights file: the first one present wins; the hub fetches the .safetensors ones only
    "model.safetensors", "open_clip_model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")
INDEX_FILE = "model.safetensors.index.json"  # a sharded checkpoint: only the shards holding vision weights are read
CONFIG_FILES = ("config.json", "preprocessor_config.json", "open_clip_config.json")  # architecture, normalisation


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names what is wrong."""


@dataclass
class Checkpoint:
    """Weights already in our layout (the seed's parameter names), with what is needed to use them."""

    config: IdeficsVisionConfig
    state_dict: dict[str, torch.Tensor]
    name: str
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    head: HeadWeights | None = None  # a task head's weights, loaded beside the tower with their own strict check
    hub_id: str | None = None  # the hub repository it was fetched from (None: a local file or folder)
    text: TextWeights | None = None  # an image-text model's text tower (CLIP, SigLIP, open_clip), when present


def check_state_dict(module: nn.Module, state: dict[str, torch.Tensor], name: str) -> None:
    """Raises CheckpointError naming every missing, unexpected or misshapen key of `state` for `module`."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshapen = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
                 for k, v in state.items() if k in expected and v.shape != expected[k].shape]
    if missing or unexpected or misshapen:
        parts = [f"{label}: {', '.join(items[:8])}{' …' if len(items) > 8 else ''}"
                 for label, items in (("missing keys", missing), ("unexpected keys", unexpected),
                                      ("shape mismatches", misshapen)) if items]
        raise CheckpointError(f"{name} does not fit the model ({'; '.join(parts)})")
