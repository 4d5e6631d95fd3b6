"""Image loading and preprocessing: any PIL image to a normalized tensor plus the geometry to map results back."""
from __future__ import annotations

import io
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
STANDARD_MEAN = (0.5, 0.5, 0.5)  # SigLIP, IDEFICS2/3, google/vit-*: pixels scaled to [-1, 1]
STANDARD_STD = (0.5, 0.5, 0.5)
MAX_IMAGE_PIXELS = 100_000_000  # larger uploads are refused before decoding
WORKING_MAX_PIXELS = 4096 * 4096  # larger images are reduced while they are decoded and converted
STRIP_PIXELS = 1 << 20  # pixels converted at a time, as a strip of whole rows
SCALED_MODES = ("I;16", "I;16B", "I;16L", "I", "F")  # rescaled to 8 bits over the image's range
BYTES_PER_PIXEL = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2}  # Pillow keeps other modes in 4
ORIENTATION_TAG = 0x0112  # EXIF orientation → the transpose that undoes it
ORIENTATIONS = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
                5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
                8: Image.Transpose.ROTATE_90}
SWAPPED = (Image.Transpose.TRANSPOSE, Image.Transpose.ROTATE_270, Image.Transpose.TRANSVERSE,
           Image.Transpose.ROTATE_90)


class InvalidImageError(ValueError):
    """An input that cannot be analysed; the message is meant for the person who sent it."""


@dataclass(frozen=True)
class ImageGeometry:
    """How a grid_h × grid_w patch map lines up with the original image: the model saw the whole image,
    resized (without cropping) to grid_h * patch_size rows by grid_w * patch_size columns."""

    orig_h: int
    orig_w: int
    grid_h: int
    grid_w: int
    patch_size: int

    @property
    def input_h(self) -> int:
        return self.grid_h * self.patch_size

    @property
    def input_w(self) -> int:
        return self.grid_w * self.patch_size

    def patch_at(self, x: float, y: float) -> tuple[int, int]:
        """(row, col) of the patch under pixel (x, y) of the original image, clamped to the grid."""
        row = int(y * self.grid_h / self.orig_h)
        col = int(x * self.grid_w / self.orig_w)
        return min(max(row, 0), self.grid_h - 1), min(max(col, 0), self.grid_w - 1)

    def patch_box(self, row: int, col: int) -> tuple[float, float, float, float]:
        """(left, top, right, bottom) of a patch in original-image pixels."""
        sy, sx = self.orig_h / self.grid_h, self.orig_w / self.grid_w
        return col * sx, row * sy, (col + 1) * sx, (row + 1) * sy

    def to_dict(self) -> dict:
        return {**asdict(self), "input_h": self.input_h, "input_w": self.input_w}


def load_image(source: "str | os.PathLike | bytes | Image.Image | np.ndarray",
               warn: "Callable[[str], None] | None" = None, max_pixels: int = WORKING_MAX_PIXELS) -> Image.Image:
    """Opens an image from a path, bytes, array or PIL image; applies EXIF orientation; returns RGB of at most
    `max_pixels` (larger ones: reduced by the smallest whole factor that fits, while converted, and JPEG while decoded),
    with its size before the reduction in `info["original_size"]` as (width, height).

    Peak memory: the decoded image in its own mode (`decoded_bytes`), plus a few bytes per pixel of the reduced one:
    the conversion (16-bit and float rescaling in float32, transparency on white) goes strip by strip.

    Args:
        warn: told, in a sentence, about anything repaired on the way (e.g. NaN pixels of a float image).
    """
    if source is None:
        raise InvalidImageError("No image was given.")
    if isinstance(source, np.ndarray):
        if source.size == 0:
            raise InvalidImageError("The image is empty.")
        source = Image.fromarray(np.ascontiguousarray(source))
    if isinstance(source, Image.Image):
        size = source.size
    else:
        source, size = _open(source, max_pixels)
    if size[0] * size[1] > MAX_IMAGE_PIXELS:
        raise InvalidImageError(f"The image is {size[0]}x{size[1]}; at most {MAX_IMAGE_PIXELS:,} pixels are "
                                "accepted.")
    try:
        orientation = ORIENTATIONS.get(source.getexif().get(ORIENTATION_TAG))
        image = _reduced_rgb(source, max_pixels, warn or (lambda message: None))
    except (OSError, SyntaxError, ValueError) as err:
        raise InvalidImageError(f"The image could not be decoded ({err}).") from err
    if orientation is not None:
        image = image.transpose(orientation)
        size = size[::-1] if orientation in SWAPPED else size
    image.info["original_size"] = size
    return image


def decoded_bytes(source: "str | os.PathLike | bytes", max_pixels: int = WORKING_MAX_PIXELS) -> int:
    """About the peak memory `load_image` needs for a file, from its header alone: width × height × bytes per pixel
    of its mode (after JPEG's reduction while decoding), plus the reduced RGB copy. Raises InvalidImageError where
    the header cannot be read."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            _draft(image, max_pixels)
            factor = _factor(image.width, image.height, max_pixels)
            reduced = -(-image.width // factor) * -(-image.height // factor)
            return image.width * image.height * BYTES_PER_PIXEL.get(image.mode, 4) + 4 * reduced
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as err:
        raise InvalidImageError("The file is not a readable image (it may be corrupt or of an unsupported "
                                "format).") from err


def _open(source, max_pixels: int) -> tuple[Image.Image, tuple[int, int]]:
    """The decoded image (a JPEG at a reduced scale, see `_draft`) and its size in the file."""
    data = source if isinstance(source, bytes) else None
    if data is not None and not data:
        raise InvalidImageError("The file is empty.")
    if data is None and os.path.isfile(source) and os.path.getsize(source) == 0:
        raise InvalidImageError("The file is empty.")
    try:
        image = Image.open(io.BytesIO(data) if data is not None else source)
        size = image.size
        if image.width * image.height > MAX_IMAGE_PIXELS:
            return image, size
        _draft(image, max_pixels)
        image.load()
        return image, size
    except Image.DecompressionBombError as err:
        raise InvalidImageError(f"The image is too large to decode safely ({err}).") from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise InvalidImageError("The file is not a readable image (it may be corrupt or of an unsupported "
                                "format).") from err


def _draft(image: Image.Image, max_pixels: int) -> None:
    """A JPEG decodes at 1/2, 1/4 or 1/8 of its size where that still leaves `max_pixels` (others: no-op)."""
    pixels = image.width * image.height
    if image.format == "JPEG" and pixels > max_pixels:
        scale = math.sqrt(max_pixels / pixels)
        image.draft(None, (math.ceil(image.width * scale), math.ceil(image.height * scale)))


def _factor(width: int, height: int, max_pixels: int) -> int:
    """The smallest whole factor that brings width × height to at most `max_pixels` (at least a quarter of it)."""
    return max(1, math.ceil(math.sqrt(width * height / max_pixels)))


def _reduced_rgb(image: Image.Image, max_pixels: int, warn: "Callable[[str], None]") -> Image.Image:
    """RGB of at most `max_pixels`: converted strip by strip and box-reduced by a whole factor (exact across strips,
    whose heights are multiples of it)."""
    width, height = image.size
    factor = _factor(width, height, max_pixels)
    convert = _strip_converter(image, warn)
    rows = max(1, STRIP_PIXELS // width // factor) * factor
    reduced = Image.new("RGB", (-(-width // factor), -(-height // factor)))
    for top in range(0, height, rows):
        strip = convert(image.crop((0, top, width, min(height, top + rows))))
        reduced.paste(strip.reduce(factor) if factor > 1 else strip, (0, top // factor))
    return reduced


def _strip_converter(image: Image.Image, warn: "Callable[[str], None]") -> "Callable[[Image.Image], Image.Image]":
    """A function from a strip of `image` to RGB: transparency is composited on white; 16-bit and float images are
    rescaled over the whole image's range (NaN and infinite values replaced by the lowest finite one)."""
    if image.mode in SCALED_MODES:
        low, high = _finite_range(image, warn)

        def rescaled(strip: Image.Image) -> Image.Image:
            values = np.asarray(strip, dtype=np.float32)
            values = np.where(np.isfinite(values), values, np.float32(low))
            values = (values - low) / (high - low) * 255 if high > low else np.zeros_like(values)
            return Image.fromarray(values.astype(np.uint8)).convert("RGB")
        return rescaled
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        def on_white(strip: Image.Image) -> Image.Image:
            rgba = strip.convert("RGBA")
            return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
        return on_white
    return lambda strip: strip.convert("RGB")


def _finite_range(image: Image.Image, warn: "Callable[[str], None]") -> tuple[float, float]:
    """(lowest, highest) finite value of a 16-bit or float image, read strip by strip; warns about the others."""
    low, high, bad = math.inf, -math.inf, 0
    rows = max(1, STRIP_PIXELS // image.width)
    for top in range(0, image.height, rows):
        values = np.asarray(image.crop((0, top, image.width, min(image.height, top + rows))), dtype=np.float32)
        finite = np.isfinite(values)
        bad += int(values.size - np.count_nonzero(finite))
        if finite.any():
            low = min(low, float(np.where(finite, values, np.inf).min()))
            high = max(high, float(np.where(finite, values, -np.inf).max()))
    if bad:
        warn(f"{bad:,} pixels were NaN or infinite; they are shown as the lowest finite value.")
    return (low, high) if low <= high else (0.0, 0.0)


@dataclass(frozen=True)
class Preprocessing:
    """Resize keeping the aspect ratio, snap each side to a multiple of the patch size, normalize."""

    patch_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def geometry(self, orig_h: int, orig_w: int, long_side: int) -> ImageGeometry:
        """The patch grid for an image whose long side is brought to about `long_side` pixels."""
        p = self.patch_size
        if min(orig_h, orig_w) < 1:
            raise InvalidImageError("The image is empty.")
        if long_side < p:
            raise InvalidImageError(f"The resolution must be at least one patch ({p} px).")
        scale = long_side / max(orig_h, orig_w)
        grid_h = max(1, round(orig_h * scale / p))
        grid_w = max(1, round(orig_w * scale / p))
        return ImageGeometry(orig_h, orig_w, grid_h, grid_w, p)

    def __call__(self, image: Image.Image, long_side: int) -> tuple[torch.Tensor, ImageGeometry]:
        """Returns (1, 3, grid_h * patch, grid_w * patch) pixel values and the geometry."""
        if min(image.width, image.height) < self.patch_size:
            raise InvalidImageError(f"The image is {image.width}x{image.height}; each side must be at least one "
                                    f"patch ({self.patch_size} px).")
        geometry = self.geometry(image.height, image.width, long_side)
        resized = image.convert("RGB").resize((geometry.input_w, geometry.input_h), Image.Resampling.BICUBIC)
        pixels = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (3, H, W)
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return ((pixels - mean) / std).unsqueeze(0), geometry
