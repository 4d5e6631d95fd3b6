"""Checkpoint formats not covered elsewhere (the seed's IDEFICS sharded, CLIP with its text tower, DINOv2's names),
fetching from a hub (a local fake one, through the real huggingface_hub client) within caps, and the clear errors.
The families' parity lives in test_families.py (transformers) and test_references.py (timm, open_clip)."""
import json
import shutil
import socket
import time
from pathlib import Path

import pytest
import torch
from fake_hub import FakeHub
from safetensors.torch import load_file, save_file

from model import CheckpointError, load_model
from tests.helpers import spoil_language_shards

TOL = 1e-5
REFERENCES = Path(__file__).parent / "fixtures" / "references"
OPEN_CLIP_SAFETENSORS = REFERENCES / "open_clip_vit_b16" / "open_clip_model.safetensors"


def assert_close(a, b):
    assert a.shape == b.shape and (a - b).abs().max().item() < TOL, (a - b).abs().max().item()


def ours(loaded, pixels):
    with torch.no_grad():
        return loaded.model(pixels, output_attentions=True, interpolate_pos_encoding=True)


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
    vision_shards = spoil_language_shards(folder)
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
    save_file(state, str(tmp_path / "model.safetensors"))
    loaded = load_model(tmp_path, device="cpu")
    assert loaded.config.num_prefix_tokens == 4 and loaded.config.pos_interpolation == "size_antialias"
    pixels = torch.randn(1, 3, 40, 24)
    with torch.no_grad():
        expected = reference(pixels, output_attentions=True, output_hidden_states=True)
        got = loaded.model(pixels, output_attentions=True, output_hidden_states=True, interpolate_pos_encoding=True)
    assert_close(got.last_hidden_state, expected.last_hidden_state)
    for a, b in zip(got.hidden_states, expected.hidden_states, strict=True):
        assert_close(a, b)
    for a, b in zip(got.attentions, expected.attentions, strict=True):
        assert_close(a, b)


# ---- the hub: a local fake one, answering the real huggingface_hub client ----
@pytest.fixture
def hub(monkeypatch, tmp_path):
    """Serves the tiny IDEFICS (sharded) and an open_clip checkpoint; downloads land in a fresh cache."""
    import huggingface_hub.constants

    def start(repos: dict[str, Path], sizes: bool = True, listed: dict[str, int] | None = None) -> FakeHub:
        server = FakeHub(repos, sizes, listed or {}).__enter__()
        started.append(server)
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        return server

    started = []
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    yield start
    for server in started:
        server.__exit__()


def test_hub_fetches_only_configs_and_vision_shards(idefics_folder, hub, tmp_path):
    folder, reference, vision_shards = idefics_folder
    server = hub({"someone/tiny-idefics": folder})
    check_idefics(load_model("someone/tiny-idefics", device="cpu"), reference)
    assert sorted(server.fetched()) == sorted({"config.json", "preprocessor_config.json",
                                               "model.safetensors.index.json", *vision_shards})
    assert not [r for r in server.requests if r.byte_range]  # no caps: no header reads either


def test_hub_caps_met_load_after_header_reads_only(idefics_folder, hub):
    folder, reference, vision_shards = idefics_folder
    server = hub({"someone/tiny-idefics": folder})
    check_idefics(load_model("someone/tiny-idefics", device="cpu", max_params=30_000,
                             max_download_bytes=10_000_000), reference)
    ranged = {r.file for r in server.requests if r.byte_range}
    assert ranged == vision_shards  # each vision shard's header read once by range, the language shards never


@pytest.mark.parametrize("caps, message", [
    ({"max_params": 10_000}, r"someone/tiny-idefics: its vision tower has 23\.9 thousand parameters, more than "
                             r"the 10 thousand this server accepts\."),
    ({"max_download_bytes": 20_000}, r"someone/tiny-idefics: its vision weights and configuration files mean "
                                     r"downloading \d+ kB \(config\.json, model-"),
])
def test_hub_caps_refuse_before_any_weight_is_fetched(idefics_folder, hub, tmp_path, caps, message):
    folder, _, _ = idefics_folder
    server = hub({"someone/tiny-idefics": folder})
    with pytest.raises(CheckpointError, match=message) as refused:
        load_model("someone/tiny-idefics", device="cpu", **caps)
    assert server.fetched(".safetensors") == []
    assert not list((tmp_path / "hf-cache").rglob("*.safetensors"))
    assert str(tmp_path) not in str(refused.value) and "/tmp" not in str(refused.value)


def test_hub_byte_cap_refuses_files_of_unknown_size(idefics_folder, hub):
    folder, _, _ = idefics_folder
    server = hub({"someone/tiny-idefics": folder}, sizes=False)
    with pytest.raises(CheckpointError, match=r"the hub did not say how large config\.json, .*index\.json is"):
        load_model("someone/tiny-idefics", device="cpu", max_download_bytes=10**9)
    assert server.fetched() == []  # not even the index


def test_hub_single_file_counts_both_towers(hub, tmp_path):
    """open_clip's file holds a text tower too: the parameter cap counts both towers (and the logit scale and bias),
    the byte cap the whole file; its tokenizer is fetched with it."""
    repo = tmp_path / "repo"
    shutil.copytree(REFERENCES / "open_clip_vit_b16", repo)
    tensors = load_file(str(OPEN_CLIP_SAFETENSORS))
    vision = sum(t.numel() for k, t in tensors.items() if k.startswith("visual."))
    total = sum(t.numel() for t in tensors.values())
    assert vision < total
    server = hub({"someone/tiny-open-clip": repo})
    with pytest.raises(CheckpointError, match="its vision and text towers have 37.5 thousand parameters"):
        load_model("someone/tiny-open-clip", device="cpu", max_params=total - 1)
    assert server.fetched(".safetensors") == []
    loaded = load_model("someone/tiny-open-clip", device="cpu", max_params=total)
    assert "someone/tiny-open-clip (open_clip" in loaded.name and loaded.text is not None
    assert server.fetched(".safetensors") == ["open_clip_model.safetensors"]
    assert "tokenizer.json" in server.fetched()


def test_hub_counts_the_text_shards_of_an_image_text_model_and_fetches_its_tokenizer(hub, tmp_path):
    from tests.text_models import save_clip
    folder = tmp_path / "clip"
    save_clip(folder, max_shard_size="20KB")
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    shards = set(weight_map.values())
    text_shards = {s for k, s in weight_map.items() if k.startswith("text_model.")}
    assert len(shards) > 2 and text_shards - {s for k, s in weight_map.items() if k.startswith("vision_model.")}
    total = sum(t.numel() for shard in shards for t in load_file(str(folder / shard)).values())
    server = hub({"someone/tiny-clip": folder})
    with pytest.raises(CheckpointError, match=r"its vision and text towers have .* parameters"):
        load_model("someone/tiny-clip", device="cpu", max_params=total - 1)
    assert server.fetched(".safetensors") == [] and {r.file for r in server.requests if r.byte_range} == shards
    loaded = load_model("someone/tiny-clip", device="cpu", max_params=total, max_download_bytes=10_000_000)
    assert loaded.text is not None and loaded.text.tokenizer.source == "tokenizer.json"
    assert set(server.fetched(".safetensors")) == shards and "tokenizer.json" in server.fetched()


def test_hub_fetches_a_siglip_sentencepiece_model_for_its_text_tower(hub, tmp_path):
    """One weights file, no index: config.json's model_type says it is an image-text model."""
    from tests.text_models import save_siglip
    folder = tmp_path / "siglip"
    save_siglip(folder)
    server = hub({"someone/tiny-siglip": folder})
    loaded = load_model("someone/tiny-siglip", device="cpu", max_params=10**6, max_download_bytes=10_000_000)
    assert loaded.text is not None and loaded.text.tokenizer.source == "spiece.model" and loaded.text.sigmoid
    assert {"spiece.model", "tokenizer_config.json", "model.safetensors"} <= set(server.fetched())


def test_hub_never_fetches_a_vlm_tokenizer_or_its_language_model(idefics_folder, hub, tmp_path):
    folder, reference, vision_shards = idefics_folder
    repo = tmp_path / "vlm"
    shutil.copytree(folder, repo)
    (repo / "tokenizer.json").write_text("{}")  # the language model's: never fetched
    (repo / "tokenizer_config.json").write_text("{}")
    server = hub({"someone/tiny-vlm": repo})
    loaded = load_model("someone/tiny-vlm", device="cpu", max_params=30_000, max_download_bytes=10_000_000)
    check_idefics(loaded, reference)
    assert loaded.text is None
    assert sorted(server.fetched()) == sorted({"config.json", "preprocessor_config.json",
                                               "model.safetensors.index.json", *vision_shards})


def test_parameter_cap_applies_to_what_was_read_whatever_the_source():
    with pytest.raises(CheckpointError, match=r"open_clip_vit_b16: the vision and text towers have 37\.5 thousand "
                                              r"parameters, more than the 30 thousand this server accepts\."):
        load_model(REFERENCES / "open_clip_vit_b16", device="cpu", max_params=30_000)
    assert load_model(REFERENCES / "open_clip_vit_b16", device="cpu", max_params=40_000).config.hidden_size == 32


def test_hub_errors_name_the_repo_never_a_local_path(hub, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}   ")
    hub({"someone/corrupt": repo})
    for caps in ({}, {"max_params": 10}):
        with pytest.raises(CheckpointError) as failed:
            load_model("someone/corrupt", device="cpu", **caps)
        message = str(failed.value)
        assert message.startswith("someone/corrupt") and "model.safetensors" in message
        assert str(tmp_path) not in message and "hf-cache" not in message, message
    with pytest.raises(CheckpointError, match="someone/missing is not on the hub"):
        load_model("someone/missing", device="cpu")


@pytest.mark.parametrize("listed, caps, message", [
    (300 * 2**20, {}, r"model\.safetensors\.index\.json is larger than the 16\.8 MB this server accepts for a JSON"),
    (5 * 2**20, {"max_download_bytes": 2**20}, r"its configuration files mean downloading 5\.\d+ MB"),
])
def test_hub_index_is_refused_before_it_is_fetched(idefics_folder, hub, listed, caps, message):
    """A 300 MB index was downloaded in full before the download cap refused the repository."""
    folder, _, _ = idefics_folder
    server = hub({"someone/tiny-idefics": folder}, listed={"model.safetensors.index.json": listed})
    with pytest.raises(CheckpointError, match=message):
        load_model("someone/tiny-idefics", device="cpu", **caps)
    assert server.fetched() == []


def open_clip_repos(tmp_path: Path, count: int) -> dict[str, Path]:
    repo = tmp_path / "repo"
    shutil.copytree(REFERENCES / "open_clip_vit_b16", repo)
    return {f"someone/clip-{i}": repo for i in range(count)}


def cached_repos(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "hf-cache").glob("models--*"))


def test_hub_cache_stays_under_its_cap_least_recently_used_first(hub, tmp_path):
    from model.hub_cache import folder_bytes
    hub(open_clip_repos(tmp_path, 4))
    cap = int(2.5 * sum(p.stat().st_size for p in (tmp_path / "repo").iterdir()))  # two repositories fit
    for name in ("clip-0", "clip-1", "clip-2", "clip-1", "clip-3"):  # clip-1 used again: clip-2 is the oldest
        load_model(f"someone/{name}", device="cpu", max_cache_bytes=cap)
        assert folder_bytes(tmp_path / "hf-cache") <= cap
        time.sleep(0.01)
    assert cached_repos(tmp_path) == ["models--someone--clip-1", "models--someone--clip-3"]
    with pytest.raises(CheckpointError, match="larger than the 1 kB this server keeps of the hub"):
        load_model("someone/clip-0", device="cpu", max_cache_bytes=1000)


def test_hub_repository_refused_at_conversion_is_deleted_from_a_capped_cache(hub, tmp_path):
    repo = tmp_path / "resnet"
    repo.mkdir()
    save_file({"conv1.weight": torch.randn(8, 3, 7, 7), "layer1.0.conv1.weight": torch.randn(8, 8, 3, 3)},
              str(repo / "model.safetensors"))
    hub({"someone/resnet": repo, **open_clip_repos(tmp_path, 1)})
    load_model("someone/clip-0", device="cpu", max_cache_bytes=10**7)
    for cap in (None, 10**7):  # without a cap the cache is left alone
        with pytest.raises(CheckpointError, match="not a vision transformer this tool knows"):
            load_model("someone/resnet", device="cpu", max_cache_bytes=cap)
        kept = ["models--someone--clip-0"] + (["models--someone--resnet"] if cap is None else [])
        assert cached_repos(tmp_path) == kept


# ---- errors ----
@pytest.mark.parametrize("hub_state", ["HF_HUB_OFFLINE", "refused", "silent"])
def test_unreachable_hub_fails_at_once(monkeypatch, hub_state):
    silent = socket.socket()  # accepts connections and never answers: a hub that hangs
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    endpoints = {"refused": "http://127.0.0.1:9", "silent": f"http://127.0.0.1:{silent.getsockname()[1]}"}
    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if hub_state == "HF_HUB_OFFLINE" else "0")
    monkeypatch.setenv("HF_ENDPOINT", endpoints.get(hub_state, "http://127.0.0.1:9"))
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
        state = load_file(str(OPEN_CLIP_SAFETENSORS))
        save_file(state, str(path)) if name.endswith(".safetensors") else torch.save(state, path)
        content = path.read_bytes()[: len(path.read_bytes()) // 2]
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message) as failed:
        load_model(path, device="cpu")
    assert str(failed.value).startswith(str(path))


def test_empty_folder_says_what_it_looked_for(tmp_path):
    with pytest.raises(CheckpointError, match=r"no weights in the folder \(model\.safetensors, .*index\.json"):
        load_model(tmp_path, device="cpu")


@pytest.mark.parametrize("state", [
    {"conv1.weight": torch.randn(8, 3, 7, 7), "layer1.0.conv1.weight": torch.randn(8, 8, 3, 3)},  # a ResNet
    {"embeddings.word_embeddings.weight": torch.randn(50, 16),  # a text model (BERT)
     "encoder.layer.0.attention.self.query.weight": torch.randn(16, 16)},
])
def test_wrong_architecture_says_so(tmp_path, state):
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="not a vision transformer"):
        load_model(tmp_path / "model.safetensors", device="cpu")


def test_missing_and_misshapen_keys_are_named(tmp_path):
    state = load_file(str(OPEN_CLIP_SAFETENSORS))
    del state["visual.ln_post.weight"]
    save_file(state, str(tmp_path / "a.safetensors"))
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
