"""The Dataset view: an atlas written by `python -m explorer atlas` (a folder on this server, never in public mode) or
made here from an uploaded zip of images, drawn from `explorer.atlas.load_atlas`: the aggregate per layer × head,
fig. 7 with its intervals, the table of every statistic's mean and interval, and for a chosen head the images that
rank lowest and highest, each of which opens in the single-image views.

The handlers (module level, typed, callable from tests) take the workspace and raw values and check them once
(`explorer.inputs`); `DatasetEvents` turns the page's arguments into these calls and their results into the page's
components (DATASET_OUTPUTS). A request reads only what it uploaded, or the images the atlas it opened lists."""
from __future__ import annotations

import hashlib
import html
import shutil
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Any

import gradio as gr
import numpy as np
from PIL import Image

import visualizer
from analysis import STAT_LABELS
from explorer import drawing
from explorer.atlas import Atlas, AtlasError, build_atlas, load_atlas, open_source
from explorer.atlas.archive import image_members, unpack_images
from explorer.atlas.store import SUMMARY
from explorer.drawing import Style
from explorer.inputs import (ORDERS, UserError, check_resolution, choice, head_choice, model_name, server_folder,
                             uploaded_file, whole)

from .handlers import STAT_COLUMNS, guarded, paced, shown_number, user_message, warn
from .workspace import Workspace

DATASET_OUTPUTS = ("dataset", "dataset_status", "dataset_layer", "dataset_head", "dataset_figure", "dataset_chart",
                   "dataset_table", "dataset_lowest", "dataset_highest", "dataset_caption")
DRAWN = ("dataset", "dataset_chart", "dataset_table", "dataset_lowest", "dataset_highest", "dataset_caption")
SHOWN_IMAGES = 8  # images shown at each end of a head's ranking
ZIP_QUERIES = "spread"  # the head statistics of a zip's images: 512 spread queries, as the single-image views
NO_FOLDERS = "This server does not read folders: upload a zip of images instead."
EXPIRED = "The atlas of this zip has expired on the server: upload the zip again."
FOLDER_FULL = "The server has no room for this zip's images right now: try again in a few minutes."
_building: dict[str, threading.Lock] = {}  # one build per atlas folder at a time
_building_lock = threading.Lock()


@dataclass(frozen=True)
class DatasetView:
    """What a page visitor's Dataset view shows: the atlas folder, and the images on screen (what a click names)."""

    folder: str
    uploaded: bool  # made here from a zip: in the managed folder, its images beside it
    lowest: tuple[str, ...] = ()
    highest: tuple[str, ...] = ()


# ---- handlers ----
def open_folder(ws: Workspace, path: Any) -> DatasetView:
    """An atlas folder on this server, read and checked; refused in public mode whatever the path."""
    if ws.settings.public:
        raise UserError(NO_FOLDERS)
    view = DatasetView(str(server_folder(path, "atlas folder")), uploaded=False)  # messages name it as typed
    atlas_of(ws, view)
    return view


def open_zip(ws: Workspace, value: Any, model: Any = "default", resolution: Any = 224,
             progress: Callable[[float, str], None] | None = None) -> DatasetView:
    """The atlas of an uploaded zip of images, made once per (zip, model, resolution) in the managed folder: the zip
    checked against the caps before anything is unpacked, each image analysed within the single upload's caps."""
    path = uploaded_file(value, "zip", ws.upload_roots)
    resolution, key = check_resolution(resolution), ws.models.check(model_name(model))
    members = image_members(path, ws.settings.zip_caps)  # refused here before a byte is hashed or unpacked
    loaded = ws.models.get(key)
    digest = hashlib.blake2b(f"{key}\0{loaded.name}\0{resolution}\0".encode(), digest_size=16)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    root = ws.files.folder(f"dataset-{digest.hexdigest()}")
    view = DatasetView(str(root / "atlas"), uploaded=True)
    with _lock_for(str(root)):
        try:
            if not atlas_of(ws, view).summary["skipped"]:
                return view  # this zip, already analysed at these settings
            resuming = True  # images skipped for time: tried again, the others kept
        except UserError:
            shutil.rmtree(root, ignore_errors=True)  # nothing, or what the sweep left of it
            resuming = False
        if not resuming and not ws.files.admit(sum(info.file_size for info in members)):
            raise UserError(FOLDER_FULL)
        report = (lambda done, total: progress(done / total, f"{done} of {total} images")) if progress else None
        try:
            if not resuming:
                unpack_images(path, root / "images", ws.settings.zip_caps)
            with ws.device_slot():
                summary = build_atlas(open_source(root / "images"), root / "atlas", loaded, resolution, ZIP_QUERIES,
                                      progress=False, limits=ws.limits, deadline=ws.limits.deadline(), decoders=1,
                                      report=report)
        except BaseException:
            shutil.rmtree(root, ignore_errors=True)  # nothing half made is left
            raise
    if summary["images"] == 0:
        reasons = "; ".join(f"{s['image']}: {s['reason']}" for s in summary["skipped"][:3])
        raise UserError(f"None of the zip's images could be analysed ({reasons}).")
    atlas_of(ws, view)
    return view


def _lock_for(folder: str) -> threading.Lock:
    with _building_lock:
        return _building.setdefault(folder, threading.Lock())


def atlas_of(ws: Workspace, view: DatasetView) -> Atlas:
    """The atlas a view shows, read once per version of its summary and kept in the workspace's cache."""
    folder = Path(view.folder)
    try:
        stamp = (folder / SUMMARY).stat().st_mtime_ns
    except OSError:
        stamp = None
    try:
        return ws.cache.get_or_compute(("dataset", view.folder, stamp), lambda: load_atlas(folder))
    except (AtlasError, OSError) as err:
        if view.uploaded:
            raise UserError(EXPIRED) from None
        raise UserError(str(err) if isinstance(err, AtlasError) else "The atlas could not be read.") from None


@dataclass(frozen=True)
class HeadChoice:
    """The Dataset view's controls, checked against the atlas."""

    statistic: str
    layer: int
    head: int
    order: str = "ascending"

    @classmethod
    def parse(cls, atlas: Atlas, statistic: Any, layer: Any, head: Any, order: Any = "ascending") -> "HeadChoice":
        layers, heads = atlas.settings["num_layers"], atlas.settings["num_heads"]
        return cls(choice(statistic, "statistic", tuple(STAT_LABELS)), whole(layer, "layer", 0, layers - 1),
                   int(head_choice(head, heads, ())), choice(order, "order", ORDERS))


def summary_text(atlas: Atlas) -> str:
    """What the atlas is, in a sentence or two, with the model's predictions over the images where it has a head."""
    s = atlas.settings
    skipped = atlas.summary.get("skipped", [])
    text = (f"**{len(atlas.images)} images** · {html.escape(str(s['model']))} at {s['resolution']} px · "
            f"{s['num_layers']} layers × {s['num_heads']} heads · statistics over "
            f"{'512 spread queries' if s['queries'] == 'spread' else 'every query'}.")
    if skipped:
        text += (f" {len(skipped)} skipped, e.g. {html.escape(skipped[0]['image'])}: "
                 f"{html.escape(skipped[0]['reason'])}")
    images = atlas.images
    if s.get("prediction") == "classes":
        top = Counter(labels[0] for labels in images["top_labels"] if labels is not None and len(labels))
        shown = ", ".join(f"{html.escape(label)} ({count})" for label, count in top.most_common(5))
        text += f" The classifier's most frequent top class: {shown}."
    elif s.get("prediction") == "saliency":
        text += (f" The saliency decoder's region covers {images['region_share'].mean():.0%} of an image on average "
                 f"(its mean saliency {images['saliency_mean'].mean():.3f}).")
    return text


def figure(atlas: Atlas) -> Image.Image:
    """Fig. 7 over the dataset: each head's mean attention distance against depth, with its 95 % interval."""
    mean, low, high = atlas.aggregated("mean_distance_px")
    return visualizer.depth_intervals(mean, low, high, "mean attention distance (pixels)",
                                      f"Mean attention distance against depth over {len(atlas.images)} images: mean "
                                      "and 95 % t-interval")


def chart(atlas: Atlas, c: HeadChoice) -> Image.Image:
    """The mean of a statistic over the images, per layer × head, the chosen head outlined."""
    mean, _, _ = atlas.aggregated(c.statistic)
    return visualizer.stats_heatmap(mean, f"{STAT_COLUMNS[c.statistic]}: mean over {len(atlas.images)} images",
                                    "viridis", selected=(c.layer, c.head))


def head_table(atlas: Atlas, sort_by: str, order: str) -> dict:
    """One row per layer × head: each statistic's mean over the images and the half-width of its 95 % interval,
    sorted by `sort_by`'s mean (heads without a value last)."""
    heads = atlas.settings["num_heads"]
    columns = {name: atlas.aggregated(name) for name in STAT_LABELS}  # (mean, low, high), each (layers, heads)
    key = columns[sort_by][0].ravel()
    cells = np.argsort(np.where(np.isnan(key), np.inf, key if order == "ascending" else -key), kind="stable")
    rows = []
    for layer, head in (divmod(int(cell), heads) for cell in cells):
        values = [(mean[layer, head], high[layer, head] - mean[layer, head]) for mean, _, high in columns.values()]
        rows.append([layer, head, *(shown_number(v) for pair in values for v in pair)])
    headers = [f"{STAT_COLUMNS[name]}{part}" for name in STAT_LABELS for part in (": mean", ": ± 95 %")]
    return {"headers": ["Layer", "Head", *headers], "data": rows}


def ranked_images(atlas: Atlas, c: HeadChoice, lowest: bool, count: int = SHOWN_IMAGES,
                  style: Style = Style()) -> tuple[list[tuple[Image.Image, str]], tuple[str, ...]]:
    """The images that rank first (lowest or highest `c.statistic`) for the chosen head, each as its thumbnail with
    that head's class-token map where the atlas kept it (the last layer), captioned; and their names in order."""
    ranked = atlas.ranked(c.layer, c.head, c.statistic, count, lowest)
    tiles = []
    for name, value in zip(ranked["image"], ranked[c.statistic]):
        thumb = atlas.thumbnail(name)
        if c.layer == atlas.settings["map_layer"]:
            thumb = drawing.paint(thumb, atlas.cls_maps(name)[c.head], style)
        tiles.append((thumb, f"{name} · {value:.3f}{prediction_note(atlas, name)}"))
    return tiles, tuple(ranked["image"])


def prediction_note(atlas: Atlas, name: str) -> str:
    row = atlas.images[atlas.images["image"] == name].iloc[0]
    if atlas.settings.get("prediction") == "classes" and row["top_labels"] is not None and len(row["top_labels"]):
        return f" · {row['top_labels'][0]} ({row['top_probabilities'][0]:.0%})"
    if atlas.settings.get("prediction") == "saliency":
        return f" · region {row['region_share']:.0%}"
    return ""


def caption(atlas: Atlas, c: HeadChoice) -> str:
    maps = ("with the head's class-token map" if c.layer == atlas.settings["map_layer"] else
            f"without maps (the atlas keeps the class-token maps of the last layer, {atlas.settings['map_layer']}, "
            "only)")
    return (f"Layer {c.layer}, head {c.head}: the images with the lowest and the highest "
            f"**{STAT_COLUMNS[c.statistic]}** ({STAT_LABELS[c.statistic]}), {maps}. For the entropies, lowest is the "
            "most focused. Click an image to open it in the single-image views.")


def image_file(ws: Workspace, view: DatasetView, name: str) -> str:
    """A copy, in the managed folder, of the atlas's image `name` for the single-image views (only images the atlas
    lists): the zip's own image where it was unpacked, or the one the atlas's source holds. A copy, named by its
    content: Gradio deletes the files it served a session when the session ends, and the atlas keeps its own."""
    atlas = atlas_of(ws, view)
    if not (atlas.images["image"] == name).any():
        raise UserError("This image is not in the atlas.")
    try:
        if view.uploaded:
            images = Path(view.folder).parent / "images"
            original = str((images / name).resolve())
            if not Path(original).is_relative_to(images.resolve()) or not Path(original).is_file():
                raise UserError(EXPIRED)
        else:
            original = atlas.original(name)
    except AtlasError as err:
        raise UserError(str(err)) from None
    data = original if isinstance(original, bytes) else Path(original).read_bytes()
    return str(ws.files.put(data, PurePosixPath(name).name or "image"))


# ---- the page's events ----
def as_outputs(values: dict[str, Any], names: tuple[str, ...]) -> tuple:
    return tuple(values.get(name, gr.skip()) for name in names)


class DatasetEvents:
    """The Dataset view's events; the atlas lives in the workspace's cache, the visitor keeps a DatasetView."""

    def __init__(self, workspace: Workspace):
        self.workspace = workspace

    def open_folder(self, path: Any, statistic: Any, order: Any) -> tuple:
        """An atlas folder typed in (outside public mode)."""
        return self._opened(lambda: open_folder(self.workspace, path), statistic, order)

    def open_zip(self, value: Any, model: Any, resolution: Any, statistic: Any, order: Any,
                 progress: gr.Progress = gr.Progress()) -> tuple:
        """A zip of images: checked, analysed here (with a progress bar), then shown."""
        if value is None:
            return as_outputs({}, DATASET_OUTPUTS)
        return self._opened(lambda: open_zip(self.workspace, value, model, resolution,
                                             paced(progress)), statistic, order)

    def _opened(self, open_view: Callable[[], DatasetView], statistic: Any, order: Any) -> tuple:
        """The view just opened, at its last layer's first head; a failure is a message, the controls stay usable."""
        cleared = {name: None for name in DATASET_OUTPUTS if name not in ("dataset_layer", "dataset_head")}
        try:
            view = open_view()
            atlas = atlas_of(self.workspace, view)
            layers, heads = atlas.settings["num_layers"], atlas.settings["num_heads"]
            c = HeadChoice.parse(atlas, statistic, layers - 1, 0, order)
            drawn = self._drawn(view, atlas, c)
        except Exception as err:
            message = user_message(err)
            warn(message)
            return as_outputs({**cleared, "dataset_status": f"**Could not open this atlas:** {html.escape(message)}"},
                              DATASET_OUTPUTS)
        return as_outputs({**drawn, "dataset_status": summary_text(atlas), "dataset_figure": figure(atlas),
                           "dataset_layer": gr.update(maximum=layers - 1, value=c.layer),
                           "dataset_head": gr.update(choices=[str(h) for h in range(heads)], value="0")},
                          DATASET_OUTPUTS)

    @guarded
    def redraw(self, view: DatasetView | None, statistic: Any, layer: Any, head: Any, order: Any) -> tuple:
        """The chart, the table and the chosen head's images, after any control changed."""
        if view is None:
            return as_outputs({}, DRAWN)
        atlas = atlas_of(self.workspace, view)
        return as_outputs(self._drawn(view, atlas, HeadChoice.parse(atlas, statistic, layer, head, order)), DRAWN)

    @staticmethod
    def _drawn(view: DatasetView, atlas: Atlas, c: HeadChoice) -> dict:
        lowest, lowest_names = ranked_images(atlas, c, lowest=True)
        highest, highest_names = ranked_images(atlas, c, lowest=False)
        return {"dataset": replace(view, lowest=lowest_names, highest=highest_names), "dataset_chart": chart(atlas, c),
                "dataset_table": head_table(atlas, c.statistic, c.order), "dataset_lowest": lowest,
                "dataset_highest": highest, "dataset_caption": caption(atlas, c)}

    @guarded
    def select_row(self, view: DatasetView | None, evt: gr.SelectData) -> tuple:
        """A click on a row of the table selects its head."""
        if view is None or not isinstance(evt.row_value, (list, tuple)) or len(evt.row_value) < 2:
            return gr.skip(), gr.skip()
        atlas = atlas_of(self.workspace, view)
        c = HeadChoice.parse(atlas, "cls_patch_entropy", evt.row_value[0], evt.row_value[1])
        return c.layer, str(c.head)

    @guarded
    def open_lowest(self, view: DatasetView | None, evt: gr.SelectData) -> tuple:
        return self._open_image(view, "lowest", evt)

    @guarded
    def open_highest(self, view: DatasetView | None, evt: gr.SelectData) -> tuple:
        return self._open_image(view, "highest", evt)

    def _open_image(self, view: DatasetView | None, end: str, evt: gr.SelectData) -> tuple:
        """The clicked image into the single-image views' input (which analyses it), and that tab opened."""
        names = getattr(view, end, ()) if view is not None else ()
        if not names:
            return gr.skip(), gr.skip()
        index = whole(evt.index, "image", 0, len(names) - 1)
        return image_file(self.workspace, view, names[index]), gr.Tabs(selected="image")
