"""Numpy in, images out: overlays, head grids, the atlas, charts, GIFs and exports."""
from .charts import line_chart, stats_heatmap
from .colormaps import available_colormaps, colorize, normalize_map
from .export import animation_gif, caption, export_npz, png_bytes
from .grid import AtlasLayout, atlas, head_grid
from .overlay import mark_patch, mark_patches, overlay, rgb_image, upsample

__all__ = [
    "AtlasLayout", "animation_gif", "atlas", "available_colormaps", "caption", "colorize", "export_npz", "head_grid",
    "line_chart", "mark_patch", "mark_patches", "normalize_map", "overlay", "png_bytes", "rgb_image",
    "stats_heatmap", "upsample",
]
