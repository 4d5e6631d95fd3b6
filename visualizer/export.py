"""Files people take away: PNG, animated GIF, and numbers as .npz with a JSON sidecar."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .grid import font


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def caption(image: Image.Image, text: str) -> Image.Image:
    """A copy with `text` on a dark band at the top left."""
    framed = image.convert("RGB").copy()
    draw = ImageDraw.Draw(framed)
    size = max(12, framed.width // 30)
    left, top, right, bottom = draw.textbbox((6, 4), text, font=font(size))
    draw.rectangle((0, 0, right + 6, bottom + 4), fill=(0, 0, 0))
    draw.text((6, 4), text, fill=(255, 255, 255), font=font(size))
    return framed


def animation_gif(frames: list[Image.Image], duration_ms: int = 400, loop: int = 0,
                  captions: list[str] | None = None) -> bytes:
    """An animated GIF of equally sized frames, each optionally captioned."""
    if not frames:
        raise ValueError("an animation needs at least one frame")
    if any(frame.size != frames[0].size for frame in frames):
        raise ValueError("all frames must have the same size")
    if captions is not None:
        frames = [caption(frame, text) for frame, text in zip(frames, captions, strict=True)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=duration_ms, loop=loop,
                   optimize=False, disposal=2)
    return buffer.getvalue()


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def export_npz(stem: "str | Path", arrays: dict[str, np.ndarray], metadata: dict) -> tuple[Path, Path]:
    """Writes `<stem>.npz` (compressed) and `<stem>.json` (metadata plus each array's shape and dtype)."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    npz_path, json_path = stem.with_suffix(".npz"), stem.with_suffix(".json")
    np.savez_compressed(npz_path, **arrays)
    sidecar = {**_jsonable(metadata),
               "arrays": {name: {"shape": list(a.shape), "dtype": str(a.dtype)} for name, a in arrays.items()}}
    json_path.write_text(json.dumps(sidecar, indent=2))
    return npz_path, json_path
