"""ZeroGPU: on a Hugging Face Space with ZeroGPU hardware, the forward pass runs inside `spaces.GPU`, which lends a
GPU to one call in a process of its own; elsewhere (no `spaces`, or not on ZeroGPU) `spaces.GPU` returns the
function as it is and the app runs unchanged, on the CPU or a GPU of its own."""
from __future__ import annotations

from PIL import Image

from analysis import Analysis, analyze
from analysis.budget import ComputeLimits
from model import LoadedModel

try:
    import spaces
except ImportError:  # not installed: running on one's own machine
    spaces = None

GPU_SECONDS = (15, 240)  # the shortest and longest GPU lease asked for one analysis
GPU_DEVICE = "cuda"


def on_zero_gpu() -> bool:
    """Whether this process runs on ZeroGPU hardware (where CUDA exists only inside `spaces.GPU` calls)."""
    if spaces is None:
        return False
    from spaces.config import Config
    return bool(Config.zero_gpu)


def lease_seconds(loaded: LoadedModel, image: Image.Image, resolution: int, dtype: str = "float32",
                  original_size: tuple[int, int] | None = None, limits: ComputeLimits | None = None) -> int:
    """The GPU time to ask for: the forward and the per-layer sweeps grow as layers × (N²·D + N·D²)."""
    config = loaded.config
    geometry = loaded.preprocessing.geometry(image.height, image.width, resolution)
    tokens, width = geometry.grid_h * geometry.grid_w + config.num_prefix_tokens, config.hidden_size
    work = config.num_hidden_layers * (tokens ** 2 * width + 12 * tokens * width ** 2)
    low, high = GPU_SECONDS
    return int(min(high, max(low, 10 + work / 1e12)))  # ~4 FLOPs per unit of work at ~4 TFLOP/s: generous


def analyze_on_gpu(loaded: LoadedModel, image: Image.Image, resolution: int, dtype: str = "float32",
                   original_size: tuple[int, int] | None = None, limits: ComputeLimits | None = None) -> Analysis:
    """The analysis on the lent GPU, returned with CPU tensors and no module (the caller attaches its own)."""
    model = loaded.model.to(GPU_DEVICE)  # the lease's process has its own copy: the caller's stays on the CPU
    analysis = analyze(LoadedModel(model, loaded.preprocessing, loaded.name), image, resolution, dtype,
                       original_size=original_size, statistics=False, limits=limits)
    analysis.record = analysis.record.moved("cpu", None)
    return analysis


GPU_ANALYZE = spaces.GPU(duration=lease_seconds)(analyze_on_gpu) if spaces is not None else analyze_on_gpu
