"""Files people take away: PNG bytes, and numbers as .npz with a JSON sidecar."""
from __future__ import annotations

import io
import json
import math
import zipfile
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


def npz_bytes(arrays: dict[str, np.ndarray], metadata: dict) -> tuple[bytes, bytes]:
    """A compressed .npz of the arrays and its JSON sidecar (metadata plus "arrays": each name's shape and dtype).

    The same arrays and metadata always give the same bytes."""
    if "arrays" in metadata:
        raise ValueError('metadata may not have an "arrays" key: the sidecar lists the arrays there')
    if clash := [name for name in arrays if name in RESERVED_ARRAY_NAMES or not name]:
        raise ValueError(f"array names {clash} are not allowed in an .npz export")
    arrays = {name: np.asarray(a) for name, a in arrays.items()}
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:  # np.savez_compressed, minus timestamps
        for name, array in arrays.items():
            entry = io.BytesIO()
            np.lib.format.write_array(entry, array, allow_pickle=False)
            archive.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), entry.getvalue(),
                             compress_type=zipfile.ZIP_DEFLATED)
    sidecar = {**jsonable(metadata),
               "arrays": {name: {"shape": list(a.shape), "dtype": str(a.dtype)} for name, a in arrays.items()}}
    return buffer.getvalue(), json.dumps(sidecar, indent=2).encode()
