"""Relevance (Chefer et al. 2021b) and gradient rollout (vit-explain) against dense references written here from
the papers' equations: transformers' eager attentions with their gradients retained, every N×N matrix kept, within
1e-5 of the map's peak. Tiny classifiers saved by transformers (ViT, DeiT distilled, DINOv2 with registers), patch
and embedding targets, SigLIP (no class token: its pooling probe, or the mean of the patches), bad targets. Every
dense comparison runs twice: the sweep from the heads' outputs the forward kept, and recomputing them."""
import numpy as np
import pytest
import torch
import transformers as tf

from analysis import analyze, record, relevance
from analysis.relevance import TargetError, explain, parse_target, predictions
from model import load_model
from model.heads import SaliencyDecoder
from tests.helpers import random_image, randomize, save, tiny_loaded

TOL = 1e-5
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32,
            patch_size=8)
IMAGES = [((32, 32), 32), ((40, 64), 64)]  # (height, width), long side: a 4×4 grid and a 5×8 one


def dense_maps(attentions, start: torch.Tensor, discard_ratio: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """start·R with R ← R + Ā·R from R = I, layer 1 first, Ā = mean_h (∇A ⊙ A)⁺ (Chefer et al. 2021b, eq. 5–6 and
    their reference code); and start·P with P ← Â·P, Â = rownorm(drop(G) + I), G = (mean_h ∇A ⊙ A)⁺ (vit-explain's
    grad_rollout, rows normalised by their own sums), from full (heads, N, N) matrices in float64."""
    n = attentions[0].shape[-1]
    eye = torch.eye(n, dtype=torch.float64)
    chefer_r, rollout_p = eye.clone(), eye.clone()
    for a in attentions:
        weighted = a.grad[0].double() * a[0].detach().double()  # (heads, N, N)
        chefer_r = chefer_r + weighted.clamp(min=0).mean(0) @ chefer_r
        fused = weighted.mean(0).clamp(min=0).flatten()
        k = int(n * n * discard_ratio)
        if k:
            fused[fused.topk(k, largest=False).indices] = 0.0
        fused = fused.view(n, n) + eye
        rollout_p = (fused / fused.sum(-1, keepdim=True)) @ rollout_p
    return start.double() @ chefer_r, start.double() @ rollout_p


def eager(model, pixels, scalar):
    """Runs a transformers model eagerly with attentions kept and retained for their gradients; backprops scalar."""
    out = model(pixels, output_attentions=True, interpolate_pos_encoding=True)
    for a in out.attentions:
        a.retain_grad()
    scalar(out).backward()
    return out.attentions


def one_hot(n: int, *tokens: int) -> torch.Tensor:
    w = torch.zeros(n)
    w[list(tokens)] = 1.0 / len(tokens)
    return w


def assert_maps(loaded, analysis, target, references, discard_ratio=0.0):
    for method, reference in zip(("relevance", "grad_rollout"), references, strict=True):
        got = explain(loaded, analysis, target, method, discard_ratio if method == "grad_rollout" else 0.0).values
        expected = analysis.to_grid(reference.float())
        assert got.shape == expected.shape
        peak = np.abs(expected).max()
        assert peak > 0 and np.abs(got - expected).max() <= TOL * peak, (method, np.abs(got - expected).max(), peak)


def setup(loaded, size, long_side):
    image = random_image(*size, seed=long_side)
    pixels, _ = loaded.preprocessing(image, long_side)
    return analyze(loaded, image, long_side, keep_outputs=True), pixels  # kept where the budget allows


@pytest.fixture(params=["kept", "recomputed"])
def outputs(request, monkeypatch) -> str:
    """The analyses keep every layer's heads' outputs (the sweep skips its attention forward), or none."""
    monkeypatch.setattr(record, "KEEP_OUTPUTS_BYTES", 1 << 40 if request.param == "kept" else 0)
    return request.param


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vit")
    reference = save(tf.ViTForImageClassification(tf.ViTConfig(**TINY, num_labels=5)), folder, seed=1)
    return load_model(folder, device="cpu"), reference


@pytest.mark.parametrize("size, long_side", IMAGES)
@pytest.mark.parametrize("target", ["top", "class:3"])
@pytest.mark.usefixtures("outputs")
def test_vit_classifier(vit, size, long_side, target):
    loaded, reference = vit
    analysis, pixels = setup(loaded, size, long_side)
    with torch.no_grad():
        logits = reference(pixels, interpolate_pos_encoding=True).logits[0]
    index = int(logits.argmax()) if target == "top" else 3
    assert relevance.resolve(loaded, analysis, target) == relevance.Target("class", index=index)
    attentions = eager(reference, pixels, lambda out: out.logits[0, index])
    assert_maps(loaded, analysis, target, dense_maps(attentions, one_hot(analysis.record.num_tokens, 0)))


@pytest.mark.usefixtures("outputs")
def test_grad_rollout_discard_ratio(vit):
    loaded, reference = vit
    analysis, pixels = setup(loaded, *IMAGES[1])
    attentions = eager(reference, pixels, lambda out: out.logits[0, 1])
    assert_maps(loaded, analysis, "class:1", dense_maps(attentions, one_hot(analysis.record.num_tokens, 0), 0.6), 0.6)


@pytest.mark.parametrize("target", ["embedding", "patch:2,5"])
@pytest.mark.usefixtures("outputs")
def test_embedding_and_patch_targets(vit, target):
    """y = f·sg(f) for the final-norm feature f of the class token, or of patch (2, 5)."""
    loaded, reference = vit
    analysis, pixels = setup(loaded, *IMAGES[1])
    token = 0 if target == "embedding" else analysis.token_at(2, 5)

    def scalar(out):
        f = out.last_hidden_state[0, token]  # ViTModel: after the final layernorm
        return f @ f.detach()

    attentions = eager(reference.vit, pixels, scalar)
    assert_maps(loaded, analysis, target, dense_maps(attentions, one_hot(analysis.record.num_tokens, token)))


@pytest.mark.usefixtures("outputs")
def test_deit_distilled_averages_its_two_heads(tmp_path):
    reference = save(tf.DeiTForImageClassificationWithTeacher(tf.DeiTConfig(**TINY, num_labels=4)), tmp_path, seed=3)
    loaded = load_model(tmp_path, device="cpu")
    analysis, pixels = setup(loaded, *IMAGES[1])
    attentions = eager(reference, pixels, lambda out: out.logits[0, 2])  # (cls_logits + distillation_logits) / 2
    assert_maps(loaded, analysis, "class:2", dense_maps(attentions, one_hot(analysis.record.num_tokens, 0, 1)))


@pytest.mark.usefixtures("outputs")
def test_dinov2_with_registers_classifier(tmp_path):
    sizes = {k: v for k, v in TINY.items() if k != "intermediate_size"}
    config = tf.Dinov2WithRegistersConfig(**sizes, mlp_ratio=2, num_register_tokens=2, num_labels=4)
    reference = save(tf.Dinov2WithRegistersForImageClassification(config), tmp_path, seed=4)
    loaded = load_model(tmp_path, device="cpu")
    assert loaded.config.num_prefix_tokens == 3
    analysis, pixels = setup(loaded, *IMAGES[1])
    n = analysis.record.num_tokens
    start = 0.5 * one_hot(n, 0) + 0.5 * one_hot(n, *range(3, n))  # concat(class token, mean of the patches)
    attentions = eager(reference, pixels, lambda out: out.logits[0, 1])
    assert_maps(loaded, analysis, "class:1", dense_maps(attentions, start))


def siglip_pooled_with_probe(head, tokens):
    """The MAP head written out: the probe's attention P (heads, N) kept for its gradient, then the pooled output."""
    attention, dim = head.attention, tokens.shape[-1]
    heads = attention.num_heads
    w_q, w_k, w_v = attention.in_proj_weight.chunk(3)
    b_q, b_k, b_v = attention.in_proj_bias.chunk(3)
    q = (head.probe @ w_q.T + b_q).view(1, heads, -1).transpose(0, 1)  # (heads, 1, head_dim)
    k = (tokens[0] @ w_k.T + b_k).view(-1, heads, dim // heads).transpose(0, 1)  # (heads, N, head_dim)
    v = (tokens[0] @ w_v.T + b_v).view(-1, heads, dim // heads).transpose(0, 1)
    probs = torch.softmax(q @ k.transpose(-1, -2) / (dim // heads) ** 0.5, dim=-1)  # (heads, 1, N)
    probs.retain_grad()
    pooled = attention.out_proj((probs @ v).transpose(0, 1).reshape(1, dim))
    return pooled + head.mlp(head.layernorm(pooled)), probs


@pytest.mark.usefixtures("outputs")
def test_siglip_embedding_through_the_pooling_probe(tmp_path):
    reference = save(tf.SiglipVisionModel(tf.SiglipVisionConfig(**TINY)), tmp_path, seed=5)
    loaded = load_model(tmp_path, device="cpu")
    analysis, pixels = setup(loaded, *IMAGES[1])
    kept = {}

    def scalar(out):
        pooled, kept["probs"] = siglip_pooled_with_probe(reference.head, out.last_hidden_state)
        assert (pooled - out.pooler_output).abs().max() < 1e-5
        return pooled[0] @ pooled[0].detach()

    attentions = eager(reference, pixels, scalar)
    probe = (kept["probs"].grad * kept["probs"].detach())[:, 0].double()  # (heads, N)
    chefer_start = probe.clamp(min=0).mean(0)
    rollout_start = probe.mean(0).clamp(min=0)
    expected = (dense_maps(attentions, chefer_start)[0],
                dense_maps(attentions, rollout_start / rollout_start.sum())[1])
    assert_maps(loaded, analysis, "embedding", expected)
    assert relevance.resolve(loaded, analysis, "top").kind == "embedding"  # no head: top is the embedding


@pytest.mark.usefixtures("outputs")
def test_mean_pooled_embedding_without_class_token(tmp_path):
    reference = save(tf.SiglipVisionModel(tf.SiglipVisionConfig(**TINY, vision_use_head=False)), tmp_path, seed=6)
    loaded = load_model(tmp_path, device="cpu")
    analysis, pixels = setup(loaded, *IMAGES[0])

    def scalar(out):
        f = out.last_hidden_state[0].mean(0)
        return f @ f.detach()

    attentions = eager(reference, pixels, scalar)
    n = analysis.record.num_tokens
    assert_maps(loaded, analysis, "embedding", dense_maps(attentions, one_hot(n, *range(n))))


@pytest.mark.usefixtures("outputs")
def test_saliency_region_through_the_decoder():
    """A dense head: y = the mean saliency inside the decoder's own region (≥ 0.5, else its top 20 %), the patches read
    evenly."""
    loaded = tiny_loaded(seed=7)
    loaded.head = SaliencyDecoder((32, 8, 8, 4)).eval()
    randomize(loaded.head, seed=12)
    with torch.no_grad():  # a region of 58 pixels at ≥ 0.5 whose gradient reaches the tokens
        loaded.head.final_conv.weight.mul_(30.0)
    analysis, pixels = setup(loaded, *IMAGES[1])
    g = analysis.geometry

    def scalar(out):
        tokens = loaded.model.post_layernorm(out.hidden_states[-1])
        grid = tokens[:, 1:].transpose(1, 2).reshape(1, 32, g.grid_h, g.grid_w)
        saliency = loaded.head(grid, (g.input_h, g.input_w))[0]
        mask = saliency >= 0.5
        if not mask.any():
            mask = saliency >= saliency.flatten().topk(int(0.2 * saliency.numel())).values[-1]
        return (saliency * mask.detach()).sum() / mask.sum()

    out = loaded.model(pixels, output_attentions=True, output_hidden_states=True, interpolate_pos_encoding=True)
    for a in out.attentions:
        a.retain_grad()
    scalar(out).backward()
    n = analysis.record.num_tokens
    assert relevance.resolve(loaded, analysis, "top").kind == "region"
    start = one_hot(n, *range(1, n))
    assert_maps(loaded, analysis, "top", dense_maps(out.attentions, start))
    for method in ("relevance", "grad_rollout"):  # the maps are more than their start row (a gradient was taken)
        values = explain(loaded, analysis, "top", method).values
        assert np.abs(values - analysis.to_grid(start)).max() > 1e-3 * np.abs(values).max(), method
    assert relevance.predicted_saliency(loaded, analysis).shape == (g.input_h, g.input_w)


def test_one_sweep_serves_both_methods_and_is_cached(vit, monkeypatch):
    loaded, _ = vit
    analysis, _ = setup(loaded, *IMAGES[0])
    first = explain(loaded, analysis, "class:1", "relevance").values
    monkeypatch.setattr(relevance, "sweep", lambda *args, **kwargs: pytest.fail("swept again"))
    assert np.array_equal(explain(loaded, analysis, "class:1", "relevance").values, first)
    explain(loaded, analysis, "class:1", "grad_rollout")
    assert explain(loaded, analysis, "top", "rollout").values.shape == first.shape
    assert np.array_equal(explain(loaded, analysis, "top", "attention").values, analysis.cls_map(2, "mean"))


def test_predictions(vit):
    loaded, reference = vit
    analysis, pixels = setup(loaded, *IMAGES[1])
    with torch.no_grad():
        probs = reference(pixels, interpolate_pos_encoding=True).logits[0].softmax(-1)
    top = predictions(loaded, analysis, 3)
    assert [p.index for p in top] == probs.topk(3).indices.tolist()
    assert np.allclose([p.probability for p in top], probs.topk(3).values.numpy(), atol=1e-6)
    assert top[0].label == f"LABEL_{top[0].index}"


@pytest.mark.parametrize("target, field", [("class:5", "target"), ("class:x", "target"), ("patch:4,0", "target"),
                                           ("region", "target"), ("bogus", "target")])
def test_bad_targets_name_the_field(vit, target, field):
    loaded, _ = vit
    analysis, _ = setup(loaded, *IMAGES[0])
    with pytest.raises(TargetError, match=field):
        explain(loaded, analysis, target)


def test_bad_method_and_head_less_class(vit, tmp_path):
    loaded, _ = vit
    analysis, _ = setup(loaded, *IMAGES[0])
    with pytest.raises(TargetError, match="method"):
        explain(loaded, analysis, "top", "saliency")
    with pytest.raises(TargetError, match="discard_ratio"):
        explain(loaded, analysis, "top", "grad_rollout", 1.0)
    save(tf.ViTModel(tf.ViTConfig(**TINY)), tmp_path, seed=2)
    bare = load_model(tmp_path, device="cpu")
    with pytest.raises(TargetError, match="target: class:N needs a classifier"):
        explain(bare, analyze(bare, random_image(32, 32), 32), "class:0")
    assert issubclass(TargetError, ValueError) and parse_target(" Patch:3,4 ") == relevance.Target("patch", row=3, col=4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("overrides", [{}, dict(distillation_token=True, num_register_tokens=2)])
def test_kept_outputs_give_the_recomputed_maps_without_an_attention_forward(monkeypatch, overrides, dtype):
    """Kept heads' outputs (the sweep's attention backward from them) against the same analysis recomputing them."""
    loaded = tiny_loaded(seed=9, **overrides)
    loaded.model.to(dtype)
    image, name = random_image(40, 64, seed=9), str(dtype).removeprefix("torch.")
    maps = {}
    for budget in (0, 1 << 40):
        monkeypatch.setattr(record, "KEEP_OUTPUTS_BYTES", budget)
        analysis = analyze(loaded, image, 64, dtype=name, keep_outputs=True)
        n, layers = analysis.record.num_tokens, analysis.num_layers
        assert [o.shape for o in analysis.record.outputs] == ([(4, n, 8)] * layers if budget else [])
        assert all(o.dtype == dtype for o in analysis.record.outputs)
        with monkeypatch.context() as patched:
            if budget:  # nothing recomputes the attention forward
                patched.setattr(torch.nn.functional, "scaled_dot_product_attention", lambda *a, **k: pytest.fail())
            maps[budget] = [explain(loaded, analysis, "patch:2,5", method, ratio).values
                            for method, ratio in (("relevance", 0.0), ("grad_rollout", 0.3))]
    for recomputed, kept in zip(maps[0], maps[1 << 40]):
        assert np.abs(kept - recomputed).max() <= TOL * np.abs(recomputed).max()


def test_a_wrong_kept_output_fails_loudly(monkeypatch):
    monkeypatch.setattr(record, "KEEP_OUTPUTS_BYTES", 1 << 40)
    loaded = tiny_loaded(seed=10)
    analysis = analyze(loaded, random_image(32, 32), 32, keep_outputs=True)
    analysis.record.outputs[1] = analysis.record.outputs[1] * 1.5
    with pytest.raises(RuntimeError, match="layer 1 recomputed from its kept input differs"):
        explain(loaded, analysis, "embedding")
