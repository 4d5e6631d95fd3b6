"""Which patches made the model's output: gradient-weighted attention relevance (Chefer et al. 2021b, "Generic
Attention-model Explainability") and gradient rollout (vit-explain), from one backward sweep over the kept record.

Nothing N×N is kept, nor its gradient. The sweep starts at the top with the target's gradient w.r.t. the last
layer's output and goes down one layer at a time: the layer is recomputed from its kept input (activation
checkpointing, fused attention, the MLP a part of the tokens at a time), backpropagated to give the gradient of its
heads' outputs ∂y/∂O and of its input, and then, since O = A·V per head, ∂y/∂A = ∂y/∂O · Vᵀ is formed a block of
rows at a time beside the matching rows of A (rebuilt from q, k and the forward's log-sum-exps). Where the record
kept the heads' outputs O (see `record.KEEP_OUTPUTS_BYTES`), the recomputed attention skips its forward: O is the
kept one and the fused CPU kernel's backward runs from it and the kept log-sum-exps. Only the target's row of each
product is carried:

    relevance:     R = (I + Ā_L) ··· (I + Ā_1),  Ā = mean_h (∇A ⊙ A)⁺,  map = w·R   (R ← R + Ā·R, layer 1 first)
    grad_rollout:  P = Â_L ··· Â_1,  Â = rownorm(drop(G) + I),  G = (mean_h ∇A ⊙ A)⁺,  map = w·P

so w ← w + w·Ā and w ← w·Â are applied from layer L down. w is the (N,) row of the tokens the target reads
(`token weights`), the map its patch entries. drop() zeroes the `discard_ratio` fraction of smallest entries of G
(vit-explain's grad_rollout, which drops any entry); rows are normalised by their own sums (vit-explain's code
divides by the wrong axis). Memory: the record, one layer's recomputation (O(N·D)) and blocks of rows.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model import LoadedModel
from model.heads import ClassifierHead, SaliencyDecoder

from .engine import Analysis
from .record import AttentionRecord, LayerAttention
from .rollout import kth_smallest
from .text import FAMILIES, similarity

METHODS = ("relevance", "grad_rollout", "rollout", "attention")
TOP, CLASS, EMBEDDING, PATCH, REGION, TEXT = "top", "class", "embedding", "patch", "region", "text"
BLOCK_ELEMENTS = 1 << 21  # heads × rows × N floats of attention (and as many of its gradient) held at once: 8 MB
MLP_ELEMENTS = 1 << 20  # tokens × hidden units of a recomputed MLP held at once (and their gradients): 4 MB
REGION_THRESHOLD, REGION_TOP_SHARE = 0.5, 0.2  # the decoder's own region: saliency ≥ 0.5, else its top 20 %


class TargetError(ValueError):
    """A target or method this model cannot explain; the message names the field."""


@dataclass(frozen=True)
class Target:
    """What is explained: TOP (resolved per model), CLASS `index`, EMBEDDING, PATCH (`row`, `col`), REGION, or TEXT
    (the image's similarity with `prompt`, kept as typed)."""

    kind: str
    index: int = 0
    row: int = 0
    col: int = 0
    prompt: str = ""

    def __str__(self) -> str:
        return {CLASS: f"class:{self.index}", PATCH: f"patch:{self.row},{self.col}",
                TEXT: f"text:{self.prompt}"}.get(self.kind, self.kind)


@dataclass(frozen=True)
class Prediction:
    """One class of a classifier's output: softmax probability and pre-softmax logit."""

    index: int
    label: str
    probability: float
    logit: float


@dataclass
class Explanation:
    """A map of `method` for a target, with the scalar it explains in words."""

    method: str
    target: Target  # resolved: never TOP
    description: str  # the scalar explained, in words
    values: np.ndarray  # (grid_h, grid_w)


def parse_target(text: str) -> Target:
    """"top", "class:N", "embedding", "patch:ROW,COL", "region" (the saliency decoder's) or "text:PROMPT" (the
    prompt as typed: any case, ':' and commas included) → Target."""
    if match := re.fullmatch(r"\s*text:(.*)", str(text), re.IGNORECASE | re.DOTALL):
        return Target(TEXT, prompt=match.group(1).strip())
    text = str(text).strip().lower()
    if text in (TOP, EMBEDDING, REGION):
        return Target(text)
    if match := re.fullmatch(r"class:(\d+)", text):
        return Target(CLASS, index=int(match.group(1)))
    if match := re.fullmatch(r"patch:(\d+),(\d+)", text):
        return Target(PATCH, row=int(match.group(1)), col=int(match.group(2)))
    raise TargetError(f"target must be 'top', 'class:N', 'embedding', 'patch:ROW,COL', 'region' or 'text:PROMPT', "
                      f"got {text!r}")


def resolve(loaded: LoadedModel, analysis: Analysis, target: "Target | str") -> Target:
    """The target checked against this model and image; TOP becomes the top class (a classifier), the predicted
    region (the saliency decoder) or the embedding (no head)."""
    target = parse_target(target) if isinstance(target, str) else target
    head = loaded.head
    if target.kind == TOP:
        if isinstance(head, ClassifierHead):
            return Target(CLASS, index=predictions(loaded, analysis, 1)[0].index)
        return Target(REGION if isinstance(head, SaliencyDecoder) else EMBEDDING)
    if target.kind == CLASS:
        if not isinstance(head, ClassifierHead):
            raise TargetError("target: class:N needs a classifier head, and this model has none")
        if target.index >= head.num_classes:
            raise TargetError(f"target: class {target.index} is out of range (this head has {head.num_classes} "
                              f"classes, 0–{head.num_classes - 1})")
    if target.kind == REGION and not isinstance(head, SaliencyDecoder):
        raise TargetError("target: region needs a saliency decoder, and this model has none")
    if target.kind == TEXT and not target.prompt:
        raise TargetError("target: text:PROMPT needs a prompt after 'text:'")
    if target.kind == TEXT and loaded.text is None:
        raise TargetError(f"target: text:PROMPT needs a model with a text tower, and this one has none ({FAMILIES} "
                          "have one)")
    g = analysis.geometry
    if target.kind == PATCH and not (target.row < g.grid_h and target.col < g.grid_w):
        raise TargetError(f"target: patch {target.row},{target.col} is outside the {g.grid_h}×{g.grid_w} grid")
    return target


def explain(loaded: LoadedModel, analysis: Analysis, target: "Target | str" = TOP, method: str = "relevance",
            discard_ratio: float = 0.0, progress: Callable[[float], None] | None = None) -> Explanation:
    """The map of `method` for `target` on an analysed image: (grid_h, grid_w), cached in the analysis.

    "relevance" and "grad_rollout" of one target come from one backward sweep, cached together by target (the
    forward record is the analysis's own): switching between them costs nothing, another class or patch one sweep.
    "rollout" (with `discard_ratio`) and "attention" (the last layer, heads' mean) are the class token's (or its
    stand-in's, see `summary`) whatever the target.
    """
    if method not in METHODS:
        raise TargetError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if not 0.0 <= discard_ratio < 1.0:
        raise TargetError(f"discard_ratio must be in [0, 1), got {discard_ratio}")
    target = resolve(loaded, analysis, target)
    if method == "rollout":
        return Explanation(method, target, "attention rollout of the class token (or its stand-in)",
                           analysis.rollout_map(discard_ratio=discard_ratio))
    if method == "attention":
        return Explanation(method, target, "the last layer's class-token (or stand-in) attention, heads' mean",
                           analysis.cls_map(analysis.num_layers - 1, "mean"))
    ratio = round(float(discard_ratio), 6)
    key = ("explain", method, str(target), ratio if method == "grad_rollout" else None)
    cache = analysis._derived  # the analysis's derived maps, counted in its nbytes
    if key not in cache:
        objective = Objective(loaded, analysis, target)
        relevance, rollout = sweep(analysis.record, objective, ratio, progress)
        cache[("explain", "relevance", str(target), None)] = relevance.cpu().numpy()
        cache[("explain", "grad_rollout", str(target), ratio)] = rollout.cpu().numpy()
    return Explanation(method, target, describe(loaded, target), analysis.to_grid(cache[key]))


def describe(loaded: LoadedModel, target: Target) -> str:
    """The scalar explained, in words."""
    if target.kind == CLASS:
        return f"the logit of class {target.index} ({loaded.labels[target.index]})"
    if target.kind == REGION:
        return "the mean predicted saliency inside the model's own predicted region"
    if target.kind == PATCH:
        return f"f·sg(f), f the final feature of patch {target.row},{target.col}"
    if target.kind == TEXT:
        bias = " + bias" if loaded.text is not None and loaded.text.sigmoid else ""
        return f"the image's similarity with the prompt \"{target.prompt}\" (logit_scale·cos{bias})"
    return "f·sg(f), f the final feature of the class token (or the pooled output without one)"


class _ProbeCatcher:
    """An observer that keeps the attention-pooling probe's probabilities, in the graph."""

    probs: torch.Tensor | None = None

    def observe_layer(self, layer, query, key, lse, scale) -> None:
        pass

    def observe_pooling(self, probs: torch.Tensor) -> None:
        self.probs = probs


class Objective:
    """The scalar y explained, as a function of the last layer's output x (1, N, D), and the row it reads.

    CLASS: the class's logit (pre-softmax). EMBEDDING / PATCH: y = f·sg(f) (the feature times its own detached
    value, whose gradient is f itself), f the final feature (after post_layernorm) of the class token or of the
    patch; without a class token f is the pooled output. TEXT: the image-text similarity logit of the pooled output
    (projected) with the prompt's detached text embedding (`text.similarity`), read like EMBEDDING. REGION: the
    decoder's mean predicted saliency inside its own region (pixels at ≥ 0.5, or its top 20 % where none is), the
    mask held fixed, backpropagated through the decoder: a score in [0, 1], the one the perturbation tests watch (a
    sum over the region's ~10⁵ pixels scaled Ā so far above I that relevance and gradient rollout lost the residual
    path, and both ranked worse by those tests on every bundled example). The row w: the tokens the target reads,
    evenly (the class token; DeiT's class and distillation tokens; DINOv2's classifier: ½ class token + ½ the
    patches' mean; mean-pooled heads and the decoder: the patches); an attention-pooling probe's row is its own
    mean_h (∇P ⊙ P)⁺ (relevance) or rownorm((mean_h ∇P ⊙ P)⁺) (rollout).
    """

    def __init__(self, loaded: LoadedModel, analysis: Analysis, target: Target):
        self.loaded, self.model, self.head, self.target = loaded, loaded.model, loaded.head, target
        self.num_prefix = analysis.num_prefix_tokens
        self.geometry = analysis.geometry
        self.token = analysis.token_at(target.row, target.col) if target.kind == PATCH else None

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (1, N, D), requiring grad → (∂y/∂x, relevance start row (N,), rollout start row (N,))."""
        config, catcher = self.model.config, _ProbeCatcher()
        tokens = self.model.post_layernorm(x)  # (1, N, D)
        _, pooled = self.model.pool(x, catcher)
        n = x.shape[1]
        weights = self._patch_row(n)
        if self.target.kind == CLASS:
            y = self.head(tokens, pooled)[0, self.target.index]
            weights = self.head.token_weights(n)
        elif self.target.kind == REGION:
            y = self._region_saliency(tokens)
        elif self.target.kind == PATCH:
            f = tokens[0, self.token]
            y, weights = f @ f.detach(), F.one_hot(torch.tensor(self.token), n).float()
        else:
            f = tokens[0, 0] if config.class_token else pooled[0]
            y = similarity(self.loaded, pooled, self.target.prompt)[0] if self.target.kind == TEXT else f @ f.detach()
            weights = F.one_hot(torch.tensor(0), n).float() if config.class_token else weights
        if weights is not None:
            grad, = torch.autograd.grad(y, x)
            weights = weights.to(x.device)
            return grad, weights, weights
        if catcher.probs is None:
            raise TargetError("target: this target reads an attention-pooling head that did not run")
        grad, probe_grad = torch.autograd.grad(y, (x, catcher.probs))
        weighted = (catcher.probs.detach() * probe_grad)[0].float()  # (heads, N)
        rollout = weighted.mean(0).clamp(min=0)
        return grad, weighted.clamp(min=0).mean(0), rollout / rollout.sum().clamp(min=torch.finfo().tiny)

    def _patch_row(self, n: int) -> torch.Tensor | None:
        """Even weights over the patch tokens (a mean-pooled output, the decoder); None with a pooling head."""
        if self.model.config.pooling_head and not self.model.config.class_token:
            return None
        weights = torch.zeros(n)
        weights[self.num_prefix:] = 1.0 / (n - self.num_prefix)
        return weights

    def _region_saliency(self, tokens: torch.Tensor) -> torch.Tensor:
        g = self.geometry
        grid = tokens[:, self.num_prefix:].transpose(1, 2).reshape(1, -1, g.grid_h, g.grid_w)
        saliency = self.head(grid, (g.input_h, g.input_w))[0]  # (input_h, input_w)
        mask = predicted_region(saliency.detach())
        return (saliency * mask).sum() / mask.sum()


def predicted_region(saliency: torch.Tensor) -> torch.Tensor:
    """The decoder's own region: pixels at or above REGION_THRESHOLD, or its top REGION_TOP_SHARE where none is."""
    mask = saliency >= REGION_THRESHOLD
    if not mask.any():
        k = max(1, int(saliency.numel() * REGION_TOP_SHARE))
        mask = saliency >= saliency.flatten().topk(k).values[-1]
    return mask.to(saliency.dtype)


class KeptAttention(torch.autograd.Function):
    """softmax(scale·QKᵀ)·V whose forward is the analysis forward's kept output O (nothing is computed) and whose
    backward is the fused CPU flash kernel's from O and the kept fp32 row log-sum-exps: the backward that
    F.scaled_dot_product_attention runs on the CPU from its own O and lse. A wrong O fails `mlp_gradient`'s check."""

    @staticmethod
    def forward(ctx, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, out: torch.Tensor,
                lse: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(query, key, value)
        ctx.out, ctx.lse, ctx.scale = out, lse, scale  # the record's inference tensors: autograd cannot save them
        return out.clone()  # a tensor of its own, for the same reason (one layer's O: 8 MB at 1022 px)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        query, key, value = ctx.saved_tensors
        grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad, query, key, value, ctx.out, ctx.lse, 0.0, False, scale=ctx.scale)
        return (*grads, None, None, None)


def kept_output(record: AttentionRecord, index: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Layer `index`'s kept heads' outputs (1, heads, N, head_dim) and fp32 row log-sum-exps (1, heads, N), where
    `KeptAttention` can use them (kept, on the CPU); None otherwise."""
    if len(record.outputs) != record.num_layers or record.outputs[index].device.type != "cpu":
        return None
    return record.outputs[index].unsqueeze(0), record.lse[index].unsqueeze(0)


def attention_forward(layer: nn.Module, x: torch.Tensor, kept: tuple[torch.Tensor, torch.Tensor] | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """An encoder layer's first half, x + attention(layer_norm1(x)) (1, N, D), with its heads' outputs O
    (1, heads, N, head_dim) and q, k, v; O is `kept` = (O, lse) from the forward where given (see `kept_output`)
    and of the model's dtype, else recomputed."""
    attn = layer.self_attn
    batch, tokens, dim = x.shape
    normed = layer.layer_norm1(x)
    query, key = attn.query_key(normed)  # (1, heads, N, head_dim)
    value = attn.v_proj(normed).view(batch, tokens, attn.num_heads, attn.head_dim).transpose(1, 2)
    if kept is not None and kept[0].dtype == query.dtype:
        heads = KeptAttention.apply(query, key, value, *kept, attn.scale)
    else:
        heads = F.scaled_dot_product_attention(query, key, value, scale=attn.scale)
    return x + attn.out_proj(heads.transpose(1, 2).reshape(batch, tokens, dim)), heads, query, key, value


def mlp_gradient(layer: nn.Module, mid: torch.Tensor, kept: torch.Tensor, grad: torch.Tensor, index: int) -> None:
    """Turns grad, ∂y/∂output (N, D) of the layer's output mid + mlp(layer_norm2(mid)), into ∂y/∂mid in place,
    MLP_ELEMENTS of hidden activations at a time (the MLP reads each token alone), each part's output checked against
    the kept one."""
    tolerance = max(1e-3, 8 * torch.finfo(kept.dtype).eps)
    atol = tolerance * float(kept.abs().max())
    step = max(1, MLP_ELEMENTS // layer.mlp.fc1.out_features)
    for start in range(0, len(mid), step):
        rows = slice(start, start + step)
        part = mid[rows].detach().requires_grad_()
        out = part + layer.mlp(layer.layer_norm2(part))
        if not torch.allclose(out.detach().float(), kept[rows].float(), rtol=tolerance, atol=atol):
            raise RuntimeError(f"layer {index} recomputed from its kept input differs from the forward's output")
        grad[rows], = torch.autograd.grad(out, part, grad[rows])


def sweep(record: AttentionRecord, objective: Callable, discard_ratio: float = 0.0,
          progress: Callable[[float], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Relevance and gradient rollout rows (N,) each, fp32, from one top-down sweep (see the module docstring)."""
    with torch.inference_mode(False), torch.enable_grad():
        last = record.hidden_states[-1].unsqueeze(0).clone().requires_grad_()
        grad, relevance, rollout = objective(last)
        record.release_between_layers()
        for step, index in enumerate(range(record.num_layers - 1, -1, -1)):
            layer, layer_input = record.layers[index], record.hidden_states[index].unsqueeze(0).clone()
            mid, heads, query, key, value = attention_forward(layer, layer_input.requires_grad_(index > 0),
                                                              kept_output(record, index))
            mlp_gradient(layer, mid[0], record.hidden_states[index + 1], grad[0], index)  # grad: now ∂y/∂mid
            record.release_between_layers()  # the MLP's parts leave holes the attention's gradients do not fit
            wanted = (heads, layer_input) if index > 0 else (heads,)
            grads = torch.autograd.grad(mid, wanted, grad)
            attention = LayerAttention(query.detach()[0], key.detach()[0], record.lse[index], record.scales[index])
            relevance, rollout = propagate(attention, value.detach()[0].float(), grads[0][0].float(), relevance,
                                           rollout, discard_ratio)
            grad = grads[1] if index > 0 else None
            del mid, heads, query, key, value, grads, attention
            record.release_between_layers()
            if progress is not None:
                progress((step + 1) / record.num_layers)
    return relevance, rollout


def propagate(attention: LayerAttention, value: torch.Tensor, out_grad: torch.Tensor, relevance: torch.Tensor,
              rollout: torch.Tensor, discard_ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer: relevance + relevance·Ā and rollout·Â, from blocks of rows of A and ∂y/∂A = ∂y/∂O·Vᵀ.

    value, out_grad: (heads, N, head_dim) fp32, the layer's V and ∂y/∂O.
    """
    n, heads = attention.num_tokens, attention.num_heads
    step = max(1, BLOCK_ELEMENTS // (heads * n))

    def blocks(every: bool) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        for start in range(0, n, step):
            rows = slice(start, start + step)
            if not every and not (torch.any(relevance[rows]) or torch.any(rollout[rows])):
                continue
            weighted = attention.probs(rows).mul_(torch.matmul(out_grad[:, rows], value.transpose(-1, -2)))
            fused = weighted.sum(0).clamp_(min=0).div_(heads)  # G rows: (rows, N)
            yield start, weighted.clamp_(min=0).sum(0).div_(heads), fused  # Ā rows, G rows

    k = int(n * n * discard_ratio)
    threshold = kth_smallest(lambda: (fused for _, _, fused in blocks(True)), k) if k else None
    new_relevance, new_rollout = relevance.clone(), torch.zeros_like(rollout)
    for start, chefer, fused in blocks(False):
        rows = slice(start, start + len(chefer))
        new_relevance += relevance[rows] @ chefer
        if threshold is not None:
            fused[fused <= threshold] = 0.0
        fused[torch.arange(len(fused)), torch.arange(rows.start, rows.stop)] += 1.0
        new_rollout += rollout[rows] @ (fused / fused.sum(-1, keepdim=True))
    return new_relevance, new_rollout


@torch.inference_mode()
def predictions(loaded: LoadedModel, analysis: Analysis, k: int = 5) -> list[Prediction]:
    """The classifier's top `k` classes with softmax probabilities, from the kept last layer (no new forward)."""
    if not isinstance(loaded.head, ClassifierHead):
        raise TargetError("predictions need a classifier head, and this model has none")
    key = ("explain", "logits")
    if key not in analysis._derived:
        x = analysis.record.hidden_states[-1].unsqueeze(0)
        _, pooled = loaded.model.pool(x)
        analysis._derived[key] = loaded.head(loaded.model.post_layernorm(x), pooled)[0].float().cpu().numpy()
    logits = torch.from_numpy(analysis._derived[key])
    probs = logits.softmax(-1)
    top = probs.topk(min(k, len(probs)))
    return [Prediction(int(i), loaded.labels[int(i)], float(p), float(logits[i])) for p, i in zip(*top)]


@torch.inference_mode()
def predicted_saliency(loaded: LoadedModel, analysis: Analysis) -> np.ndarray:
    """The saliency decoder's own prediction at the model input's size: (input_h, input_w) in [0, 1], cached."""
    if not isinstance(loaded.head, SaliencyDecoder):
        raise TargetError("a saliency map needs a saliency decoder, and this model has none")
    key = ("explain", "saliency")
    if key not in analysis._derived:
        g = analysis.geometry
        tokens = loaded.model.post_layernorm(analysis.record.hidden_states[-1].unsqueeze(0))
        grid = tokens[:, analysis.num_prefix_tokens:].transpose(1, 2).reshape(1, -1, g.grid_h, g.grid_w)
        analysis._derived[key] = loaded.head(grid, (g.input_h, g.input_w))[0].float().cpu().numpy()
    return analysis._derived[key]
