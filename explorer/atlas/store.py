"""An atlas folder on disk: one Parquet part per batch in statistics/ and images/, each written whole or not at all,
so that a run stopped anywhere resumes with the images it had not finished.

    DIR/statistics/part-000000.parquet  image, layer, head, one column per statistic (STAT_LABELS' names)
    DIR/images/part-000000.parquet      image, width, height, grid_h, grid_w, num_queries, thumbnail (JPEG),
                                        cls_maps (the last layer's class-token maps, float16 heads × grid_h × grid_w),
                                        the model's prediction (measure.PREDICTIONS; null where the model has no head)
    DIR/aggregate.parquet, DIR/summary.json, DIR/mean_attention_distance.png   (written at the end, aggregate.py)

A part is written to a hidden temporary file, synced and renamed into place; a batch's images part is renamed
before its statistics part, which commits the batch. Readers (pandas, DuckDB, pyarrow) skip hidden files.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from analysis import STAT_LABELS

STATISTICS, IMAGES = "statistics", "images"
AGGREGATE, SUMMARY, FIGURE = "aggregate.parquet", "summary.json", "mean_attention_distance.png"
METADATA_KEY = b"vit_inspect_atlas"  # the settings, as JSON, in every part's schema metadata
RESUME_KEYS = ("format", "version", "model", "resolution", "queries", "dtype", "num_layers", "num_heads")
IMAGE_COLUMNS = ("image", "width", "height", "grid_h", "grid_w", "num_queries", "thumbnail", "cls_maps", "top_classes",
                 "top_probabilities", "top_labels", "saliency_mean", "region_share")


class AtlasError(ValueError):
    """An output folder that cannot be written or read as an atlas; the message is meant for a person."""


def part_paths(folder: Path) -> list[Path]:
    """The committed parts of one table, in order."""
    return sorted(folder.glob("part-*.parquet")) if folder.is_dir() else []


def part_settings(path: Path) -> dict:
    """The settings a part was written with (its schema metadata)."""
    metadata = pq.read_schema(path).metadata or {}
    if METADATA_KEY not in metadata:
        raise AtlasError(f"{path} was not written by the atlas (no {METADATA_KEY.decode()} metadata).")
    return json.loads(metadata[METADATA_KEY])


def check_settings(found: dict, expected: dict, where: Path) -> None:
    """Refuses parts made with other settings than `expected` (RESUME_KEYS), naming the first that differs."""
    for key in RESUME_KEYS:
        if found.get(key) != expected.get(key):
            raise AtlasError(f"{where} holds an atlas made with {key}={found.get(key)!r}, not {expected.get(key)!r}: "
                             "choose another --out folder, or the same settings to resume it.")


def read_table(folder: Path, columns: list[str] | None = None, images: list[str] | None = None) -> pa.Table:
    """One table's committed parts as one Arrow table (optionally only `images`' rows)."""
    dataset = ds.dataset(part_paths(folder), format="parquet")
    where = None if images is None else pc.field("image").isin(images)
    return dataset.to_table(columns=columns, filter=where)


def write_atomic(table: pa.Table, path: Path) -> None:
    """Writes a Parquet file whole: to a hidden temporary file, synced, then renamed over `path`."""
    temporary = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, temporary)
    with open(temporary, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def write_bytes_atomic(data: bytes, path: Path) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def check_out(folder: Path) -> None:
    """An output folder: new, empty, or an atlas (to resume); anything else is refused."""
    if folder.exists() and not folder.is_dir():
        raise AtlasError(f"--out {folder} is a file: give a folder (new, empty, or an atlas to resume).")
    if folder.is_dir() and any(folder.iterdir()) and not (folder / STATISTICS).is_dir():
        raise AtlasError(f"--out {folder} is a folder that holds other files: give a new or empty folder, or an "
                         "atlas to resume.")


class AtlasWriter:
    """Appends one part per batch; knows which images are already in the atlas (`done`) to resume a run."""

    def __init__(self, folder: Path, settings: dict):
        check_out(folder)
        self.folder, self.settings = folder, settings
        self.metadata = {METADATA_KEY: json.dumps(settings).encode()}
        try:
            for name in (STATISTICS, IMAGES):
                (folder / name).mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise AtlasError(f"--out {folder} cannot be written ({err.strerror}).") from err
        committed = part_paths(folder / STATISTICS)
        for leftover in [*folder.glob(f"{STATISTICS}/.*.tmp"), *folder.glob(f"{IMAGES}/.*.tmp"),
                         *(p for p in part_paths(folder / IMAGES) if not (folder / STATISTICS / p.name).exists())]:
            leftover.unlink()  # a batch that was stopped before its statistics part committed it
        for path in committed:
            check_settings(part_settings(path), settings, folder)
        # the images parts left are those of committed batches: one row per image
        self.done = set(read_table(folder / IMAGES, ["image"])["image"].to_pylist()) if committed else set()
        self.next_part = int(committed[-1].stem.split("-")[1]) + 1 if committed else 0

    def write(self, batch: pa.Table) -> list[tuple[str, str]]:
        """Commits the batch's analysed images as one part of each table; returns the failed (image, reason)."""
        failed = batch.filter(pc.invert(pc.is_null(batch["error"])))
        analysed = batch.filter(pc.and_(pc.is_null(batch["error"]),
                                        pc.invert(pc.is_in(batch["image"], pa.array(sorted(self.done), pa.string())))))
        if analysed.num_rows:
            name = f"part-{self.next_part:06d}.parquet"
            write_atomic(analysed.select(list(IMAGE_COLUMNS)).replace_schema_metadata(self.metadata),
                         self.folder / IMAGES / name)
            write_atomic(self.statistics_rows(analysed), self.folder / STATISTICS / name)
            self.done.update(analysed["image"].to_pylist())
            self.next_part += 1
        return list(zip(failed["image"].to_pylist(), failed["error"].to_pylist()))

    def statistics_rows(self, analysed: pa.Table) -> pa.Table:
        """One row per image × layer × head, from the batch's per-image lists (layer-major, as analyses keep them)."""
        layers, heads, count = self.settings["num_layers"], self.settings["num_heads"], analysed.num_rows
        columns = {"image": pa.array(np.repeat(np.array(analysed["image"].to_pylist(), dtype=object), layers * heads),
                                     pa.string()),
                   "layer": pa.array(np.tile(np.repeat(np.arange(layers, dtype=np.int32), heads), count)),
                   "head": pa.array(np.tile(np.arange(heads, dtype=np.int32), count * layers))}
        for name in STAT_LABELS:
            values = pc.list_flatten(analysed[name])
            if len(values) != count * layers * heads:
                raise AtlasError(f"{name}: expected {layers} × {heads} values per image, got {len(values)} for "
                                 f"{count} images.")
            columns[name] = values
        return pa.table(columns).replace_schema_metadata(self.metadata)
