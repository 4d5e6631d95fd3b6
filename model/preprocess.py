"""Image loading and preprocessing: any PIL image to a normalized tensor plus the geometry to map results back."""
from __future__ import annotations

import io
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
STANDARD_MEAN = (0.5, 0.5, 0.5)  # SigLIP, IDEFICS2/3, google/vit-*: pixels scaled to [-1, 1]
STANDARD_STD = (0.5, 0.5, 0.5)
MAX_IMAGE_PIXELS = 100_000_000  # larger uploads are refused before decoding


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
               warn: "Callable[[str], None] | None" = None) -> Image.Image:
    """Opens an image from a path, bytes, array or PIL image; applies EXIF orientation; returns RGB.

    Args:
        warn: told, in a sentence, about anything repaired on the way (e.g. NaN pixels of a float image).
    """
    if source is None:
        raise InvalidImageError("No image was given.")
    if isinstance(source, np.ndarray):
        if source.size == 0:
            raise InvalidImageError("The image is empty.")
        source = Image.fromarray(np.ascontiguousarray(source))
    if not isinstance(source, Image.Image):
        source = _open(source)
    if source.width * source.height > MAX_IMAGE_PIXELS:
        raise InvalidImageError(f"The image is {source.width}x{source.height}; at most {MAX_IMAGE_PIXELS:,} "
                                "pixels are accepted.")
    try:
        image = ImageOps.exif_transpose(source)
        return _to_rgb(image, warn or (lambda message: None))
    except (OSError, SyntaxError, ValueError) as err:
        raise InvalidImageError(f"The image could not be decoded ({err}).") from err


def _open(source) -> Image.Image:
    data = source if isinstance(source, bytes) else None
    if data is not None and not data:
        raise InvalidImageError("The file is empty.")
    if data is None and os.path.isfile(source) and os.path.getsize(source) == 0:
        raise InvalidImageError("The file is empty.")
    try:
        image = Image.open(io.BytesIO(data) if data is not None else source)
        if image.width * image.height > MAX_IMAGE_PIXELS:
            return image
        image.load()
        return image
    except Image.DecompressionBombError as err:
        raise InvalidImageError(f"The image is too large to decode safely ({err}).") from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise InvalidImageError("The file is not a readable image (it may be corrupt or of an unsupported "
                                "format).") from err


def _to_rgb(image: Image.Image, warn: "Callable[[str], None]") -> Image.Image:
    """RGB of any mode; transparency is composited on white, 16-bit and float images are rescaled (NaN and
    infinite values replaced by the lowest finite one)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        finite = np.isfinite(values)
        if not finite.all():
            fill = float(values[finite].min()) if finite.any() else 0.0
            warn(f"{int((~finite).sum()):,} pixels were NaN or infinite; they are shown as the lowest finite value.")
            values = np.where(finite, values, fill)
        low, high = float(values.min()), float(values.max())
        values = (values - low) / (high - low) * 255 if high > low else np.zeros_like(values)
        image = Image.fromarray(values.astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


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
