"""What stands in for the class token: its row where there is one, else the mean attention each token receives.

Decided once per model and named, so the maps, rollout, flow, statistics and exports all describe the same thing.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from model import IdeficsVisionConfig

from .record import LayerAttention, fuse_heads

CLASS_TOKEN = "class token"
MEAN_RECEIVED = "mean attention received"
POOLING_CLAUSE = "the attention-pooling probe's map shows what summarises the image"


@dataclass(frozen=True)
class Summary:
    """What each layer's maps, rollout, flow and class-token statistics describe, in words for the page and JSON."""

    kind: str  # CLASS_TOKEN (row 0 of each layer) or MEAN_RECEIVED (the mean of every query row, per head)
    pooling: bool  # an attention-pooling probe's map (after the last layer) is available
    distillation: bool  # the distillation token's rows (token 1) are kept beside the class token's
    description: str  # one sentence the page shows as it is
    rollout_top: str  # the vector rollout starts from at the top
    flow_sink: str  # where attention flow ends
    statistics_note: str  # what cls_entropy, cls_patch_entropy and cls_mass mean for this model

    @property
    def class_token(self) -> bool:
        return self.kind == CLASS_TOKEN

    def to_dict(self) -> dict[str, str | bool]:
        return asdict(self)


def summary_of(config: IdeficsVisionConfig) -> Summary:
    """The stand-in for the class token this model's views use: the class token itself when it has one."""
    pooling, distillation = config.pooling_head, config.distillation_token
    if config.class_token:
        extras = []
        if distillation:
            extras.append("the distillation token's attention to every patch is kept as well")
        if pooling:
            extras.append(POOLING_CLAUSE)
        return Summary(
            CLASS_TOKEN, pooling, distillation,
            "; ".join(["Each map shows the class token's attention to every patch, per head", *extras]) + ".",
            "e_0: the class token's row", "the class token at the top depth",
            "cls_entropy and cls_patch_entropy describe the class token's row; cls_mass is the attention patch "
            "queries give the class token.")
    if pooling:
        description = ("This model has no class token: each map shows the mean attention each patch receives from "
                       f"every token, per head; {POOLING_CLAUSE}.")
        top = "the pooling probe's attention, heads fused by the rollout's fusion and renormalised to sum to 1"
    else:
        description = ("This model has no class token and no pooling head: in their place, each map shows the mean "
                       "attention each patch receives from every token, per head.")
        top = "uniform, 1/N on every token: the rollout of the mean attention received"
    return Summary(MEAN_RECEIVED, pooling, distillation, description, top,
                   "a super-sink fed by every top-depth token with capacity equal to the rollout's top vector",
                   "cls_entropy and cls_patch_entropy describe the mean attention received; cls_mass is NaN: there "
                   "is no class token.")


def summary_rows(attention: LayerAttention, summary: Summary) -> torch.Tensor:
    """One layer's row per head that stands in for the class token: (heads, N), fp32."""
    if summary.class_token:
        return attention.probs(slice(0, 1))[:, 0]
    return attention.mean_row()


def top_vector(summary: Summary, pooling: torch.Tensor | None, fusion: str, num_tokens: int,
               device: torch.device) -> torch.Tensor | None:
    """The (N,) vector rollout and flow start from at the top; None: e_0, the class token."""
    if summary.class_token:
        return None
    if summary.pooling:
        if pooling is None:
            raise ValueError("this model has a pooling head but its probe's attention was not recorded")
        fused = fuse_heads(pooling, fusion).to(device)
        return fused / fused.sum()
    return torch.full((num_tokens,), 1.0 / num_tokens, device=device)
