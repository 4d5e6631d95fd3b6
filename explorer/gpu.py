"""ZeroGPU: on a Hugging Face Space with ZeroGPU hardware, the forward pass runs inside `spaces.GPU`, which lends a
GPU for the duration of one call; elsewhere (no `spaces`, or not on ZeroGPU) `spaces.GPU` leaves the function as it
is and the app runs unchanged."""
from __future__ import annotations

from collections.abc import Callable

try:
    import spaces
except ImportError:  # not installed: running on one's own machine
    spaces = None

GPU_SECONDS = (15, 240)  # the shortest and longest GPU lease asked for one analysis


def on_zero_gpu() -> bool:
    """Whether this process runs on ZeroGPU hardware (where CUDA exists only inside `spaces.GPU` calls)."""
    if spaces is None:
        return False
    from spaces.config import Config
    return bool(Config.zero_gpu)


def lease_seconds(num_layers: int, num_tokens: int, width: int) -> int:
    """The GPU time to ask for: the forward and the per-layer sweeps grow as layers × (N²·D + N·D²)."""
    work = num_layers * (num_tokens ** 2 * width + 12 * num_tokens * width ** 2)
    low, high = GPU_SECONDS
    return int(min(high, max(low, 10 + work / 2e11)))


def gpu_task(fn: Callable, duration: Callable[..., int]) -> Callable:
    """`fn` run with a GPU lent for `duration(*args)` seconds on ZeroGPU; `fn` itself anywhere else."""
    return spaces.GPU(duration=duration)(fn) if spaces is not None else fn
