"""Position-embedding resampling: a pure function of the table and the new grid."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def resample_patch_posemb(patch_posemb: torch.Tensor, grid_h: int, grid_w: int, mode: str) -> torch.Tensor:
    """Resamples a square (1, P, D) patch position table to (1, grid_h * grid_w, D), bicubic, in float32.

    mode "idefics" reproduces the IDEFICS seed (scale_factor with +0.1, as DINO did); "size" interpolates to
    size=(grid_h, grid_w) as transformers' CLIP and DINOv2 do; "size_antialias" adds antialias=True, as
    DINOv2-with-registers, timm and open_clip do: PyTorch's antialiased bicubic kernel differs from the plain one
    (a = -0.5 rather than -0.75), so the two differ even when the grid grows.
    """
    _, num_positions, dim = patch_posemb.shape
    side = int(math.sqrt(num_positions))
    if side * side != num_positions:
        raise ValueError(f"position table of {num_positions} patches is not square")
    table = patch_posemb.reshape(1, side, side, dim).permute(0, 3, 1, 2).to(torch.float32)  # (1, D, side, side)
    if mode == "idefics":
        scale = ((grid_h + 0.1) / math.sqrt(num_positions), (grid_w + 0.1) / math.sqrt(num_positions))
        table = F.interpolate(table, scale_factor=scale, mode="bicubic", align_corners=False)
    elif mode in ("size", "size_antialias"):
        table = F.interpolate(table, size=(grid_h, grid_w), mode="bicubic", align_corners=False,
                              antialias=mode == "size_antialias")
    else:
        raise ValueError(f"unknown position interpolation {mode!r}")
    if table.shape[-2:] != (grid_h, grid_w):
        raise ValueError(f"interpolated grid {tuple(table.shape[-2:])} does not match ({grid_h}, {grid_w})")
    return table.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, dim).to(patch_posemb.dtype)
