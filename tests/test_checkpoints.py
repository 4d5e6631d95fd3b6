"""Every checkpoint format through the entry point users use (`load_model`), and the clear errors."""
import json
import time

import pytest
import torch
from safetensors.torch import save_file

from model import CheckpointError, IdeficsVisionConfig, IdeficsVisionTransformer, load_model

TOL = 1e-5


def tiny(**overrides) -> IdeficsVisionTransformer:
    torch.manual_seed(3)
    values = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=1, image_size=32,
                  patch_size=8, pos_interpolation="size")
    values.update(overrides)
    model = IdeficsVisionTransformer(IdeficsVisionConfig(**values)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def same_outputs(a: IdeficsVisionTransformer, b: IdeficsVisionTransformer, size=(40, 24)) -> None:
    pixels = torch.randn(1, 3, *size)
    with torch.no_grad():
        x = a(pixels, output_attentions=True, interpolate_pos_encoding=True)
        y = b(pixels, output_attentions=True, interpolate_pos_encoding=True)
    assert (x.last_hidden_state - y.last_hidden_state).abs().max() < TOL
    assert (x.pooler_output - y.pooler_output).abs().max() < TOL
    assert all((p - q).abs().max() < TOL for p, q in zip(x.attentions, y.attentions))


def open_clip_state(model: IdeficsVisionTransformer) -> dict:
    """Our weights under open_clip's names (visual.*, fused in_proj), written independently of the loader."""
    s = model.state_dict()
    out = {"visual.conv1.weight": s["embeddings.patch_embedding.weight"],
           "visual.class_embedding": s["embeddings.class_embedding"],
           "visual.positional_embedding": s["embeddings.position_embedding.weight"],
           "visual.ln_pre.weight": s["pre_layrnorm.weight"], "visual.ln_pre.bias": s["pre_layrnorm.bias"],
           "visual.ln_post.weight": s["post_layernorm.weight"], "visual.ln_post.bias": s["post_layernorm.bias"],
           "visual.proj": s["proj"], "text_projection": torch.zeros(3, 3), "logit_scale": torch.tensor(1.0)}
    for i in range(model.config.num_hidden_layers):
        o, n = f"encoder.layers.{i}.", f"visual.transformer.resblocks.{i}."
        out[n + "attn.in_proj_weight"] = torch.cat([s[o + f"self_attn.{x}_proj.weight"] for x in "qkv"])
        out[n + "attn.in_proj_bias"] = torch.cat([s[o + f"self_attn.{x}_proj.bias"] for x in "qkv"])
        for a, b in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                     ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
            for p in ("weight", "bias"):
                out[f"{n}{b}.{p}"] = s[f"{o}{a}.{p}"]
    return out


def test_open_clip_state_dict(tmp_path):
    model = tiny(projection_dim=16)
    path = tmp_path / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in open_clip_state(model).items()}, path)
    loaded = load_model(path, device="cpu")
    c = loaded.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.patch_size, c.image_size) == (64, 2, 1, 8, 32)
    assert c.projection_dim == 16 and "open_clip" in loaded.name
    same_outputs(model, loaded.model)


def test_head_count_override_and_bin_loading(tmp_path):
    model = tiny(num_attention_heads=4, projection_dim=8)
    path = tmp_path / "weights.bin"
    torch.save(open_clip_state(model), path)
    assert load_model(path, device="cpu").config.num_attention_heads == 1  # width 64 // 64: the rule
    loaded = load_model(path, device="cpu", num_heads=4)
    same_outputs(model, loaded.model)


def timm_state(model: IdeficsVisionTransformer, gamma: bool, class_slot: bool) -> dict:
    s = model.state_dict()
    pos = s["embeddings.position_embedding.weight"]
    out = {"cls_token": s["embeddings.class_embedding"].view(1, 1, -1),
           "pos_embed": (pos if class_slot else pos[1:]).unsqueeze(0),
           "patch_embed.proj.weight": s["embeddings.patch_embedding.weight"],
           "patch_embed.proj.bias": s["embeddings.patch_embedding.bias"],
           "norm.weight": s["post_layernorm.weight"], "norm.bias": s["post_layernorm.bias"],
           "head.weight": torch.zeros(10, 64), "head.bias": torch.zeros(10)}
    for i in range(model.config.num_hidden_layers):
        o, n = f"encoder.layers.{i}.", f"blocks.{i}."
        out[n + "attn.qkv.weight"] = torch.cat([s[o + f"self_attn.{x}_proj.weight"] for x in "qkv"])
        out[n + "attn.qkv.bias"] = torch.cat([s[o + f"self_attn.{x}_proj.bias"] for x in "qkv"])
        for a, b in (("self_attn.out_proj", "attn.proj"), ("layer_norm1", "norm1"), ("layer_norm2", "norm2"),
                     ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
            for p in ("weight", "bias"):
                out[f"{n}{b}.{p}"] = s[f"{o}{a}.{p}"].clone()
        if gamma:  # store LayerScale separately: divide it out of the projections, the loader folds it back
            for proj, ls in (("attn.proj", "ls1"), ("mlp.fc2", "ls2")):
                g = torch.rand(64) + 0.5
                out[f"{n}{ls}.gamma"] = g
                out[f"{n}{proj}.weight"] = out[f"{n}{proj}.weight"] / g[:, None]
                out[f"{n}{proj}.bias"] = out[f"{n}{proj}.bias"] / g
    return out


@pytest.mark.parametrize("gamma, class_slot", [(True, True), (False, False)])
def test_timm_state_dict(tmp_path, gamma, class_slot):
    model = tiny(use_pre_layernorm=False, patch_bias=True, layer_norm_eps=1e-6)
    if not class_slot:  # timm's no_embed_class: the class token gets no position embedding
        with torch.no_grad():
            model.embeddings.position_embedding.weight[0] = 0
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in timm_state(model, gamma, class_slot).items()}, path)
    loaded = load_model(path, device="cpu")
    assert loaded.config.layer_norm_eps == 1e-6 and "timm" in loaded.name
    same_outputs(model, loaded.model)


def test_idefics_sharded_reads_only_vision_shards(tmp_path):
    model = tiny(num_attention_heads=2, pos_interpolation="idefics", hidden_act="gelu")
    save_file({f"model.vision_model.{k}": v.contiguous() for k, v in model.state_dict().items()},
              tmp_path / "model-00001-of-00002.safetensors")
    (tmp_path / "model-00002-of-00002.safetensors").write_bytes(b"language model shard: must never be read")
    weight_map = {f"model.vision_model.{k}": "model-00001-of-00002.safetensors" for k in model.state_dict()}
    weight_map["model.layers.0.self_attn.q_proj.weight"] = "model-00002-of-00002.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    vision = dict(embed_dim=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=8, hidden_act="gelu", layer_norm_eps=1e-5)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "idefics", "vision_config": vision}))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.1, 0.2, 0.3],
                                                                   "image_std": [0.5, 0.5, 0.5]}))
    loaded = load_model(tmp_path, device="cpu")
    assert loaded.config.pos_interpolation == "idefics" and loaded.config.num_attention_heads == 2
    assert loaded.preprocessing.mean == (0.1, 0.2, 0.3)
    same_outputs(model, loaded.model, size=(48, 24))


def test_dinov2_with_registers(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.Dinov2WithRegistersConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                    mlp_ratio=2, image_size=32, patch_size=8, num_register_tokens=3,
                                                    attn_implementation="eager")
    torch.manual_seed(4)
    reference = transformers.Dinov2WithRegistersModel(config).eval()
    with torch.no_grad():
        reference.embeddings.register_tokens.normal_()
    reference.save_pretrained(tmp_path)
    loaded = load_model(tmp_path, device="cpu")
    assert loaded.config.num_prefix_tokens == 4
    pixels = torch.randn(1, 3, 40, 24)
    with torch.no_grad():
        expected = reference(pixels, output_attentions=True)
        got = loaded.model(pixels, output_attentions=True, interpolate_pos_encoding=True)
    assert (loaded.model.post_layernorm(got.last_hidden_state) - expected.last_hidden_state).abs().max() < TOL
    assert all((a - b).abs().max() < TOL for a, b in zip(got.attentions, expected.attentions))


def test_offline_hub_id_fails_at_once(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.time()
    with pytest.raises(CheckpointError, match="hub is unreachable.*local folder"):
        load_model("openai/clip-vit-base-patch32", device="cpu")
    assert time.time() - start < 10


def test_unreachable_hub_fails_fast(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: like a machine offline
    start = time.time()
    with pytest.raises(CheckpointError, match="hub is unreachable"):
        load_model("someone/some-vit", device="cpu")
    assert time.time() - start < 10


@pytest.mark.parametrize("content, message", [
    (b"garbage that is no checkpoint", "not a readable safetensors"),
    (None, "not a readable safetensors"),  # truncated: a real file cut in half
])
def test_corrupt_and_truncated_files(tmp_path, content, message):
    path = tmp_path / "model.safetensors"
    if content is None:
        save_file({"visual.conv1.weight": torch.randn(64, 3, 8, 8)}, path)
        content = path.read_bytes()[: len(path.read_bytes()) // 2]
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        load_model(path, device="cpu")


def test_wrong_architecture_says_so(tmp_path):
    path = tmp_path / "resnet.safetensors"
    save_file({"conv1.weight": torch.randn(8, 3, 7, 7), "layer1.0.conv1.weight": torch.randn(8, 8, 3, 3)}, path)
    with pytest.raises(CheckpointError, match="not a vision transformer"):
        load_model(path, device="cpu")


def test_missing_and_misshapen_keys_are_named(tmp_path):
    state = open_clip_state(tiny(projection_dim=8))
    del state["visual.ln_post.weight"]
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "a.safetensors")
    with pytest.raises(CheckpointError, match="missing keys: post_layernorm.weight"):
        load_model(tmp_path / "a.safetensors", device="cpu")


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickles_with_objects_are_refused(tmp_path):
    path = tmp_path / "evil.bin"
    torch.save({"visual.conv1.weight": torch.zeros(1), "payload": Evil()}, path)
    with pytest.raises(CheckpointError, match="never arbitrary pickled objects"):
        load_model(path, device="cpu")


def test_nonexistent_path(tmp_path):
    with pytest.raises(CheckpointError, match="neither an existing file"):
        load_model(tmp_path / "nothing" / "here.safetensors", device="cpu")
