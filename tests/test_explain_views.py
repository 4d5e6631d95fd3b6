"""The Explain tab and the /predict and /relevance endpoints, called directly: a tiny classifier saved by
transformers, the page's target and method controls, the clicked patch as a target, plain messages for bad targets;
the command line's --explain."""
import json
import subprocess
import sys
import time
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import transformers as tf
from PIL import Image

import app
from analysis import explain
from explorer.inputs import DEFAULTS, FIELDS, UserError
from server.api import Api
from server.handlers import open_upload
from server.page import ANALYSIS_OUTPUTS, VIEW_OUTPUTS, Page
from tests.helpers import random_image, save, tiny_loaded

ROOT = Path(__file__).resolve().parents[1]
LABELS = {0: "cat", 1: "dog", 2: "fox"}


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """A folder holding a tiny ViTForImageClassification, as transformers saves it."""
    folder = tmp_path_factory.mktemp("classifier")
    config = tf.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8,
                          intermediate_size=64, num_labels=3, id2label=LABELS)
    save(tf.ViTForImageClassification(config), folder, seed=3)
    return str(folder)


@pytest.fixture(scope="module")
def workspace():
    return app.workspace_for(tiny_loaded(), "cpu")


@pytest.fixture
def upload(workspace):
    def make(image: Image.Image) -> dict:
        folder = Path(workspace.upload_roots[0]) / f"explain-{time.time_ns()}"
        folder.mkdir(parents=True)
        image.save(folder / "photo.png")
        return {"path": str(folder / "photo.png"), "meta": {"_type": "gradio.FileData"}}
    return make


def controls(**changes) -> list:
    values = DEFAULTS | changes
    return [values[name] for name in FIELDS]


def test_predict_and_relevance_of_a_classifier(workspace, upload, classifier):
    api, image = Api(workspace), upload(random_image(45, 70))
    predicted = api.predict(image, 224, classifier)
    assert predicted["kind"] == "classes" and sorted(p["label"] for p in predicted["top5"]) == sorted(LABELS.values())
    assert sum(p["probability"] for p in predicted["top5"]) == pytest.approx(1.0)
    png, out = api.relevance(image, "class:1", "relevance", 224, classifier)
    assert out["target"] == "class:1" and out["method"] == "relevance" and "dog" in out["explained"]
    assert np.array(out["map"]).shape == (out["grid_h"], out["grid_w"]) == (18, 28)
    assert [p["index"] for p in out["top5"]] == [p["index"] for p in predicted["top5"]]
    s = open_upload(workspace, image, 224, classifier)
    expected = explain(workspace.models.get(classifier), s.analysis, "class:1", "relevance").values
    np.testing.assert_allclose(np.array(out["map"]), expected, atol=1e-6)  # the engine's map (checked against a
    # dense reference in test_relevance.py), returned as it is
    assert Image.open(png.path).size == (70, 45)  # drawn over the original image


def test_only_an_analysis_made_to_explain_keeps_the_attention_outputs(workspace, upload):
    """/relevance's analysis keeps every layer's attention output for its sweep; the page's upload and the other
    endpoints' analyses keep none (their kept bytes stay at the layers' inputs and log-sum-exps)."""
    api = Api(workspace)
    explained, plain = upload(random_image(45, 70, seed=11)), upload(random_image(45, 70, seed=12))
    api.relevance(explained, "embedding", "relevance", 224)
    api.cls_attention(plain, resolution=224)
    assert len(open_upload(workspace, explained, 224).analysis.record.outputs) == 3
    assert open_upload(workspace, plain, 224).analysis.record.outputs == []


def test_a_patch_target_is_the_pixel_of_the_original_image(workspace, upload):
    api, image = Api(workspace), upload(random_image(45, 70))
    _, out = api.relevance(image, "patch:69,0", "grad_rollout", 224)
    assert out["target"] == "patch:0,27"  # the top-right patch of the 18 × 28 grid
    _, first = api.relevance(image, "patch:0,44", "relevance", 224)
    assert first["target"] == "patch:17,0"


@pytest.mark.parametrize("target, message", [
    ("class:7", "target: class 7 is out of range (this head has 3 classes, 0–2)"),
    ("region", "target: region needs a saliency decoder"),
    ("class", "target must be top, class:N, embedding, region, patch:X,Y"),
    ("patch:900,3", "x must be a number from 0 to"),
])
def test_bad_targets_get_plain_messages(workspace, upload, classifier, target, message):
    with pytest.raises(gr.Error, match=message.replace("(", r"\(").replace(")", r"\)")):
        app_api(workspace).relevance(upload(random_image(45, 70)), target, "relevance", 224, classifier)


def test_a_target_needing_a_head_the_model_lacks_is_refused(workspace, upload):
    with pytest.raises(gr.Error, match="class:N needs a classifier head, and this model has none"):
        app_api(workspace).relevance(upload(random_image(45, 70)), "class:0", "relevance", 224)
    with pytest.raises(gr.Error, match="method must be one of relevance, grad_rollout, rollout, attention"):
        app_api(workspace).relevance(upload(random_image(45, 70)), "top", "saliency", 224)


def app_api(workspace) -> Api:
    """The endpoints as the served app calls them: every failure a plain gr.Error."""
    from server.handlers import guarded
    api = Api(workspace)
    api.relevance = guarded(api.relevance)
    return api


def test_the_explain_tab_offers_the_models_outputs_and_draws_every_method(workspace, upload, classifier):
    page = Page(workspace)
    image = upload(random_image(45, 70, seed=2))
    out = dict(zip(ANALYSIS_OUTPUTS, page.analyze(image, 224, classifier, "float32", *controls())))
    offered = [value for _, value in out["target"]["choices"]]
    assert offered[0] == "top" and {"class:0", "class:1", "class:2", "embedding", "patch"} <= set(offered)
    view = out["view"]
    page.prepare_tab(view, "explain", *controls(target="class:2", method="grad_rollout"))
    drawn = dict(zip(VIEW_OUTPUTS, page.render(view, "explain", *controls(target="class:2", method="grad_rollout"))))
    assert "| 2 | fox |" in drawn["prediction"] and "gradient rollout" in drawn["explain_caption"]
    assert isinstance(drawn["explanation"], Image.Image) and drawn["explanation"].width <= 640
    assert drawn["explain_strip"].width > 4 * 200  # the four methods side by side
    clicked = view.clicked(69.0, 44.0)  # the bottom-right patch, as the page's click gives it
    drawn = dict(zip(VIEW_OUTPUTS, page.render(clicked, "explain", *controls(target="patch"))))
    assert "target `patch:17,27`" in drawn["explain_caption"]
    files = page.download(clicked, "explain", *controls(target="class:1", method="rollout"))["value"]
    sidecar = json.loads(Path(files[1]).read_text())
    assert sidecar["settings"]["target"] == "class:1" and sidecar["settings"]["method"] == "rollout"


def test_the_page_refuses_an_unknown_method(workspace, upload):
    page = Page(workspace)
    view = page.analyze(upload(random_image(40, 40)), 224, "default", "float32", *controls())[0]
    with pytest.raises(gr.Error, match="method must be one of"):
        page.render(view, "explain", *controls(method="lime"))
    with pytest.raises(UserError):
        from explorer.inputs import Controls
        Controls.parse(open_upload(workspace, upload(random_image(40, 40)), 224).analysis, {"target": 3})


@pytest.mark.slow
def test_the_command_line_explains(tmp_path, classifier):
    Image.open(ROOT / "assets" / "chelsea.png").save(tmp_path / "cat.png")
    done = subprocess.run([sys.executable, "-m", "explorer", str(tmp_path / "cat.png"), "--out", str(tmp_path / "out"),
                           "--model", classifier, "--resolution", "224", "--no-gif", "--explain", "class:0",
                           "--method", "relevance", "grad_rollout"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    folder = tmp_path / "out" / "cat"
    numbers = json.loads((folder / "explain.json").read_text())
    assert set(numbers) == {"relevance", "grad_rollout"} and numbers["relevance"]["target"] == "class:0"
    assert (folder / "explain_relevance.png").is_file() and (folder / "explain_grad_rollout.png").is_file()
