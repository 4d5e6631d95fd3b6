"""Text on images: the default font at a chosen size, shrunk to fit, and captions on a dark band."""
from __future__ import annotations

from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont

MIN_FONT_SIZE = 8


@lru_cache(maxsize=64)
def font(size: int) -> ImageFont.FreeTypeFont:
    """Pillow's bundled font at `size` pixels (Pillow >= 10.1 scales it)."""
    return ImageFont.load_default(size=size)


def fitting_font(draw: ImageDraw.ImageDraw, text: str, max_width: float, size: int) -> ImageFont.FreeTypeFont:
    """The default font at `size`, or smaller (down to MIN_FONT_SIZE) until `text` is at most `max_width` wide."""
    while size > MIN_FONT_SIZE and draw.textlength(text, font=font(size)) > max_width:
        size -= 1
    return font(size)


def caption(image: Image.Image, text: str) -> Image.Image:
    """A copy with `text` in white on a dark band at the top left."""
    framed = image.convert("RGB")
    draw = ImageDraw.Draw(framed)
    margin = max(3, framed.width // 100)
    label_font = fitting_font(draw, text, framed.width - 4 * margin, max(12, framed.width // 28))
    _, _, right, bottom = draw.textbbox((2 * margin, margin), text, font=label_font)
    draw.rectangle((0, 0, right + 2 * margin, bottom + margin), fill=(0, 0, 0))
    draw.text((2 * margin, margin), text, fill=(255, 255, 255), font=label_font)
    return framed
