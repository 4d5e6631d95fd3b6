"""The page's and the API's handlers called directly, and what they stand on: the workspace, the cache, the model
store (public mode, a copy per precision) and the checks on every field."""
import math
import threading
import time
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import torch
from PIL import Image

import app
from explorer.cache import ByteCache
from explorer.inputs import DEFAULTS, FIELDS, UserError, head_choice, layer_index, number, uploaded_file
from server.api import Api
from server.model_store import PUBLIC_REFUSAL, ModelStore
from server.handlers import open_upload, paced
from server.page import ANALYSIS_OUTPUTS, STALE_OUTPUTS, VIEW_OUTPUTS, Page
from server.settings import Settings
from server.workspace import View
from tests.helpers import random_image, tiny_loaded

ROOT = Path(__file__).resolve().parents[1]
PUBLIC = Settings(public=True)


def controls(**changes) -> list:
    """The page's controls in the order it sends them (layer 2: the tiny model's last)."""
    values = DEFAULTS | {"layer": 2} | changes
    return [values[name] for name in FIELDS]


def analyze(page: Page, image, resolution: int = 224) -> tuple:
    return page.analyze(image, resolution, "default", "float32", *controls())


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return app.workspace_for(tiny_loaded(), "cpu")


@pytest.fixture
def upload(workspace, tmp_path_factory):
    """An image saved where Gradio keeps uploads, as the file object a client sends."""
    def make(image: Image.Image, name: str = "photo.png") -> dict:
        folder = Path(workspace.upload_roots[0]) / f"test-{time.time_ns()}"
        folder.mkdir(parents=True)
        image.save(folder / name)
        return {"path": str(folder / name), "meta": {"_type": "gradio.FileData"}}
    return make


def test_analyze_then_render_each_tab(workspace, upload):
    page = Page(workspace)
    out = dict(zip(ANALYSIS_OUTPUTS, analyze(page, upload(random_image(45, 70)))))
    view = out["view"]
    assert isinstance(view, View) and "grid 18×28" in out["status"] and "analysed in" in out["status"]
    assert out["main"].width <= 640  # the class-token map comes with the analysis, at page size
    stale = dict(zip(STALE_OUTPUTS, page.clear_stale()))  # what follows every analysis
    after = {**stale, **out}
    cleared = [after[name] is None or after[name] == gr.update(value=None, visible=False)
               for name in (*VIEW_OUTPUTS, "flow", "gif", "gif_file", "export_files") if name != "main"]
    assert all(cleared)  # everything else drawn from a previous image is cleared, by one or the other
    assert not set(stale) & set(out)  # and what the analysis sends is not cleared after it
    drawn = {"cls": {"main", "patch", "grid", "patch_caption"}, "rollout": {"rollout", "rollout_caption"},
             "heads": {"atlas", "chart", "scatter", "table"},
             "hidden": {"norms", "pca", "similarity", "hidden_caption"}}
    for tab, names in drawn.items():
        values = dict(zip(VIEW_OUTPUTS, page.render(view, tab, *controls())))
        drawn_now = {n for n, v in values.items() if isinstance(v, (Image.Image, str)) or "headers" in v}
        assert drawn_now == names, tab
        assert all(values[n] == {"__type__": "update"} for n in set(VIEW_OUTPUTS) - names), tab  # the rest: skipped
    main = dict(zip(VIEW_OUTPUTS, page.render(view, "cls", *controls())))["main"]
    assert main.width <= 640 and main.height > main.width * 45 / 70  # page size, with the colour bar below
    table = dict(zip(VIEW_OUTPUTS, page.render(view, "heads", *controls())))["table"]
    assert table["headers"][:3] == ["Layer", "Head", "CLS entropy, whole row (nats)"] and len(table["data"]) == 12


def test_exact_statistics_come_from_the_kept_inputs_without_a_new_forward(workspace, upload, monkeypatch):
    page = Page(workspace)
    view = analyze(page, upload(random_image(150, 220, seed=5)))[0]
    analysis = workspace.analysis(view.key, view.source)
    monkeypatch.setattr("server.workspace.analyze", lambda *a, **k: pytest.fail("a new forward"))
    page.prepare_tab(view, "heads", *controls(stat_mode="all"))
    table = dict(zip(VIEW_OUTPUTS, page.render(view, "heads", *controls(stat_mode="all"))))["table"]
    spread = dict(zip(VIEW_OUTPUTS, page.render(view, "heads", *controls())))["table"]
    assert analysis.statistics_for(None).num_queries == 19 * 28 > 512 == analysis.statistics.num_queries
    assert table["data"] != spread["data"]


def test_a_click_moves_the_patch_everywhere(workspace, upload):
    page = Page(workspace)
    view = analyze(page, upload(random_image(45, 70, seed=3)))[0]
    scene = workspace.scene(view.source, digest=view.key.digest)
    event = gr.SelectData(None, {"index": [scene.page.width * 0.9, scene.page.height * 0.1], "value": None})
    clicked = page.click(view, event)
    assert clicked.point == pytest.approx((70 * 0.9, 45 * 0.1), rel=0.02)  # in the upload's own pixels
    caption = dict(zip(VIEW_OUTPUTS, page.render(clicked, "cls", *controls())))["patch_caption"]
    assert "row 1, column 25" in caption
    on_colour_bar = gr.SelectData(None, {"index": [5, scene.page.height + 5], "value": None})
    assert isinstance(page.click(clicked, on_colour_bar), dict)  # skipped: the view is unchanged


def test_a_failed_analysis_is_a_message_not_an_error(workspace, upload, monkeypatch):
    page = Page(workspace)
    warnings = []
    monkeypatch.setattr(gr, "Warning", lambda message, **kwargs: warnings.append(message))
    out = dict(zip(ANALYSIS_OUTPUTS, analyze(page, upload(Image.new("RGB", (4, 40))))))
    assert "Could not analyse this image" in out["status"] and out["view"] is None
    assert warnings and "at least one patch" in warnings[0]
    assert "layer" not in {k for k, v in out.items() if v is not None and not isinstance(v, dict)}


def test_the_flow_offer_names_the_largest_resolution_that_works(workspace, upload):
    page = Page(workspace)
    out = dict(zip(ANALYSIS_OUTPUTS, analyze(page, upload(random_image(300, 451)), 518)))
    assert "largest resolution that works for it is" in out["flow_note"]  # patch 8: 65 × 43 patches at 518 px
    assert out["flow_button"]["visible"] is False


def test_downloads_carry_the_settings_and_the_view(workspace, upload):
    import json
    page = Page(workspace)
    view = analyze(page, upload(random_image(40, 40)))[0]
    files = page.download(view, "rollout", *controls(fusion="max", discard=0.5, mass_on=True, mass=0.4))["value"]
    sidecar = json.loads(Path(files[1]).read_text())
    assert sidecar["settings"] | {"tab": "rollout", "fusion": "max", "discard_ratio": 0.5, "mass_fraction": 0.4} \
        == sidecar["settings"]
    assert sidecar["rollout_discard_ratio"] == 0.5 and Path(files[2]).name == "current_view.png"


@pytest.mark.parametrize("field, value, message", [
    ("layer", "abc", "layer must be a whole number from -3 to 2"),
    ("opacity", math.nan, "opacity must be a number from 0 to 1, got nan"),
    ("cmap", "flag", "colormap must be one of"),
    ("mass", math.inf, "mass fraction must be a number from 0.05 to 1, got inf"),
    ("smooth", "yes", "smooth must be true or false"),
    ("statistic", "__class__", "statistic must be one of"),
])
def test_page_controls_are_checked(workspace, upload, field, value, message):
    page = Page(workspace)
    view = analyze(page, upload(random_image(40, 40)))[0]
    with pytest.raises(gr.Error, match=message):
        page.render(view, "cls", *controls(**{field: value, "mass_on": True}))


def test_inputs_refuse_hostile_values():
    for value in (True, None, [], "1e400", "nan", float("inf"), "12abc"):
        with pytest.raises(UserError):
            number(value, "x", 0, 10)
    assert number(" 3.5 ", "x", 0, 10) == 3.5 and layer_index(-1, 12) == 11 and layer_index("3", 12) == 3
    assert head_choice(" MEAN ", 6, ("mean", "max", "min")) == "mean" and head_choice("5", 6, ("mean",)) == 5
    for value in (6, -1, 2.0, True, "head 1"):
        with pytest.raises(UserError):
            head_choice(value, 6, ("mean",))
    roots = [ROOT / "assets"]
    assert uploaded_file({"path": str(ROOT / "assets" / "chelsea.png"), "meta": {"_type": "gradio.FileData"}},
                         "image", roots).name == "chelsea.png"
    refusals = set()
    for path in (ROOT / "assets" / "nope.png", ROOT / "README.md", ROOT / "assets" / ".." / "README.md"):
        with pytest.raises(UserError) as refused:
            uploaded_file({"path": str(path), "meta": {"_type": "gradio.FileData"}}, "image", roots)
        refusals.add(str(refused.value))
    assert len(refusals) == 1  # the same words whether or not the file exists
    for path in ("/x/" + "a/../" * 200_000, "assets/a\0.png", "assets/\ud800.png", ["chelsea.png"], 7, ""):
        start = time.perf_counter()
        with pytest.raises(UserError, match="image: send an image file as an upload"):
            uploaded_file({"path": path, "meta": {"_type": "gradio.FileData"}}, "image", roots)
        assert time.perf_counter() - start < 0.1  # refused before realpath, which took ~8 s for the first one


def test_paced_progress_passes_the_first_call_then_one_an_interval():
    sent, now = [], [0.0]
    report = paced(lambda fraction, desc=None: sent.append((fraction, desc)), "rollout", every=0.5,
                   clock=lambda: now[0])
    for step in range(10):  # a burst within the interval: only its first call goes through
        now[0] = step * 0.04
        report(step / 10)
    now[0] = 0.5
    report(0.95)
    for when, fraction in ((0.7, 0.97), (1.0, 1.0)):
        now[0] = when
        report(fraction, "other")
    assert sent == [(0.0, "rollout"), (0.95, "rollout"), (1.0, "other")]


class Item:
    def __init__(self, nbytes: int):
        self.nbytes = nbytes


def test_identical_concurrent_requests_compute_once():
    cache, calls = ByteCache(10**9), []

    def slow():
        calls.append(1)
        time.sleep(0.3)
        return Item(10)

    results = []
    threads = [threading.Thread(target=lambda: results.append(cache.get_or_compute(("a", 1), slow)))
               for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and len({id(r) for r in results}) == 1


def test_the_cache_keeps_to_its_budgets_and_its_pins():
    evicted = []
    cache = ByteCache(100, {"layer": 30}, on_evict=evicted.append)
    cache.put(("model", "pinned"), Item(40), pin=True)
    for i in range(5):
        cache.put(("analysis", i), Item(30))
    assert cache.get(("analysis", 3)) is not None  # recently used: kept before 4
    assert cache.keys() == [("model", "pinned"), ("analysis", 4), ("analysis", 3)] and cache.bytes_of() == 100
    assert evicted == [("analysis", i) for i in range(3)]  # least recently used first
    cache.put(("layer", 0), Item(20))  # over the budget: the least recently used analysis goes
    cache.put(("layer", 1), Item(20))  # over the layers' own budget: the older layer goes, not an analysis
    assert cache.keys() == [("model", "pinned"), ("analysis", 3), ("layer", 1)] and cache.bytes_of("layer") == 20
    cache.put(("analysis", "big"), Item(500))  # the newest is kept even alone over the budget
    assert cache.keys() == [("model", "pinned"), ("analysis", "big")]


def test_a_model_asked_for_by_two_threads_at_once_is_loaded_once(monkeypatch):
    loads = []

    def slow_load(source, device=None, **caps):
        loads.append(source)
        time.sleep(0.3)
        return tiny_loaded()

    monkeypatch.setattr("server.model_store.load_model", slow_load)
    store = ModelStore(ByteCache(10**9), Settings(), tiny_loaded(), device="cpu")
    got = []
    threads = [threading.Thread(target=lambda: got.append(store.get("some/model"))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert loads == ["some/model"] and len({id(m) for m in got}) == 1


def test_a_model_dropped_for_room_takes_its_analyses_along(tmp_path, upload):
    from transformers import CLIPVisionConfig, CLIPVisionModel
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8)
    for name in ("a", "b"):
        CLIPVisionModel(config).save_pretrained(tmp_path / name)
    workspace = app.workspace_for(tiny_loaded(), "cpu")
    api = Api(workspace)
    image = upload(random_image(40, 40))
    api.cls_attention(image, model=str(tmp_path / "a"), resolution=224)
    assert [key[1].model for key in workspace.cache.keys("analysis")] == [str(tmp_path / "a")]
    workspace.cache.max_bytes = workspace.cache.bytes_of() + 1000  # no room for another model beside it
    api.cls_attention(image, model=str(tmp_path / "b"), resolution=224)  # no room for both: "a" goes, with its analysis
    assert [key[1] for key in workspace.cache.keys("model")] == ["default", str(tmp_path / "b")]
    assert [key[1].model for key in workspace.cache.keys("analysis")] == [str(tmp_path / "b")]


def test_the_page_opens_with_sliders_sized_for_its_model():
    demo = app.build_demo(tiny_loaded(num_hidden_layers=5, num_attention_heads=2), device="cpu")
    by_id = {block.elem_id: block for block in demo.blocks.values() if getattr(block, "elem_id", None)}
    assert (by_id["layer"].maximum, by_id["layer"].value) == (4, 4)
    assert [value for _, value in by_id["head"].choices] == ["mean", "max", "min", "0", "1"]


def test_public_mode_gives_one_answer_for_every_local_path(tmp_path):
    store = ModelStore(ByteCache(10**9), PUBLIC, tiny_loaded(), device="cpu")
    (tmp_path / "weights").mkdir()
    for path in (str(tmp_path / "weights"), str(tmp_path / "missing"), "/etc/passwd", "../../x", "~"):
        with pytest.raises(UserError) as refused:
            store.get(path)
        assert str(refused.value) == PUBLIC_REFUSAL
    local = ModelStore(ByteCache(10**9), Settings(), tiny_loaded(), device="cpu")
    with pytest.raises(Exception) as missing:
        local.get(str(tmp_path / "missing"))
    assert "no such file or folder" in str(missing.value)  # on one's own machine, local folders are read


def test_public_mode_takes_a_hub_id_only_from_the_hub(monkeypatch, tmp_path):
    """A hub-shaped id that is also a local path (here: the examples folder) is never read from disk."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    store = ModelStore(ByteCache(10**9), PUBLIC, tiny_loaded(), device="cpu")
    monkeypatch.chdir(ROOT)
    with pytest.raises(Exception) as refused:
        store.get("assets/chelsea.png")
    assert "hub" in str(refused.value) and "not a readable" not in str(refused.value)


def test_half_precision_uses_a_copy_and_never_changes_the_shared_weights(workspace, upload):
    store = ModelStore(ByteCache(10**9), Settings(), tiny_loaded(), device="cpu")
    base = store.get("default")
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    half = store.get("default", "bfloat16")
    assert half.model is not base.model and next(half.model.parameters()).dtype == torch.bfloat16
    from analysis import analyze
    analyze(half, random_image(40, 40), 224, "bfloat16")
    for name, value in base.model.state_dict().items():
        assert value.dtype == torch.float32 and torch.equal(value, before[name]), name
    assert store.get("default", "bfloat16") is half  # made once


def test_half_precision_is_refused_on_a_cpu_server(workspace, upload):
    with pytest.raises(UserError, match="offered on a GPU only"):
        open_upload(workspace, upload(random_image(40, 40)), 224, dtype="float16")


def test_the_zero_gpu_path_returns_tensors_only_and_rebuilds_with_the_callers_weights(monkeypatch, upload):
    """As on ZeroGPU, where the forward runs in a lent GPU's process: simulated here with that 'GPU' on the CPU."""
    from server import gpu, workspace as workspace_module
    workspace = app.workspace_for(tiny_loaded(), "cpu")
    image = upload(random_image(45, 70, seed=9))
    expected = open_upload(workspace, image, 224).analysis
    monkeypatch.setattr(gpu, "GPU_DEVICE", "cpu")
    monkeypatch.setattr(workspace_module, "on_zero_gpu", lambda: True)
    crossed = []

    def lease(*args):
        result = gpu.analyze_on_gpu(*args)
        crossed.append(result.record.layers)
        return result

    monkeypatch.setattr(workspace_module, "GPU_ANALYZE", lease)
    workspace.cache.clear()
    got = open_upload(workspace, image, 224).analysis
    assert crossed == [None]  # only tensors come back from the lease
    assert got.record.layers is workspace.models.get("default").model.encoder.layers
    token = got.token_at(3, 4)
    np.testing.assert_allclose(got.query_map(token, 1, "mean", "column"),
                               expected.query_map(token, 1, "mean", "column"), atol=1e-6)
    np.testing.assert_allclose(got.cls_attention, expected.cls_attention, atol=1e-6)
    from types import SimpleNamespace

    from model import IdeficsVisionConfig, Preprocessing
    vit_h = SimpleNamespace(config=IdeficsVisionConfig(hidden_size=1280, num_attention_heads=16, num_hidden_layers=32,
                                                       patch_size=14), preprocessing=Preprocessing(14))
    leases = [gpu.lease_seconds(vit_h, Image.new("RGB", (side, side)), side) for side in (224, 1022, 2044)]
    assert leases[0] == gpu.GPU_SECONDS[0] <= leases[1] < leases[2] <= gpu.GPU_SECONDS[1]


@pytest.mark.parametrize("family", ["siglip", "idefics2", "deit"])
def test_models_without_a_class_token_say_what_stands_in_for_it(family, upload):
    import json
    overrides = {"siglip": dict(class_token=False, pooling_head=True), "idefics2": dict(class_token=False),
                 "deit": dict(distillation_token=True)}[family]
    workspace = app.workspace_for(tiny_loaded(**overrides), "cpu")
    page, api = Page(workspace), Api(workspace)
    image = upload(random_image(45, 70, seed=4))
    out = dict(zip(ANALYSIS_OUTPUTS, analyze(page, image)))
    summary = workspace.analysis(out["view"].key, out["view"].source).summary
    assert out["summary"] == summary.description
    drawn = dict(zip(VIEW_OUTPUTS, page.render(out["view"], "cls", *controls())))
    assert isinstance(drawn["second"], Image.Image) == (family in ("siglip", "deit"))  # the probe's or distillation map
    table = dict(zip(VIEW_OUTPUTS, page.render(out["view"], "heads", *controls())))["table"]
    attention_to_cls = [row[-1] for row in table["data"]]
    assert (set(attention_to_cls) == {"n/a"}) == (family != "deit")
    _, _, maps = api.cls_attention(image, resolution=224)
    assert maps["summary"]["kind"] == summary.kind and ("cls_self_attention" in maps) == (family == "deit")
    assert ("pooling_maps" in maps) == (family == "siglip")
    stats = api.head_statistics(image, 224)
    assert json.dumps(stats, allow_nan=False) and stats["summary"]["kind"] == summary.kind
    files = page.download(out["view"], "cls", *controls())["value"]
    sidecar = json.loads(Path(files[1]).read_text())
    assert sidecar["summary"]["description"] == summary.description
    assert ("pooling_attention" in sidecar["arrays"]) == (family == "siglip")


def test_public_mode_refuses_a_tower_over_the_cap_before_any_weight_is_fetched(tmp_path, monkeypatch):
    import huggingface_hub.constants
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from model import CheckpointError
    from tests.fake_hub import FakeHub
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8)
    CLIPVisionModel(config).save_pretrained(tmp_path / "repo")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    with FakeHub({"someone/tiny-clip": tmp_path / "repo"}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        capped = ModelStore(ByteCache(10**9), Settings(public=True, max_params=10_000), tiny_loaded(), device="cpu")
        with pytest.raises(CheckpointError, match="more than the 10 thousand this server accepts") as refused:
            capped.get("someone/tiny-clip")
        assert hub.fetched(".safetensors") == [] and str(tmp_path) not in str(refused.value)
        loaded = ModelStore(ByteCache(10**9), PUBLIC, tiny_loaded(), device="cpu").get("someone/tiny-clip")
        assert loaded.config.num_hidden_layers == 2 and hub.fetched(".safetensors") == ["model.safetensors"]


def test_settings_are_read_from_their_environment_variables_once():
    env = {"SPACE_ID": "someone/space", "VIT_INSPECT_CACHE_MB": "256", "VIT_INSPECT_REBUILD_CACHE_MB": "32",
           "VIT_INSPECT_MAX_DOWNLOAD_MB": "100", "VIT_INSPECT_CONCURRENCY": "3", "GRADIO_TEMP_DIR": "/srv/managed"}
    settings = Settings.from_env(env)
    assert settings.public  # on a Space unless VIT_INSPECT_PUBLIC says otherwise
    assert (settings.cache_bytes, settings.rebuild_cache_bytes, settings.max_download_bytes) == (
        256 * 2**20, 32 * 2**20, 100 * 2**20)
    assert settings.concurrency == 3 and str(settings.temp_dir) == "/srv/managed"
    assert not Settings.from_env({**env, "VIT_INSPECT_PUBLIC": "0"}).public
    assert Settings.from_env({}) == Settings()
