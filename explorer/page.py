"""The page's event handlers: analyse an image, redraw only the visible tab, follow clicks, make downloads.

Handlers return {output name: value}; `as_outputs` orders them as the page's components (`VIEW_OUTPUTS`,
`ANALYSIS_OUTPUTS`) and leaves every other output as it is."""
from __future__ import annotations

import html
import math
import time
from typing import Any

import gradio as gr

import visualizer
from analysis import FUSIONS, STAT_LABELS, Analysis, HeadStatistics

from . import exports, views
from .handlers import Controls, Handlers, check_discard, check_stat_mode, guarded, statistics, user_message, warn
from .inputs import choice, head_choice, number, text
from .session import View, resolution_limits

TAB_LABELS = {"cls": "Class token", "rollout": "Rollout", "heads": "Heads", "hidden": "Hidden states",
              "animation": "GIF"}
TABS = tuple(TAB_LABELS)
VIEW_OUTPUTS = ("main", "patch", "grid", "patch_caption", "second", "rollout", "rollout_caption", "atlas", "chart",
                "scatter", "table", "norms", "pca", "similarity", "hidden_caption")
ANALYSIS_OUTPUTS = ("view", "status", "summary", "layer", "head", "resolution", "flow", "flow_note", "flow_button",
                    "gif", "gif_file", "export_files", *VIEW_OUTPUTS)
STATISTICS = tuple(STAT_LABELS)
STAT_COLUMNS = {  # short column titles with units; STAT_LABELS gives each definition in full
    "cls_entropy": "CLS entropy, whole row (nats)",
    "cls_patch_entropy": "CLS entropy, drawn map (nats)",
    "mean_entropy": "Query entropy (nats)",
    "mean_distance": "Attention distance (patches)",
    "mean_distance_px": "Attention distance, fig. 7 (px)",
    "cls_mass": "Attention to CLS",
}


def as_outputs(values: dict[str, Any], names: tuple[str, ...]) -> tuple:
    return tuple(values.get(name, gr.skip()) for name in names)


def stats_table(stats: HeadStatistics) -> dict:
    """One row per layer × head, columns named in words with their units."""
    values = stats.as_dict()
    layers, heads = values[STATISTICS[0]].shape
    rows = [[layer, head, *(shown_number(values[name][layer, head]) for name in STATISTICS)]
            for layer in range(layers) for head in range(heads)]
    return {"headers": ["Layer", "Head", *(STAT_COLUMNS.get(name, name) for name in STATISTICS)], "data": rows}


def shown_number(value: float) -> "float | str":
    """A statistic for the table: rounded, or "n/a" where it has no meaning (NaN)."""
    return round(float(value), 4) if math.isfinite(value) else "n/a"


def stat_definitions() -> str:
    """Each statistic's short name and its definition, for the page."""
    return "\n".join(f"- **{STAT_COLUMNS.get(name, name)}**: {STAT_LABELS[name]}." for name in STATISTICS)


class Page(Handlers):
    """Handlers of the page's events; the analysis and images live in the shared workspace, the visitor keeps a View."""

    def analyze(self, image: Any, res: Any, model: Any, dtype: Any, progress: gr.Progress = gr.Progress()) -> tuple:
        """A new image, resolution or model: analyse it and clear every view drawn from the previous one."""
        cleared = {name: None for name in ANALYSIS_OUTPUTS if name not in ("layer", "head", "resolution")}
        cleared |= {name: gr.update(value=None, visible=False) for name in ("flow", "flow_button", "export_files",
                                                                             "second")}
        if image is None:
            return as_outputs({**cleared, "status": "Upload an image, or pick an example."}, ANALYSIS_OUTPUTS)
        started = time.perf_counter()
        try:
            source, scene, analysis, key = self.open(image, res, model, dtype, lambda f, desc: progress(f, desc=desc))
        except Exception as err:  # a message, no red badges: the controls stay usable
            message = user_message(err)
            warn(message)
            return as_outputs({**cleared, "status": f"**Could not analyse this image:** {html.escape(message)}"},
                              ANALYSIS_OUTPUTS)
        seconds = time.perf_counter() - started
        note, offered = self.flow_offer(analysis, scene, key)
        low, high = resolution_limits(analysis.geometry.patch_size)
        last = analysis.num_layers - 1
        return as_outputs({
            **cleared, "view": View(key, source), "status": status_line(analysis, seconds),
            "summary": analysis.summary.description,
            "second": gr.update(value=None, visible=analysis.summary.pooling or analysis.summary.distillation),
            "layer": gr.update(maximum=last, value=last),
            "head": gr.update(choices=views.head_choices(analysis.num_heads), value="mean"),
            "resolution": gr.update(minimum=low, maximum=high, step=analysis.geometry.patch_size, value=key.resolution),
            "flow_note": note, "flow_button": gr.update(visible=offered),
        }, ANALYSIS_OUTPUTS)

    def warm(self, path: str, res: int) -> None:
        """Analyses an example at start-up and keeps it, so that the page opens with its maps at once."""
        scene = self.workspace.scene(path)
        key = self.workspace.key(scene, res)
        self.workspace.analysis(key, path)
        self.workspace.cache.pin(("scene", key.digest))
        self.workspace.cache.pin(("analysis", key))

    @guarded
    def switch_model(self, choice_: Any, custom: Any, progress: gr.Progress = gr.Progress()) -> tuple[str, str]:
        """Loads the model typed in (or else the one picked), so that the next analysis uses it."""
        key = text(custom, "model id") or text(choice_, "model")
        progress(0.1, desc=f"loading {key}")
        loaded = self.workspace.models.get(key)
        return key, f"Loaded **{html.escape(loaded.name)}**."

    @guarded
    def render(self, view: View | None, tab: str, *controls: Any) -> tuple:
        """Redraws only the visible tab's views, at the page's size."""
        if view is None:
            return as_outputs({}, VIEW_OUTPUTS)
        scene, analysis = self.current(view)
        c = Controls.parse(analysis, *controls)
        draw = {"cls": self._cls, "rollout": self._rollout, "heads": self._heads, "hidden": self._hidden,
                "animation": lambda *_: {}}[choice(tab, "tab", TABS)]
        return as_outputs(draw(view, scene, analysis, c), VIEW_OUTPUTS)

    def current(self, view: View) -> tuple[views.Scene, Analysis]:
        analysis = self.workspace.analysis(view.key, view.source)
        return self.workspace.scene(view.source, digest=view.key.digest), analysis

    def marker(self, view: View, analysis: Analysis) -> tuple[int, int]:
        """The clicked patch, or the centre one before any click."""
        g = analysis.geometry
        x, y = view.point or (g.orig_w / 2, g.orig_h / 2)
        return views.patch_at(analysis, x, y)[:2]

    def _cls(self, view: View, scene: views.Scene, analysis: Analysis, c: Controls) -> dict:
        row, col = self.marker(view, analysis)
        main = views.cls_view(analysis, scene.page, c.layer, c.head, c.style, legend=True, marker=(row, col))
        patch, _ = views.patch_view(analysis, scene.page, row, col, c.layer, c.head, c.direction, c.style, legend=True)
        left, top, right, bottom = analysis.geometry.patch_box(row, col)
        caption = (f"Clicked patch: **row {row}, column {col}** (pixels x {left:.0f}–{right:.0f}, y {top:.0f}–"
                   f"{bottom:.0f} of the original). Right: "
                   f"{'what it attends to' if c.direction == 'row' else 'what attends to it'} in layer {c.layer}, "
                   f"{views.head_label(c.head)}. Click either map to move it.")
        second = views.second_view(analysis, scene.page, c.layer, c.head, c.style)
        return {"main": main, "patch": patch, "grid": views.head_grid(analysis, scene.thumb, c.layer, c.style, True),
                "patch_caption": caption, **({"second": second} if second is not None else {})}

    def _rollout(self, view: View, scene: views.Scene, analysis: Analysis, c: Controls) -> dict:
        image = views.rollout_view(analysis, scene.page, c.fusion, c.discard, c.style, legend=True)
        caption = (f"Rollout with heads fused by **{c.fusion}** and discard ratio **{c.discard:g}**, through all "
                   f"{analysis.num_layers} layers, from {analysis.summary.rollout_top}.")
        return {"rollout": image, "rollout_caption": caption}

    def _heads(self, view: View, scene: views.Scene, analysis: Analysis, c: Controls) -> dict:
        selected = (c.layer, c.head) if isinstance(c.head, int) else None
        atlas, _ = views.atlas_view(analysis, c.style, selected, c.atlas_shared,
                                    views.atlas_thumb_width(analysis.num_heads))
        stats = statistics(analysis, c.stat_mode)
        chart = visualizer.stats_heatmap(stats.as_dict()[c.statistic], STAT_LABELS[c.statistic], "viridis",
                                         selected=selected)
        return {"atlas": atlas, "chart": chart, "scatter": views.distance_figure(stats, selected),
                "table": stats_table(stats)}

    def _hidden(self, view: View, scene: views.Scene, analysis: Analysis, c: Controls) -> dict:
        row, col = self.marker(view, analysis)
        norms, pca, similarity, outliers = views.hidden_views(analysis, scene.page, c.layer, (row, col), c.style, True)
        if outliers:
            found = f"**{outliers} high-norm token(s)** outlined in red on the norm map."
        else:
            found = ("No high-norm outlier token after this layer (none more than 6 robust deviations and twice the "
                     "median norm); models without registers show them mostly in the later layers.")
        caption = (f"After layer {c.layer}. {found} PCA: the first three principal components of the patch features "
                   "as RGB.")
        return {"norms": norms, "pca": pca, "similarity": similarity, "hidden_caption": caption}

    @guarded
    def select_tab(self, evt: gr.SelectData) -> str:
        """The id of the tab just opened."""
        by_label = {label: name for name, label in TAB_LABELS.items()}
        return evt.index if evt.index in TABS else choice(by_label.get(evt.value, evt.value), "tab", TABS)

    @guarded
    def click(self, view: View | None, evt: gr.SelectData) -> View:
        """A click on a map drawn on the page's copy of the image (a click on its colour bar is ignored)."""
        if view is None:
            return gr.skip()
        scene, _ = self.current(view)
        index = evt.index if isinstance(evt.index, (list, tuple)) and len(evt.index) == 2 else (None, None)
        x = number(index[0], "click x", 0, math.inf)
        y = number(index[1], "click y", 0, math.inf)
        if x >= scene.page.width or y >= scene.page.height:
            return gr.skip()
        return view.clicked(*scene.page_to_original(x, y))

    @guarded
    def select_in_atlas(self, view: View | None, evt: gr.SelectData) -> tuple:
        if view is None:
            return gr.skip(), gr.skip()
        _, analysis = self.current(view)
        g = analysis.geometry
        layout = visualizer.atlas_layout(analysis.num_layers, analysis.num_heads, g.grid_h, g.grid_w,
                                         views.atlas_thumb_width(analysis.num_heads))
        index = evt.index if isinstance(evt.index, (list, tuple)) and len(evt.index) == 2 else (None, None)
        cell = layout.cell_at(number(index[0], "click x", 0, math.inf), number(index[1], "click y", 0, math.inf))
        return (gr.skip(), gr.skip()) if cell is None else (cell[0], str(cell[1]))

    @guarded
    def select_in_table(self, view: View | None, evt: gr.SelectData) -> tuple:
        if view is None or not isinstance(evt.row_value, (list, tuple)) or len(evt.row_value) < 2:
            return gr.skip(), gr.skip()
        _, analysis = self.current(view)
        layer = number(evt.row_value[0], "layer", 0, analysis.num_layers - 1, whole=True)
        return int(layer), str(head_choice(evt.row_value[1], analysis.num_heads, ()))

    @guarded
    def prepare_tab(self, view: View | None, tab: str, fusion: str, discard: float, stat_mode: str,
                    progress: gr.Progress = gr.Progress()) -> None:
        """The slow part of a tab, with a progress bar, before it is drawn: the rollout, or exact statistics."""
        tab = choice(tab, "tab", TABS)
        if view is None or tab not in ("rollout", "heads"):
            return
        _, analysis = self.current(view)
        if tab == "rollout":
            analysis.rollout_map(choice(fusion, "fusion", FUSIONS), check_discard(discard),
                                 progress=lambda f: progress(f, desc="rollout"))
        else:
            statistics(analysis, check_stat_mode(stat_mode), lambda f: progress(f, desc="statistics over every query"))

    @guarded
    def flow(self, view: View | None, *controls: Any, progress: gr.Progress = gr.Progress()) -> Any:
        if view is None:
            return gr.skip()
        scene, analysis = self.current(view)
        c = Controls.parse(analysis, *controls)
        return gr.update(visible=True, value=views.flow_view(analysis, scene.page, c.fusion, c.style, legend=True,
                                                             progress=lambda f: progress(f, desc="max-flow per token")))

    @guarded
    def animate(self, view: View | None, mode: str, *controls: Any, progress: gr.Progress = gr.Progress()) -> tuple:
        if view is None:
            raise gr.Error("Analyse an image first.", print_exception=False)
        scene, analysis = self.current(view)
        c = Controls.parse(analysis, *controls)
        mode = choice(mode, "animation", ("cls", "rollout"))
        frames, captions = views.layer_frames(analysis, scene.page, mode, c.head, c.style,
                                              lambda f: progress(f, desc="frames"))
        path = self.file(visualizer.animation_gif(frames, 500, captions=captions), f"{mode}_layers.gif").path
        return path, path

    @guarded
    def download(self, view: View | None, tab: str, *controls: Any) -> dict:
        """The numbers of the analysis with every setting of the view, and the view on screen as a PNG."""
        if view is None:
            raise gr.Error("Analyse an image first.", print_exception=False)
        scene, analysis = self.current(view)
        c = Controls.parse(analysis, *controls)
        row, col = self.marker(view, analysis)
        tab = choice(tab, "tab", TABS)
        settings = {"tab": tab, "fusion": c.fusion, "discard_ratio": c.discard, "direction": c.direction,
                    "opacity": c.style.opacity, "colormap": c.style.cmap, "smooth": c.style.smooth,
                    "scaling": c.style.normalize, "mass_fraction": c.style.mass, "statistic": c.statistic,
                    "statistics_queries": c.stat_mode, "atlas_one_scale": c.atlas_shared, "clicked_patch": [row, col]}
        npz, sidecar = exports.numbers(analysis, c.layer, c.head, analysis.token_at(row, col), settings,
                                       statistics(analysis, c.stat_mode))
        on_screen = self._screen_view(tab, view, scene, analysis, c)
        files = [self.file(npz, "analysis.npz").path, self.file(sidecar, "analysis.json").path,
                 self.png(on_screen, "current_view").path]
        return gr.update(value=files, visible=True)

    def _screen_view(self, tab: str, view: View, scene: views.Scene, analysis: Analysis, c: Controls):
        """The main image of the visible tab (the class-token map where a tab has none)."""
        drawn = {"rollout": self._rollout, "heads": self._heads, "hidden": self._hidden}.get(tab, self._cls)(
            view, scene, analysis, c)
        return drawn.get({"rollout": "rollout", "heads": "atlas", "hidden": "similarity"}.get(tab, "main"))


def status_line(analysis: Analysis, seconds: float) -> str:
    g = analysis.geometry
    tokens = g.grid_h * g.grid_w + analysis.num_prefix_tokens
    return (f"**{analysis.model_name}** · input {g.input_w}×{g.input_h} px · grid {g.grid_h}×{g.grid_w} "
            f"({g.grid_h * g.grid_w} patches, {tokens} tokens) · {analysis.num_layers} layers × "
            f"{analysis.num_heads} heads · {seconds:.1f} s")

