"""vit-inspect: see what every head of a vision transformer attends to, at any resolution.

Gradio wiring only: the page's layout and which event calls what. The events live in `server` (`server.page` for
the page, `server.api` for the named endpoints, both calling `server.handlers`), the maths in `analysis`, the network
in `model`.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import gradio as gr
from gradio.events import Dependency
from starlette.middleware import Middleware

import visualizer
from analysis import FUSIONS, METHODS, STAT_LABELS
from explorer import drawing
from explorer.inputs import (ANIMATIONS, DEFAULT_LABELS, DEFAULT_RESOLUTION, DEFAULT_TEMPLATE, DIRECTIONS, FIELDS,
                             NORMALIZATIONS, ORDERS, PRECISIONS, STAT_MODES, resolution_limits)
from model import LoadedModel
from server.api import Api
from server.dataset import DATASET_OUTPUTS, DRAWN as DATASET_DRAWN, DatasetEvents
from server.files import FileStore
from server.gpu import on_zero_gpu
from server.guard import EventShape, RequestGuard
from server.handlers import METHOD_LABELS, STAT_COLUMNS, faithfulness_definition, stat_definitions
from server.model_store import DEFAULT, WELL_KNOWN
from server.page import ANALYSIS_OUTPUTS, STALE_OUTPUTS, TAB_LABELS, VIEW_OUTPUTS, Page
from server.page_script import PageScript
from server.settings import MB, Settings
from server.workspace import Workspace

logger = logging.getLogger("vit-inspect")
Components = dict[str, gr.components.Component | gr.State | gr.Tabs]  # the page's parts by name
ASSETS = Path(__file__).resolve().parent / "assets"
EXAMPLES = [str(ASSETS / name) for name in ("chelsea.png", "astronaut.png", "coffee.png", "rocket.jpg")]
# How often Gradio's queue looks for a free worker while none is free or nothing waits: its default, every 1 ms,
# keeps the idle server above 4 % of a core (tests/test_served_app.py), taken from the analyses on a 2-core CPU;
# 10 ms adds at most that to an event's start.
QUEUE_POLL_S = 0.01
INTRO = """# vit-inspect
See what each **head** of each **layer** of a vision transformer attends to, at any resolution. The model runs
once per image; every control redraws from that one pass. **Click a map** to pick a patch and see what it attends to."""
CSS = """
.view img { object-fit: contain }
#examples .gallery { flex-wrap: nowrap }
#examples .gallery-item { flex: 1 1 0; min-width: 0 }
#examples .gallery-item img { max-height: 64px; width: 100%; object-fit: cover }
@media (max-width: 640px) {
  .tab-container button { padding-left: 3px !important; padding-right: 3px !important; font-size: 12px !important }
  #image-input { height: 200px !important }
}
"""
ENTER_APPLIES_RESOLUTION = """() => {
  document.addEventListener('keydown', (event) => {
    if (event.key === 'Enter' && event.target.matches && event.target.matches('#resolution input[type=number]')) {
      document.querySelector('#resolution-apply')?.click();
    }
  });
}"""

# Run in the browser before the request that follows an analysis: resolves once the first map it sent has loaded (at
# once if it is in a hidden tab, after 2 s at most), so the browser fetches and shows that map before it handles the
# rest of the tab's events.
AFTER_FIRST_MAP = """() => new Promise((resolve) => setTimeout(() => {  // after the outputs' DOM updates
  const img = document.querySelector('#cls-view img');
  if (!img || !img.checkVisibility() || (img.complete && img.naturalWidth)) return resolve([]);
  const done = () => resolve([]);
  img.addEventListener('load', done, {once: true});
  img.addEventListener('error', done, {once: true});
  setTimeout(done, 2000);
}, 0))"""


def workspace_for(loaded: LoadedModel | None, device: str | None = None, settings: Settings | None = None) -> Workspace:
    """The shared workspace; `loaded` replaces the embedded default model (tests pass a tiny one)."""
    settings = settings or Settings.from_env()
    os.environ["GRADIO_TEMP_DIR"] = str(settings.temp_dir)  # Gradio's uploads and cache: our managed folder
    device = device or ("cpu" if on_zero_gpu() else None)  # on ZeroGPU, models live on the CPU between leases
    root = Path(gr.utils.get_upload_folder())
    return Workspace(settings, FileStore(root, settings.disk_bytes, settings.file_age_s), [root, ASSETS], loaded,
                     device)


def launch_options(demo: gr.Blocks, workspace: Workspace) -> dict:
    """What `launch()` needs besides host and port: upload cap, request guard, page scripts and style."""
    file_inputs = {index: [i for i, block in enumerate(fn.inputs) if isinstance(block, (gr.Image, gr.File))]
                   for index, fn in demo.fns.items()}
    shapes = {index: EventShape(len(fn.inputs), _examples(fn.inputs), any(event == "select" for _, event in fn.targets))
              for index, fn in demo.fns.items()}
    guard = Middleware(RequestGuard, roots=[gr.utils.get_upload_folder(), ASSETS], file_inputs=file_inputs,
                       shapes=shapes, files=workspace.files)
    middleware = [guard, Middleware(PageScript)]  # PageScript: the status trackers' timers (server.page_script)
    return dict(max_file_size=workspace.settings.max_file_size, app_kwargs={"middleware": middleware},
                js=ENTER_APPLIES_RESOLUTION, css=CSS, show_error=False, allowed_paths=[], footer_links=["api"])


def _examples(inputs: list) -> int | None:
    """How many examples an examples gallery's click may name (None: not such a click)."""
    return len(inputs[0].samples) if len(inputs) == 1 and isinstance(inputs[0], gr.Dataset) else None


def build_demo(loaded: LoadedModel | None = None, device: str | None = None, workspace: Workspace | None = None,
               queue_size: int | None = None) -> gr.Blocks:
    """The page and its API; `loaded` replaces the embedded default model (tests pass a tiny one, or a whole
    `workspace` to look into)."""
    gr.set_static_paths([ASSETS])  # the examples are served from where they are, never copied
    workspace = workspace or workspace_for(loaded, device)
    page, api = Page(workspace), Api(workspace)
    config = workspace.models.get(DEFAULT).config  # load (and convert, the first time) at start-up
    page.warm(EXAMPLES[0], DEFAULT_RESOLUTION)  # the arrival image, analysed once and kept
    with gr.Blocks(title="vit-inspect", delete_cache=(600, workspace.settings.file_age_s)) as demo:
        gr.Markdown(INTRO)
        c: Components = {"view": gr.State(None), "model_key": gr.State(DEFAULT), "dataset": gr.State(None),
                         # the open view tab, set in the browser as a tab is clicked (see _wire)
                         "tab": gr.Textbox("cls", visible="hidden", elem_id="open-tab")}
        with gr.Tabs(elem_id="page-tabs") as c["page_tabs"]:
            with gr.Tab("One image", id="image", elem_id="image-tab"):
                with gr.Row(equal_height=False):
                    with gr.Column(scale=1, min_width=300):
                        _input_column(c)
                    with gr.Column(scale=3, min_width=320):
                        _controls(c, config.patch_size, config.num_hidden_layers, config.num_attention_heads)
                        _tabs(c)
                        with gr.Row():
                            c["export_button"] = gr.Button("Download this view (.png) and its numbers (.npz + .json)",
                                                           elem_id="export", scale=2)
                            c["export_files"] = gr.File(label="Downloads", file_count="multiple",
                                                        elem_id="export-files", scale=3, visible=False)
                with gr.Row():
                    _settings(c, workspace)
            with gr.Tab("Dataset", id="dataset", elem_id="dataset-tab"):
                _dataset_tab(c, workspace, config.patch_size)
        _wire(demo, c, page, DatasetEvents(workspace))
        api.register()
    demo.queue(max_size=queue_size or workspace.settings.queue_size,
               default_concurrency_limit=workspace.device_slots)
    demo._queue.sleep_when_free = QUEUE_POLL_S
    return demo


def _input_column(c: Components) -> None:
    c["image_in"] = gr.Image(EXAMPLES[0], label="Image (upload, paste or webcam)", type="filepath",
                             sources=["upload", "clipboard", "webcam"], height=240, elem_id="image-input")
    gr.Examples(EXAMPLES, inputs=[c["image_in"]], label="Examples (public domain / CC0): click to analyse",
                elem_id="examples")
    c["status"] = gr.Markdown(elem_id="status")
    c["apply_resolution"] = gr.Button("Apply resolution", visible="hidden", elem_id="resolution-apply")


def _controls(c: Components, patch_size: int, num_layers: int, num_heads: int) -> None:
    """The controls every tab shares, sized for the model the page opens with."""
    low, high = resolution_limits(patch_size)
    with gr.Row():
        c["resolution"] = gr.Slider(low, high, DEFAULT_RESOLUTION, step=patch_size, elem_id="resolution",
                                    label="Resolution, long side (px): release, or type + Enter", min_width=200)
        c["layer"] = gr.Slider(0, num_layers - 1, num_layers - 1, step=1, label="Layer", elem_id="layer",
                               min_width=160)
        c["head"] = gr.Dropdown(drawing.head_choices(num_heads), value="mean", label="Head (or fusion of heads)",
                                elem_id="head", min_width=120)
        c["cmap"] = gr.Dropdown(visualizer.available_colormaps(), value="inferno", label="Colormap",
                                elem_id="cmap", min_width=120)
        c["opacity"] = gr.Slider(0, 1, 0.6, step=0.05, label="Opacity", elem_id="opacity", min_width=140)


def _tabs(c: Components) -> None:
    with gr.Tabs():
        with gr.Tab(TAB_LABELS["cls"], id="cls") as c["cls_tab"]:
            _class_token_tab(c)
        with gr.Tab(TAB_LABELS["explain"], id="explain") as c["explain_tab"]:
            _explain_tab(c)
        with gr.Tab(TAB_LABELS["rollout"], id="rollout") as c["rollout_tab"]:
            with gr.Row():
                c["fusion"] = gr.Radio(list(FUSIONS), value="mean", label="Head fusion", elem_id="rollout-fusion")
                c["discard"] = gr.Slider(0, 0.95, 0, step=0.05, label="Discard ratio", elem_id="rollout-discard",
                                         info="drops the weakest links of each layer")
            c["rollout_caption"] = gr.Markdown(elem_id="rollout-caption")
            c["rollout"] = _view("Rollout", "rollout-view")
            c["flow_note"] = gr.Markdown(elem_id="flow-note")
            c["flow_button"] = gr.Button("Compute attention flow", visible=False, elem_id="flow-button")
            c["flow"] = _view("Attention flow", "flow-view", visible=False)
        with gr.Tab(TAB_LABELS["heads"], id="heads") as c["heads_tab"]:
            _heads_tab(c)
        with gr.Tab(TAB_LABELS["hidden"], id="hidden") as c["hidden_tab"]:
            c["hidden_caption"] = gr.Markdown(elem_id="hidden-caption")
            with gr.Row():
                c["norms"] = _view("Token norms", "norm-view")
                c["pca"] = _view("PCA → RGB", "pca-view")
                c["similarity"] = _view("Similarity to the clicked patch", "similarity-view")
        with gr.Tab(TAB_LABELS["animation"], id="animation") as c["animation_tab"]:
            shown = ("class-token map of the head", "rollout up to each layer")
            c["anim_mode"] = gr.Radio(list(zip(shown, ANIMATIONS)), value="cls", label="Animate through the layers")
            c["anim_button"] = gr.Button("Make GIF")
            c["gif"] = gr.Image(label="Layer animation", interactive=False, format="gif", show_label=False,
                                buttons=[], elem_id="gif")
            c["gif_file"] = gr.File(label="GIF download")


def _explain_tab(c: Components) -> None:
    """Which patches made the model's output: its prediction, a target and a method, the map and all four maps."""
    c["prediction"] = gr.Markdown(elem_id="explain-prediction")
    c["saliency"] = _view("The model's own prediction", "saliency-view", visible=False)
    _prompts(c)
    with gr.Row():
        c["target"] = gr.Dropdown([("the model's top output", "top")], value="top", label="Explain",
                                  elem_id="explain-target", min_width=240)
        c["method"] = gr.Radio([(METHOD_LABELS[m], m) for m in METHODS], value="relevance", label="Method",
                               elem_id="explain-method")
    c["explain_caption"] = gr.Markdown(elem_id="explain-caption")
    c["explanation"] = _view("Relevance", "explain-view")
    c["explain_strip"] = _view("Every method for this target", "explain-strip")
    _faithfulness(c)


def _faithfulness(c: Components) -> None:
    """Which map to trust: every map's perturbation curves for the target above, and a verdict."""
    gr.Markdown("### Which map can you trust?")
    with gr.Row():
        c["removal"] = gr.Radio([("drop the patches' tokens", "drop"), ("black out their pixels", "pixels")],
                                value="drop", label="Remove a patch by", elem_id="faithfulness-removal", scale=2)
        c["score_button"] = gr.Button("Score every map by perturbation", elem_id="faithfulness-button", scale=1)
    c["faithfulness_caption"] = gr.Markdown(elem_id="faithfulness-caption")
    c["faithfulness_plot"] = gr.Image(label="Perturbation curves", show_label=False, interactive=False, format="png",
                                      elem_id="faithfulness-plot", buttons=[], visible=False)
    with gr.Accordion("How the curves are made", open=False):
        gr.Markdown(faithfulness_definition())


def _prompts(c: Components) -> None:
    """An image-text model's prompts (shown only for CLIP, SigLIP and open_clip): labels through a template, their
    zero-shot scores, and one map per prompt; each prompt is offered as a target."""
    with gr.Column(visible=False, elem_id="prompts") as c["prompts_box"]:
        with gr.Row():
            c["template"] = gr.Textbox(DEFAULT_TEMPLATE, label="Prompt template ({} is the label)", max_lines=1,
                                       elem_id="prompt-template", min_width=200)
            c["labels"] = gr.Textbox(DEFAULT_LABELS, label="Labels, one per line (at most 32)", lines=3,
                                     elem_id="prompt-labels", min_width=200)
        c["prompt_button"] = gr.Button("Score these prompts", elem_id="prompt-button")
        c["zero_shot"] = gr.Markdown(elem_id="zero-shot")
        c["prompt_strip"] = _view("One map per prompt", "prompt-strip")


def _class_token_tab(c: Components) -> None:
    c["summary"] = gr.Markdown(elem_id="summary")
    with gr.Row(equal_height=False):
        c["main"] = _view("Class-token attention (click a patch)", "cls-view")
        with gr.Column(min_width=240):
            c["patch"] = _view("Attention of the clicked patch", "patch-view")
            c["direction"] = gr.Radio(list(zip(("what it attends to", "what attends to it"), DIRECTIONS)),
                                      value="row", show_label=False, elem_id="direction")
    c["patch_caption"] = gr.Markdown(elem_id="patch-info")
    with gr.Row():
        c["mass_on"] = gr.Checkbox(False, label="Show only the patches holding", min_width=120, elem_id="mass-on")
        c["mass"] = gr.Slider(0.05, 1, 0.6, step=0.05, label="of the attention mass (DINO)", min_width=160)
    c["second"] = _view("The model's other summary", "second-view", visible=False)
    c["grid"] = _view("Every head of this layer", "head-grid")


def _heads_tab(c: Components) -> None:
    gr.Markdown("Every layer (rows) × head (columns). Click a thumbnail or a table row to select that head everywhere.")
    c["atlas_shared"] = gr.Checkbox(False, label="One scale for every thumbnail")
    c["atlas"] = _view("Atlas", "atlas")
    c["statistic"] = gr.Dropdown([(STAT_COLUMNS[name], name) for name in STAT_LABELS],
                                 value="mean_distance_px", label="Statistic")
    c["chart"] = _view("Statistic per layer × head", "chart")
    c["scatter"] = _view("Mean attention distance against depth (Dosovitskiy et al. 2021, fig. 7)", "distance-figure")
    c["table"] = gr.Dataframe(label="Head statistics (click a row; sortable)", interactive=False, elem_id="stats-table",
                              max_height=360, wrap=True, column_widths=["70px", "70px"])
    with gr.Accordion("What each statistic is", open=False):
        gr.Markdown(stat_definitions())


def _dataset_tab(c: Components, workspace: Workspace, patch_size: int) -> None:
    """An atlas over many images: a folder the atlas command wrote (outside public mode), or a zip analysed here."""
    public, caps = workspace.settings.public, workspace.settings.zip_caps
    gr.Markdown("The head statistics of many images, with their mean and 95 % interval over the images. "
                + ("" if public else "Open an atlas written by `python -m explorer atlas SOURCE --out DIR`, or ")
                + f"{'U' if public else 'u'}pload a zip of at most {caps.max_images} images (at most "
                f"{caps.max_bytes / MB:g} MB) to analyse them here with the model of the *One image* tab.")
    with gr.Row(equal_height=False):
        with gr.Column(scale=2, min_width=300, visible=not public):
            c["dataset_path"] = gr.Textbox(label="Atlas folder on this server", placeholder="atlas/",
                                           elem_id="dataset-path", visible=not public)
            c["dataset_open"] = gr.Button("Open atlas", elem_id="dataset-open", visible=not public)
        with gr.Column(scale=2, min_width=300):
            c["dataset_zip"] = gr.File(label=f"Zip of at most {caps.max_images} images", file_types=[".zip"],
                                       elem_id="dataset-zip", height=120)
            low, high = resolution_limits(patch_size)
            c["dataset_resolution"] = gr.Slider(low, high, low, step=patch_size, elem_id="dataset-resolution",
                                                label="Resolution for the zip's images, long side (px)")
    c["dataset_status"] = gr.Markdown(elem_id="dataset-status")
    with gr.Row():
        c["dataset_statistic"] = gr.Dropdown([(STAT_COLUMNS[name], name) for name in STAT_LABELS],
                                             value="cls_patch_entropy", label="Statistic", elem_id="dataset-statistic")
        c["dataset_layer"] = gr.Slider(0, 1, 1, step=1, label="Layer", elem_id="dataset-layer")
        c["dataset_head"] = gr.Dropdown(["0"], value="0", label="Head", elem_id="dataset-head")
        c["dataset_order"] = gr.Radio(list(ORDERS), value="ascending", label="Table order", elem_id="dataset-order")
    with gr.Row():
        c["dataset_chart"] = _view("The statistic's mean per layer × head", "dataset-chart")
        c["dataset_figure"] = _view("Mean attention distance against depth, with 95 % intervals (fig. 7)",
                                    "dataset-figure")
    c["dataset_caption"] = gr.Markdown(elem_id="dataset-caption")
    gallery = dict(columns=4, height=240, object_fit="contain", allow_preview=False, format="jpeg")
    with gr.Row():
        c["dataset_lowest"] = gr.Gallery(label="Lowest (click to open)", elem_id="dataset-lowest", **gallery)
        c["dataset_highest"] = gr.Gallery(label="Highest (click to open)", elem_id="dataset-highest", **gallery)
    c["dataset_table"] = gr.Dataframe(label="Every head: each statistic's mean and the half-width of its 95 % "
                                            "interval (click a row; sortable)", interactive=False,
                                      elem_id="dataset-table", max_height=360, wrap=True)


def _settings(c: Components, workspace: Workspace) -> None:
    with gr.Accordion("Model", open=False):
        c["model_choice"] = gr.Dropdown([DEFAULT, *WELL_KNOWN], value=DEFAULT, label="Model",
                                        info="'default' is DINOv2 ViT-S/14, embedded; others come from the hub.")
        local = "" if workspace.settings.public else " / local folder"
        c["model_custom"] = gr.Textbox(label=f"Or any hub id{local}", placeholder="org/name")
        c["load_button"] = gr.Button("Load model and analyse")
        c["model_status"] = gr.Markdown()
    with gr.Accordion("Advanced", open=False):
        c["stat_mode"] = gr.Radio(list(zip(("512 spread queries", "all queries (exact)"), STAT_MODES)),
                                  value="spread", label="Head statistics averaged over")
        c["dtype"] = gr.Radio(list(PRECISIONS), value="float32", label="Precision",
                              visible=workspace.models.device_type == "cuda")
        c["smooth"] = gr.Checkbox(True, label="Smooth maps (bilinear); off shows crisp patches")
        c["normalize"] = gr.Radio(list(NORMALIZATIONS), value="robust", label="Map scaling",
                                  info="robust: min to 99th percentile, so sink tokens don't hide the rest")


def _wire(demo: gr.Blocks, c: Components, page: Page, dataset: DatasetEvents) -> None:
    """Every event of the page: analyses and slow work in the "model" concurrency group, redraws in "render".

    Gradio's default trigger mode ("once") drops an event whose previous run is still pending, and that holds for the
    steps of a chain too: a second tab or map click while the first one's redraw runs would change the state but never
    draw it. So the steps that read the state when they start (an analysis, a tab's preparation, a redraw) run
    "always_last", and the events that carry what was clicked (which Gradio re-sends from the first event when it
    defers) run "multiple", one at a time in the "pick" group so that the last click wins. The open tab is set in the
    browser, in click order."""
    view, tab = c["view"], c["tab"]
    controls = [c[name] for name in FIELDS]
    private = {"api_visibility": "private", "preprocess": False}
    model = dict(concurrency_id="model", **private)
    last, each = {"trigger_mode": "always_last"}, {"trigger_mode": "multiple"}
    pick = dict(concurrency_id="pick", concurrency_limit=1, **each, **private)
    render = dict(fn=page.render, inputs=[view, tab, *controls], outputs=[c[n] for n in VIEW_OUTPUTS],
                  show_progress="hidden", concurrency_id="render", concurrency_limit=2, **last, **private)
    prepare = dict(fn=page.prepare_tab, inputs=[view, tab, *controls], outputs=None, **last, **model)
    analyze = dict(fn=page.analyze, inputs=[c["image_in"], c["resolution"], c["model_key"], c["dtype"], *controls],
                   outputs=[c[n] for n in ANALYSIS_OUTPUTS], show_progress_on=[c["status"]],
                   show_progress="minimal", **last, **model)  # the status's timer and progress, without a spinner
    stale = dict(fn=page.clear_stale, js=AFTER_FIRST_MAP, inputs=None, outputs=[c[n] for n in STALE_OUTPUTS],
                 queue=False, show_progress="hidden", **last, **private)

    def analysed(event: Dependency) -> None:
        """After an analysis: what belonged to the last image cleared, then the visible tab prepared and drawn."""
        event.then(**stale).then(**prepare).then(**render)

    analysed(gr.on([demo.load, c["image_in"].change, c["resolution"].release, c["apply_resolution"].click],
                   **analyze))  # a new image while one runs is not lost
    loaded = c["load_button"].click(page.switch_model, [c["model_choice"], c["model_custom"]],
                                    [c["model_key"], c["model_status"]], **model)
    analysed(loaded.success(**analyze))
    for name in TAB_LABELS:
        c[f"{name}_tab"].select(None, None, tab, js=f"() => {json.dumps(name)}", queue=False, **each,
                                **private).then(**prepare).then(**render)
    redraws = ("layer", "head", "direction", "cmap", "smooth", "normalize", "mass_on", "statistic", "atlas_shared",
               "opacity", "mass", "removal")
    # A visitor's input redraws; what the server sets (an analysis's layer, head and target, new prompts' target, a
    # pick in the atlas or the table) is followed by its own redraw, not by a second one from a change event.
    gr.on([c[n].input for n in redraws], **render)
    gr.on([c[n].input for n in ("fusion", "discard", "stat_mode", "target", "method")], **prepare).then(**render)
    for clickable in ("main", "patch", "similarity", "explanation"):  # a new patch may need a new explanation
        c[clickable].select(page.click, view, view, **pick).then(**prepare).then(**render)
    for selectable, handler in (("atlas", page.select_in_atlas), ("table", page.select_in_table)):
        c[selectable].select(handler, view, [c["layer"], c["head"]], **pick).then(**render)
    prompted = [c["prompt_button"].click, c["template"].submit, c["template"].blur, c["labels"].blur]  # new prompts'
    gr.on(prompted, page.set_prompts, [view, *controls], c["target"], trigger_mode="always_last",  # maps: in the
          **model).then(**prepare).then(**render)  # model's slot, before any redraw needs them
    c["flow_button"].click(page.flow, [view, *controls], c["flow"], **model)
    c["score_button"].click(page.score_maps, [view, *controls], [c["faithfulness_plot"], c["faithfulness_caption"]],
                            **model)
    c["anim_button"].click(page.animate, [view, c["anim_mode"], *controls], [c["gif"], c["gif_file"]], **model)
    c["export_button"].click(page.download, [view, tab, *controls], c["export_files"], **model)
    _wire_dataset(c, dataset, analyze, analysed, pick)


def _wire_dataset(c: Components, dataset: DatasetEvents, analyze: dict, analysed: Callable[[Dependency], None],
                  pick: dict) -> None:
    """The Dataset view's events: opening in the "model" group (a zip is analysed there), redraws in "render", picks
    in "pick" (see _wire); a clicked image goes to the single-image input and through the analysis as an upload
    would."""
    private = {"api_visibility": "private", "preprocess": False}
    state, outputs = c["dataset"], [c[name] for name in DATASET_OUTPUTS]
    shown = [c[name] for name in ("dataset_statistic", "dataset_order")]
    redraw = dict(fn=dataset.redraw, inputs=[state, c["dataset_statistic"], c["dataset_layer"], c["dataset_head"],
                                             c["dataset_order"]],
                  outputs=[c[name] for name in DATASET_DRAWN], concurrency_id="render", trigger_mode="always_last",
                  show_progress="hidden", **private)
    c["dataset_open"].click(dataset.open_folder, [c["dataset_path"], *shown], outputs, concurrency_id="model",
                            **private)
    c["dataset_path"].submit(dataset.open_folder, [c["dataset_path"], *shown], outputs, concurrency_id="model",
                             **private)
    c["dataset_zip"].upload(dataset.open_zip, [c["dataset_zip"], c["model_key"], c["dataset_resolution"], *shown],
                            outputs, concurrency_id="model", **private)
    gr.on([c[name].change for name in ("dataset_statistic", "dataset_layer", "dataset_head", "dataset_order")],
          **redraw)
    c["dataset_table"].select(dataset.select_row, state, [c["dataset_layer"], c["dataset_head"]], **pick)
    for end, handler in (("dataset_lowest", dataset.open_lowest), ("dataset_highest", dataset.open_highest)):
        analysed(c[end].select(handler, state, [c["image_in"], c["page_tabs"]], **pick).success(**analyze))


def _view(label: str, elem_id: str, min_width: int = 240, visible: bool = True) -> gr.Image:
    """An image the page draws into: no label chip or buttons over the content."""
    return gr.Image(label=label, show_label=False, interactive=False, format="jpeg", elem_id=elem_id,
                    elem_classes=["view"], buttons=[], min_width=min_width, visible=visible)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    workspace = workspace_for(None)
    demo = build_demo(workspace=workspace)
    demo.launch(server_name=os.environ.get("GRADIO_SERVER_NAME"), **launch_options(demo, workspace))
