"""Parity with transformers on tiny random configs: every hidden state and attention within 1e-5 (fp32)."""
import copy

import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel, Dinov2Config, Dinov2Model
from transformers.models.idefics.configuration_idefics import IdeficsVisionConfig as HFIdeficsVisionConfig
from transformers.models.idefics.vision import IdeficsVisionTransformer as HFIdeficsVisionTransformer

from model import IdeficsVisionConfig, IdeficsVisionTransformer, load_model

TOL = 1e-5
SIZES = [(32, 32), (48, 40), (24, 56), (35, 33), (41, 30)]  # native, interpolated non-square grids (patch 8), then
# sides off the patch size: 35×33 keeps the native 4×4 grid, yet the seed resamples it since height ≠ width


def assert_close(a, b):
    assert a.shape == b.shape and (a - b).abs().max().item() < TOL, (a - b).abs().max().item()


def ours_all(model, pixels):
    with torch.no_grad():
        return model(pixels, output_attentions=True, output_hidden_states=True, interpolate_pos_encoding=True)


@pytest.fixture(scope="module")
def idefics_pair():
    torch.manual_seed(0)
    config = HFIdeficsVisionConfig(embed_dim=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                   image_size=32, patch_size=8, hidden_act="gelu")
    config._attn_implementation = "eager"
    reference = HFIdeficsVisionTransformer(config).eval()
    ours = IdeficsVisionTransformer(IdeficsVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                                        num_attention_heads=4, image_size=32, patch_size=8)).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    return reference, ours


@pytest.mark.parametrize("size", SIZES)
def test_idefics_vision_transformer(idefics_pair, size):
    reference, ours = idefics_pair
    captured = {"attn": [], "hidden": []}  # transformers 5's tower is a plain module: capture with hooks
    first = reference.encoder.layers[0]
    hooks = [first.register_forward_pre_hook(  # the embeddings after pre_layrnorm: hidden state 0
        lambda m, args, kwargs: captured["hidden"].append(args[0] if args else kwargs["hidden_states"]),
        with_kwargs=True)]
    hooks += [layer.self_attn.register_forward_hook(lambda m, i, o: captured["attn"].append(o[1]))
              for layer in reference.encoder.layers]
    hooks += [layer.register_forward_hook(
        lambda m, i, o: captured["hidden"].append(o[0] if isinstance(o, tuple) else o))
        for layer in reference.encoder.layers]
    pixels = torch.randn(2, 3, *size)
    with torch.no_grad():
        expected = reference(pixels, interpolate_pos_encoding=True)
    for hook in hooks:
        hook.remove()
    got = ours_all(ours, pixels)
    assert_close(got.last_hidden_state, expected.last_hidden_state)
    assert_close(got.pooler_output, expected.pooler_output)
    for a, b in zip(got.attentions, captured["attn"], strict=True):
        assert_close(a, b)
    for a, b in zip(got.hidden_states, captured["hidden"], strict=True):
        assert_close(a, b)


@pytest.mark.parametrize("size", SIZES)
def test_clip_vision_model(tmp_path, size):
    torch.manual_seed(1)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=32, patch_size=8, hidden_act="quick_gelu", attn_implementation="eager")
    CLIPVisionModel(config).save_pretrained(tmp_path)
    reference = CLIPVisionModel.from_pretrained(tmp_path, attn_implementation="eager").eval()
    loaded = load_model(tmp_path, device="cpu")
    assert loaded.config.hidden_act == "quick_gelu" and loaded.config.pos_interpolation == "size"
    pixels = torch.randn(1, 3, *size)
    with torch.no_grad():
        expected = reference(pixels, output_attentions=True, output_hidden_states=True, interpolate_pos_encoding=True)
    got = ours_all(loaded.model, pixels)
    assert_close(got.last_hidden_state, expected.last_hidden_state)
    assert_close(got.pooler_output, expected.pooler_output)
    for a, b in zip(got.hidden_states, expected.hidden_states, strict=True):
        assert_close(a, b)
    for a, b in zip(got.attentions, expected.attentions, strict=True):
        assert_close(a, b)


@pytest.mark.parametrize("size", SIZES)
def test_dinov2_model_with_layer_scale_folded(tmp_path, size):
    torch.manual_seed(2)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, mlp_ratio=2, image_size=32,
                          patch_size=8, layerscale_value=0.5, attn_implementation="eager")
    model = Dinov2Model(config)
    with torch.no_grad():  # LayerScale far from 1 and uneven, so folding it wrongly would show
        for layer in model.encoder.layer:
            layer.layer_scale1.lambda1.uniform_(0.1, 2.0)
            layer.layer_scale2.lambda1.uniform_(0.1, 2.0)
    model.save_pretrained(tmp_path)
    reference = Dinov2Model.from_pretrained(tmp_path, attn_implementation="eager").eval()
    loaded = load_model(tmp_path, device="cpu")
    pixels = torch.randn(1, 3, *size)
    with torch.no_grad():
        expected = reference(pixels, output_attentions=True, output_hidden_states=True)
    got = ours_all(loaded.model, pixels)
    for a, b in zip(got.hidden_states, expected.hidden_states, strict=True):
        assert_close(a, b)
    for a, b in zip(got.attentions, expected.attentions, strict=True):
        assert_close(a, b)
    assert_close(got.last_hidden_state, expected.last_hidden_state)  # after the final layernorm, as Dinov2Model's
    assert_close(got.pooler_output, expected.pooler_output)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("size", SIZES)
def test_idefics_half_precision_is_the_seed_bit_for_bit(idefics_pair, dtype, size):
    """The same operations in the same order as the seed, whose position resampling upcasts bfloat16 to float32
    and runs float16 as it is: identical bits, on the eager path (against transformers' eager attention) and the
    fused one (against its SDPA attention)."""
    reference, ours = (copy.deepcopy(m).to(dtype) for m in idefics_pair)
    pixels = torch.randn(2, 3, *size).to(dtype)
    for implementation, eager in (("eager", True), ("sdpa", False)):
        reference.config._attn_implementation = implementation
        with torch.no_grad():
            expected = reference(pixels, interpolate_pos_encoding=True)
            got = ours(pixels, interpolate_pos_encoding=True, output_attentions=eager)
        assert torch.equal(got.last_hidden_state, expected.last_hidden_state), implementation
        assert torch.equal(got.pooler_output, expected.pooler_output), implementation


def test_fused_path_equals_eager_and_tuple_output(idefics_pair):
    _, ours = idefics_pair
    pixels = torch.randn(1, 3, 40, 24)
    eager = ours_all(ours, pixels)
    with torch.no_grad():
        fused = ours(pixels, interpolate_pos_encoding=True)
        as_tuple = ours(pixels, output_hidden_states=True, interpolate_pos_encoding=True, return_dict=False)
    assert fused.attentions is None and fused.hidden_states is None
    assert_close(fused.last_hidden_state, eager.last_hidden_state)
    assert len(as_tuple) == 3 and len(as_tuple[2]) == 4
    assert_close(as_tuple[0], eager.last_hidden_state)


def test_native_size_required_without_interpolation(idefics_pair):
    _, ours = idefics_pair
    with pytest.raises(ValueError, match="interpolate_pos_encoding"):
        ours(torch.randn(1, 3, 40, 40))
