"""Our loader against the real timm and open_clip: tiny checkpoints those libraries saved themselves, with their own
outputs for fixed inputs (written by tests/fixtures/make_references.py), at the native size and two non-square ones.
"""
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from model import load_model
from model.preprocess import CLIP_MEAN, IMAGENET_MEAN, STANDARD_MEAN

TOL = 1e-5
REFERENCES = Path(__file__).parent / "fixtures" / "references"
CASES = {  # case → what the loaded config and normalisation must be (the library's definitions decide these)
    "timm_vit_small_augreg": dict(layer_norm_eps=1e-6, hidden_act="gelu", use_pre_layernorm=False,
                                  num_prefix_tokens=1, mean=STANDARD_MEAN),
    "timm_vit_small_registers_in_table": dict(num_register_tokens=2, num_prefix_tokens=3),
    "timm_clip_quickgelu": dict(layer_norm_eps=1e-5, hidden_act="quick_gelu", use_pre_layernorm=True, mean=CLIP_MEAN),
    "timm_clip": dict(layer_norm_eps=1e-5, hidden_act="gelu", use_pre_layernorm=True, mean=CLIP_MEAN),
    "timm_dinov2": dict(layer_norm_eps=1e-6, num_prefix_tokens=1, mean=IMAGENET_MEAN),
    "timm_dinov2_reg4": dict(layer_norm_eps=1e-6, num_register_tokens=4, num_prefix_tokens=5),
    "timm_deit_distilled": dict(distillation_token=True, num_prefix_tokens=2, mean=IMAGENET_MEAN),
    "timm_siglip_map": dict(class_token=False, pooling_head=True, num_prefix_tokens=0, mean=STANDARD_MEAN),
    "timm_siglip_gap": dict(class_token=False, pooling_head=False, num_prefix_tokens=0),
    "open_clip_vit_b32_quickgelu": dict(hidden_act="quick_gelu", projection_dim=16, mean=CLIP_MEAN),
    "open_clip_vit_b16": dict(hidden_act="gelu", projection_dim=16, num_attention_heads=2),
    "open_clip_vit_m16_alt_layer_scale": dict(hidden_act="gelu", layer_norm_eps=1e-5),
}


def assert_close(a, b, tol=TOL):
    assert a.shape == b.shape and (a - b).abs().max().item() < tol, (a - b).abs().max().item()


def reference(case: str) -> tuple[dict, int]:
    with safe_open(str(REFERENCES / f"{case}.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, len(json.loads(f.metadata()["sizes"]))


def ours(loaded, pixels):
    with torch.no_grad():
        return loaded.model(pixels, output_attentions=True, output_hidden_states=True, interpolate_pos_encoding=True)


def test_every_fixture_is_checked():
    assert sorted(p.stem for p in REFERENCES.glob("*.safetensors")) == sorted(CASES)
    assert sorted(p.name for p in REFERENCES.iterdir() if p.is_dir()) == sorted(CASES)


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_the_library(case):
    loaded = load_model(REFERENCES / case, device="cpu")
    expected = dict(CASES[case])
    assert loaded.preprocessing.mean == expected.pop("mean", loaded.preprocessing.mean)
    for name, value in expected.items():
        assert getattr(loaded.config, name) == value, name
    tensors, sizes = reference(case)
    for i in range(sizes):
        got = ours(loaded, tensors[f"pixels.{i}"])
        assert_close(got.last_hidden_state, tensors[f"tokens.{i}"])
        assert_close(got.pooler_output, tensors[f"pooled.{i}"])
        for layer, (hidden, attention) in enumerate(zip(got.hidden_states[1:], got.attentions, strict=True)):
            assert_close(hidden, tensors[f"hidden.{layer}.{i}"])
            assert_close(attention, tensors[f"attention.{layer}.{i}"])


def test_timm_clip_eps_is_what_matters(tmp_path):
    """timm's CLIP towers use LayerNorm eps 1e-5: with timm's ViT default (1e-6) the tokens are off by ~1e-3."""
    tensors, _ = reference("timm_clip")
    wrong = load_model(REFERENCES / "timm_clip", device="cpu", layer_norm_eps=1e-6)
    assert (ours(wrong, tensors["pixels.1"]).last_hidden_state - tensors["tokens.1"]).abs().max() > 1e-4
    shutil.copy(REFERENCES / "timm_clip" / "model.safetensors", tmp_path)  # no config.json: the pre-norm decides
    bare = load_model(tmp_path, device="cpu", num_heads=2)
    assert bare.config.layer_norm_eps == 1e-5
    assert_close(ours(bare, tensors["pixels.1"]).last_hidden_state, tensors["tokens.1"])


def test_open_clip_overrides_win(tmp_path):
    folder = REFERENCES / "open_clip_vit_b32_quickgelu"
    overridden = load_model(folder, device="cpu", num_heads=4, hidden_act="gelu")
    assert (overridden.config.num_attention_heads, overridden.config.hidden_act) == (4, "gelu")
    with pytest.raises(TypeError, match="unknown config overrides: hiden_act"):
        load_model(folder, device="cpu", hiden_act="gelu")
