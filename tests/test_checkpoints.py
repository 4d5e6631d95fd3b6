"""Every checkpoint format, written in its real layout and loaded through `load_model`, against a reference;
and the clear errors."""
import json
import math
import socket
import time
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from model import CheckpointError, load_model

TOL = 1e-5
SIZES = [(32, 32), (40, 24)]  # native (patch 8, grid 4×4), then a non-square grid that grows and shrinks


def assert_close(a, b):
    assert a.shape == b.shape and (a - b).abs().max().item() < TOL, (a - b).abs().max().item()


def assert_matches(got, tokens, pooled, attentions) -> None:
    """Our output against a reference's tokens, pooled output and every attention."""
    assert_close(got.last_hidden_state, tokens)
    assert_close(got.pooler_output, pooled)
    for a, b in zip(got.attentions, attentions, strict=True):
        assert_close(a, b)


def save(state: dict, path) -> None:
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))


def ours(loaded, pixels):
    with torch.no_grad():
        return loaded.model(pixels, output_attentions=True, interpolate_pos_encoding=True)


def antialiased_resize(table: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """(P, D) patch positions → (grid_h * grid_w, D), as timm's resample_abs_pos_embed and open_clip do."""
    grid = math.isqrt(len(table))
    if (grid_h, grid_w) == (grid, grid):
        return table
    square = table.reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
    resized = F.interpolate(square, size=(grid_h, grid_w), mode="bicubic", align_corners=False, antialias=True)
    return resized.permute(0, 2, 3, 1).reshape(grid_h * grid_w, -1)


def ln(x, state, name, eps):
    return F.layer_norm(x, x.shape[-1:], state[f"{name}.weight"], state[f"{name}.bias"], eps)


def linear(x, state, name):
    return F.linear(x, state[f"{name}.weight"], state.get(f"{name}.bias"))


# ---- open_clip: `visual.*`, nn.MultiheadAttention with a fused in_proj, optional LayerScale ----
def linear_params(name: str, out_dim: int, in_dim: int, std: float = 0.1) -> dict:
    return {f"{name}.weight": torch.randn(out_dim, in_dim) * std, f"{name}.bias": torch.randn(out_dim) * 0.1}


def norm_params(name: str, width: int) -> dict:
    return {f"{name}.weight": torch.rand(width) + 0.5, f"{name}.bias": torch.randn(width) * 0.1}


def open_clip_state(width=128, layers=2, mlp=256, patch=8, grid=4, proj=16, layer_scale=True) -> dict:
    torch.manual_seed(0)
    s = {"visual.conv1.weight": torch.randn(width, 3, patch, patch) * 0.1,
         "visual.class_embedding": torch.randn(width) * 0.5,
         "visual.positional_embedding": torch.randn(grid * grid + 1, width) * 0.5,
         **norm_params("visual.ln_pre", width), **norm_params("visual.ln_post", width),
         "visual.proj": torch.randn(width, proj) * 0.1,
         "token_embedding.weight": torch.randn(10, 8), "transformer.resblocks.0.ln_1.weight": torch.ones(8),
         "text_projection": torch.zeros(8, proj), "logit_scale": torch.tensor(1.0)}  # a text tower: ignored
    for i in range(layers):
        p = f"visual.transformer.resblocks.{i}."
        s |= {p + "attn.in_proj_weight": torch.randn(3 * width, width) * 0.2,
              p + "attn.in_proj_bias": torch.randn(3 * width) * 0.1,
              **linear_params(p + "attn.out_proj", width, width, 0.03), **norm_params(p + "ln_1", width),
              **norm_params(p + "ln_2", width), **linear_params(p + "mlp.c_fc", mlp, width),
              **linear_params(p + "mlp.c_proj", width, mlp, 0.03)}
        if layer_scale:
            s |= {p + "ls_1.gamma": torch.rand(width) + 0.2, p + "ls_2.gamma": torch.rand(width) + 0.2}
    return s


def open_clip_reference(state: dict, pixels: torch.Tensor, heads: int, act=F.gelu):
    """open_clip's VisionTransformer.forward, written from its key names; returns (tokens, pooled, attentions)."""
    v = {k[len("visual."):]: t for k, t in state.items() if k.startswith("visual.")}
    width, patch = v["conv1.weight"].shape[0], v["conv1.weight"].shape[-1]
    x = F.conv2d(pixels, v["conv1.weight"], stride=patch)  # (B, D, grid_h, grid_w)
    grid_h, grid_w = x.shape[-2:]
    x = torch.cat([v["class_embedding"].expand(len(x), 1, width), x.flatten(2).transpose(1, 2)], dim=1)
    table = v["positional_embedding"]
    x = x + torch.cat([table[:1], antialiased_resize(table[1:], grid_h, grid_w)])
    x = ln(x, v, "ln_pre", 1e-5)
    attentions = []
    for i in range(1 + max(int(k.split(".")[2]) for k in v if k.startswith("transformer.resblocks."))):
        p = f"transformer.resblocks.{i}."
        mha = nn.MultiheadAttention(width, heads, batch_first=True)
        mha.load_state_dict({n: v[p + "attn." + n] for n in ("in_proj_weight", "in_proj_bias", "out_proj.weight",
                                                            "out_proj.bias")})
        h = ln(x, v, p + "ln_1", 1e-5)
        out, weights = mha(h, h, h, need_weights=True, average_attn_weights=False)
        attentions.append(weights)
        x = x + v.get(p + "ls_1.gamma", 1.0) * out
        h = linear(act(linear(ln(x, v, p + "ln_2", 1e-5), v, p + "mlp.c_fc")), v, p + "mlp.c_proj")
        x = x + v.get(p + "ls_2.gamma", 1.0) * h
    return x, ln(x[:, 0], v, "ln_post", 1e-5) @ v["proj"], attentions


@pytest.mark.parametrize("size", SIZES)
def test_open_clip_state_dict(tmp_path, size):
    state = open_clip_state()
    save(state, tmp_path / "open_clip_model.safetensors")
    loaded = load_model(tmp_path / "open_clip_model.safetensors", device="cpu")
    c = loaded.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.patch_size, c.image_size) == (128, 2, 2, 8, 32)
    assert c.projection_dim == 16 and "open_clip" in loaded.name and loaded.preprocessing.mean[0] == 0.48145466
    pixels = torch.randn(2, 3, *size)
    tokens, pooled, attentions = open_clip_reference(state, pixels, heads=2)  # 128 // 64: the head-count rule
    assert_matches(ours(loaded, pixels), tokens, pooled, attentions)


def test_open_clip_config_file_and_overrides(tmp_path):
    state = open_clip_state(layer_scale=False)
    torch.save(state, tmp_path / "open_clip_pytorch_model.bin")  # .bin, read with weights_only=True
    config = {"model_cfg": {"quick_gelu": True, "vision_cfg": {"width": 128, "head_width": 32}},
              "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}
    (tmp_path / "open_clip_config.json").write_text(json.dumps(config))
    loaded = load_model(tmp_path, device="cpu")
    assert loaded.config.num_attention_heads == 4 and loaded.config.hidden_act == "quick_gelu"
    assert loaded.preprocessing.mean == (0.5, 0.5, 0.5) and loaded.preprocessing.std == (0.25, 0.25, 0.25)
    pixels = torch.randn(1, 3, 40, 24)
    _, pooled, attentions = open_clip_reference(state, pixels, heads=4, act=lambda x: x * torch.sigmoid(1.702 * x))
    got = ours(loaded, pixels)
    assert_close(got.pooler_output, pooled)
    assert_close(got.attentions[-1], attentions[-1])
    overridden = load_model(tmp_path, device="cpu", num_heads=8, hidden_act="gelu")
    assert (overridden.config.num_attention_heads, overridden.config.hidden_act) == (8, "gelu")
    with pytest.raises(TypeError, match="unknown config overrides: hiden_act"):
        load_model(tmp_path, device="cpu", hiden_act="gelu")


def test_against_open_clip_itself(tmp_path):
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(5)
    reference = open_clip.transformer.VisionTransformer(image_size=32, patch_size=8, width=64, layers=2, heads=1,
                                                        mlp_ratio=2.0, ls_init_value=0.5, output_dim=16).eval()
    save({f"visual.{k}": v for k, v in reference.state_dict().items()}, tmp_path / "open_clip_model.safetensors")
    loaded = load_model(tmp_path, device="cpu")
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert_close(ours(loaded, pixels).pooler_output, reference(pixels))


# ---- timm: fused qkv, LayerScale ls1/ls2, registers, pos_embed with or without class slot ----
def timm_state(registers=0, no_embed_class=False, layer_scale=True, pre_norm=False, width=128, layers=2, mlp=256,
               patch=8, grid=4) -> dict:
    torch.manual_seed(1)
    prefix = 0 if no_embed_class else 1 + registers
    s = {"cls_token": torch.randn(1, 1, width) * 0.5, "pos_embed": torch.randn(1, prefix + grid * grid, width) * 0.5,
         **linear_params("patch_embed.proj", width, 3 * patch * patch), **norm_params("norm", width),
         **linear_params("head", 10, width)}
    s["patch_embed.proj.weight"] = s["patch_embed.proj.weight"].reshape(width, 3, patch, patch)
    if registers:
        s["reg_token"] = torch.randn(1, registers, width) * 0.5
    if pre_norm:
        s |= norm_params("norm_pre", width)
    for i in range(layers):
        p = f"blocks.{i}."
        s |= {**norm_params(p + "norm1", width), **linear_params(p + "attn.qkv", 3 * width, width, 0.2),
              **linear_params(p + "attn.proj", width, width, 0.03), **norm_params(p + "norm2", width),
              **linear_params(p + "mlp.fc1", mlp, width), **linear_params(p + "mlp.fc2", width, mlp, 0.03)}
        if layer_scale:
            s |= {p + "ls1.gamma": torch.rand(width) + 0.2, p + "ls2.gamma": torch.rand(width) + 0.2}
    return s


def timm_reference(s: dict, pixels: torch.Tensor, heads: int, registers: int, no_embed_class: bool):
    """timm's VisionTransformer.forward_features (dynamic_img_size), written from its key names."""
    width, patch = s["cls_token"].shape[-1], s["patch_embed.proj.weight"].shape[-1]
    x = F.conv2d(pixels, s["patch_embed.proj.weight"], s["patch_embed.proj.bias"], stride=patch)
    batch, _, grid_h, grid_w = x.shape
    x = x.flatten(2).transpose(1, 2)
    prefix = [s["cls_token"].expand(batch, -1, -1)] + ([s["reg_token"].expand(batch, -1, -1)] if registers else [])
    in_table = 0 if no_embed_class else 1 + registers
    table = s["pos_embed"][0]
    pos = torch.cat([table[:in_table], antialiased_resize(table[in_table:], grid_h, grid_w)])
    x = torch.cat(prefix + [x + pos], dim=1) if no_embed_class else torch.cat(prefix + [x], dim=1) + pos
    if "norm_pre.weight" in s:
        x = ln(x, s, "norm_pre", 1e-6)
    attentions = []
    for i in range(1 + max(int(k.split(".")[1]) for k in s if k.startswith("blocks."))):
        p = f"blocks.{i}."
        qkv = linear(ln(x, s, p + "norm1", 1e-6), s, p + "attn.qkv").reshape(batch, x.shape[1], 3, heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # (B, heads, N, head_dim) each
        attention = torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, dim=-1)
        attentions.append(attention)
        out = linear((attention @ v).transpose(1, 2).reshape(batch, -1, width), s, p + "attn.proj")
        x = x + s.get(p + "ls1.gamma", 1.0) * out
        x = x + s.get(p + "ls2.gamma", 1.0) * linear(F.gelu(linear(ln(x, s, p + "norm2", 1e-6), s, p + "mlp.fc1")),
                                                       s, p + "mlp.fc2")
    return x, ln(x[:, 0], s, "norm", 1e-6), attentions


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("registers, no_embed_class, layer_scale, pre_norm",
                         [(0, False, True, False), (2, True, False, True), (2, False, True, False)])
def test_timm_state_dict(tmp_path, size, registers, no_embed_class, layer_scale, pre_norm):
    state = timm_state(registers, no_embed_class, layer_scale, pre_norm)
    save(state, tmp_path / "model.safetensors")
    loaded = load_model(tmp_path, device="cpu")
    c = loaded.config
    switches = (c.num_attention_heads, c.num_register_tokens, c.use_pre_layernorm, c.patch_bias)
    assert switches == (2, registers, pre_norm, True)
    assert c.layer_norm_eps == 1e-6 and "timm" in loaded.name and loaded.preprocessing.mean == (0.485, 0.456, 0.406)
    pixels = torch.randn(2, 3, *size)
    tokens, pooled, attentions = timm_reference(state, pixels, 2, registers, no_embed_class)
    assert_matches(ours(loaded, pixels), tokens, pooled, attentions)


def test_against_timm_itself(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(6)
    reference = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=1, mlp_ratio=2.0, init_values=0.5, reg_tokens=2,
        dynamic_img_size=True, num_classes=0).eval()
    save(reference.state_dict(), tmp_path / "model.safetensors")
    loaded = load_model(tmp_path, device="cpu")
    for size in SIZES:
        pixels = torch.randn(1, 3, *size)
        with torch.no_grad():
            expected = reference.forward_features(pixels)
            assert_close(loaded.model.post_layernorm(ours(loaded, pixels).last_hidden_state), expected)


# ---- transformers formats ----
@pytest.fixture(scope="module")
def idefics_folder(tmp_path_factory):
    """A tiny IdeficsForVisionText2Text saved in many shards; the language model's shards overwritten with junk."""
    from transformers import IdeficsConfig, IdeficsForVisionText2Text
    torch.manual_seed(2)
    folder = tmp_path_factory.mktemp("idefics")
    vision = dict(embed_dim=32, image_size=32, intermediate_size=64, patch_size=8, num_attention_heads=4,
                  num_hidden_layers=2)
    config = IdeficsConfig(vocab_size=100, additional_vocab_size=2, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=2, vision_config=vision, use_resampler=False)
    model = IdeficsForVisionText2Text(config).eval()
    model.save_pretrained(folder, max_shard_size="20KB")
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    vision_shards = {s for k, s in weight_map.items() if k.startswith("model.vision_model.")}
    language_shards = set(weight_map.values()) - vision_shards
    assert language_shards
    for shard in language_shards:  # never to be opened
        (folder / shard).write_bytes(b"not read")
    (folder / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.1, 0.2, 0.3],
                                                                 "image_std": [0.5, 0.5, 0.5]}))
    return folder, model.model.vision_model, vision_shards


def check_idefics(loaded, reference):
    assert loaded.config.pos_interpolation == "idefics" and loaded.config.num_attention_heads == 4
    assert loaded.preprocessing.mean == (0.1, 0.2, 0.3) and "IDEFICS" in loaded.name
    pixels = torch.randn(1, 3, 48, 24)
    with torch.no_grad():
        expected = reference(pixels, interpolate_pos_encoding=True)
    got = ours(loaded, pixels)
    assert_close(got.last_hidden_state, expected.last_hidden_state)
    assert_close(got.pooler_output, expected.pooler_output)


def test_idefics_sharded_reads_only_vision_shards(idefics_folder):
    folder, reference, _ = idefics_folder
    check_idefics(load_model(folder, device="cpu"), reference)


def test_hub_fetches_only_configs_and_vision_shards(idefics_folder, tmp_path, monkeypatch):
    import huggingface_hub
    folder, reference, vision_shards = idefics_folder
    fetched = []

    def fake_download(repo_id, filename, **kwargs):
        fetched.append(filename)
        (tmp_path / filename).write_bytes((folder / filename).read_bytes())
        return str(tmp_path / filename)

    files = SimpleNamespace(siblings=[SimpleNamespace(rfilename=p.name) for p in folder.iterdir()])
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda self, repo_id, timeout=None: files)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    check_idefics(load_model("someone/tiny-idefics", device="cpu"), reference)
    assert sorted(fetched) == sorted({"config.json", "preprocessor_config.json", "model.safetensors.index.json",
                                      *vision_shards})


def test_clip_model_with_text_tower_and_projection(tmp_path):
    from transformers import CLIPConfig, CLIPModel
    torch.manual_seed(3)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8)
    text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=50)
    reference = CLIPModel(CLIPConfig(vision_config=vision, text_config=text, projection_dim=8)).eval()
    reference.save_pretrained(tmp_path)
    loaded = load_model(tmp_path, device="cpu")
    assert loaded.config.projection_dim == 8 and loaded.config.hidden_act == "quick_gelu"
    pixels = torch.randn(1, 3, 40, 24)
    with torch.no_grad():
        pooled = reference.vision_model(pixels, interpolate_pos_encoding=True).pooler_output
        assert_close(ours(loaded, pixels).pooler_output, reference.visual_projection(pooled))


def test_dinov2_with_q_proj_names_and_registers(tmp_path):
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel
    torch.manual_seed(4)
    config = Dinov2WithRegistersConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2,
                                       image_size=32, patch_size=8, num_register_tokens=3, attn_implementation="eager")
    reference = Dinov2WithRegistersModel(config).eval()
    with torch.no_grad():
        reference.embeddings.register_tokens.normal_()
    reference.save_pretrained(tmp_path)
    new_names = {".attention.attention.query.": ".attention.q_proj.", ".attention.attention.key.": ".attention.k_proj.",
                 ".attention.attention.value.": ".attention.v_proj.", ".attention.output.dense.": ".attention.o_proj."}
    state = {}
    for key, value in reference.state_dict().items():  # the names transformers 5 uses in memory
        for old, new in new_names.items():
            key = key.replace(old, new)
        state[key] = value
    save(state, tmp_path / "model.safetensors")
    loaded = load_model(tmp_path, device="cpu")
    assert loaded.config.num_prefix_tokens == 4 and loaded.config.pos_interpolation == "size_antialias"
    pixels = torch.randn(1, 3, 40, 24)
    with torch.no_grad():
        expected = reference(pixels, output_attentions=True, output_hidden_states=True)
        got = loaded.model(pixels, output_attentions=True, output_hidden_states=True, interpolate_pos_encoding=True)
        assert_close(loaded.model.post_layernorm(got.last_hidden_state), expected.last_hidden_state)
    for a, b in zip(got.hidden_states, expected.hidden_states, strict=True):
        assert_close(a, b)
    for a, b in zip(got.attentions, expected.attentions, strict=True):
        assert_close(a, b)


# ---- errors ----
@pytest.mark.parametrize("hub", ["HF_HUB_OFFLINE", "refused", "silent"])
def test_unreachable_hub_fails_at_once(monkeypatch, hub):
    silent = socket.socket()  # accepts connections and never answers: a hub that hangs
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    endpoints = {"refused": "http://127.0.0.1:9", "silent": f"http://127.0.0.1:{silent.getsockname()[1]}"}
    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if hub == "HF_HUB_OFFLINE" else "0")
    monkeypatch.setenv("HF_ENDPOINT", endpoints.get(hub, "http://127.0.0.1:9"))
    start = time.time()
    with pytest.raises(CheckpointError, match="hub is unreachable.*give the path of the local folder"):
        load_model("someone/never-cached-vit", device="cpu")
    assert time.time() - start < 10
    silent.close()


def test_nonexistent_path(tmp_path):
    with pytest.raises(CheckpointError, match="no such file or folder"):
        load_model(tmp_path / "nothing" / "here.safetensors", device="cpu")


@pytest.mark.parametrize("name, content, message", [
    ("model.safetensors", b"garbage that is no checkpoint", "not a readable safetensors"),
    ("model.safetensors", "truncated", "not a readable safetensors"),
    ("weights.bin", b"garbage that is no checkpoint", "not a readable PyTorch checkpoint"),
    ("weights.bin", "truncated", "not a readable PyTorch checkpoint"),
    ("weights.onnx", b"onnx", "unsupported weights file"),
])
def test_corrupt_and_truncated_files(tmp_path, name, content, message):
    path = tmp_path / name
    if content == "truncated":  # a real file cut in half
        state = open_clip_state(layers=1)
        save(state, path) if name.endswith(".safetensors") else torch.save(state, path)
        content = path.read_bytes()[: len(path.read_bytes()) // 2]
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        load_model(path, device="cpu")


@pytest.mark.parametrize("state", [
    {"conv1.weight": torch.randn(8, 3, 7, 7), "layer1.0.conv1.weight": torch.randn(8, 8, 3, 3)},  # a ResNet
    {"embeddings.word_embeddings.weight": torch.randn(50, 16),  # a text model (BERT)
     "encoder.layer.0.attention.self.query.weight": torch.randn(16, 16)},
])
def test_wrong_architecture_says_so(tmp_path, state):
    save(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="not a vision transformer"):
        load_model(tmp_path / "model.safetensors", device="cpu")


def test_missing_and_misshapen_keys_are_named(tmp_path):
    state = open_clip_state(layers=1)
    del state["visual.ln_post.weight"]
    save(state, tmp_path / "a.safetensors")
    with pytest.raises(CheckpointError, match="missing keys: post_layernorm.weight"):
        load_model(tmp_path / "a.safetensors", device="cpu")
    (tmp_path / "clip").mkdir()
    from transformers import CLIPVisionConfig, CLIPVisionModel
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                              image_size=32, patch_size=8)
    CLIPVisionModel(config).save_pretrained(tmp_path / "clip")
    config_file = tmp_path / "clip" / "config.json"
    config_file.write_text(config_file.read_text().replace('"intermediate_size": 64', '"intermediate_size": 48'))
    with pytest.raises(CheckpointError, match=r"mismatches: .*fc1\.weight: checkpoint \(64, 32\) vs model \(48, 32\)"):
        load_model(tmp_path / "clip", device="cpu")


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickles_with_objects_are_refused(tmp_path, capsys):
    path = tmp_path / "evil.bin"
    torch.save({"visual.conv1.weight": torch.zeros(1), "payload": Evil()}, path)
    with pytest.raises(CheckpointError, match="holds a pickled object .*print.*refused"):
        load_model(path, device="cpu")
    assert "pwned" not in capsys.readouterr().out
