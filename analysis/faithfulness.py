"""Which map can you trust: perturbation curves (Chefer et al. 2021, "Transformer Interpretability Beyond Attention
Visualization", their perturbation test) for the image in front of you.

A map ranks the patches; remove them in that order and watch the model's output. *Positive* perturbation removes
the most relevant first (a faithful map makes the score fall fast: a lower area is better), *negative* the least
relevant first (a higher area is better). At fraction f = i/10 of FRACTIONS the first floor(f × P) patches of the
order are removed, P the removable patches; the score at 0 is the unperturbed one, and a curve's area is the
trapezoidal rule over FRACTIONS (0 to 0.9), as Chefer et al. score theirs.

Removal:
  drop    the removed patches' tokens leave the sequence; the others keep their own position embeddings and the
          prefix tokens (class, distillation, registers) always stay, so each pass is shorter than the full one.
  pixels  the removed patches' pixels turn black before normalising (Chefer et al.'s code zeroes the unnormalised
          image), and the full sequence runs.

The score watched: a class's softmax probability; for an embedding target the cosine similarity of the perturbed
final feature to the unperturbed one (the class token's, or the pooled output without one, or the target patch's,
which is never removed under drop); for a prompt the image-text similarity logit, as the model computes it; for the
saliency decoder the mean predicted saliency inside its own region (the region fixed from the unperturbed
prediction; under drop the decoder reads zeros where tokens left). The decoder computes only the logits the region's
pixels read, and of those only the ones that may differ from its output on an all-zero grid (model.heads
.PartialDecoder): positive perturbation removes the region's own tokens first, and what reads only zeros is known.
The last layer, in turn, computes only the rows that the decoder's computed outputs read (`Score.rows`), as it does
the class token alone for a target that reads nothing else.

A random order has no direction: RANDOM_SEEDS orders give one set of curves, their mean serves both positive and
negative, their standard deviation is the spread. Orders that coincide (two maps ranking the patches alike) run once.

Memory: one batch of perturbed sequences at a time, at most BATCH_TOKENS tokens in all, through the fused attention
kernel: linear in the token count.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from scipy.integrate import trapezoid
from torch import nn

from model import LoadedModel
from model.heads import CLASS as READ_CLASS
from model.heads import CLASS_AND_DISTILLATION as READ_CLASS_AND_DISTILLATION
from model.heads import PartialDecoder

from .engine import Analysis
from .relevance import (CLASS, EMBEDDING, METHODS, PATCH, REGION, TEXT, Target, TargetError, explain,
                        predicted_region, predicted_saliency, resolve)
from .text import similarity

FRACTIONS = tuple(i / 10 for i in range(10))  # 0, 0.1, …, 0.9 of the removable patches
REMOVALS = ("drop", "pixels")
RANDOM = "random"
RANDOM_SEEDS = 3  # of a target's 11 orders; with 4 the default model's region curves ran above 60× a forward
# Tokens (batch × sequence) run at once: activations stay linear in the token count. 4,096 rather than more: the MLP's
# hidden activations (4,096 × 1,536 floats on the default model) stay nearer the cache, and the default model's
# region curves at 518 px took 12–18 % less time than with 16,384 (three alternating runs on coffee.png).
BATCH_TOKENS = 1 << 12


@dataclass
class Curve:
    """One map's scores at each of FRACTIONS, as its most relevant (positive) or least relevant (negative) patches
    go first; the spread (a random order's standard deviation over seeds) where there is one."""

    positive: np.ndarray
    negative: np.ndarray
    spread: np.ndarray | None = None

    @property
    def positive_auc(self) -> float:
        return area(self.positive)

    @property
    def nbytes(self) -> int:
        return self.positive.nbytes + self.negative.nbytes + (0 if self.spread is None else self.spread.nbytes)

    @property
    def negative_auc(self) -> float:
        return area(self.negative)


@dataclass
class Faithfulness:
    """Every map's curves for one target and removal; `score` says in words what is watched."""

    target: Target
    removal: str
    score: str
    curves: dict[str, Curve] = field(default_factory=dict)
    fractions: tuple[float, ...] = FRACTIONS

    def most_faithful(self) -> tuple[str, str]:
        """The best map by each test (the lowest positive area, the highest negative one), random left out."""
        maps = {name: c for name, c in self.curves.items() if name != RANDOM}
        return (min(maps, key=lambda n: maps[n].positive_auc), max(maps, key=lambda n: maps[n].negative_auc))

    def to_dict(self) -> dict:
        return {"target": str(self.target), "removal": self.removal, "score": self.score,
                "fractions": list(self.fractions),
                "maps": {name: {"positive": c.positive.round(7).tolist(), "negative": c.negative.round(7).tolist(),
                                "positive_auc": round(c.positive_auc, 7), "negative_auc": round(c.negative_auc, 7),
                                **({"spread": c.spread.round(7).tolist()} if c.spread is not None else {})}
                         for name, c in self.curves.items()}}


def area(scores: np.ndarray) -> float:
    """The trapezoidal area under scores at FRACTIONS."""
    return float(trapezoid(scores, FRACTIONS))


def describe_score(target: Target) -> str:
    """The score watched for `target`, in words."""
    if target.kind == CLASS:
        return f"softmax probability of class {target.index}"
    if target.kind == REGION:
        return "mean predicted saliency inside the model's own region"
    if target.kind == PATCH:
        return f"cosine similarity of patch {target.row},{target.col}'s final feature to the unperturbed one"
    if target.kind == TEXT:
        return f"image-text similarity logit with {target.prompt!r}"
    return "cosine similarity of the class token's final feature (or the pooled output) to the unperturbed one"


def removal_orders(values: np.ndarray, removable: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(most relevant first, least relevant first) over the `removable` patch indices, ties broken by index."""
    scores = values.reshape(-1)[removable]
    return removable[np.argsort(-scores, kind="stable")], removable[np.argsort(scores, kind="stable")]


def random_orders(removable: np.ndarray, seeds: int = RANDOM_SEEDS) -> list[np.ndarray]:
    return [np.random.default_rng(seed).permutation(removable) for seed in range(seeds)]


class Score:
    """The output watched, for a batch of perturbed last-layer outputs x (B, n, D) whose patch tokens are the
    `kept` patch indices (B, K) in grid order (None: every patch, at its place)."""

    def __init__(self, loaded: LoadedModel, analysis: Analysis, target: Target):
        self.loaded, self.model, self.head, self.target = loaded, loaded.model, loaded.head, target
        self.num_prefix, self.geometry = analysis.num_prefix_tokens, analysis.geometry
        self.patch = target.row * self.geometry.grid_w + target.col if target.kind == PATCH else None
        last = analysis.record.hidden_states[-1].unsqueeze(0)
        self.reference = self._feature(last, None) if target.kind in (EMBEDDING, PATCH) else None
        self.region = self.decoding = None
        if target.kind == REGION:  # the region of the decoder's own (cached) prediction
            g = self.geometry
            saliency = torch.from_numpy(predicted_saliency(loaded, analysis)).to(last.device)
            self.region = predicted_region(saliency)
            self.decoding = PartialDecoder(self.head, g.grid_h, g.grid_w,
                                           read_by(self.region, (g.grid_h, g.grid_w), self.head.num_stages))

    def rows(self, kept: torch.Tensor | None, batch: int) -> torch.Tensor | None:
        """The rows of the last layer's output (B, R) that the score reads, as indices into the perturbed sequences
        (the kept patches (B, K) in grid order, or None: every patch at its place), padded with each one's first;
        None: every row. The class token (and distillation token) where that is all a target reads; for the
        decoder's region, the kept patches its computed first-stage outputs read (see PartialDecoder.read_cells)."""
        config = self.model.config
        if config.pooling_head or (not config.class_token and self.target.kind != REGION):
            return None
        if self.target.kind in (EMBEDDING, TEXT):  # the class token's final feature (projected, for TEXT)
            return torch.zeros(batch, 1, dtype=torch.long)
        if self.target.kind == CLASS and self.head.readout in (READ_CLASS, READ_CLASS_AND_DISTILLATION):
            return torch.arange(1 + (self.head.readout == READ_CLASS_AND_DISTILLATION)).expand(batch, -1)
        if self.target.kind != REGION:
            return None
        g, device = self.geometry, self.decoding.wanted.device
        cells = torch.arange(g.grid_h * g.grid_w, device=device).expand(batch, -1) if kept is None else kept.to(device)
        zero = self._zero_cells(kept, batch, device)
        read = [self.decoding.read_cells(z).flatten()[c] for z, c in zip(zero, cells)]
        places = [self.num_prefix + r.nonzero()[:, 0] for r in read]  # each a (read,) row index
        width = max(1, *(len(r) for r in places))
        return torch.stack([F.pad(r, (0, width - len(r)), value=int(r[0]) if len(r) else 0) for r in places])

    def __call__(self, x: torch.Tensor, kept: torch.Tensor | None) -> torch.Tensor:
        kind = self.target.kind
        if kind == CLASS:
            tokens, pooled = self.model.post_layernorm(x), self.model.pool(x)[1]
            return self.head(tokens, pooled).float().softmax(-1)[:, self.target.index]
        if kind == TEXT:
            return similarity(self.loaded, self.model.pool(x)[1], self.target.prompt).float()
        if kind == REGION:
            saliency = self._saliency(x, kept)  # (B, input_h, input_w)
            return (saliency * self.region).sum((1, 2)).float() / self.region.sum()
        return F.cosine_similarity(self._feature(x, kept).float(), self.reference.float(), dim=-1)

    def _feature(self, x: torch.Tensor, kept: torch.Tensor | None) -> torch.Tensor:
        """(B, D): the final feature of the class token (or the pooled output), or of the target patch."""
        if self.patch is not None:
            place = (torch.full((len(x),), self.patch, device=x.device) if kept is None
                     else (kept == self.patch).int().argmax(1))
            return self.model.post_layernorm(x[torch.arange(len(x)), self.num_prefix + place])
        if self.model.config.class_token:
            return self.model.post_layernorm(x[:, 0])
        return self.model.pool(x)[1]

    def _saliency(self, x: torch.Tensor, kept: torch.Tensor | None) -> torch.Tensor:
        """(B, input_h, input_w): the decoder's saliency, exact inside the region (its logits computed where the
        region's pixels read them; see PartialDecoder)."""
        grid, zero = self._grid(x, kept)
        logits = F.interpolate(self.decoding(grid, zero), size=(self.geometry.input_h, self.geometry.input_w),
                               mode="bilinear", align_corners=False)
        return torch.sigmoid(logits)[:, 0]

    def _grid(self, x: torch.Tensor, kept: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoder's input (B, D, grid_h, grid_w) from the last layer's output, and its cells left zero by
        dropped patches (B, grid_h, grid_w)."""
        g = self.geometry
        tokens = self.model.post_layernorm(x[:, self.num_prefix:])  # (B, K, D)
        if kept is not None:  # the dropped patches' places read zeros
            full = tokens.new_zeros(len(x), g.grid_h * g.grid_w, tokens.shape[-1])
            tokens = full.scatter(1, kept.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]), tokens)
        grid = tokens.transpose(1, 2).reshape(len(x), -1, g.grid_h, g.grid_w)
        return grid, self._zero_cells(kept, len(x), x.device)

    def _zero_cells(self, kept: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
        """(B, grid_h, grid_w): the cells that dropped patches leave zero (none when `kept` is None)."""
        g = self.geometry
        if kept is None:
            return torch.zeros(batch, g.grid_h, g.grid_w, dtype=torch.bool, device=device)
        dropped = torch.ones(batch, g.grid_h * g.grid_w, dtype=torch.bool, device=device)
        return dropped.scatter(1, kept.to(device), False).view(batch, g.grid_h, g.grid_w)


def read_by(region: torch.Tensor, grid_size: tuple[int, int], stages: int) -> torch.Tensor:
    """The decoder's logits (2^stages × the grid) that the bilinear resize reads for the region's pixels: where the
    gradient of the region's sum w.r.t. the logits is not zero (pixels it weights by zero need no exact value)."""
    size = (grid_size[0] << stages, grid_size[1] << stages)
    with torch.inference_mode(False), torch.enable_grad():
        logits = torch.ones(1, 1, *size, requires_grad=True)
        resized = F.interpolate(logits, size=tuple(region.shape), mode="bilinear", align_corners=False)
        grad, = torch.autograd.grad((resized[0, 0] * region.cpu().float().clone()).sum(), logits)
    return (grad[0, 0] != 0).to(region.device)


def run_layers(loaded: LoadedModel, x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """The encoder on embedded (pre-normed) tokens x (B, n, D) → the last layer's output (B, n, D); with `rows`
    (B, R) token indices, the last layer's queries, residual and MLP run for those rows alone and the other rows are
    left zero."""
    layers = loaded.model.encoder.layers
    for layer in layers[:-1] if rows is not None else layers:
        x = layer(x)[0]
    if rows is None:
        return x
    picked = rows.to(x.device).unsqueeze(-1).expand(-1, -1, x.shape[-1])
    return torch.zeros_like(x).scatter_(1, picked, selected_rows(layers[-1], x, picked))


def selected_rows(layer: nn.Module, x: torch.Tensor, picked: torch.Tensor) -> torch.Tensor:
    """An encoder layer's output (B, R, D) for the rows `picked` (B, R, D: indices along the sequence, repeated over
    the features) of its input x (B, n, D), attending over all n."""
    attn, batch, dim = layer.self_attn, len(x), x.shape[-1]
    normed = layer.layer_norm1(x)
    query = attn._split_heads(attn.q_proj(normed.gather(1, picked)))  # (B, heads, R, head_dim)
    key, value = attn._split_heads(attn.k_proj(normed)), attn._split_heads(attn.v_proj(normed))
    heads = F.scaled_dot_product_attention(query, key, value, scale=attn.scale)
    y = x.gather(1, picked) + attn.out_proj(heads.transpose(1, 2).reshape(batch, -1, dim))
    return y + layer.mlp(layer.layer_norm2(y))


Rows = Callable[[torch.Tensor | None, int], torch.Tensor | None]  # (kept patches or None, batch) → rows (Score.rows)


def dropped(loaded: LoadedModel, analysis: Analysis, removed: torch.Tensor,
            rows: Rows | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The last layer's output with the `removed` patches (B, k) dropped from the sequence (with `rows`, only the
    rows it gives for the kept patches), and the kept patches (B, K) in grid order. The tokens are the forward's own
    embeddings: each keeps its position embedding."""
    embedded = analysis.record.hidden_states[0]  # (N, D), after the pre-norm: per token, so dropping commutes
    patches = analysis.geometry.grid_h * analysis.geometry.grid_w
    keep = torch.ones(len(removed), patches, dtype=torch.bool, device=removed.device)
    keep[torch.arange(len(removed)).unsqueeze(1), removed] = False
    kept = keep.nonzero()[:, 1].view(len(removed), -1)  # (B, K), ascending
    prefix = torch.arange(analysis.num_prefix_tokens, device=kept.device).expand(len(removed), -1)
    tokens = torch.cat([prefix, analysis.num_prefix_tokens + kept], dim=1)
    selected = rows(kept, len(removed)) if rows is not None else None
    return run_layers(loaded, embedded[tokens.to(embedded.device)], selected), kept


def blacked(loaded: LoadedModel, analysis: Analysis, pixels: torch.Tensor, removed: torch.Tensor,
            rows: Rows | None = None) -> torch.Tensor:
    """The last layer's output for the image (1, 3, H, W, normalised) with the `removed` patches (B, k) black."""
    g = analysis.geometry
    mask = torch.zeros(len(removed), g.grid_h * g.grid_w, dtype=torch.bool)
    mask[torch.arange(len(removed)).unsqueeze(1), removed.cpu()] = True
    mask = mask.view(-1, 1, g.grid_h, g.grid_w).repeat_interleave(g.patch_size, 2).repeat_interleave(g.patch_size, 3)
    p = loaded.preprocessing
    black = (-torch.tensor(p.mean) / torch.tensor(p.std)).view(1, 3, 1, 1)  # 0 before normalising
    batch = torch.where(mask, black, pixels.cpu().float()).to(loaded.device, next(loaded.model.parameters()).dtype)
    model = loaded.model
    embedded = model.pre_layrnorm(model.embeddings(batch, interpolate_pos_encoding=True))
    return run_layers(loaded, embedded, rows(None, len(removed)) if rows is not None else None)


@torch.inference_mode()
def perturbation_curves(loaded: LoadedModel, analysis: Analysis, target: "Target | str", removal: str,
                        maps: dict[str, np.ndarray], pixels: torch.Tensor | None = None,
                        seeds: int = RANDOM_SEEDS, progress: Callable[[float], None] | None = None) -> Faithfulness:
    """Positive and negative curves for each of `maps` (name → (grid_h, grid_w)) and a random order.

    Args:
        pixels: the model's input (1, 3, H, W) as the analysis saw it; needed for removal "pixels".
        progress: called with the fraction done after each batch (a deadline's callback stops the work there).
    """
    if removal not in REMOVALS:
        raise TargetError(f"removal must be one of {', '.join(REMOVALS)}, got {removal!r}")
    target = resolve(loaded, analysis, target)
    g = analysis.geometry
    if removal == "pixels" and (pixels is None or tuple(pixels.shape[-2:]) != (g.input_h, g.input_w)):
        raise ValueError("removal 'pixels' needs the analysis's own input pixels")
    score = Score(loaded, analysis, target)
    patches = np.arange(g.grid_h * g.grid_w)
    removable = patches[patches != score.patch] if removal == "drop" and score.patch is not None else patches
    orders, names = [], {}
    for name, values in maps.items():
        for direction, order in zip(("positive", "negative"), removal_orders(np.asarray(values), removable)):
            names[(name, direction)] = _index_of(orders, order)
    randoms = [_index_of(orders, order) for order in random_orders(removable, seeds)]
    last = analysis.record.hidden_states[-1].unsqueeze(0)
    unperturbed = float(score(last, None if removal == "pixels" else torch.from_numpy(patches).unsqueeze(0))[0])
    table = _scores(loaded, analysis, score, removal, orders, len(removable), pixels, progress)  # (orders, 9)
    table = np.concatenate([np.full((len(orders), 1), unperturbed), table], axis=1)
    result = Faithfulness(target, removal, describe_score(target))
    for name in maps:
        result.curves[name] = Curve(table[names[(name, "positive")]], table[names[(name, "negative")]])
    if randoms:
        chance = table[randoms]
        result.curves[RANDOM] = Curve(chance.mean(0), chance.mean(0), chance.std(0))
    return result


def offered_maps(analysis: Analysis, layer: int | None = None) -> list[str]:
    """The names of the maps offered: every method of `relevance.explain` (the two gradient ones from one backward
    sweep), the class-token attention (heads' mean) of `layer` when it is not the last, and attention flow once the
    Rollout tab has computed it (it takes minutes at the token counts where it is offered)."""
    names = list(METHODS)
    if layer is not None and layer != analysis.num_layers - 1:
        names.append(f"attention_layer_{layer}")
    if ("flow", "mean") in analysis._derived:
        names.append("flow")
    return names


def map_values(loaded: LoadedModel, analysis: Analysis, target: Target, name: str, discard_ratio: float,
               progress: Callable[[float], None] | None) -> np.ndarray:
    """The (grid_h, grid_w) values of an offered map."""
    if name.startswith("attention_layer_"):
        return analysis.cls_map(int(name.removeprefix("attention_layer_")), "mean")
    if name == "flow":
        return analysis.flow_map("mean")
    return explain(loaded, analysis, target, name, discard_ratio, progress).values


def faithfulness(loaded: LoadedModel, analysis: Analysis, target: "Target | str" = "top", removal: str = "drop",
                 pixels: torch.Tensor | None = None, layer: int | None = None, discard_ratio: float = 0.0,
                 progress: Callable[[float], None] | None = None, cached_only: bool = False) -> Faithfulness:
    """The curves of every offered map (see `offered_maps`) and of random orders for `target`, cached per map in
    the analysis by (target, removal, map, discard ratio): another layer computes one map's curves, nothing else.
    `cached_only`: nothing is computed, the maps whose curves are not cached yet are left out."""
    if removal not in REMOVALS:
        raise TargetError(f"removal must be one of {', '.join(REMOVALS)}, got {removal!r}")
    target = resolve(loaded, analysis, target)
    ratio = round(float(discard_ratio), 6)

    def key(name: str) -> tuple:
        return ("faithfulness", str(target), removal, name, ratio if name in ("rollout", "grad_rollout") else None)

    names = offered_maps(analysis, layer)
    missing = [name for name in names if key(name) not in analysis._derived]
    seeds = 0 if key(RANDOM) in analysis._derived else RANDOM_SEEDS
    if (missing or seeds) and not cached_only:
        maps = {name: map_values(loaded, analysis, target, name, discard_ratio, _share(progress, 0.0, 0.2))
                for name in missing}
        computed = perturbation_curves(loaded, analysis, target, removal, maps, pixels, seeds,
                                       _share(progress, 0.2, 1.0))
        analysis._derived.update({key(name): curve for name, curve in computed.curves.items()})
    kept = {name: analysis._derived.get(key(name)) for name in (*names, RANDOM)}
    return Faithfulness(target, removal, describe_score(target),
                        {name: curve for name, curve in kept.items() if curve is not None})


def _share(progress: Callable[[float], None] | None, low: float, high: float) -> Callable[[float], None] | None:
    """`progress` for a part of the work that spans [low, high] of the whole."""
    return None if progress is None else (lambda fraction: progress(low + (high - low) * fraction))


def _index_of(orders: list[np.ndarray], order: np.ndarray) -> int:
    """The index of `order` in `orders`, appended when new: coinciding orders run once."""
    for i, known in enumerate(orders):
        if np.array_equal(known, order):
            return i
    orders.append(order)
    return len(orders) - 1


def _scores(loaded: LoadedModel, analysis: Analysis, score: Score, removal: str, orders: list[np.ndarray],
            removable: int, pixels: torch.Tensor | None, progress: Callable[[float], None] | None) -> np.ndarray:
    """(orders, 9): the score with the first floor(f × removable) patches of each order removed, f = 0.1 … 0.9.
    The orders' sequences at one fraction have the same length and run together, BATCH_TOKENS at a time (under drop
    the sequences shorten with f, so more of them run at once)."""
    out = np.zeros((len(orders), len(FRACTIONS) - 1))
    stacked = torch.from_numpy(np.stack(orders)).to(loaded.device)  # (orders, removable)
    work = []
    for i in range(1, len(FRACTIONS)):
        k = i * removable // 10  # floor(i/10 × removable), exactly
        length = analysis.record.num_tokens - (k if removal == "drop" else 0)
        per_batch = max(1, BATCH_TOKENS // length)
        work += [(i, k, start, per_batch) for start in range(0, len(orders), per_batch)]
    for done, (i, k, start, per_batch) in enumerate(work):
        chunk = stacked[start:start + per_batch, :k]
        if removal == "drop":
            x, kept = dropped(loaded, analysis, chunk, score.rows)
        else:
            x, kept = blacked(loaded, analysis, pixels, chunk, score.rows), None
        out[start:start + len(chunk), i - 1] = score(x, kept).cpu().numpy()
        if progress is not None:
            progress((done + 1) / len(work))
    return out
