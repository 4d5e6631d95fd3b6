"""Perturbation curves (Chefer et al. 2021's positive and negative perturbation) against a direct reference: the
perturbed inputs built one by one in the test (tokens picked from transformers' own embeddings, or pixels blacked
before normalising) and passed through transformers' model; a tiny linear-readout model whose exact attribution
ranks first; random orders between the best and the worst; bad fields refused."""
import numpy as np
import pytest
import torch
import transformers as tf

from analysis import analyze
from analysis.faithfulness import (FRACTIONS, RANDOM, Curve, area, faithfulness, perturbation_curves, run_layers,
                                   random_orders, removal_orders)
from analysis.relevance import TargetError
from model import load_model
from model.heads import PATCH_MEAN, ClassifierHead, PartialDecoder
from tests.helpers import random_image, save, tiny_loaded, trained_decoder, untiled_saliency

TOL = 1e-5
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32,
            patch_size=8)
SIZE, LONG_SIDE = (40, 64), 64  # a 5 × 8 grid: not square


def setup(loaded, seed=0):
    image = random_image(*SIZE, seed=seed)
    pixels, _ = loaded.preprocessing(image, LONG_SIDE)
    return analyze(loaded, image, LONG_SIDE), pixels


def some_maps(analysis, seed=0):
    g = analysis.geometry
    generator = np.random.default_rng(seed)
    return {"first": generator.normal(size=(g.grid_h, g.grid_w)), "second": generator.normal(size=(g.grid_h, g.grid_w))}


def reference_curve(order, removable, score_of):
    """The score with the first floor(f × removable) patches of `order` removed, each input built on its own."""
    return np.array([score_of(np.sort(order[:i * removable // 10])) for i in range(len(FRACTIONS))])


def assert_curves(result, maps, removable_patches, score_of):
    for name, values in maps.items():
        positive, negative = removal_orders(values, removable_patches)
        for got, order in ((result.curves[name].positive, positive), (result.curves[name].negative, negative)):
            expected = reference_curve(order, len(removable_patches), score_of)
            assert np.abs(got - expected).max() <= TOL, (name, got, expected)
    randoms = np.stack([reference_curve(o, len(removable_patches), score_of) for o in random_orders(removable_patches)])
    assert np.abs(result.curves[RANDOM].positive - randoms.mean(0)).max() <= TOL
    assert np.abs(result.curves[RANDOM].spread - randoms.std(0)).max() <= TOL


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vit")
    reference = save(tf.ViTForImageClassification(tf.ViTConfig(**TINY, num_labels=5)), folder, seed=1)
    return load_model(folder, device="cpu"), reference


@torch.no_grad()
def test_class_curves_with_tokens_dropped(vit):
    """transformers' ViT embeddings (its own position interpolation), the removed patches' rows taken out, its
    encoder, layernorm and classifier: the softmax probability of the class."""
    loaded, reference = vit
    analysis, pixels = setup(loaded)
    maps = some_maps(analysis)
    embedded = reference.vit.embeddings(pixels, interpolate_pos_encoding=True)  # (1, 1 + patches, D)

    def score_of(removed):
        kept = [0] + [1 + p for p in range(embedded.shape[1] - 1) if p not in set(removed.tolist())]
        hidden = embedded[:, kept]
        for layer in reference.vit.layers:
            hidden = layer(hidden)
        hidden = reference.vit.layernorm(hidden)
        return float(reference.classifier(hidden[:, 0]).softmax(-1)[0, 3])

    result = perturbation_curves(loaded, analysis, "class:3", "drop", maps)
    assert result.curves["first"].positive[0] == pytest.approx(score_of(np.array([], dtype=int)), abs=TOL)
    assert_curves(result, maps, np.arange(analysis.geometry.grid_h * analysis.geometry.grid_w), score_of)


@torch.no_grad()
def test_class_curves_with_pixels_blacked(vit):
    """The removed patches' pixels set to 0 in [0, 1] and normalised again, through transformers' whole model."""
    loaded, reference = vit
    analysis, pixels = setup(loaded)
    maps = some_maps(analysis, seed=1)
    mean = torch.tensor(loaded.preprocessing.mean).view(1, 3, 1, 1)
    std = torch.tensor(loaded.preprocessing.std).view(1, 3, 1, 1)
    raw, g = pixels * std + mean, analysis.geometry

    def score_of(removed):
        image = raw.clone()
        for patch in removed:
            row, col = divmod(int(patch), g.grid_w)
            image[..., row * 8:(row + 1) * 8, col * 8:(col + 1) * 8] = 0.0
        logits = reference((image - mean) / std, interpolate_pos_encoding=True).logits
        return float(logits.softmax(-1)[0, 1])

    result = perturbation_curves(loaded, analysis, "class:1", "pixels", maps, pixels)
    assert_curves(result, maps, np.arange(g.grid_h * g.grid_w), score_of)


@pytest.fixture(scope="module")
def dinov2(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dinov2")
    sizes = {k: v for k, v in TINY.items() if k != "intermediate_size"}
    reference = save(tf.Dinov2WithRegistersModel(tf.Dinov2WithRegistersConfig(**sizes, mlp_ratio=2,
                                                                               num_register_tokens=2)), folder, seed=2)
    return load_model(folder, device="cpu"), reference


@pytest.mark.parametrize("target", ["embedding", "patch:2,5"])
@torch.no_grad()
def test_dropping_keeps_the_prefix_and_the_position_embeddings(dinov2, target):
    """DINOv2 with two registers on a 5 × 8 grid: the class token and both registers always stay, every kept patch
    keeps its own (interpolated) position embedding; the score is the cosine similarity of the final feature (the
    class token's, or patch 2,5's, which is never removed) to the unperturbed one."""
    loaded, reference = dinov2
    analysis, pixels = setup(loaded, seed=3)
    assert loaded.config.num_prefix_tokens == 3
    g = analysis.geometry
    embedded = reference.embeddings(pixels)  # (1, 3 + patches, D): [class, registers, patches]
    patch = 2 * g.grid_w + 5

    def feature(removed):
        kept = [0, 1, 2] + [3 + p for p in range(g.grid_h * g.grid_w) if p not in set(removed.tolist())]
        hidden = reference.layernorm(reference.encoder(embedded[:, kept]).last_hidden_state)[0]
        return hidden[0] if target == "embedding" else hidden[kept.index(3 + patch)]

    unperturbed = feature(np.array([], dtype=int))

    def score_of(removed):
        return float(torch.nn.functional.cosine_similarity(feature(removed), unperturbed, dim=0))

    maps = some_maps(analysis, seed=2)
    result = perturbation_curves(loaded, analysis, target, "drop", maps)
    patches = np.arange(g.grid_h * g.grid_w)
    assert_curves(result, maps, patches[patches != patch] if target != "embedding" else patches, score_of)


@pytest.mark.parametrize("removal", ["drop", "pixels"])
@pytest.mark.parametrize("dense_share", [2.0, 0.0])
@torch.no_grad()
def test_region_curves_against_the_whole_decoder(monkeypatch, removal, dense_share):
    """The saliency decoder's target: the tower's final patch tokens (dropped ones zero) through the untiled decoder,
    the mean saliency inside the region fixed from the unperturbed prediction (≥ 0.5, else the top 20 %). The
    decoder computes only what the region reads (with its dense stages or without), the last layer only the rows
    that reads (here all: test_heads checks the cells it reads, test_selected_rows_of_the_last_layer the rows)."""
    monkeypatch.setattr(PartialDecoder, "DENSE_SHARE", dense_share)
    loaded = tiny_loaded(seed=7, patch_size=12, image_size=36)  # the logits (8 × the grid) resized to 2/3
    loaded.head = trained_decoder(seed=8, widths=(32, 8, 8, 4))
    analysis, pixels = setup(loaded, seed=9)
    g, model = analysis.geometry, loaded.model
    mean = torch.tensor(loaded.preprocessing.mean).view(1, 3, 1, 1)
    std = torch.tensor(loaded.preprocessing.std).view(1, 3, 1, 1)

    def saliency(removed):
        gone = set(removed.tolist())
        image = pixels.clone()
        if removal == "pixels":
            for patch in gone:
                (row, col), size = divmod(patch, g.grid_w), g.patch_size
                image[..., row * size:(row + 1) * size, col * size:(col + 1) * size] = (-mean / std).view(3, 1, 1)
        hidden = model.pre_layrnorm(model.embeddings(image, interpolate_pos_encoding=True))
        kept = [p for p in range(g.grid_h * g.grid_w) if removal == "pixels" or p not in gone]
        hidden = hidden[:, [0] + [1 + p for p in kept]]
        for layer in model.encoder.layers:
            hidden = layer(hidden)[0]
        grid = torch.zeros(1, 32, g.grid_h * g.grid_w)
        grid[0][:, kept] = model.post_layernorm(hidden)[0, 1:].T
        return untiled_saliency(loaded.head, grid.view(1, 32, g.grid_h, g.grid_w), (g.input_h, g.input_w))[0]

    unperturbed = saliency(np.array([], dtype=int))
    region = unperturbed >= 0.5
    if not region.any():
        region = unperturbed >= unperturbed.flatten().sort(descending=True).values[int(0.2 * unperturbed.numel()) - 1]
    assert 0 < region.float().mean() < 1 and g.patch_size == 12

    def score_of(removed):
        return float(saliency(removed)[region].mean())

    maps = some_maps(analysis, seed=4)
    result = perturbation_curves(loaded, analysis, "region", removal, maps, pixels)
    assert_curves(result, maps, np.arange(g.grid_h * g.grid_w), score_of)


@torch.no_grad()
def test_selected_rows_of_the_last_layer():
    """The last layer run for chosen rows only (per sequence, padded by repeats) gives the full run's rows there, and
    zeros elsewhere."""
    loaded = tiny_loaded(seed=3)
    x = torch.randn(3, 11, 32, generator=torch.Generator().manual_seed(3))
    rows = torch.tensor([[0, 4, 9, 9], [2, 3, 5, 7], [10, 10, 10, 10]])
    whole, chosen = run_layers(loaded, x), run_layers(loaded, x, rows)
    for b, picked in enumerate(rows.tolist()):
        others = sorted(set(range(11)) - set(picked))
        assert (chosen[b, picked] - whole[b, picked]).abs().max() <= TOL * whole.abs().max()
        assert not chosen[b, others].any()


def linear_readout(pixels_exact: bool):
    """A tower whose layers add nothing (attention and MLP outputs zeroed) and a two-class head on the patches' mean:
    class 0's logit is the mean over the kept patches of c_i = w·LN(e_i), class 1's is 0, so its probability is
    sigmoid(that mean). Returns the model and a function of the analysis giving each patch's exact attribution."""
    loaded = tiny_loaded(seed=4)
    with torch.no_grad():
        for layer in loaded.model.encoder.layers:
            for linear in (layer.self_attn.out_proj, layer.mlp.fc2):
                linear.weight.zero_()
                linear.bias.zero_()
        head = ClassifierHead(PATCH_MEAN, 32, 2, loaded.config.num_prefix_tokens)
        head.classifier.weight.zero_()
        head.classifier.bias.zero_()
        head.classifier.weight[0] = torch.randn(32, generator=torch.Generator().manual_seed(5))
    loaded.head = head.eval()

    def contributions(hidden):  # (N, D) → each patch's share of class 0's logit, over the patch grid
        return (loaded.model.post_layernorm(hidden) @ head.classifier.weight[0])[1:]

    def exact(analysis, pixels):
        grid = (analysis.geometry.grid_h, analysis.geometry.grid_w)
        with torch.no_grad():
            values = contributions(analysis.record.hidden_states[-1])
            if pixels_exact:  # what blacking a patch takes away: its contribution minus that of a black patch
                black = (-torch.tensor(loaded.preprocessing.mean) / torch.tensor(loaded.preprocessing.std))
                embedded = loaded.model.embeddings(black.view(1, 3, 1, 1).expand_as(pixels).contiguous(),
                                                   interpolate_pos_encoding=True)
                values = values - contributions(loaded.model.pre_layrnorm(embedded)[0])
        return values.numpy().reshape(grid)

    return loaded, exact


@pytest.mark.parametrize("removal", ["drop", "pixels"])
def test_the_exact_attribution_ranks_first_and_random_lies_between(removal):
    loaded, exact = linear_readout(removal == "pixels")
    analysis, pixels = setup(loaded, seed=6)
    best = exact(analysis, pixels)
    maps = {"exact": best, "reversed": -best, **some_maps(analysis, seed=3)}
    result = perturbation_curves(loaded, analysis, "class:0", removal, maps, pixels)
    curves = result.curves
    assert result.most_faithful() == ("exact", "exact")
    assert curves["exact"].positive_auc < curves[RANDOM].positive_auc < curves["reversed"].positive_auc
    assert curves["reversed"].negative_auc < curves[RANDOM].negative_auc < curves["exact"].negative_auc
    # at every fraction, removing the largest contributions leaves the lowest mean: the lowest probability
    for name in ("reversed", "first", "second"):
        assert np.all(curves["exact"].positive <= curves[name].positive + 1e-7)
        assert np.all(curves["exact"].negative >= curves[name].negative - 1e-7)


def test_areas_are_the_trapezoidal_rule_from_the_unperturbed_score():
    scores = np.linspace(1.0, 0.1, len(FRACTIONS))
    assert FRACTIONS == (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    expected = sum(0.1 * (scores[i] + scores[i + 1]) / 2 for i in range(9))
    assert area(scores) == pytest.approx(expected)
    assert Curve(scores, scores).positive_auc == pytest.approx(expected)


def test_every_offered_map_is_scored_and_cached(vit):
    """The page's maps (four methods, the selected layer's attention) and random, cached per map: another layer
    adds one map's curves and recomputes nothing else."""
    loaded, _ = vit
    analysis, pixels = setup(loaded)
    first = faithfulness(loaded, analysis, "top", "pixels", pixels, layer=2)
    assert set(first.curves) == {"relevance", "grad_rollout", "rollout", "attention", RANDOM}
    calls = []
    second = faithfulness(loaded, analysis, "top", "pixels", pixels, layer=0, progress=calls.append)
    assert set(second.curves) == set(first.curves) | {"attention_layer_0"}
    for name, curve in first.curves.items():
        assert second.curves[name] is curve
    assert calls and calls[-1] == pytest.approx(1.0)
    data = second.to_dict()
    assert data["fractions"] == list(FRACTIONS) and data["removal"] == "pixels"
    assert set(data["maps"]["relevance"]) >= {"positive", "negative", "positive_auc", "negative_auc"}


def test_bad_fields_are_refused_plainly(vit):
    loaded, _ = vit
    analysis, pixels = setup(loaded)
    with pytest.raises(TargetError, match="removal must be one of drop, pixels"):
        faithfulness(loaded, analysis, "top", "erase", pixels)
    with pytest.raises(TargetError, match="class 9 is out of range"):
        faithfulness(loaded, analysis, "class:9", "drop")
    with pytest.raises(TargetError, match="region needs a saliency decoder"):
        faithfulness(loaded, analysis, "region", "drop")


@torch.no_grad()
def test_a_prompt_is_scored_by_the_models_image_text_logit(tmp_path):
    """A tiny CLIPModel: transformers' vision embeddings with the removed patches' rows taken out, its pre-norm,
    layers, post-norm and projection, then logit_scale · cos with the prompt's text features."""
    from tests.text_models import save_clip
    reference, tokenizer = save_clip(tmp_path / "clip")
    loaded = load_model(tmp_path / "clip", device="cpu")
    analysis, pixels = setup(loaded, seed=7)
    prompt = "a photo of a cat"
    text = reference.get_text_features(**tokenizer([prompt], return_tensors="pt", padding=True))
    text = getattr(text, "pooler_output", text)
    vision = reference.vision_model
    embedded = vision.embeddings(pixels, interpolate_pos_encoding=True)

    def score_of(removed):
        kept = [0] + [1 + p for p in range(embedded.shape[1] - 1) if p not in set(removed.tolist())]
        hidden = vision.pre_layrnorm(embedded[:, kept])
        for layer in vision.encoder.layers:
            hidden = layer(hidden, None)
        image = reference.visual_projection(vision.post_layernorm(hidden[:, 0]))
        return float(reference.logit_scale.exp() * torch.nn.functional.cosine_similarity(image, text))

    maps = some_maps(analysis, seed=4)
    result = perturbation_curves(loaded, analysis, f"text:{prompt}", "drop", maps)
    assert "image-text similarity" in result.score
    assert_curves(result, maps, np.arange(analysis.geometry.grid_h * analysis.geometry.grid_w), score_of)
