"""A checkpoint in our layout, the error every loading path raises, and the file names checkpoints use."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import IdeficsVisionConfig
from .preprocess import IMAGENET_MEAN, IMAGENET_STD

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
    hub_id: str | None = None  # the hub repository it was fetched from (None: a local file or folder)
