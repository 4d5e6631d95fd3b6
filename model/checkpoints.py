"""Loading real checkpoints from a local folder or file, or a hub id: transformers CLIP / IDEFICS / DINOv2,
open_clip / OpenAI CLIP and timm ViTs. Weights come from safetensors, or torch.load(weights_only=True)."""
from __future__ import annotations

import json
import logging
import os
import pickle
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .config import IdeficsVisionConfig
from .formats import Format, Tensors, config_from_shapes, detect, rename, switches_from_keys
from .loading import Checkpoint, CheckpointError

logger = logging.getLogger(__name__)
WEIGHT_FILES = ("model.safetensors", "open_clip_model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")
INDEX_FILE = "model.safetensors.index.json"
VISION_PREFIXES = ("model.vision_model.", "vision_model.", "visual.")  # shards without these hold no vision weights
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def load_checkpoint(source: "str | os.PathLike", **overrides) -> Checkpoint:
    """A checkpoint in our layout from a path or hub id; `overrides` set config fields (num_heads, hidden_act…)."""
    path = Path(source).expanduser()
    if not path.exists():
        if not HUB_ID.match(str(source)):
            raise CheckpointError(f"{source} is neither an existing file or folder nor a hub id (org/name)")
        from .hub import download
        path = download(str(source))
    folder = path if path.is_dir() else path.parent
    raw = read_weights(path)
    fmt = detect(set(raw))
    if fmt is None:
        raise CheckpointError(f"{source} is not a vision transformer this tool knows (no class token, position "
                              f"embedding and patch embedding under the names of CLIP, IDEFICS, DINOv2, open_clip or "
                              f"timm; first keys: {', '.join(sorted(raw)[:5])})")
    state = rename(raw, fmt)
    try:
        state = fmt.special(state) if fmt.special else state
        config = _config(folder if path.is_dir() else None, fmt, state, overrides)
    except (KeyError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{source}: the {fmt.name} weights are incomplete or inconsistent ({err})") from err
    mean, std = _normalization(folder if path.is_dir() else None, fmt)
    logger.info("%s: %s format, %d tensors", source, fmt.name, len(state))
    return Checkpoint(config, state, f"{Path(str(source)).name or source} ({fmt.name})", mean, std)


def read_weights(path: Path) -> Tensors:
    """All tensors of a file, or of the vision shards of a folder."""
    if path.is_dir():
        index = path / INDEX_FILE
        if index.is_file():
            return _read_sharded(index)
        found = next((path / name for name in WEIGHT_FILES if (path / name).is_file()), None)
        if found is None:
            found = next(iter(sorted(path.glob("*.safetensors"))), None)
        if found is None:
            raise CheckpointError(f"{path} holds no weights ({', '.join(WEIGHT_FILES)} or an index)")
        path = found
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    return _read_pickle(path)


def _read_safetensors(path: Path, keys: set[str] | None = None) -> Tensors:
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {k: handle.get_tensor(k) for k in handle.keys() if keys is None or k in keys}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path.name} is not a readable safetensors file (corrupt or truncated: {err})") from err


def _read_pickle(path: Path) -> Tensors:
    try:
        loaded = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"{path.name} holds more than tensors (refused: only weights are loaded, never "
                              f"arbitrary pickled objects): {str(err).splitlines()[0]}") from err
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise CheckpointError(f"{path.name} is not a readable PyTorch checkpoint ({err})") from err
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise CheckpointError(f"{path.name} is not a state dict of tensors")
    return loaded


def _read_sharded(index: Path) -> Tensors:
    """Reads only the shards that hold vision weights, and only those tensors (IDEFICS: never the LM)."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError) as err:
        raise CheckpointError(f"{index.name} is not a valid safetensors index ({err})") from err
    vision = {k: shard for k, shard in weight_map.items() if k.startswith(VISION_PREFIXES)}
    if not vision:
        raise CheckpointError(f"{index.parent} has no vision weights ({', '.join(VISION_PREFIXES)})")
    state: Tensors = {}
    for shard in sorted(set(vision.values())):
        logger.info("reading vision weights from %s", shard)
        state.update(_read_safetensors(index.parent / shard, {k for k, s in vision.items() if s == shard}))
    return state


def _read_json(folder: Path | None, name: str) -> dict | None:
    if folder is None or not (folder / name).is_file():
        return None
    try:
        return json.loads((folder / name).read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{folder / name} is not valid JSON ({err})") from err


def _config(folder: Path | None, fmt: Format, state: Tensors, overrides: dict) -> IdeficsVisionConfig:
    """From config.json for the transformers formats (vision_config inside a CLIP/IDEFICS config), else shapes."""
    values = _read_json(folder, "config.json")
    if values is not None and fmt.name.startswith("transformers"):
        antialias = values.get("model_type") == "dinov2_with_registers"
        values = values.get("vision_config", values)
        if "mlp_ratio" in values and "intermediate_size" not in values:
            values["intermediate_size"] = int(values["hidden_size"] * values["mlp_ratio"])
        if values.get("use_swiglu_ffn"):
            raise CheckpointError("DINOv2 checkpoints with a SwiGLU MLP (ViT-g) are not supported")
        heads = overrides.pop("num_heads", None)
        merged = {**values, **switches_from_keys(state), **fmt.defaults, **overrides}
        if heads:
            merged["num_attention_heads"] = heads
        if antialias:
            merged["pos_interpolation"] = "size_antialias"
        return IdeficsVisionConfig.from_dict(merged)
    return config_from_shapes(state, {**fmt.defaults, **overrides})


def _normalization(folder: Path | None, fmt: Format) -> tuple[tuple, tuple]:
    processor = _read_json(folder, "preprocessor_config.json") or {}
    return tuple(processor.get("image_mean", fmt.mean)), tuple(processor.get("image_std", fmt.std))
