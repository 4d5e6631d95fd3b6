"""Reading a checkpoint from a local folder or file, or a hub id: transformers CLIP / IDEFICS / IDEFICS2/3 /
SigLIP / ViT / DeiT / DINOv2, open_clip / OpenAI CLIP and timm ViTs. Weights come from safetensors, or
torch.load(weights_only=True). Messages name the source as given and file names, never another local path."""
from __future__ import annotations

import json
import logging
import os
import pickle
import re
from dataclasses import fields
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .checkpoint import INDEX_FILE, WEIGHT_FILES, Checkpoint, CheckpointError
from .config import IdeficsVisionConfig
from .conversions import shape_fields, switches_from_keys
from .formats import Format, Tensors, detect, rename, stripped, tower_keys
from .heads import head_weights
from .hub import HUB_ID, HubLimits, describe_count, download, release
from .text_formats import TextWeights, convert_text, detect_text
from .tokenizer import PromptTokenizer

logger = logging.getLogger(__name__)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
WRAPPER_KEYS = ("state_dict", "model")  # training checkpoints keep the weights one level down
NORMALIZATION_SOURCES = (  # (file, where inside it, mean key, std key), the first one found wins
    ("preprocessor_config.json", (), "image_mean", "image_std"),
    ("open_clip_config.json", ("preprocess_cfg",), "mean", "std"),
    ("config.json", ("pretrained_cfg",), "mean", "std"),  # timm
)
CONFIG_FIELDS = {f.name for f in fields(IdeficsVisionConfig)}


def load_checkpoint(source: "str | os.PathLike", num_heads: int | None = None, limits: HubLimits = HubLimits(),
                    allow_local: bool = True, **overrides) -> Checkpoint:
    """A checkpoint in our layout from a local file or folder, or a hub id ("org/name").

    Args:
        num_heads: the head count, where neither a config file nor the rule in `conversions.head_count` gets it right.
        limits: caps on a hub download, checked before any weight is fetched, and on the tower read.
        allow_local: False: `source` is a hub id and nothing else, even where a local path of that name exists.
        overrides: config fields that win over the checkpoint's (e.g. hidden_act="quick_gelu").
    """
    unknown = sorted(set(overrides) - CONFIG_FIELDS)
    if unknown:
        raise TypeError(f"unknown config overrides: {', '.join(unknown)}")
    if num_heads:
        overrides["num_attention_heads"] = num_heads
    path, from_hub = _resolve(source, limits, allow_local)
    try:
        checkpoint = _convert(path, overrides)
        checkpoint.name = f"{source if from_hub else Path(str(source)).name or source} ({checkpoint.name})"
        text = checkpoint.text.state_dict if checkpoint.text is not None else {}
        params = sum(t.numel() for state in (checkpoint.state_dict, text) for t in state.values())
        if limits.max_params is not None and params > limits.max_params:
            towers = "vision and text towers have" if text else "vision tower has"
            raise CheckpointError(f"the {towers} {describe_count(params)} parameters, more than the "
                                  f"{describe_count(limits.max_params)} this server accepts.")
    except CheckpointError as err:
        if from_hub:
            release(str(source), limits)
        raise CheckpointError(f"{source}: {err}") from err
    checkpoint.hub_id = str(source) if from_hub else None
    return checkpoint


def _convert(path: Path, overrides: dict) -> Checkpoint:
    """The weights at `path` in our layout, their config and normalisation; the name is the format's."""
    folder = path if path.is_dir() else None
    raw = read_weights(path)
    fmt = detect(set(raw))
    if fmt is None:
        raise CheckpointError("not a vision transformer this tool knows: no patch embedding and position embedding "
                              "under the names of CLIP, IDEFICS, IDEFICS2/3, SigLIP, ViT, DeiT, DINOv2, open_clip or "
                              f"timm (first keys: {', '.join(sorted(raw)[:5])})")
    try:
        state = {k: v.float() if v.is_floating_point() else v for k, v in rename(raw, fmt).items()}
        state = fmt.special(state) if fmt.special else state
        config = _config(folder, fmt, state, overrides)
        head = head_weights(fmt.head, stripped(raw, fmt), _read_json(folder, fmt.config_file), config.class_token,
                            config.pooling_head) if fmt.head else None
    except (KeyError, ValueError, RuntimeError) as err:
        detail = f"no {err}" if isinstance(err, KeyError) else str(err)
        raise CheckpointError(f"the {fmt.name} weights are incomplete or inconsistent ({detail})") from err
    mean, std = _normalization(folder, fmt)
    logger.info("%s: %s format, %d tensors, %s", path.name, fmt.name, len(state), config)
    return Checkpoint(config, state, fmt.name, mean, std, head, text=_text(raw, folder))


def _text(raw: Tensors, folder: Path | None) -> TextWeights | None:
    """An image-text model's text tower with its tokenizer; None for other models. Without tokenizer files beside
    the weights the tower is left out (with a warning): prompts could not be tokenized."""
    fmt = detect_text(raw)
    if fmt is None:
        return None
    try:
        config, state = convert_text(raw, fmt, _read_json(folder, "config.json"),
                                     _read_json(folder, "open_clip_config.json"))
    except (KeyError, ValueError, RuntimeError) as err:
        detail = f"no {err}" if isinstance(err, KeyError) else str(err)
        raise CheckpointError(f"the {fmt.name} text tower is incomplete or inconsistent ({detail})") from err
    if not PromptTokenizer.available(folder):
        logger.warning("%s text tower without tokenizer.json or spiece.model beside it: left out", fmt.name)
        return None
    try:
        tokenizer = PromptTokenizer(folder, config.context_length, siglip=fmt.name == "transformers SigLIP")
    except Exception as err:  # the tokenizers and SentencePiece libraries raise plain exceptions for unreadable files
        raise CheckpointError(f"its tokenizer files (tokenizer.json or spiece.model) are not readable "
                              f"({_plain(err, folder / 'tokenizer.json')})") from err
    return TextWeights(config, state, tokenizer)


def _resolve(source: "str | os.PathLike", limits: HubLimits, allow_local: bool) -> tuple[Path, bool]:
    """The local path of the weights, and whether they came from the hub."""
    path = Path(source).expanduser()
    if allow_local and path.exists():
        return path, False
    if not HUB_ID.match(str(source)):
        raise CheckpointError(f"{source}: no such file or folder (nor a hub id of the form org/name)")
    return download(str(source), limits), True


def read_weights(path: Path) -> Tensors:
    """The vision tensors of a file or of a folder's weights file (a pickle's: all of them), or those of the vision
    shards of a sharded folder."""
    if path.is_dir():
        if (path / INDEX_FILE).is_file():
            return _read_sharded(path / INDEX_FILE)
        candidates = [path / name for name in WEIGHT_FILES] + sorted(path.glob("*.safetensors"))
        candidates += sorted(p for suffix in PICKLE_SUFFIXES for p in path.glob(f"*{suffix}"))
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            raise CheckpointError(f"no weights in the folder ({', '.join(WEIGHT_FILES)}, {INDEX_FILE}, "
                                  "or any *.safetensors / *.bin / *.pt / *.pth file)")
        path = found
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    if path.suffix in PICKLE_SUFFIXES:
        return _read_pickle(path)
    raise CheckpointError(f"{path.name}: unsupported weights file (expected .safetensors or "
                          f"{', '.join(PICKLE_SUFFIXES)})")


def _read_safetensors(path: Path, keys: set[str] | None = None) -> Tensors:
    """The given tensors of a file; by default its towers' (a VLM's language model is never read)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {k: handle.get_tensor(k) for k in (keys if keys is not None else tower_keys(list(handle.keys())))}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path.name} is not a readable safetensors file (corrupt or truncated: "
                              f"{_plain(err, path)})") from err


def _read_pickle(path: Path) -> Tensors:
    """torch.load with weights_only=True: tensors and plain containers, never arbitrary objects."""
    try:
        loaded = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        refused = re.search(r"GLOBAL (\S+) was not an allowed global", str(err))
        if refused:
            raise CheckpointError(f"{path.name} holds a pickled object ({refused.group(1)}), not only tensors: "
                                  "refused, since unpickling arbitrary objects can run code") from None
        raise CheckpointError(f"{path.name} is not a readable PyTorch checkpoint (corrupt, truncated or not a "
                              "weights file)") from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise CheckpointError(f"{path.name} is not a readable PyTorch checkpoint ({_plain(err, path)})") from err
    for key in WRAPPER_KEYS:
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise CheckpointError(f"{path.name} is not a state dict of tensors")
    return loaded


def _read_sharded(index: Path) -> Tensors:
    """Reads only the shards that hold the towers' weights, and only those tensors (IDEFICS: never the LM)."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{index.name} is not a valid safetensors index ({err})") from err
    vision = {k: weight_map[k] for k in tower_keys(weight_map)}
    state: Tensors = {}
    for shard in sorted(set(vision.values())):
        logger.info("reading vision weights from %s", shard)
        state.update(_read_safetensors(index.parent / shard, {k for k, s in vision.items() if s == shard}))
    return state


def _read_json(folder: Path | None, name: str) -> dict | None:
    if folder is None or not (folder / name).is_file():
        return None
    try:
        values = json.loads((folder / name).read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{name} is not valid JSON ({err})") from err
    return values if isinstance(values, dict) else None


def _config(folder: Path | None, fmt: Format, state: Tensors, overrides: dict) -> IdeficsVisionConfig:
    """Family defaults (fixed, then read off the keys) < shapes < the format's config file < what the weights
    decide < the caller's overrides."""
    from_file = _read_json(folder, fmt.config_file) if fmt.config_file else None
    if from_file is None:
        logger.warning("%s weights without %s: architecture read off the shapes (heads: width // 64, or 16 for "
                       "ViT-H/g/bigG widths; pass num_heads= or hidden_act= to correct it)", fmt.name, fmt.config_file)
    file_fields = fmt.config_fields(from_file) if from_file is not None else {}
    key_defaults = fmt.key_defaults(state) if fmt.key_defaults else {}
    merged = {**fmt.defaults, **key_defaults, **shape_fields(state), **file_fields, **switches_from_keys(state),
              **overrides}
    return IdeficsVisionConfig.from_dict(merged)


def _normalization(folder: Path | None, fmt: Format) -> tuple[tuple, tuple]:
    """Mean and std from the checkpoint's own files, else the family's."""
    for name, path, mean_key, std_key in NORMALIZATION_SOURCES:
        values = _read_json(folder, name) or {}
        for step in path:
            values = values.get(step) or {}
        if mean_key in values and std_key in values:
            return tuple(values[mean_key]), tuple(values[std_key])
    return fmt.mean, fmt.std


def _plain(err: Exception, path: Path) -> str:
    """An error's text without the folder it happened in (a cache or temp folder the user never named)."""
    return str(err).replace(str(path.parent) + os.sep, "")
