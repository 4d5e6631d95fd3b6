"""Position embeddings at any grid: pure functions of the table (or the native grid) and the new grid."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def resample_patch_posemb(patch_posemb: torch.Tensor, grid_h: int, grid_w: int, mode: str) -> torch.Tensor:
    """Resamples a square (1, P, D) patch position table to (1, grid_h * grid_w, D), bicubic.

    mode "idefics" reproduces the IDEFICS seed (scale_factor with +0.1, as DINO did; only bfloat16 is upcast to
    float32, as the seed does); "size" interpolates to size=(grid_h, grid_w) as transformers' CLIP, SigLIP, ViT and
    DINOv2 do; "size_antialias" adds antialias=True, as DINOv2-with-registers, timm and open_clip do: PyTorch's
    antialiased bicubic kernel differs from the plain one (a = -0.5 rather than -0.75), so the two differ even when
    the grid grows. The "size" modes run in float32, as timm and DINOv2 do.
    """
    _, num_positions, dim = patch_posemb.shape
    side = math.isqrt(num_positions)
    if side * side != num_positions:
        raise ValueError(f"position table of {num_positions} patches is not square")
    table = patch_posemb.reshape(1, side, side, dim).permute(0, 3, 1, 2)  # (1, D, side, side)
    if mode == "idefics":
        table = table.float() if table.dtype == torch.bfloat16 else table
        scale = ((grid_h + 0.1) / math.sqrt(num_positions), (grid_w + 0.1) / math.sqrt(num_positions))
        table = F.interpolate(table, scale_factor=scale, mode="bicubic", align_corners=False)
    elif mode in ("size", "size_antialias"):
        table = F.interpolate(table.float(), size=(grid_h, grid_w), mode="bicubic", align_corners=False,
                              antialias=mode == "size_antialias")
    else:
        raise ValueError(f"unknown position interpolation {mode!r}")
    if table.shape[-2:] != (grid_h, grid_w):
        raise ValueError(f"interpolated grid {tuple(table.shape[-2:])} does not match ({grid_h}, {grid_w})")
    return table.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, dim).to(patch_posemb.dtype)


def bucketed_position_ids(grid_h: int, grid_w: int, native_grid: int, device: torch.device | None = None
                          ) -> torch.Tensor:
    """(grid_h * grid_w,) rows of the native table, as IDEFICS2/3 pick them: each patch's fractional coordinate
    (row / grid_h, col / grid_w) falls into one of native_grid buckets per side (NaViT's scheme).

    The arithmetic is transformers' own, operation for operation, so that float rounding at bucket boundaries
    lands every patch where theirs does.
    """
    boundaries = torch.arange(1 / native_grid, 1.0, 1 / native_grid, device=device)
    coords = []
    for size in (grid_h, grid_w):
        step = 1.0 / torch.tensor([size], device=device)  # float32, as 1.0 / a count of mask cells is
        fractional = torch.arange(size, device=device, dtype=torch.float32)[None, :] * step[:, None]
        coords.append(torch.bucketize(torch.clamp(fractional, max=1.0 - 1e-6), boundaries, right=True)[0])
    rows, cols = coords
    return (rows[:, None] * native_grid + cols[None, :]).reshape(-1)
