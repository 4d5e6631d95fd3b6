"""Animated GIFs, e.g. one frame per layer."""
from __future__ import annotations

import io

from PIL import Image

from .text import caption


def dithered(frame: Image.Image) -> Image.Image:
    """The frame in 256 colours of its own median-cut palette, Floyd-Steinberg dithered (no banding on smooth maps)."""
    rgb = frame.convert("RGB")
    return rgb.quantize(palette=rgb.quantize(256, method=Image.Quantize.MEDIANCUT), dither=Image.Dither.FLOYDSTEINBERG)


def animation_gif(frames: list[Image.Image], duration_ms: int = 400, loop: int = 0,
                  captions: list[str] | None = None) -> bytes:
    """An animated GIF of equally sized frames, each optionally captioned (e.g. "layer 3"); loop 0 repeats forever.

    Pillow merges consecutive identical frames into one longer frame, so n_frames can be smaller than len(frames).
    """
    if not frames:
        raise ValueError("an animation needs at least one frame")
    if any(frame.size != frames[0].size for frame in frames):
        raise ValueError(f"all frames must have the same size; sizes are {sorted({f.size for f in frames})}")
    if captions is not None:
        frames = [caption(frame, text) for frame, text in zip(frames, captions, strict=True)]
    frames = [dithered(frame) for frame in frames]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=duration_ms, loop=loop,
                   disposal=2)
    return buffer.getvalue()
