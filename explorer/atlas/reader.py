"""An atlas folder read back and checked, for the page: its tables, each image's maps and thumbnail, and the images
that rank first or last for a head by a statistic."""
from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from PIL import Image

from analysis import STAT_LABELS

from .sources import ImageRef, Source
from .store import AGGREGATE, IMAGE_COLUMNS, IMAGES, STATISTICS, SUMMARY, AtlasError, check_settings, part_paths
from .store import part_settings, read_table

BLOB_COLUMNS = ("thumbnail", "cls_maps")  # read per image on demand, not with the tables


@dataclass
class Atlas:
    """A finished atlas: per image × layer × head statistics, per-image facts, the aggregate and the summary."""

    folder: Path
    settings: dict
    statistics: pd.DataFrame  # image, layer, head, one column per statistic; sorted by image, layer, head
    images: pd.DataFrame  # image, width, height, grid_h, grid_w, num_queries, the prediction; sorted by image
    aggregate: pd.DataFrame  # layer, head, statistic, n, mean, low, high
    summary: dict

    def ranked(self, layer: int, head: int, statistic: str, count: int = 8, lowest: bool = True) -> pd.DataFrame:
        """The `count` images with the lowest (or highest) `statistic` for this head: image and value, in order.

        The images where a head is most focused: statistic "cls_patch_entropy", lowest first."""
        if statistic not in STAT_LABELS:
            raise ValueError(f"statistic must be one of {', '.join(STAT_LABELS)}, got {statistic!r}")
        if not (0 <= layer < self.settings["num_layers"] and 0 <= head < self.settings["num_heads"]):
            raise ValueError(f"no layer {layer}, head {head} in a {self.settings['num_layers']} × "
                             f"{self.settings['num_heads']} model")
        rows = self.statistics[(self.statistics["layer"] == layer) & (self.statistics["head"] == head)]
        rows = rows[["image", statistic]].dropna().sort_values([statistic, "image"], ascending=[lowest, True],
                                                                kind="stable")
        return rows.head(count).reset_index(drop=True)

    @property
    def nbytes(self) -> int:
        """Bytes of the tables held in memory (the thumbnails and maps stay on disk)."""
        return int(sum(frame.memory_usage(deep=True).sum() for frame in (self.statistics, self.images, self.aggregate)))

    def aggregated(self, statistic: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(mean, low, high) of `statistic` over the images, each (layers, heads): the aggregate's t-interval."""
        if statistic not in STAT_LABELS:
            raise ValueError(f"statistic must be one of {', '.join(STAT_LABELS)}, got {statistic!r}")
        rows = self.aggregate[self.aggregate["statistic"] == statistic].sort_values(["layer", "head"])
        shape = (self.settings["num_layers"], self.settings["num_heads"])
        return tuple(rows[column].to_numpy(np.float64).reshape(shape) for column in ("mean", "low", "high"))

    def original(self, image: str) -> "str | bytes":
        """The image as its source holds it: a path inside a folder source, or a `save_to_disk` dataset row (bytes
        or a path); KeyError for an image this atlas does not list, AtlasError for a source not readable here."""
        if not (self.images["image"] == image).any():
            raise KeyError(f"{image!r} is not in this atlas")
        source = self.settings["source"]
        root = Path(source["location"])
        if not root.is_dir():
            raise AtlasError("The atlas's images are not on this server (a hub dataset, or a folder since moved).")
        if source["kind"] == "folder":
            path = (root / image).resolve()
            if not path.is_relative_to(root.resolve()) or not path.is_file():
                raise AtlasError(f"{image} is no longer in the atlas's source folder.")
            return str(path)
        split, _, index = image.rpartition("/")
        return Source(str(root), "dataset", split).read(ImageRef(image, index=int(index)))

    def _blob(self, image: str, column: str) -> bytes:
        table = read_table(self.folder / IMAGES, [column], images=[image])
        if table.num_rows != 1:
            raise KeyError(f"{image!r} is not in this atlas")
        return table[column][0].as_py()

    def cls_maps(self, image: str) -> np.ndarray:
        """The last layer's class-token map of each head for `image`: (heads, grid_h, grid_w), float32."""
        row = self.images[self.images["image"] == image]
        if row.empty:
            raise KeyError(f"{image!r} is not in this atlas")
        shape = (self.settings["num_heads"], int(row["grid_h"].iloc[0]), int(row["grid_w"].iloc[0]))
        return np.frombuffer(self._blob(image, "cls_maps"), self.settings["map_dtype"]).reshape(shape).astype(
            np.float32)

    def thumbnail(self, image: str) -> Image.Image:
        """`image` at 224 px on its long side, as the atlas kept it."""
        return Image.open(io.BytesIO(self._blob(image, "thumbnail"))).convert("RGB")


def load_atlas(folder: "str | Path") -> Atlas:
    """Reads a finished atlas and checks it: one setting for every part, every image with each layer × head once,
    the same images in both tables, the aggregate and summary present; refuses anything else with AtlasError."""
    folder = Path(folder)
    parts = part_paths(folder / STATISTICS)
    if not parts:
        raise AtlasError(f"{folder} holds no atlas (no {STATISTICS}/part-*.parquet).")
    if not (folder / SUMMARY).is_file() or not (folder / AGGREGATE).is_file():
        raise AtlasError(f"{folder} is unfinished (no {SUMMARY} or {AGGREGATE}): run the atlas command again to "
                         "finish it.")
    settings = part_settings(parts[0])
    for path in [*parts[1:], *part_paths(folder / IMAGES)]:
        check_settings(part_settings(path), settings, path)
    statistics = read_table(folder / STATISTICS).to_pandas().sort_values(["image", "layer", "head"],
                                                                         ignore_index=True)
    written = set(pq.read_schema(part_paths(folder / IMAGES)[0]).names) if part_paths(folder / IMAGES) else set()
    columns = [c for c in IMAGE_COLUMNS if c not in BLOB_COLUMNS and c in written]  # version 1: no prediction
    images = read_table(folder / IMAGES, columns).to_pandas()
    images = images.sort_values("image", ignore_index=True)
    check_tables(statistics, images, settings, folder)
    return Atlas(folder, settings, statistics, images, pd.read_parquet(folder / AGGREGATE),
                 json.loads((folder / SUMMARY).read_text()))


def check_tables(statistics: pd.DataFrame, images: pd.DataFrame, settings: dict, folder: Path) -> None:
    """Every image has each layer × head exactly once, within the model's sizes, and a row of maps."""
    layers, heads = settings["num_layers"], settings["num_heads"]
    if statistics.duplicated(["image", "layer", "head"]).any() or images["image"].duplicated().any():
        raise AtlasError(f"{folder} holds an image twice.")
    counts = statistics.groupby("image").size()
    out_of_range = ~statistics["layer"].between(0, layers - 1) | ~statistics["head"].between(0, heads - 1)
    if (counts != layers * heads).any() or out_of_range.any():
        raise AtlasError(f"{folder}: every image must have {layers} layers × {heads} heads of statistics.")
    if set(counts.index) != set(images["image"]):
        raise AtlasError(f"{folder}: the {STATISTICS} and {IMAGES} tables hold different images.")
