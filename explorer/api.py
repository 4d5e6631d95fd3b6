"""The named API endpoints: every view for an image sent by a client (gradio_client), no page state needed."""

from collections.abc import Callable

import gradio as gr
from gradio.data_classes import FileData
from PIL import Image

from analysis import STAT_LABELS

from . import exports, views
from .session import DEFAULT_RESOLUTION, Session, Workspace


def _path(image: "FileData | dict | str") -> str:
    if isinstance(image, str):
        return image
    path = image.get("path") if isinstance(image, dict) else image.path
    if not path:
        raise ValueError("No image was given.")
    return path


def _file(image: Image.Image, name: str) -> FileData:
    return FileData(path=str(exports.save_png(image, exports.new_export_dir() / f"{name}.png")))


def register_api(workspace: Workspace, guard: Callable) -> None:
    """Adds the endpoints to the Blocks being built; `guard` turns bad input into a clear error."""
    from model import load_image

    def open_session(image, resolution: int, model: str = "default") -> tuple:
        session = workspace.open(load_image(_path(image)), resolution, model)
        return session, workspace.analysis(session)

    def pick(analysis, layer: int, head: str) -> tuple:
        layer = analysis.num_layers + layer if layer < 0 else layer
        return views.check_layer(analysis, layer), views.parse_head(head, analysis.num_heads)

    def cls_attention(image: FileData, layer: int = -1, head: str = "mean", resolution: int = DEFAULT_RESOLUTION,
                      opacity: float = 0.6, colormap: str = "inferno") -> tuple[FileData, FileData, dict]:
        """The class token's attention in `layer` (negative counts from the end): the overlay for `head`
        (an index, or mean/max/min), the grid of all heads, and every head's map as numbers."""
        session, analysis = open_session(image, resolution)
        layer, head = pick(analysis, layer, head)
        overlay, grid = views.cls_view(analysis, session.scene, layer, head, views.Style(opacity, colormap))
        return _file(overlay, "cls_attention"), _file(grid, "head_grid"), views.cls_maps_payload(analysis, layer)

    def patch_attention(image: FileData, x: float, y: float, layer: int = -1, head: str = "mean",
                        direction: str = "row", resolution: int = DEFAULT_RESOLUTION,
                        opacity: float = 0.6, colormap: str = "inferno") -> tuple[FileData, dict]:
        """What the patch under pixel (x, y) of the original image attends to (direction "row") or what
        attends to it ("column"), in `layer` for `head`."""
        session, analysis = open_session(image, resolution)
        layer, head = pick(analysis, layer, head)
        overlay, values, (row, col) = views.patch_view(analysis, session.scene, x, y, layer, head, direction,
                                                       views.Style(opacity, colormap))
        return _file(overlay, "patch_attention"), {"row": row, "col": col, "layer": layer, "head": head,
                                                   "direction": direction, "map": values.round(7).tolist()}

    def rollout(image: FileData, fusion: str = "mean", discard_ratio: float = 0.0,
                resolution: int = DEFAULT_RESOLUTION) -> tuple[FileData, dict]:
        """Attention rollout of the class token over all layers, heads fused by mean, max or min."""
        session, analysis = open_session(image, resolution)
        values = analysis.rollout_map(fusion, discard_ratio)
        overlay = views.rollout_view(analysis, session.scene, fusion, discard_ratio, views.Style())
        return _file(overlay, "rollout"), {"fusion": fusion, "discard_ratio": discard_ratio,
                                           "map": values.round(8).tolist()}

    def attention_flow(image: FileData, fusion: str = "mean", resolution: int = 336) -> tuple[FileData, dict]:
        """Attention flow (max-flow) to the class token from each patch; up to 577 tokens."""
        session, analysis = open_session(image, resolution)
        values = analysis.flow_map(fusion)
        overlay = views.flow_view(analysis, session.scene, fusion, views.Style())
        return _file(overlay, "attention_flow"), {"fusion": fusion, "map": values.round(7).tolist()}

    def head_statistics(image: FileData, resolution: int = DEFAULT_RESOLUTION) -> dict:
        """Per layer × head: class-token entropy, mean entropy, mean attention distance, class-token mass."""
        _, analysis = open_session(image, resolution)
        stats = analysis.statistics
        return {"labels": STAT_LABELS, "num_queries": stats.num_queries,
                **{name: values.round(6).tolist() for name, values in stats.as_dict().items()}}

    def hidden_states(image: FileData, layer: int = -1, x: float = 0.0, y: float = 0.0,
                      resolution: int = DEFAULT_RESOLUTION) -> tuple[FileData, FileData, FileData, dict]:
        """After `layer`: token norms with outliers outlined, PCA as RGB, cosine similarity to the patch at (x, y)."""
        session, analysis = open_session(image, resolution)
        layer, _ = pick(analysis, layer, "mean")
        norms, pca, similarity, outliers = views.hidden_views(analysis, session.scene, layer, x, y, views.Style())
        values, flags = analysis.norm_map(layer)
        return (_file(norms, "token_norms"), _file(pca, "pca"), _file(similarity, "similarity"),
                {"layer": layer, "norms": values.round(5).tolist(), "outliers": flags.tolist()})

    def layer_animation(image: FileData, mode: str = "cls", head: str = "mean",
                        resolution: int = DEFAULT_RESOLUTION) -> FileData:
        """A GIF through the layers: the class-token map of `head` ("cls") or rollout up to each layer."""
        session, analysis = open_session(image, resolution)
        _, head = pick(analysis, 0, head)
        frames, captions = views.layer_frames(analysis, session.scene, mode, head, views.Style())
        return FileData(path=str(exports.save_gif(frames, captions, exports.new_export_dir() / f"{mode}.gif")))

    def export(image: FileData, layer: int = -1, head: str = "mean", x: float = 0.0, y: float = 0.0,
               resolution: int = DEFAULT_RESOLUTION) -> tuple[FileData, FileData]:
        """The numbers behind the views as .npz with a .json sidecar (model, resolution, grid, alignment)."""
        session, analysis = open_session(image, resolution)
        layer, head = pick(analysis, layer, head)
        token = views.patch_at(analysis, x, y)[2]
        paths = exports.export_numbers(analysis, exports.new_export_dir() / "analysis", layer, head, token)
        return FileData(path=str(paths[0])), FileData(path=str(paths[1]))

    endpoints = (cls_attention, patch_attention, rollout, attention_flow, head_statistics, hidden_states,
                 layer_animation, export)
    for endpoint in endpoints:
        gr.api(guard(endpoint), api_name=endpoint.__name__, concurrency_limit=1)
