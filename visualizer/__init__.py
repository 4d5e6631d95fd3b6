"""Numpy in, images out: overlays, head grids, the atlas, charts, GIFs and exports (no torch, no pyplot)."""
from .animation import animation_gif
from .charts import depth_intervals, depth_scatter, perturbation_plot, stats_heatmap
from .colormaps import available_colormaps, colorbar_image, colorize, normalize_map, scale_range, with_colorbar
from .export import jsonable, npz_bytes, png_bytes
from .grid import AtlasLayout, atlas, atlas_layout, head_grid
from .overlay import mark_patch, mark_patches, overlay, rgb_image, top_mass_mask, upsample
from .text import caption

__all__ = [
    "AtlasLayout", "animation_gif", "atlas", "atlas_layout", "available_colormaps", "caption", "colorbar_image",
    "colorize", "depth_intervals", "depth_scatter", "head_grid", "jsonable", "mark_patch", "mark_patches",
    "normalize_map", "npz_bytes", "overlay", "perturbation_plot", "png_bytes", "rgb_image", "scale_range",
    "stats_heatmap", "top_mass_mask", "upsample", "with_colorbar",
]
