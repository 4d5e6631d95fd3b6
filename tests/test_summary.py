"""What stands in for the class token (SigLIP's pooling probe, IDEFICS2's mean attention received, DeiT's two tokens),
against dense references from full attention matrices, on towers transformers saved and `load_model` read back."""
import json

import numpy as np
import pytest
import torch
import transformers as tf
from transformers.models.idefics2.modeling_idefics2 import Idefics2VisionTransformer

import visualizer
from analysis import CLASS_TOKEN, MEAN_RECEIVED, STAT_LABELS, analyze
from model import load_model
from tests.helpers import dense_attentions, dense_flow, dense_rollout, random_image, save, tiny_loaded

TOL = 1e-5
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32,
            patch_size=8)
FAMILIES = {  # family → a transformers model, the tower inside it
    "siglip": (lambda: tf.SiglipVisionModel(tf.SiglipVisionConfig(**TINY)), lambda m: m.vision_model),
    "idefics2": (lambda: Idefics2VisionTransformer(tf.Idefics2VisionConfig(**TINY)), lambda m: m),
    "deit": (lambda: tf.DeiTForImageClassificationWithTeacher(tf.DeiTConfig(**TINY, num_labels=3)), lambda m: m.deit),
}
DESCRIPTIONS = {
    "siglip": ("This model has no class token: each map shows the mean attention each patch receives from every token, "
               "per head; the attention-pooling probe's map shows what summarises the image."),
    "idefics2": ("This model has no class token and no pooling head: in their place, each map shows the mean attention "
                 "each patch receives from every token, per head."),
    "deit": ("Each map shows the class token's attention to every patch, per head; the distillation token's attention "
             "to every patch is kept as well."),
}
FUSE = {"mean": lambda a: a.mean(0), "max": lambda a: a.amax(0), "min": lambda a: a.amin(0)}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    save(FAMILIES[request.param][0](), folder, seed=11)
    return request.param, load_model(folder, device="cpu")


@pytest.fixture(scope="module")
def case(family):
    name, loaded = family
    image = random_image(45, 70)  # non-square: grid 5 × 8 at long side 64
    analysis = analyze(loaded, image, long_side=64, max_stat_queries=None)
    pixels, _ = loaded.preprocessing(image, 64)
    return name, loaded, analysis, pixels, dense_attentions(loaded, pixels)


def dense_summary_rows(attentions, class_token):
    """Per layer (heads, N), float64: the class token's row A[:, 0, :], or the mean query row Σ_i A[:, i, :] / N."""
    return [a.double()[:, 0] if class_token else a.double().mean(1) for a in attentions]


def dense_probe(loaded, pixels):
    """The pooling head's probe attention, written out: q = W_q·probe + b_q, k_j = W_k·x_j + b_k over the
    post-layernorm tokens x_j, split into heads of size d; p_h = softmax_j(q_h · k_hj / √d): (heads, N), float64."""
    model = loaded.model
    with torch.no_grad():
        tokens = model.post_layernorm(model(pixels, output_hidden_states=True,
                                            interpolate_pos_encoding=True).hidden_states[-1][0]).double()
        w_q, w_k, _ = model.head.attention.in_proj_weight.double().chunk(3)
        b_q, b_k, _ = model.head.attention.in_proj_bias.double().chunk(3)
        q = model.head.probe[0, 0].double() @ w_q.T + b_q  # (D,)
        k = tokens @ w_k.T + b_k  # (N, D)
    heads = loaded.config.num_attention_heads
    d = q.shape[0] // heads
    scores = torch.einsum("hd,nhd->hn", q.view(heads, d), k.view(-1, heads, d)) / d ** 0.5
    return torch.softmax(scores, dim=-1)


def dense_top(name, loaded, pixels, fusion, num_tokens):
    """The vector rollout and flow start from: None (the class token), the fused probe renormalised, or uniform."""
    if name == "deit":
        return None
    if name == "siglip":
        fused = FUSE[fusion](dense_probe(loaded, pixels))
        return fused / fused.sum()
    return torch.full((num_tokens,), 1.0 / num_tokens, dtype=torch.float64)


def test_summary_names_the_stand_in(case):
    name, loaded, analysis, _, _ = case
    summary = analysis.summary
    assert summary.kind == (CLASS_TOKEN if name == "deit" else MEAN_RECEIVED)
    assert (summary.class_token, summary.pooling, summary.distillation) == (
        name == "deit", name == "siglip", name == "deit")
    assert summary.description == DESCRIPTIONS[name]
    as_json = json.loads(json.dumps(summary.to_dict()))
    assert as_json["kind"] == summary.kind and as_json["description"] == summary.description
    assert ("NaN" in summary.statistics_note) == (name != "deit")
    assert ("uniform" in summary.rollout_top, "probe" in summary.rollout_top) == (name == "idefics2", name == "siglip")
    assert ("super-sink" in summary.flow_sink) == (name != "deit")


def test_summary_maps_match_dense(case):
    name, loaded, analysis, _, attentions = case
    prefix = loaded.config.num_prefix_tokens
    assert (analysis.geometry.grid_h, analysis.geometry.grid_w, prefix) == (5, 8, 2 if name == "deit" else 0)
    for layer, rows in enumerate(dense_summary_rows(attentions, name == "deit")):
        np.testing.assert_allclose(analysis.cls_attention[layer], rows.numpy(), atol=TOL)
        expected = rows[:, prefix:].reshape(4, 5, 8).numpy()
        np.testing.assert_allclose(analysis.cls_maps(layer), expected, atol=TOL)
        for head in (0, 3):
            np.testing.assert_allclose(analysis.cls_map(layer, head), expected[head], atol=TOL)
        np.testing.assert_allclose(analysis.cls_map(layer, "max"), expected.max(0), atol=TOL)
        assert expected.std() > 0.1 * expected.mean()  # real maps, not uniform ones


def test_pooling_probe_and_distillation_rows_match_dense(case):
    name, loaded, analysis, pixels, attentions = case
    if name == "siglip":
        probe = dense_probe(loaded, pixels)
        np.testing.assert_allclose(analysis.pooling_attention, probe.numpy(), atol=TOL)
        np.testing.assert_allclose(analysis.pooling_map(2), probe[2].reshape(5, 8).numpy(), atol=TOL)
        np.testing.assert_allclose(analysis.pooling_map("mean"), probe.mean(0).reshape(5, 8).numpy(), atol=TOL)
    else:
        assert analysis.pooling_attention is None
        with pytest.raises(ValueError, match="no attention-pooling head"):
            analysis.pooling_map(0)
    if name == "deit":
        for layer, attention in enumerate(attentions):
            np.testing.assert_allclose(analysis.distillation_attention[layer], attention[:, 1].numpy(), atol=TOL)
            np.testing.assert_allclose(analysis.distillation_map(layer, 1), attention[1, 1, 2:].reshape(5, 8).numpy(),
                                       atol=TOL)
    else:
        assert analysis.distillation_attention is None
        with pytest.raises(ValueError, match="no distillation token"):
            analysis.distillation_map(0, 0)


@pytest.mark.parametrize("fusion", ["mean", "max", "min"])
@pytest.mark.parametrize("discard_ratio", [0.0, 0.5])
def test_rollout_matches_a_dense_rollout_from_the_same_top(case, fusion, discard_ratio):
    name, loaded, analysis, pixels, attentions = case
    prefix = loaded.config.num_prefix_tokens
    top = dense_top(name, loaded, pixels, fusion, attentions[0].shape[-1])
    for last_layer in (0, 2):
        expected = dense_rollout(attentions, fusion, discard_ratio, last_layer, top)
        np.testing.assert_allclose(analysis.rollout_map(fusion, discard_ratio, last_layer),
                                   expected[prefix:].reshape(5, 8).numpy(), atol=TOL)
        assert expected.sum().item() == pytest.approx(1.0, abs=1e-9)  # a distribution over the input tokens


@pytest.mark.parametrize("fusion", ["mean", "max"])
def test_attention_flow_matches_a_plain_max_flow_to_the_same_sink(family, fusion):
    name, loaded = family
    image = random_image(24, 32)  # grid 3 × 4 at long side 32: 12 or 14 tokens keep the reference quick
    analysis = analyze(loaded, image, long_side=32)
    pixels, _ = loaded.preprocessing(image, 32)
    attentions = dense_attentions(loaded, pixels)
    top = dense_top(name, loaded, pixels, fusion, attentions[0].shape[-1])
    expected = np.array(dense_flow(attentions, fusion, None if top is None else top.tolist()))
    prefix = loaded.config.num_prefix_tokens
    np.testing.assert_allclose(analysis.flow_map(fusion), expected[prefix:].reshape(3, 4), atol=TOL)
    assert expected.max() > 0.02  # the maps carry real flow, not zeros


def dense_statistics(attentions, summary_rows, num_prefix, grid_w, patch_size, class_token):
    """STAT_LABELS' definitions on full matrices A (heads, N, N), s being each layer's summary rows (heads, N):

    cls_entropy = −Σ_j s_j ln s_j over every token; cls_patch_entropy: the same over the patches, s renormalised over
    them; mean_entropy: −Σ_j A_ij ln A_ij, averaged over patch queries i; mean_distance: Σ_j A_ij d_ij / Σ_j A_ij over
    patch keys j, d_ij in patches, averaged over patch queries; mean_distance_px: Σ_j A_ij d_ij · patch_size over patch
    keys, not renormalised, averaged over patch queries; cls_mass: A_i0 averaged over patch queries, NaN without a
    class token.
    """
    num_patches = attentions[0].shape[-1] - num_prefix
    patch_rc = np.array([divmod(j, grid_w) for j in range(num_patches)], dtype=float)
    distance = np.sqrt(((patch_rc[:, None] - patch_rc[None]) ** 2).sum(-1))  # (patches, patches), in patches
    entropy = lambda p: -(p * np.log(np.maximum(p, 1e-300))).sum(-1)  # noqa: E731
    out = {name: np.zeros((len(attentions), attentions[0].shape[0])) for name in STAT_LABELS}
    for layer, (a, s) in enumerate(zip(attentions, summary_rows)):
        a, s = a.double().numpy(), s.numpy()
        queries = a[:, num_prefix:]  # (heads, patches, N)
        keys = queries[:, :, num_prefix:]
        out["cls_entropy"][layer] = entropy(s)
        out["cls_patch_entropy"][layer] = entropy(s[:, num_prefix:] / s[:, num_prefix:].sum(-1, keepdims=True))
        out["mean_entropy"][layer] = entropy(queries).mean(-1)
        out["mean_distance"][layer] = ((keys * distance).sum(-1) / keys.sum(-1)).mean(-1)
        out["mean_distance_px"][layer] = (keys * distance * patch_size).sum(-1).mean(-1)
        out["cls_mass"][layer] = queries[:, :, 0].mean(-1) if class_token else np.nan
    return out


def test_statistics_match_dense(case):
    name, loaded, analysis, _, attentions = case
    class_token = name == "deit"
    expected = dense_statistics(attentions, dense_summary_rows(attentions, class_token),
                                loaded.config.num_prefix_tokens, 8, 8, class_token)
    sampled = analysis.statistics_for(10)  # rebuilt layers, the summary rows kept from the forward
    assert analysis.statistics.num_queries == 40 and sampled.num_queries == 10
    for stat, values in analysis.statistics.as_dict().items():
        np.testing.assert_allclose(values, expected[stat], atol=TOL, err_msg=stat)
    for stat in ("cls_entropy", "cls_patch_entropy"):
        np.testing.assert_allclose(sampled.as_dict()[stat], expected[stat], atol=TOL, err_msg=stat)
    assert np.isnan(sampled.cls_mass).all() != class_token


def test_nan_class_token_mass_survives_exports_and_the_heatmap():
    analysis = analyze(tiny_loaded(class_token=False), random_image(24, 32), long_side=32)
    stats = analysis.statistics
    _, sidecar = visualizer.npz_bytes({"stat_cls_mass": stats.cls_mass},
                                      {"summary": analysis.summary.to_dict(), "cls_mass": stats.cls_mass})
    metadata = json.loads(sidecar)  # strict JSON: NaN written as null
    assert metadata["cls_mass"] == [[None] * 4] * 3 and metadata["summary"]["kind"] == MEAN_RECEIVED
    assert visualizer.stats_heatmap(stats.cls_mass, STAT_LABELS["cls_mass"]).size[0] > 0
