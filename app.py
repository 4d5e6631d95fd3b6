"""vit-inspect: see what every head of a vision transformer attends to, at any resolution.

Gradio wiring only: the page's components and events, and the named API endpoints. The work is done by
`explorer` (views of an analysis), `analysis` (the maths) and `model` (the network).
"""
from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import gradio as gr
import torch

import visualizer
from analysis import FUSIONS, STAT_LABELS, Analysis
from analysis.stats import DEFAULT_STAT_QUERIES
from explorer import exports, views
from explorer.api import register_api
from explorer.cache import AnalysisCache
from explorer.models import DEFAULT, WELL_KNOWN, ModelStore
from explorer.session import DEFAULT_RESOLUTION, MAX_RESOLUTION, MIN_RESOLUTION, Session, Workspace
from model import CheckpointError, InvalidImageError, LoadedModel, load_image

logger = logging.getLogger("vit-inspect")
ASSETS = Path(__file__).resolve().parent / "assets"
EXAMPLES = [str(ASSETS / name) for name in ("chelsea.png", "astronaut.png", "coffee.png", "rocket.jpg")]
CACHE_BYTES = int(os.environ.get("VIT_INSPECT_CACHE_MB", "4096")) * 2**20
DESCRIPTION = """# vit-inspect
Upload an image of any size and see what each **head** of each **layer** of a vision transformer attends to.
The model runs once per image and resolution; every slider below redraws from that single pass.
**Class-token attention**: where the [CLS] token looks. **Clicked patch**: click the image to see what a patch
attends to, or what attends to it. **Rollout**: attention propagated through all layers (Abnar & Zuidema 2020).
**Head atlas**: every layer × head at once with statistics. **Hidden states**: token norms, PCA, similarity."""


def user_errors(fn):
    """Bad input becomes a message in the page and the API, never a stack trace; the app keeps serving."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except (InvalidImageError, CheckpointError, ValueError) as err:
            raise gr.Error(str(err), print_exception=False) from None
        except (MemoryError, torch.OutOfMemoryError):
            raise gr.Error("Out of memory at this resolution: try a smaller one.", print_exception=False) from None
        except Exception as err:
            logger.exception("request failed")
            raise gr.Error(f"Something went wrong ({type(err).__name__}: {err}).", print_exception=False) from None
    return wrapper


def progress_reporter(progress: gr.Progress):
    return lambda fraction, desc: progress(fraction, desc=desc)


def style_of(opacity: float, cmap: str, smooth: bool, normalize: str) -> views.Style:
    if cmap not in visualizer.available_colormaps():
        raise ValueError(f"unknown colormap {cmap!r}")
    return views.Style(float(opacity), cmap, bool(smooth), normalize)


def build_demo(loaded: LoadedModel | None = None, device: str | None = None) -> gr.Blocks:
    """The page and its API; `loaded` replaces the embedded default model (tests pass a tiny one)."""
    workspace = Workspace(ModelStore(loaded or None, device=device), AnalysisCache(CACHE_BYTES))
    if loaded is None:
        workspace.models.get(DEFAULT)  # load (and convert, the first time) at start-up, not on the first request

    def opened(session: Session | None) -> tuple[Session, Analysis]:
        """The page's session and its analysis (recomputed if the cache dropped it)."""
        if session is None:
            raise gr.Error("Upload an image first.", print_exception=False)
        return session, workspace.analysis(session)

    # ---- handlers of the page: plain functions of the session state and the controls ----
    @user_errors
    def run_analysis(image_path, resolution, model_key, stat_mode, dtype, progress=gr.Progress()):
        if not image_path:
            raise gr.Error("Upload an image first.", print_exception=False)
        stat_queries = None if stat_mode == "all queries (exact)" else DEFAULT_STAT_QUERIES
        session = workspace.open(load_image(image_path), resolution, model_key, stat_queries, dtype)
        analysis = workspace.analysis(session, progress_reporter(progress))
        last = analysis.num_layers - 1
        g = analysis.geometry
        status = (f"**{analysis.model_name}** · input {g.input_w}×{g.input_h} px · grid {g.grid_h}×{g.grid_w} "
                  f"({g.grid_h * g.grid_w} patches) · {analysis.num_layers} layers × {analysis.num_heads} heads")
        return (session, gr.update(maximum=last, value=last),
                gr.update(choices=views.head_choices(analysis.num_heads), value="mean"),
                views.stats_rows(analysis), status)

    @user_errors
    def render(session, layer, head, direction, opacity, cmap, smooth, normalize):
        session, analysis = opened(session)
        style = style_of(opacity, cmap, smooth, normalize)
        head = views.parse_head(head, analysis.num_heads)
        layer = min(int(layer), analysis.num_layers - 1)
        overlay, grid = views.cls_view(analysis, session.scene, layer, head, style)
        x, y = session.clicked_point()
        patch, _, (row, col) = views.patch_view(analysis, session.scene, x, y, layer, head, direction, style)
        norms, pca, similarity, outliers = views.hidden_views(analysis, session.scene, layer, x, y, style)
        what = "attends to" if direction == "row" else "is attended by"
        info = (f"Patch (row {row}, column {col}) {what} — layer {layer}, {views.head_label(head)}. "
                f"{outliers} high-norm token(s) outlined in red on the norm map.")
        return overlay, grid, patch, info, norms, pca, similarity

    @user_errors
    def click(session, evt: gr.SelectData):
        session, _ = opened(session)
        x, y = session.scene.to_original(*evt.index)
        return session.clicked(x, y)

    @user_errors
    def render_rollout(session, fusion, discard, opacity, cmap, smooth, normalize, progress=gr.Progress()):
        session, analysis = opened(session)
        style = style_of(opacity, cmap, smooth, normalize)
        return views.rollout_view(analysis, session.scene, fusion, float(discard), style,
                                  lambda f: progress(f, desc="rollout"))

    @user_errors
    def render_flow(session, fusion, opacity, cmap, smooth, normalize, progress=gr.Progress()):
        session, analysis = opened(session)
        style = style_of(opacity, cmap, smooth, normalize)
        return views.flow_view(analysis, session.scene, fusion, style, lambda f: progress(f, desc="max-flow per token"))

    @user_errors
    def select_in_atlas(session, evt: gr.SelectData):
        _, analysis = opened(session)
        g = analysis.geometry
        cell = visualizer.atlas_layout(analysis.num_layers, analysis.num_heads, g.grid_h, g.grid_w).cell_at(*evt.index)
        if cell is None:
            return gr.update(), gr.update()
        return cell[0], str(cell[1])

    @user_errors
    def render_atlas(session, layer, head, cmap):
        _, analysis = opened(session)
        head = views.parse_head(head, analysis.num_heads)
        selected = (min(int(layer), analysis.num_layers - 1), head) if isinstance(head, int) else None
        return views.atlas_view(analysis, views.Style(cmap=cmap), selected)[0]

    @user_errors
    def select_in_table(evt: gr.SelectData):
        row = evt.row_value
        return int(row[0]), str(int(row[1]))

    @user_errors
    def stats_chart(session, statistic):
        return views.stats_chart(opened(session)[1], statistic)

    @user_errors
    def animate(session, mode, head, opacity, cmap, smooth, normalize, progress=gr.Progress()):
        session, analysis = opened(session)
        head = views.parse_head(head, analysis.num_heads)
        frames, captions = views.layer_frames(analysis, session.scene, mode, head,
                                              style_of(opacity, cmap, smooth, normalize),
                                              lambda f: progress(f, desc="frames"))
        path = exports.save_gif(frames, captions, exports.new_export_dir() / f"{mode}_layers.gif")
        return str(path), str(path)

    @user_errors
    def export_current(session, layer, head, fusion, view_image):
        session, analysis = opened(session)
        head = views.parse_head(head, analysis.num_heads)
        folder = exports.new_export_dir()
        token = views.patch_at(analysis, *session.clicked_point())[2]
        files = list(exports.export_numbers(analysis, folder / "analysis", int(layer), head, token, fusion))
        if view_image is not None:
            files.append(exports.save_png(load_image(view_image), folder / "current_view.png"))
        return [str(f) for f in files]

    @user_errors
    def switch_model(session, choice, custom, progress=gr.Progress()):
        key = (custom or "").strip() or choice
        progress(0.1, desc=f"loading {key}")
        loaded = workspace.models.get(key)
        return key, f"Loaded **{loaded.name}**: analyze an image to use it."

    # ---- the page ----
    with gr.Blocks(title="vit-inspect") as demo:
        gr.Markdown(DESCRIPTION)
        session = gr.State(None)
        model_key = gr.State(DEFAULT)
        with gr.Row():
            with gr.Column(scale=1, min_width=320):
                image_in = gr.Image(label="Image (upload, paste or webcam)", type="filepath", image_mode=None,
                                    sources=["upload", "clipboard", "webcam"], height=300, elem_id="image-input")
                resolution = gr.Slider(MIN_RESOLUTION, MAX_RESOLUTION, DEFAULT_RESOLUTION, step=14,
                                       label="Resolution (long side, px)",
                                       info="The image keeps its aspect ratio; each side snaps to the patch size.")
                analyze_btn = gr.Button("Analyze", variant="primary", elem_id="analyze")
                status = gr.Markdown(elem_id="status")
                gr.Examples(EXAMPLES, inputs=[image_in], label="Examples (public domain / CC0)")
                with gr.Accordion("Model", open=False):
                    model_choice = gr.Dropdown([DEFAULT, *WELL_KNOWN], value=DEFAULT, label="Model",
                                               info="'default' is DINOv2 ViT-S/14, embedded; others come from the hub.")
                    model_custom = gr.Textbox(label="Or any hub id / local folder", placeholder="org/name or /path")
                    load_btn = gr.Button("Load model")
                    model_status = gr.Markdown()
                with gr.Accordion("Advanced", open=False):
                    stat_mode = gr.Radio(["512 spread queries", "all queries (exact)"], value="512 spread queries",
                                         label="Head statistics averaged over")
                    dtype = gr.Radio(["float32", "float16", "bfloat16"], value="float32", label="Precision",
                                     info="Half precision is offered on GPU only.")
                    smooth = gr.Checkbox(True, label="Smooth maps (bilinear); off shows crisp patches")
                    normalize = gr.Radio(["robust", "minmax", "max"], value="robust", label="Map scaling",
                                         info="robust: min to 99th percentile, so a few sink tokens don't hide the rest")
            with gr.Column(scale=2):
                with gr.Row():
                    layer = gr.Slider(0, 11, 11, step=1, label="Layer", elem_id="layer")
                    head = gr.Dropdown(views.head_choices(6), value="mean", label="Head (or fusion of heads)",
                                       elem_id="head")
                with gr.Row():
                    opacity = gr.Slider(0, 1, 0.6, step=0.05, label="Opacity")
                    cmap = gr.Dropdown(visualizer.available_colormaps(), value="inferno", label="Colormap")
                with gr.Tabs():
                    with gr.Tab("Class-token attention"):
                        gr.Markdown("Where the class token looks in this layer: the chosen head, then every head.")
                        cls_image = gr.Image(label="Class-token attention (click a patch)", interactive=False,
                                             elem_id="cls-view", format="png")
                        grid_image = gr.Image(label="All heads of the layer", interactive=False, elem_id="head-grid",
                                              format="png")
                    with gr.Tab("Clicked patch"):
                        direction = gr.Radio([("what it attends to", "row"), ("what attends to it", "column")],
                                             value="row", label="Direction")
                        patch_info = gr.Markdown("Click the image to choose a patch.", elem_id="patch-info")
                        patch_image = gr.Image(label="Clicked-patch attention (click another patch)",
                                               interactive=False, elem_id="patch-view", format="png")
                    with gr.Tab("Rollout"):
                        gr.Markdown("Attention rollout: the class token's row of the product of (fused heads + "
                                    "identity) over all layers. Discarding drops the weakest links per layer.")
                        with gr.Row():
                            fusion = gr.Radio(list(FUSIONS), value="mean", label="Head fusion")
                            discard = gr.Slider(0, 0.95, 0, step=0.05, label="Discard ratio")
                        rollout_btn = gr.Button("Compute rollout")
                        rollout_image = gr.Image(label="Rollout", interactive=False, elem_id="rollout-view",
                                                 format="png")
                        gr.Markdown("Attention flow: the max-flow from each patch to the class token through the "
                                    "same graph (one max-flow per token, so up to 577 tokens: about 336 px for "
                                    "patch 14; about a minute there).")
                        flow_btn = gr.Button("Compute attention flow")
                        flow_image = gr.Image(label="Attention flow", interactive=False, elem_id="flow-view",
                                              format="png")
                    with gr.Tab("Head atlas"):
                        gr.Markdown("Every layer (rows) × head (columns). Click a thumbnail or a table row to "
                                    "select that head everywhere.")
                        atlas_image = gr.Image(label="Atlas", interactive=False, elem_id="atlas", format="png")
                        statistic = gr.Dropdown([(label, name) for name, label in STAT_LABELS.items()],
                                                value="mean_distance", label="Statistic")
                        chart_image = gr.Image(label="Statistic per layer × head", interactive=False, format="png")
                        table = gr.Dataframe(headers=views.STAT_COLUMNS, label="Head statistics (sortable)",
                                             interactive=False, elem_id="stats-table")
                    with gr.Tab("Hidden states"):
                        gr.Markdown("After the chosen layer: token norms (high-norm outliers outlined), the first "
                                    "three principal components as RGB, and cosine similarity to the clicked patch.")
                        with gr.Row():
                            norm_image = gr.Image(label="Token norms", interactive=False, format="png")
                            pca_image = gr.Image(label="PCA → RGB", interactive=False, format="png")
                            similarity_image = gr.Image(label="Similarity to clicked patch", interactive=False,
                                                        format="png")
                    with gr.Tab("Animation & export"):
                        anim_mode = gr.Radio([("class-token map of the head", "cls"), ("rollout up to each layer",
                                                                                        "rollout")],
                                             value="cls", label="Animate through the layers")
                        anim_btn = gr.Button("Make GIF")
                        anim_image = gr.Image(label="Layer animation", interactive=False, format="gif")
                        anim_file = gr.File(label="GIF download")
                        export_btn = gr.Button("Export numbers (.npz + .json) and the current view (.png)",
                                               elem_id="export")
                        export_files = gr.File(label="Exports", file_count="multiple", elem_id="export-files")

        style_inputs = [opacity, cmap, smooth, normalize]
        view_outputs = [cls_image, grid_image, patch_image, patch_info, norm_image, pca_image, similarity_image]
        render_inputs = [session, layer, head, direction, *style_inputs]
        private = {"api_visibility": "private"}

        analyzed = gr.on([analyze_btn.click, image_in.upload, image_in.input, resolution.release], run_analysis,
                         [image_in, resolution, model_key, stat_mode, dtype],
                         [session, layer, head, table, status], concurrency_limit=1, **private)
        analyzed.success(render, render_inputs, view_outputs, **private).success(
            stats_chart, [session, statistic], chart_image, **private).success(
            render_atlas, [session, layer, head, cmap], atlas_image, **private)
        gr.on([layer.change, head.change, direction.change, opacity.release, cmap.change, smooth.change,
               normalize.change], render, render_inputs, view_outputs, trigger_mode="always_last", **private)
        for clickable in (cls_image, patch_image, similarity_image):
            clickable.select(click, session, session, **private).success(render, render_inputs, view_outputs,
                                                                         **private)
        rollout_btn.click(render_rollout, [session, fusion, discard, *style_inputs], rollout_image, **private)
        flow_btn.click(render_flow, [session, fusion, *style_inputs], flow_image, **private)
        atlas_image.select(select_in_atlas, session, [layer, head], **private)
        gr.on([layer.change, head.change, cmap.change], render_atlas, [session, layer, head, cmap], atlas_image,
              trigger_mode="always_last", **private)
        table.select(select_in_table, None, [layer, head], **private)
        statistic.change(stats_chart, [session, statistic], chart_image, **private)
        anim_btn.click(animate, [session, anim_mode, head, *style_inputs], [anim_image, anim_file], **private)
        export_btn.click(export_current, [session, layer, head, fusion, cls_image], export_files, **private)
        load_btn.click(switch_model, [session, model_choice, model_custom], [model_key, model_status], **private)
        register_api(workspace, user_errors)
    return demo


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    build_demo().queue(max_size=32).launch(show_error=True, server_name=os.environ.get("GRADIO_SERVER_NAME"))
