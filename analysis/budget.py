"""What one analysis may cost: tokens and work, checked from the geometry before any pixel is resized, and
wall-clock time, checked between layers (and in the sweeps that take a progress callback)."""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from model import IdeficsVisionConfig, ImageGeometry, InvalidImageError, Preprocessing

MIN_SIDE, MAX_SIDE = 224, 2048  # the long sides the page offers, in steps of the patch size


class BudgetError(InvalidImageError):
    """An analysis above this server's compute limits; the message says what would fit."""


@dataclass(frozen=True)
class ComputeLimits:
    """Caps on one analysis. Tokens count the prefix tokens; work = layers × tokens² × width, attention's share
    (scores and weighted sum), which grows fastest with the resolution and caps a deep, wide model sooner.

    The CPU defaults admit DINOv2-S/14 (12 layers, width 384) at 2044 px on a square image: 21,317 tokens,
    work 2.09e12; and ViT-H/14 (32 layers, width 1280) at 1022 px: 5,330 tokens, work 1.16e12. The GPU defaults
    admit ViT-S/8 at 2048 px (65,537 tokens, 1.98e13) and ViT-H/14 at 2044 px (1.86e13)."""

    max_tokens: int = 25_000
    max_work: float = 2.5e12
    max_seconds: float = 600.0  # DINOv2-S/14 at 2044 px took 42–170 s on a 2-core CPU (README)

    def deadline(self) -> "Deadline":
        return Deadline(self.max_seconds)


CPU_LIMITS = ComputeLimits()
GPU_LIMITS = ComputeLimits(max_tokens=70_000, max_work=2.5e13, max_seconds=300.0)


def cost(config: IdeficsVisionConfig, geometry: ImageGeometry) -> tuple[int, float]:
    """(tokens, work) of one forward pass at `geometry`."""
    tokens = geometry.grid_h * geometry.grid_w + config.num_prefix_tokens
    return tokens, float(config.num_hidden_layers) * tokens ** 2 * config.hidden_size


def fits(config: IdeficsVisionConfig, geometry: ImageGeometry, limits: ComputeLimits) -> bool:
    tokens, work = cost(config, geometry)
    return tokens <= limits.max_tokens and work <= limits.max_work


def largest_side(config: IdeficsVisionConfig, geometry: ImageGeometry, limits: ComputeLimits,
                 preprocessing: Preprocessing) -> int | None:
    """The largest long side offered (MIN_SIDE up to MAX_SIDE in steps of the patch size) that fits for this image."""
    for side in range(MIN_SIDE + (MAX_SIDE - MIN_SIDE) // geometry.patch_size * geometry.patch_size, MIN_SIDE - 1,
                      -geometry.patch_size):
        if fits(config, preprocessing.geometry(geometry.orig_h, geometry.orig_w, side), limits):
            return side
    return None


def check_cost(config: IdeficsVisionConfig, geometry: ImageGeometry, limits: ComputeLimits,
               preprocessing: Preprocessing) -> None:
    """Raises BudgetError, naming the largest resolution that fits, when `geometry` is above `limits`."""
    if fits(config, geometry, limits):
        return
    tokens, work = cost(config, geometry)
    reason = (f"{tokens:,} tokens, more than the {limits.max_tokens:,} this server analyses at once"
              if tokens > limits.max_tokens else
              f"{config.num_hidden_layers} layers of width {config.hidden_size} over {tokens:,} tokens, more work "
              "than this server does in one analysis")
    side = largest_side(config, geometry, limits, preprocessing)
    advice = (f"the largest resolution that fits for this image is {side}." if side is not None else
              "no resolution offered here fits for this model.")
    raise BudgetError(f"At {geometry.input_h}×{geometry.input_w} px this model sees {reason}: {advice}")


class Deadline:
    """A wall-clock limit on one analysis: `check` raises BudgetError once `seconds` have passed since it began."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def check(self) -> None:
        if time.monotonic() > self.end:
            raise BudgetError(f"The analysis was stopped after {self.seconds:g} s, this server's limit for one "
                              "analysis: try a lower resolution.")

    def progress(self, report: "Callable[[float], None] | None" = None) -> Callable[[float], None]:
        """A progress callback for the sweeps (rollout_map, statistics_for, flow_map) that stops them in time."""
        def checked(fraction: float) -> None:
            self.check()
            if report is not None:
                report(fraction)
        return checked
