"""The Explain tab's faithfulness view, the /faithfulness endpoint and the command line's --faithfulness, called
directly with a tiny classifier saved by transformers: the dict's fields, the scores against /predict, the page's
button then redraws from the cache and its selected layer, plain messages for bad fields; and the peak memory of the
curves in a fresh process."""
import json
import subprocess
import sys
from pathlib import Path

import gradio as gr
import pytest
from PIL import Image

from analysis import METHODS
from analysis.faithfulness import BATCH_TOKENS, FRACTIONS
from explorer.inputs import DEFAULTS, FIELDS
from server.api import Api
from server.handlers import guarded
from server.page import ANALYSIS_OUTPUTS, VIEW_OUTPUTS, Page
from tests.helpers import random_image
from tests.test_explain_views import classifier, upload, workspace  # noqa: F401  (the same fixtures)
from tests.test_relevance_memory import clear_refs_works

ROOT = Path(__file__).resolve().parents[1]


def controls(**changes) -> list:
    values = DEFAULTS | changes
    return [values[name] for name in FIELDS]


@pytest.mark.parametrize("removal", ["drop", "pixels"])
def test_the_endpoint_returns_every_curve_from_the_unperturbed_score(workspace, upload, classifier, removal):
    api, image = Api(workspace), upload(random_image(45, 70))
    probability = {p["index"]: p["probability"] for p in api.predict(image, 224, classifier)["top5"]}[1]
    png, out = api.faithfulness(image, "class:1", removal, 224, classifier)
    assert out["fractions"] == list(FRACTIONS) and out["removal"] == removal and out["target"] == "class:1"
    assert set(out["maps"]) == {*METHODS, "random"}
    for curves in out["maps"].values():
        assert len(curves["positive"]) == len(curves["negative"]) == 10
        assert curves["positive"][0] == curves["negative"][0] == pytest.approx(probability, abs=1e-5)
        trapezoids = sum(0.05 * (a + b) for a, b in zip(curves["positive"], curves["positive"][1:]))
        assert curves["positive_auc"] == pytest.approx(trapezoids, abs=1e-6)
    assert len(out["maps"]["random"]["spread"]) == 10
    assert out["verdict"].startswith("Most faithful for this image and target: ")
    assert "softmax probability of class 1" in out["score"]
    assert Image.open(png.path).width > 600


@pytest.mark.parametrize("field, value, message", [
    ("removal", "erase", "removal must be one of drop, pixels"),
    ("target", "class:7", "target: class 7 is out of range"),
    ("target", "dog", "target must be top, class:N, embedding, region, patch:X,Y"),
    ("removal", ["drop"], "removal must be one of drop, pixels"),
])
def test_bad_fields_get_plain_messages(workspace, upload, classifier, field, value, message):
    endpoint = guarded(Api(workspace).faithfulness)
    arguments = {"target": "top", "removal": "drop", field: value}
    with pytest.raises(gr.Error, match=message):
        endpoint(upload(random_image(45, 70)), arguments["target"], arguments["removal"], 224, classifier)


@pytest.mark.slow  # every curve through the page's events: 6 s of the quick subset's minute
def test_the_explain_tab_scores_on_request_then_redraws_from_the_cache(workspace, upload, classifier):
    page = Page(workspace)
    out = dict(zip(ANALYSIS_OUTPUTS, page.analyze(upload(random_image(45, 70, seed=4)), 224, classifier, "float32",
                                                  *controls())))
    view, chosen = out["view"], controls(target="class:2", removal="pixels")
    before = dict(zip(VIEW_OUTPUTS, page.render(view, "explain", *chosen)))
    assert before["faithfulness_plot"]["visible"] is False and "Score every map" in before["faithfulness_caption"]
    assert "110 to 130 forward passes" in before["faithfulness_caption"]  # the full sequence every pass
    dropping = dict(zip(VIEW_OUTPUTS, page.render(view, "explain", *controls(target="class:2", removal="drop"))))
    assert "40 to 70 forward passes" in dropping["faithfulness_caption"]
    plot, caption = page.score_maps(view, *chosen)
    assert isinstance(plot["value"], Image.Image) and plot["visible"] is True
    assert "Most faithful" in caption and "`class:2`" in caption
    drawn = dict(zip(VIEW_OUTPUTS, page.render(view, "explain", *chosen)))  # no new pass: from the cache
    assert drawn["faithfulness_caption"] == caption
    first_layer = controls(target="class:2", removal="pixels", layer=0)
    drawn = dict(zip(VIEW_OUTPUTS, page.render(view, "explain", *first_layer)))
    assert "Press the button again to add layer 0's attention" in drawn["faithfulness_caption"]
    page.score_maps(view, *first_layer)
    from analysis.faithfulness import faithfulness
    s = workspace.analysis(view.key, view.source)
    cached = faithfulness(workspace.models.get(classifier), s, "class:2", "pixels", layer=0, cached_only=True)
    assert set(cached.curves) == {*METHODS, "attention_layer_0", "random"}
    other = dict(zip(VIEW_OUTPUTS, page.render(view, "explain", *controls(target="class:0", removal="pixels"))))
    assert other["faithfulness_plot"]["visible"] is False  # another target's curves are not the ones drawn
    files = page.download(view, "explain", *first_layer)["value"]
    assert json.loads(Path(files[1]).read_text())["settings"]["removal"] == "pixels"


@pytest.mark.slow
def test_the_command_line_scores_the_maps(tmp_path, classifier):
    Image.open(ROOT / "assets" / "chelsea.png").save(tmp_path / "cat.png")
    done = subprocess.run([sys.executable, "-m", "explorer", str(tmp_path / "cat.png"), "--out", str(tmp_path / "out"),
                           "--model", classifier, "--resolution", "224", "--no-gif", "--explain", "class:0",
                           "--faithfulness", "pixels"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    numbers = json.loads((tmp_path / "out" / "cat" / "faithfulness.json").read_text())
    assert numbers["target"] == "class:0" and numbers["removal"] == "pixels" and set(numbers["maps"]) >= set(METHODS)
    assert (tmp_path / "out" / "cat" / "faithfulness.png").is_file()


# A narrow tower at 6,401 tokens (an 80 × 80 grid): a batch of perturbed sequences (BATCH_TOKENS in all, at least
# one sequence) through eager attention would hold heads × N² probabilities per sequence, 4 · 6401² · 4 bytes =
# 625 MB for one layer.
LAYERS, WIDTH, HEADS, GRID = 4, 64, 4, 80
TOKENS = 1 + GRID * GRID
DENSE_MB = max(1, BATCH_TOKENS // TOKENS) * HEADS * TOKENS ** 2 * 4 / 2**20
CHILD = f"""
import json, sys
from pathlib import Path
import torch
sys.path.insert(0, {str(ROOT)!r})
from analysis import analyze
from analysis.faithfulness import perturbation_curves
from analysis.memory import release_free_memory
from model import IdeficsVisionConfig, IdeficsVisionTransformer, LoadedModel, Preprocessing
from tests.helpers import random_image

def status_mb(field):
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field + ":"))
    return int(line.split()[1]) / 1024

torch.manual_seed(0)
config = IdeficsVisionConfig(hidden_size={WIDTH}, intermediate_size={2 * WIDTH}, num_hidden_layers={LAYERS},
                             num_attention_heads={HEADS}, image_size=224, patch_size=14)
loaded = LoadedModel(IdeficsVisionTransformer(config).eval(), Preprocessing(14), "narrow")
image = random_image({GRID * 14}, {GRID * 14})
small = analyze(loaded, image, 112)
perturbation_curves(loaded, small, "embedding", "drop", {{"a": small.cls_map(-1, "mean")}}, seeds=1)  # warm-up
analysis = analyze(loaded, image, {GRID * 14})
maps = {{"attention": analysis.cls_map(-1, "mean")}}
release_free_memory()
base = status_mb("VmRSS")
Path("/proc/self/clear_refs").write_text("5")
result = perturbation_curves(loaded, analysis, "embedding", "drop", maps, seeds=1)
print(json.dumps({{"peak_extra_mb": status_mb("VmHWM") - base, "tokens": analysis.record.num_tokens,
                  "last": float(result.curves["attention"].positive[-1])}}))
"""


@pytest.mark.slow
@pytest.mark.skipif(not clear_refs_works(), reason="needs Linux's resettable high-water mark (/proc/self/clear_refs)")
def test_curves_peak_is_10_times_below_one_dense_batch():
    done = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["tokens"] == TOKENS and 0.0 < result["last"] <= 1.0
    assert result["peak_extra_mb"] < DENSE_MB / 10, (result, DENSE_MB)
