"""Files people take away: PNG bytes, and numbers as .npz with a JSON sidecar."""
from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image

RESERVED_ARRAY_NAMES = ("file", "allow_pickle")  # keyword names of np.savez_compressed


def png_bytes(image: Image.Image) -> bytes:
    """The image encoded as PNG."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def jsonable(value):
    """Metadata made JSON-safe: numpy scalars and arrays to Python, tuples to lists, paths to strings, NaN to None."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        return jsonable(value.item())
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def export_npz(stem: "str | Path", arrays: dict[str, np.ndarray], metadata: dict) -> tuple[Path, Path]:
    """Writes `<stem>.npz` (compressed) and `<stem>.json` (metadata plus "arrays": each name's shape and dtype).

    Args:
        stem: path without extension (a trailing .npz or .json is dropped); its folder is created.
    """
    if "arrays" in metadata:
        raise ValueError('metadata may not have an "arrays" key: the sidecar lists the arrays there')
    if clash := [name for name in arrays if name in RESERVED_ARRAY_NAMES or not name]:
        raise ValueError(f"array names {clash} are not allowed in an .npz export")
    stem = Path(stem)
    if stem.suffix in (".npz", ".json"):
        stem = stem.with_suffix("")
    stem.parent.mkdir(parents=True, exist_ok=True)
    npz_path, json_path = stem.parent / f"{stem.name}.npz", stem.parent / f"{stem.name}.json"
    arrays = {name: np.asarray(a) for name, a in arrays.items()}
    np.savez_compressed(npz_path, **arrays)
    sidecar = {**jsonable(metadata),
               "arrays": {name: {"shape": list(a.shape), "dtype": str(a.dtype)} for name, a in arrays.items()}}
    json_path.write_text(json.dumps(sidecar, indent=2))
    return npz_path, json_path
