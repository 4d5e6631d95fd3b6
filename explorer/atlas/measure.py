"""The one per-image step both engines run: decode, analyse, keep only the head statistics and the last layer's
class-token maps; the analysis itself is dropped before the next image."""
from __future__ import annotations

import io
import logging
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import torch

from analysis import STAT_LABELS, analyze, summary_of
from model import InvalidImageError, LoadedModel, load_image, load_model

from ..drawing import Scene
from ..inputs import STAT_MODES
from .sources import ImageRef, Source

logger = logging.getLogger("vit-inspect")
THUMBNAIL_QUALITY = 85  # the JPEG of each image's 224 px copy (the page's head-grid tiles are this size)
MAP_DTYPE = np.float16  # the kept class-token maps: 2 bytes a patch
FORMAT, VERSION = "vit-inspect atlas", 1
REF_SCHEMA = pa.schema([("name", pa.string()), ("path", pa.string()), ("index", pa.int64())])


def batch_schema() -> pa.Schema:
    """One row per image: what it is, why it failed (null when it did not), its maps and statistics."""
    return pa.schema([("image", pa.string()), ("error", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
                      ("grid_h", pa.int32()), ("grid_w", pa.int32()), ("num_queries", pa.int32()),
                      ("thumbnail", pa.binary()), ("cls_maps", pa.binary()),
                      *((name, pa.list_(pa.float32())) for name in STAT_LABELS)])


def settings_of(loaded: LoadedModel, resolution: int, queries: str, source: Source) -> dict:
    """What an atlas was made with, as its Parquet files' metadata record it."""
    config = loaded.config
    return {"format": FORMAT, "version": VERSION, "model": loaded.name, "resolution": resolution, "queries": queries,
            "max_queries": STAT_MODES[queries], "dtype": str(next(loaded.model.parameters()).dtype).split(".")[-1],
            "num_layers": config.num_hidden_layers, "num_heads": config.num_attention_heads,
            "patch_size": config.patch_size, "num_prefix_tokens": config.num_prefix_tokens,
            "summary": summary_of(config).to_dict(), "map_layer": config.num_hidden_layers - 1,
            "map_dtype": np.dtype(MAP_DTYPE).name, "labels": STAT_LABELS,
            "source": {"location": source.location, "kind": source.kind, "split": source.split}}


def refs_table(refs: list[ImageRef]) -> pa.Table:
    return pa.table({"name": [r.name for r in refs], "path": [r.path for r in refs],
                     "index": [r.index for r in refs]}, schema=REF_SCHEMA)


class Measurer:
    """Holds one model and turns a batch of image references (REF_SCHEMA) into one row per image (batch_schema).

    The same callable is the in-process engine's step and Ray Data's `map_batches` stage (one per actor). Images
    are decoded by a small thread pool; the batch's images are then analysed one at a time, those of one input
    size back to back (analyze takes one image: "batching" here is this grouping, not a batched forward).

    Args:
        model: a loaded model, or what `model.load_model` loads (None: the embedded default) on `device`.
        threads: torch's CPU threads in this process (a Ray actor sets its share).
    """

    def __init__(self, model: "LoadedModel | str | None", source: Source, resolution: int, queries: str,
                 device: str | None = None, decoders: int = 2, threads: int | None = None):
        if threads:
            torch.set_num_threads(threads)
        self.loaded = model if isinstance(model, LoadedModel) else load_model(model, device)
        self.source, self.resolution, self.max_queries = source, resolution, STAT_MODES[queries]
        self.pool = ThreadPoolExecutor(decoders, thread_name_prefix="atlas-decode")

    def __call__(self, batch: pa.Table) -> pa.Table:
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
            analysis = analyze(self.loaded, scene.image, self.resolution, max_stat_queries=self.max_queries,
                               original_size=scene.original_size)
        except InvalidImageError as err:
            return {"image": name, "error": str(err)}
        statistics, g = analysis.statistics, analysis.geometry
        thumbnail = io.BytesIO()
        scene.thumb.save(thumbnail, "JPEG", quality=THUMBNAIL_QUALITY)
        return {"image": name, "width": g.orig_w, "height": g.orig_h, "grid_h": g.grid_h, "grid_w": g.grid_w,
                "num_queries": statistics.num_queries, "thumbnail": thumbnail.getvalue(),
                "cls_maps": analysis.cls_maps(analysis.num_layers - 1).astype(MAP_DTYPE).tobytes(),
                **{key: values.ravel() for key, values in statistics.as_dict().items()}}
