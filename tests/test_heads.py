"""Task heads loaded beside the tower: transformers' image classifiers (ViT, DeiT with teacher, DINOv2 with and
without registers) against transformers' own logits; timm's heads from the fixtures timm saved (tests/fixtures/
references), against timm's definition on its own pre-logits; labels; each head's strict key check."""
import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file, save_file

from model import CheckpointError, load_model
from model import heads
from model.heads import (CLASS, CLASS_AND_DISTILLATION, CLASS_AND_PATCH_MEAN, PATCH_MEAN, POOLED, ClassifierHead)
from tests.helpers import save, trained_decoder, untiled_logits, untiled_saliency

TOL = 1e-5
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)
REFERENCES = Path(__file__).parent / "fixtures" / "references"
SIZES = [(32, 32), (48, 24)]


def logits_of(loaded, pixels):
    with torch.no_grad():
        out = loaded.model(pixels, interpolate_pos_encoding=True)  # these families' tokens are after the final norm
        return loaded.head(out.last_hidden_state, out.pooler_output)


def assert_close(a, b):
    assert a.shape == b.shape and (a - b).abs().max().item() < TOL, (a - b).abs().max().item()


TRANSFORMERS_CASES = {  # name → (model, readout)
    "vit": (lambda: tf.ViTForImageClassification(tf.ViTConfig(**TINY, intermediate_size=64, num_labels=3,
                                                               id2label={0: "cat", 1: "dog", 2: "fox"})), CLASS),
    "deit": (lambda: tf.DeiTForImageClassificationWithTeacher(tf.DeiTConfig(**TINY, intermediate_size=64,
                                                                             num_labels=4)), CLASS_AND_DISTILLATION),
    "deit_without_teacher": (lambda: tf.DeiTForImageClassification(tf.DeiTConfig(**TINY, intermediate_size=64,
                                                                                  num_labels=4)), CLASS),
    "dinov2": (lambda: tf.Dinov2ForImageClassification(tf.Dinov2Config(**TINY, mlp_ratio=2, num_labels=6)),
               CLASS_AND_PATCH_MEAN),
    "dinov2_registers": (lambda: tf.Dinov2WithRegistersForImageClassification(tf.Dinov2WithRegistersConfig(
        **TINY, mlp_ratio=2, num_register_tokens=2, num_labels=6)), CLASS_AND_PATCH_MEAN),
}


@pytest.mark.parametrize("case", sorted(TRANSFORMERS_CASES))
def test_transformers_classifiers(tmp_path, case):
    build, readout = TRANSFORMERS_CASES[case]
    reference = save(build(), tmp_path, seed=len(case))
    loaded = load_model(tmp_path, device="cpu")
    assert isinstance(loaded.head, ClassifierHead) and loaded.head.readout == readout
    assert len(loaded.labels) == reference.config.num_labels
    if case == "vit":
        assert loaded.labels == ("cat", "dog", "fox")
    for size in SIZES:
        pixels = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(sum(size)))
        with torch.no_grad():
            expected = reference(pixels, interpolate_pos_encoding=True).logits
        assert_close(logits_of(loaded, pixels), expected)


TIMM_CASES = {  # fixture → readout (timm's global_pool: "token", "avg", "map"; head_dist for DeiT distilled)
    "timm_vit_small_augreg": CLASS, "timm_dinov2_reg4": CLASS, "timm_deit_distilled": CLASS_AND_DISTILLATION,
    "timm_siglip_map": POOLED, "timm_siglip_gap": PATCH_MEAN,
}


@pytest.mark.parametrize("case", sorted(TIMM_CASES))
def test_timm_heads(case):
    """timm's forward_head in eval: head(pre-logits), or (head(class) + head_dist(distillation)) / 2 for DeiT."""
    loaded = load_model(REFERENCES / case, device="cpu")
    assert loaded.head.readout == TIMM_CASES[case] and loaded.labels == tuple(f"class {i}" for i in range(5))
    weights = load_file(str(REFERENCES / case / "model.safetensors"))
    fixture = load_file(str(REFERENCES / f"{case}.safetensors"))
    for i in range(2):
        tokens, pooled = fixture[f"tokens.{i}"], fixture[f"pooled.{i}"]  # timm's forward_features, pre-logits
        expected = pooled @ weights["head.weight"].T + weights["head.bias"]
        if case == "timm_deit_distilled":
            expected = (tokens[:, 0] @ weights["head.weight"].T + weights["head.bias"]
                        + tokens[:, 1] @ weights["head_dist.weight"].T + weights["head_dist.bias"]) / 2
        with torch.no_grad():
            out = loaded.model(fixture[f"pixels.{i}"], interpolate_pos_encoding=True)
        assert_close(loaded.head(out.last_hidden_state, out.pooler_output), expected)


def test_timm_label_names(tmp_path):
    shutil.copytree(REFERENCES / "timm_vit_small_augreg", tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "label_names": list("abcde")}))
    assert load_model(tmp_path / "m", device="cpu").labels == tuple("abcde")


def test_a_misshapen_head_is_named(tmp_path):
    shutil.copytree(REFERENCES / "timm_vit_small_augreg", tmp_path / "m")
    path = tmp_path / "m" / "model.safetensors"
    weights = load_file(str(path))
    weights["head.bias"] = torch.zeros(7)
    save_file(weights, str(path))
    with pytest.raises(CheckpointError, match=r"head does not fit.*classifier\.bias: checkpoint \(7,\)"):
        load_model(tmp_path / "m", device="cpu")


def test_a_tower_without_head_loads_without_one(tmp_path):
    save(tf.ViTModel(tf.ViTConfig(**TINY, intermediate_size=64)), tmp_path, seed=9)
    loaded = load_model(tmp_path, device="cpu")
    assert loaded.head is None and loaded.labels == ()


@pytest.mark.parametrize("grid_h, grid_w", [(1, 3), (5, 8), (7, 3), (9, 9), (12, 5)])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 100])
def test_saliency_decoder_in_strips_equals_the_whole_grid(monkeypatch, grid_h, grid_w, rows):
    """The strips' saliency and its gradient w.r.t. the grid (any weighting of the pixels) against the untiled
    decoder, for strips of `rows` grid rows (the last one shorter where they do not divide the grid)."""
    decoder = trained_decoder(seed=grid_h * grid_w + rows)
    monkeypatch.setattr(heads, "STRIP_ELEMENTS", rows * 4 * 8 * 8 * grid_w)  # 4 channels at 8× per grid row
    generator = torch.Generator().manual_seed(rows)
    grid = torch.randn(1, 16, grid_h, grid_w, generator=generator)
    size = (14 * grid_h, 14 * grid_w)
    weights = torch.randn(1, *size, generator=generator)
    assert len(decoder.strips(grid)) == -(-grid_h // rows)
    results = []
    for saliency_of in (decoder, lambda g, s: untiled_saliency(decoder, g, s)):
        leaf = grid.clone().requires_grad_()
        saliency = saliency_of(leaf, size)
        results.append((saliency.detach(), torch.autograd.grad((saliency * weights).sum(), leaf)[0]))
    (tiled, tiled_grad), (whole, whole_grad) = results
    assert (tiled - whole).abs().max() <= 1e-6 * whole.abs().max()
    assert (tiled_grad - whole_grad).abs().max() <= 1e-6 * whole_grad.abs().max(), (tiled_grad - whole_grad).abs().max()


@pytest.mark.parametrize("grid_h, grid_w", [(1, 3), (5, 8), (7, 3), (9, 9)])
@pytest.mark.parametrize("dense_share", [0.75, 2.0])  # the dense convolution where most is computed, or never
@torch.no_grad()
def test_partial_decoder_is_exact_where_wanted(monkeypatch, grid_h, grid_w, dense_share):
    """Logits at the wanted pixels against the untiled decoder's, for grids with zero cells (dropped tokens), over
    random wanted pixels and zero cells from none to all; with every cell zero nothing is computed."""
    monkeypatch.setattr(heads.PartialDecoder, "DENSE_SHARE", dense_share)
    decoder = trained_decoder(seed=grid_h + grid_w)
    generator = torch.Generator().manual_seed(grid_h * grid_w)
    size = (8 * grid_h, 8 * grid_w)
    for density in (0.0, 0.02, 0.3, 1.0):
        wanted = torch.rand(size, generator=generator) < density
        partial = heads.PartialDecoder(decoder, grid_h, grid_w, wanted)
        for zero_share in (0.0, 0.3, 0.8, 1.0):
            zero = torch.rand(3, grid_h, grid_w, generator=generator) < zero_share
            grid = torch.randn(3, 16, grid_h, grid_w, generator=generator) * ~zero.unsqueeze(1)
            whole = untiled_logits(decoder, grid)
            got = partial(grid, zero)
            assert got.shape == whole.shape
            error = (got - whole)[..., wanted].abs()
            assert error.numel() == 0 or error.max() <= TOL * whole.abs().max(), (density, zero_share)
    everything_zero = torch.ones(grid_h, grid_w, dtype=torch.bool)
    assert not any(anchors.any() for anchors in heads.PartialDecoder(decoder, grid_h, grid_w, wanted)
                   ._computed(everything_zero))


@pytest.mark.parametrize("dense_share", [0.75, 2.0])
@torch.no_grad()
def test_partial_decoder_reads_only_its_read_cells(monkeypatch, dense_share):
    """Whatever the cells outside `read_cells` hold (the faithfulness test leaves the last layer's rows there
    uncomputed), the wanted logits are the untiled decoder's on the true grid; the cells read are fewer than all."""
    monkeypatch.setattr(heads.PartialDecoder, "DENSE_SHARE", dense_share)
    grid_h, grid_w = 12, 20
    decoder = trained_decoder(seed=5)
    generator = torch.Generator().manual_seed(6)
    wanted = torch.zeros(8 * grid_h, 8 * grid_w, dtype=torch.bool)
    wanted[10:30, 40:90] = True  # a compact region
    partial = heads.PartialDecoder(decoder, grid_h, grid_w, wanted)
    for zero_share in (0.0, 0.5):
        zero = torch.rand(2, grid_h, grid_w, generator=generator) < zero_share
        grid = torch.randn(2, 16, grid_h, grid_w, generator=generator) * ~zero.unsqueeze(1)
        read = torch.stack([partial.read_cells(z) for z in zero])
        assert read.sum(dim=(1, 2)).max() < grid_h * grid_w / 2
        garbage = torch.randn(grid.shape, generator=generator) * 100
        spoiled = torch.where((read | zero).unsqueeze(1), grid, garbage)
        whole = untiled_logits(decoder, grid)
        error = (partial(spoiled, zero) - whole)[..., wanted].abs()
        assert error.max() <= TOL * whole.abs().max(), zero_share
