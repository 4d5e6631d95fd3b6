"""Text towers against transformers' CLIPModel and SiglipModel (tiny configs, random weights, saved by transformers
with their tokenizers) and against fixtures written by the real open_clip: tokens, text and image embeddings, logits
and zero-shot scores within 1e-5; relevance for a prompt against the dense reference; the cache of prompt
embeddings; and the plain messages for models without a text tower and for bad prompts."""
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open

from analysis import TextError, analyze, explain, similarity, zero_shot
from analysis.relevance import TEXT, Target, TargetError, parse_target, resolve
from analysis.text import image_embedding
from explorer.inputs import DEFAULTS, FIELDS, UserError, explain_target, prompt_list, templated_prompts
from model import load_model
from server.api import Api
from server.page import ANALYSIS_OUTPUTS, VIEW_OUTPUTS, Page
from tests.helpers import random_image, tiny_loaded
from tests.test_relevance import assert_maps, dense_maps, eager, one_hot, siglip_pooled_with_probe
from tests.text_models import CONTEXT, save_clip, save_siglip

TOL = 1e-5
REFERENCES = Path(__file__).resolve().parent / "fixtures" / "references"
PROMPTS = ["a photo of a dog.", "A RED car, on the Sky!", "photo of " * 12 + "a cat", "a cat: small & blue, 2",
           "IMAGE of an Person  with\tgreen   sky"]
OPEN_CLIP_CASES = ("open_clip_vit_b32_quickgelu", "open_clip_vit_b16", "open_clip_vit_m16_alt_layer_scale")


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    return folder, *save_clip(folder)


@pytest.fixture(scope="module")
def clip(clip_folder):
    folder, reference, tokenizer = clip_folder
    return load_model(folder, device="cpu"), reference, tokenizer


@pytest.fixture(scope="module")
def siglip(tmp_path_factory):
    folder = tmp_path_factory.mktemp("siglip")
    reference, tokenizer = save_siglip(folder)
    return load_model(folder, device="cpu"), reference, tokenizer


def assert_close(got, expected, tol=TOL):
    got, expected = torch.as_tensor(got).float(), torch.as_tensor(expected).float()
    assert got.shape == expected.shape and (got - expected).abs().max().item() < tol, (got - expected).abs().max()


def reference_outputs(reference, tokenizer, pixels, prompts, siglip: bool):
    """transformers' own forward: normalised embeddings and logits_per_image, tokens as its processors make them."""
    padding = "max_length" if siglip else True
    batch = tokenizer(prompts, truncation=True, max_length=CONTEXT, padding=padding, return_tensors="pt")
    inputs = {"input_ids": batch["input_ids"]} if siglip else dict(batch)  # SigLIP is trained without a mask
    with torch.no_grad():
        return reference(pixel_values=pixels, interpolate_pos_encoding=True, **inputs)


# ---- tokens ----
@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_tokens_match_the_reference_tokenizers(family, clip, siglip):
    """Punctuation, casing, tabs and runs of spaces, a prompt longer than the context (truncated, end token kept)."""
    loaded, _, tokenizer = clip if family == "clip" else siglip
    padding = {"padding": "max_length"} if family == "siglip" else {}
    expected = [tokenizer(p, truncation=True, max_length=CONTEXT, **padding)["input_ids"] for p in PROMPTS]
    got = loaded.text.tokenizer(PROMPTS).tolist()
    for row, reference in zip(got, expected, strict=True):
        assert row[:len(reference)] == reference and set(row[len(reference):]) <= {0}
    assert max(len(r) for r in expected) == CONTEXT  # the long prompt was truncated
    assert expected[2][-1] == tokenizer.eos_token_id


# ---- embeddings, logits, scores ----
@pytest.mark.parametrize("family", ["clip", "siglip"])
@pytest.mark.parametrize("size, long_side", [((32, 32), 32), ((40, 64), 64)])
def test_embeddings_logits_and_scores_match_transformers(family, size, long_side, clip, siglip):
    loaded, reference, tokenizer = clip if family == "clip" else siglip
    image = random_image(*size, seed=long_side)
    pixels, _ = loaded.preprocessing(image, long_side)
    expected = reference_outputs(reference, tokenizer, pixels, PROMPTS, family == "siglip")
    text = loaded.text.embed(PROMPTS)
    assert_close(F.normalize(text, dim=-1), expected.text_embeds)
    analysis = analyze(loaded, image, long_side)
    assert_close(F.normalize(image_embedding(loaded, analysis), dim=-1), expected.image_embeds)
    result = zero_shot(loaded, analysis, PROMPTS)
    assert result.prompts == PROMPTS
    assert_close(result.logits, expected.logits_per_image[0])
    logits = expected.logits_per_image[0]
    assert_close(result.scores, logits.sigmoid() if family == "siglip" else logits.softmax(-1))
    assert result.kind == ("sigmoid" if family == "siglip" else "softmax")
    assert_close(similarity(loaded, image_embedding(loaded, analysis), PROMPTS[1]), expected.logits_per_image[0, 1:2])


@pytest.mark.parametrize("case", OPEN_CLIP_CASES)
def test_open_clip_text_tower_matches_open_clip(case):
    """Against open_clip's own encode_text, encode_image and forward (tests/fixtures/make_references.py)."""
    loaded = load_model(REFERENCES / case, device="cpu")
    with safe_open(str(REFERENCES / f"{case}.safetensors"), "pt") as f:
        prompts = json.loads(f.metadata()["prompts"])
        reference = {k: f.get_tensor(k) for k in f.keys() if k.startswith("text.") or k == "pixels.0"}
    ids = loaded.text.tokenizer(prompts)
    assert torch.equal(ids, reference["text.ids"][:, :ids.shape[1]])  # open_clip pads to its context with zeros
    assert_close(loaded.text.embed(prompts), reference["text.embeddings"])
    with torch.no_grad():
        image = loaded.model(reference["pixels.0"]).pooler_output
    assert_close(image, reference["text.image_embeddings"])
    assert_close(loaded.text.tower.logits(image, loaded.text.embed(prompts)), reference["text.logits"])
    assert loaded.text.sigmoid == (case == "open_clip_vit_b16")  # the one saved with a logit bias


# ---- relevance for a prompt ----
def clip_similarity(reference, pixels, text_features):
    """logit_scale·cos of CLIPModel's projected image embedding with a fixed text embedding, attentions kept."""
    def scalar(out):
        image = reference.visual_projection(out.pooler_output)
        return (F.normalize(image, dim=-1) @ F.normalize(text_features, dim=-1).T)[0, 0] * reference.logit_scale.exp()
    return eager(reference.vision_model, pixels, scalar)


@pytest.mark.parametrize("size, long_side", [((32, 32), 32), ((40, 64), 64)])
def test_relevance_for_a_prompt_against_the_dense_reference(clip, size, long_side):
    loaded, reference, tokenizer = clip
    image = random_image(*size, seed=long_side + 1)
    pixels, _ = loaded.preprocessing(image, long_side)
    analysis = analyze(loaded, image, long_side)
    prompt = "A photo of a DOG: small, red"
    with torch.no_grad():
        batch = tokenizer([prompt], return_tensors="pt")
        text_features = reference.text_projection(reference.text_model(**batch).pooler_output)
    attentions = clip_similarity(reference, pixels, text_features)
    assert_maps(loaded, analysis, f"text:{prompt}", dense_maps(attentions, one_hot(analysis.record.num_tokens, 0)))
    e = explain(loaded, analysis, f"text:{prompt}")
    assert e.target == Target(TEXT, prompt=prompt) and prompt in e.description and "logit_scale·cos" in e.description


def test_siglip_relevance_for_a_prompt_reads_the_pooling_probe(siglip):
    loaded, reference, tokenizer = siglip
    image = random_image(40, 64, seed=3)
    pixels, _ = loaded.preprocessing(image, 64)
    analysis = analyze(loaded, image, 64)
    prompt = "a big Dog on the sky"
    with torch.no_grad():
        ids = tokenizer([prompt], truncation=True, max_length=CONTEXT, padding="max_length", return_tensors="pt")
        text_features = reference.text_model(input_ids=ids["input_ids"]).pooler_output
    kept = {}

    def scalar(out):
        pooled, kept["probs"] = siglip_pooled_with_probe(reference.vision_model.head, out.last_hidden_state)
        cosine = F.normalize(pooled, dim=-1) @ F.normalize(text_features, dim=-1).T
        return cosine[0, 0] * reference.logit_scale.exp()[0] + reference.logit_bias[0]

    attentions = eager(reference.vision_model, pixels, scalar)
    probe = (kept["probs"].grad * kept["probs"].detach())[:, 0].double()  # (heads, N)
    rollout_start = probe.mean(0).clamp(min=0)
    expected = (dense_maps(attentions, probe.clamp(min=0).mean(0))[0],
                dense_maps(attentions, rollout_start / rollout_start.sum())[1])
    assert_maps(loaded, analysis, f"text:{prompt}", expected)
    assert "+ bias" in explain(loaded, analysis, f"text:{prompt}").description


# ---- caching, targets, refusals ----
def test_prompts_are_encoded_once_per_model(clip, monkeypatch):
    loaded = clip[0]
    calls = []
    forward = type(loaded.text.tower).forward
    monkeypatch.setattr(type(loaded.text.tower), "forward",
                        lambda self, ids: calls.append(len(ids)) or forward(self, ids))
    prompts = ["a red sky, seen once", "a blue car, seen once"]
    for seed in range(3):  # three images: the prompts are encoded for the first only
        zero_shot(loaded, analyze(loaded, random_image(32, 32, seed=seed), 32), prompts)
    explain(loaded, analyze(loaded, random_image(32, 32, seed=9), 32), f"text:{prompts[0]}")
    assert calls == [2]
    monkeypatch.setattr("model.text.EMBEDDINGS_KEPT", 2)  # the least recently used go past the bound
    loaded.text.embed(["first", "second", "third"])
    assert list(loaded.text._kept) == ["second", "third"]


def test_a_tokenizer_that_cannot_be_read_is_a_plain_error(clip_folder, tmp_path):
    import shutil

    from model import CheckpointError
    folder = tmp_path / "broken"
    shutil.copytree(clip_folder[0], folder)
    (folder / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"broken: its tokenizer files .* are not readable"):
        load_model(folder, device="cpu")
    (folder / "tokenizer.json").unlink()  # no tokenizer at all: the vision tower alone, prompts refused
    assert load_model(folder, device="cpu").text is None


def test_text_targets_keep_the_prompt_as_typed():
    assert parse_target("TEXT:A Dog: on a Sofa, asleep ") == Target(TEXT, prompt="A Dog: on a Sofa, asleep")
    assert str(parse_target("text:a, b: C")) == "text:a, b: C"
    assert parse_target("Class:3") == Target("class", index=3)


def test_models_without_a_text_tower_say_which_families_have_one():
    loaded = tiny_loaded()
    analysis = analyze(loaded, random_image(32, 32), 32)
    with pytest.raises(TextError, match=r"prompts: this model \(tiny\) has no text tower; .*CLIP .*SigLIP"):
        zero_shot(loaded, analysis, ["a dog"])
    with pytest.raises(TargetError, match=r"target: text:PROMPT needs a model with a text tower.*CLIP"):
        resolve(loaded, analysis, "text:a dog")
    with pytest.raises(TargetError, match="needs a prompt"):
        resolve(loaded, analysis, "text:  ")


@pytest.mark.parametrize("value, message", [
    ("", "give at least one prompt"),
    (" \n \n", "give at least one prompt"),
    (None, "prompts must be text"),
    (["a dog"], "prompts must be text"),
    ("\n".join(f"a photo of {i}" for i in range(33)), "at most 32 prompts, got 33"),
    ("a dog\n" + "x" * 301, "at most 300 characters"),
    ("y" * 20_000, "at most 32 prompts of at most 300 characters"),
])
def test_bad_prompts_get_plain_messages(value, message):
    with pytest.raises(UserError, match=message):
        prompt_list(value)


def test_prompt_inputs():
    assert prompt_list(" A Dog \n\n a cat: small, Red \n") == ["A Dog", "a cat: small, Red"]
    assert templated_prompts("a photo of a {}", "Dog\ncat") == ["a photo of a Dog", "a photo of a cat"]
    assert templated_prompts("no slot", "dog") == ["dog"] and templated_prompts("a {}", " \n") == []
    with pytest.raises(UserError, match="labels must be text"):
        templated_prompts("a {}", None)
    analysis = analyze(tiny_loaded(), random_image(32, 32), 32)
    assert explain_target(" Text:A Dog, asleep: ", analysis) == "text:A Dog, asleep:"
    for bad in ("text:", "text:" + "z" * 301, "text:a\nb"):
        with pytest.raises(UserError, match="target"):
            explain_target(bad, analysis)


# ---- the page and the API ----
@pytest.fixture(scope="module")
def clip_workspace(clip):
    import app
    return app.workspace_for(clip[0], "cpu")


def uploaded(workspace, image, name: str = "photo.png") -> dict:
    """An image saved where Gradio keeps uploads, as the file object a client sends."""
    folder = Path(workspace.upload_roots[0]) / f"test-{time.time_ns()}"
    folder.mkdir(parents=True)
    image.save(folder / name)
    return {"path": str(folder / name), "meta": {"_type": "gradio.FileData"}}


def test_zero_shot_and_relevance_endpoints(clip_workspace, clip):
    api, image = Api(clip_workspace), random_image(40, 64, seed=4)
    out = api.zero_shot(uploaded(clip_workspace, image), "a photo of a dog\n\nA Cat, asleep: on a sofa\n", 224)
    assert out["prompts"] == ["a photo of a dog", "A Cat, asleep: on a sofa"] and out["kind"] == "softmax"
    expected = zero_shot(clip[0], analyze(clip[0], image, 224), out["prompts"])
    assert_close(out["scores"], expected.scores) and abs(sum(out["scores"]) - 1) < 1e-6
    assert_close(out["logits"], expected.logits)
    _, relevance = api.relevance(uploaded(clip_workspace, image), "text:A Cat, asleep: on a sofa", "relevance", 224)
    assert relevance["target"] == "text:A Cat, asleep: on a sofa"
    assert "A Cat, asleep: on a sofa" in relevance["explained"]
    assert np.array(relevance["map"]).shape == (relevance["grid_h"], relevance["grid_w"])
    for prompts, message in (("", "at least one prompt"), (7, "must be text"), ("a\n" * 40, "at most 32 prompts")):
        with pytest.raises(UserError, match=message):
            api.zero_shot(uploaded(clip_workspace, image), prompts, 224)


def test_models_without_a_text_tower_are_refused_before_any_analysis(monkeypatch):
    import app
    workspace = app.workspace_for(tiny_loaded(), "cpu")
    monkeypatch.setattr(workspace, "analysis", lambda *args, **kwargs: pytest.fail("analysed"))
    with pytest.raises(TextError, match="no text tower; prompts need an image-text model: CLIP"):
        Api(workspace).zero_shot(uploaded(workspace, random_image(32, 32)), "a dog", 224)


def test_the_explain_tab_scores_the_prompts_and_draws_one_map_per_prompt(clip_workspace):
    page = Page(clip_workspace)
    values = DEFAULTS | {"layer": 1, "template": "a photo of a {}", "labels": "Dog\ncat\nred car"}
    controls = [values[name] for name in FIELDS]
    out = dict(zip(ANALYSIS_OUTPUTS, page.analyze(uploaded(clip_workspace, random_image(40, 64)), 224, "default",
                                                  "float32", *controls)))
    assert out["prompts_box"]["visible"] is True
    targets = dict((value, label) for label, value in out["target"]["choices"])
    assert {"text:a photo of a Dog", "text:a photo of a cat", "text:a photo of a red car"} <= set(targets)
    assert out["target"]["value"].startswith("text:a photo of a")  # the best-scoring prompt is explained first
    controls[FIELDS.index("target")] = "text:a photo of a cat"
    drawn = dict(zip(VIEW_OUTPUTS, page.render(out["view"], "explain", *controls)))
    assert "Zero-shot scores" in drawn["zero_shot"] and "a photo of a red car" in drawn["zero_shot"]
    assert isinstance(drawn["prompt_strip"], Image.Image) and isinstance(drawn["explanation"], Image.Image)
    assert "a photo of a cat" in drawn["explain_caption"]
    assert page.set_prompts(out["view"], *controls)["value"] == "text:a photo of a cat"  # still offered: kept
    controls[FIELDS.index("labels")] = "sky"
    assert page.set_prompts(out["view"], *controls)["value"] == "text:a photo of a sky"


@pytest.mark.slow  # starts the app
def test_served_zero_shot_and_prompt_relevance_through_gradio_client(clip):
    from gradio_client import Client, handle_file

    from tests.served import served_app
    image = REFERENCES.parents[2] / "assets" / "chelsea.png"
    with served_app(clip[0]) as url:
        client = Client(url, verbose=False)
        out = client.predict(handle_file(str(image)), "a photo of a cat\nA Dog: big, red", 224, api_name="/zero_shot")
        assert out["prompts"] == ["a photo of a cat", "A Dog: big, red"] and len(out["scores"]) == 2
        assert abs(sum(out["scores"]) - 1) < 1e-5 and out["kind"] == "softmax"
        _, relevance = client.predict(handle_file(str(image)), "text:A Dog: big, red", "grad_rollout", 224,
                                      api_name="/relevance")
        assert relevance["target"] == "text:A Dog: big, red" and relevance["method"] == "grad_rollout"
        with pytest.raises(Exception, match="at most 32 prompts"):
            client.predict(handle_file(str(image)), "a\n" * 33, 224, api_name="/zero_shot")


def test_command_line_prompts_and_a_prompt_target(clip_folder, tmp_path, capsys):
    from explorer.cli import main
    image = tmp_path / "photo.png"
    random_image(40, 64).save(image)
    out = tmp_path / "maps"
    assert main([str(image), "--model", str(clip_folder[0]), "--resolution", "224", "--no-gif", "--out", str(out),
                 "--prompts", "a photo of a dog", "A Cat: asleep", "--explain", "text:A Cat: asleep"]) == 0
    scores = json.loads((out / "photo" / "zero_shot.json").read_text())
    assert scores["prompts"] == ["a photo of a dog", "A Cat: asleep"] and abs(sum(scores["scores"]) - 1) < 1e-6
    explained = json.loads((out / "photo" / "explain.json").read_text())
    assert explained["relevance"]["target"] == "text:A Cat: asleep"
    no_text = str(REFERENCES / "timm_vit_small_augreg")
    assert main([str(image), "--model", no_text, "--out", str(out), "--prompts", "a dog"]) == 2
    assert "has no text tower" in capsys.readouterr().err
