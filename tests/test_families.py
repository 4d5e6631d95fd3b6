"""The transformers families in their hub layouts (ViT, DeiT distilled, SigLIP, the IDEFICS2/3 and SmolVLM towers),
saved by transformers, loaded through `load_model`, against transformers itself: every hidden state, every
attention, the final tokens and the pooled output within 1e-5 (fp32), at the native size and non-square ones."""
import json

import pytest
import torch
import transformers as tf
from transformers.models.idefics2.modeling_idefics2 import Idefics2VisionTransformer

from model import load_model
from tests.helpers import save, spoil_language_shards

TOL = 1e-5
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
            patch_size=8)
TEXT = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=2)
SIZES = [(32, 32), (48, 24), (24, 56), (35, 33)]  # native (4×4 grid), two non-square grids, sides off the patch size
BUCKET_SIZES = SIZES + [(64, 40), (656, 48)]  # grids 8×5 (coordinates on bucket edges) and 82×6, where float
# rounding puts row 41 (41/82 = 0.5) into bucket 1, not 2: transformers' arithmetic, not the exact fraction, decides


def assert_close(a, b):
    assert a.shape == b.shape and (a - b).abs().max().item() < TOL, (a - b).abs().max().item()


def check(loaded, tower, sizes, interpolate=True, first_tokens=None):
    """Our tower against transformers' `tower` (eager attention): hidden states, attentions, final tokens."""
    for size in sizes:
        pixels = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(sum(size)))
        kwargs = {"interpolate_pos_encoding": True} if interpolate else {}
        with torch.no_grad():
            expected = tower(pixels, output_attentions=True, output_hidden_states=True, **kwargs)
            got = loaded.model(pixels, output_attentions=True, output_hidden_states=True, interpolate_pos_encoding=True)
        assert_close(got.last_hidden_state, expected.last_hidden_state)
        assert len(got.hidden_states) == len(expected.hidden_states) == len(got.attentions) + 1
        for a, b in zip(got.hidden_states, expected.hidden_states, strict=True):
            assert_close(a, b)
        for a, b in zip(got.attentions, expected.attentions, strict=True):
            assert_close(a, b)
        if first_tokens:  # the pooled output: the mean of these normalised prefix tokens
            assert_close(got.pooler_output, expected.last_hidden_state[:, :first_tokens].mean(dim=1))


# ---- ViT and DeiT ----
@pytest.mark.parametrize("qkv_bias", [True, False])
def test_vit_for_image_classification(tmp_path, qkv_bias):
    config = tf.ViTConfig(**TINY, qkv_bias=qkv_bias, num_labels=3)
    reference = save(tf.ViTForImageClassification(config), tmp_path, seed=1)  # google/vit-base-patch16-224
    loaded = load_model(tmp_path, device="cpu")
    c = loaded.config
    assert "transformers ViT" in loaded.name and (c.layer_norm_eps, c.num_prefix_tokens) == (1e-12, 1)
    assert loaded.preprocessing.mean == (0.5, 0.5, 0.5)  # google/vit-*'s [-1, 1] scaling
    check(loaded, reference.vit, SIZES, first_tokens=1)


def test_vit_model_with_pooler(tmp_path):
    reference = save(tf.ViTModel(tf.ViTConfig(**TINY)), tmp_path, seed=2)  # google/vit-base-patch16-224-in21k
    loaded = load_model(tmp_path, device="cpu")
    check(loaded, reference, SIZES[:2], first_tokens=1)


def test_deit_distilled(tmp_path):
    config = tf.DeiTConfig(**TINY, num_labels=3)
    reference = save(tf.DeiTForImageClassificationWithTeacher(config), tmp_path, seed=3)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(  # as facebook/deit-*-distilled-* has it
        {"image_processor_type": "DeiTImageProcessor", "image_mean": [0.485, 0.456, 0.406],
         "image_std": [0.229, 0.224, 0.225]}))
    loaded = load_model(tmp_path, device="cpu")
    c = loaded.config
    assert "transformers DeiT" in loaded.name and (c.class_token, c.distillation_token, c.num_prefix_tokens) == (
        True, True, 2)
    assert loaded.preprocessing.mean == (0.485, 0.456, 0.406)  # from preprocessor_config.json
    check(loaded, reference.deit, SIZES, first_tokens=2)  # pooled: timm's pre-logits, the two tokens' mean


# ---- SigLIP ----
@pytest.fixture(scope="module")
def siglip(tmp_path_factory):
    """A tiny SiglipModel (google/siglip-*: `vision_model.*`, a text tower, logit scale and bias)."""
    folder = tmp_path_factory.mktemp("siglip")
    text = dict(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    model = tf.SiglipModel(tf.SiglipConfig(vision_config=TINY, text_config=text))
    return folder, save(model, folder, seed=4).vision_model


def test_siglip_model(siglip):
    folder, reference = siglip
    loaded = load_model(folder, device="cpu")
    c = loaded.config
    assert "transformers SigLIP" in loaded.name and loaded.preprocessing.mean == (0.5, 0.5, 0.5)
    assert (c.class_token, c.num_prefix_tokens, c.pooling_head, c.hidden_act) == (False, 0, True, "gelu_pytorch_tanh")
    check(loaded, reference, SIZES)


class PoolingRecorder:
    """An observer that keeps the pooling head's attention (and ignores the layers')."""

    def observe_layer(self, layer, query, key, lse, scale):
        pass

    def observe_pooling(self, probs):
        self.probs = probs


@pytest.mark.parametrize("size", SIZES[:3])
def test_siglip_pooling_head(siglip, size):
    folder, reference = siglip
    loaded = load_model(folder, device="cpu")
    pixels = torch.randn(2, 3, *size)
    recorder = PoolingRecorder()
    with torch.no_grad():
        expected = reference(pixels, interpolate_pos_encoding=True)
        got = loaded.model(pixels, interpolate_pos_encoding=True, observer=recorder)
        head = reference.head
        probe = head.probe.expand(2, -1, -1)
        _, probs = head.attention(probe, expected.last_hidden_state, expected.last_hidden_state,
                                  average_attn_weights=False)
    assert_close(got.pooler_output, expected.pooler_output)
    assert recorder.probs.dtype == torch.float32 and recorder.probs.shape == (2, 4, got.last_hidden_state.shape[1])
    assert_close(recorder.probs, probs[:, :, 0])
    assert torch.allclose(recorder.probs.sum(-1), torch.ones(2, 4))


def test_siglip_vision_model_without_head(tmp_path):
    config = tf.SiglipVisionConfig(**TINY, vision_use_head=False)
    reference = save(tf.SiglipVisionModel(config), tmp_path, seed=5)
    loaded = load_model(tmp_path, device="cpu")
    assert not loaded.config.pooling_head
    check(loaded, reference, SIZES[:2])
    with torch.no_grad():
        got = loaded.model(torch.randn(1, 3, 48, 24), interpolate_pos_encoding=True)
    assert_close(got.pooler_output, got.last_hidden_state.mean(dim=1))  # no head: the mean token


# ---- IDEFICS2, IDEFICS3, SmolVLM: the full model's `model.vision_model.*`, language-model shards never read ----
def vlm_config(family: str):
    text = {**TEXT, "model_type": "mistral" if family == "idefics2" else "llama"}
    if family == "idefics2":
        perceiver = dict(hidden_size=32, resampler_n_latents=4, resampler_depth=1, resampler_n_heads=2,
                         resampler_head_dim=8, num_key_value_heads=2)
        return tf.Idefics2ForConditionalGeneration(tf.Idefics2Config(vision_config=TINY, text_config=text,
                                                                      perceiver_config=perceiver))
    config_class, model_class = {"idefics3": (tf.Idefics3Config, tf.Idefics3ForConditionalGeneration),
                                 "smolvlm": (tf.SmolVLMConfig, tf.SmolVLMForConditionalGeneration)}[family]
    return model_class(config_class(vision_config=TINY, text_config=text, scale_factor=2))


@pytest.fixture(scope="module", params=["idefics2", "idefics3", "smolvlm"])
def vlm(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    reference = save(vlm_config(request.param), folder, seed=6, max_shard_size="20KB")
    spoil_language_shards(folder)
    return folder, reference.model.vision_model


def test_vlm_vision_tower(vlm):
    folder, reference = vlm
    loaded = load_model(folder, device="cpu")
    c = loaded.config
    assert "IDEFICS2/IDEFICS3" in loaded.name and loaded.preprocessing.mean == (0.5, 0.5, 0.5)
    assert (c.pos_interpolation, c.class_token, c.pooling_head, c.layer_norm_eps) == ("idefics2", False, False, 1e-6)
    check(loaded, reference, BUCKET_SIZES, interpolate=False)


def test_bare_idefics2_tower_buckets_by_its_config(tmp_path):
    """A tower saved on its own has SigLIP's keys: its config.json's model_type picks the bucketed positions."""
    reference = save(Idefics2VisionTransformer(tf.Idefics2VisionConfig(**TINY)), tmp_path, seed=7)
    loaded = load_model(tmp_path, device="cpu")
    assert loaded.config.pos_interpolation == "idefics2"
    check(loaded, reference, BUCKET_SIZES[-2:], interpolate=False)
