"""Where an atlas's images come from: a folder (searched recursively) or a Hugging Face `datasets` image dataset.

A source is described by a small picklable `Source`, so that a Ray worker on another machine can open it again and
read the images it is given by name; the images themselves never travel through the driver.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model.hub import HUB_ID

from ..cli import IMAGE_SUFFIXES

DATASET_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")  # what `save_to_disk` writes


class SourceError(ValueError):
    """A SOURCE that cannot be read; the message is meant for the person who gave it."""


@dataclass(frozen=True)
class ImageRef:
    """One image of a source: its name in the atlas, and where to read it (a file, or a dataset row)."""

    name: str
    path: str | None = None
    index: int | None = None


@dataclass
class Source:
    """A folder of images, or a `datasets` dataset (a `save_to_disk` folder or a hub id) with its split."""

    location: str
    kind: str  # "folder" or "dataset"
    split: str = "train"
    _dataset: Any = field(default=None, repr=False, compare=False)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_dataset": None}  # each worker opens the dataset itself

    def refs(self) -> list[ImageRef]:
        """Every image, in a stable order (sorted paths, or dataset rows)."""
        if self.kind == "folder":
            root = Path(self.location)
            paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            return [ImageRef(p.relative_to(root).as_posix(), path=str(p)) for p in paths]
        count = len(self.dataset())
        width = max(6, len(str(count - 1)))
        return [ImageRef(f"{self.split}/{index:0{width}d}", index=index) for index in range(count)]

    def read(self, ref: ImageRef) -> "str | bytes":
        """What `model.load_image` opens for `ref`: a path, or the encoded bytes of a dataset row."""
        if ref.path is not None:
            return ref.path
        dataset = self.dataset()
        value = dataset[ref.index][image_column(dataset, self.location)] or {}
        if value.get("bytes"):
            return value["bytes"]
        if value.get("path"):
            return value["path"]
        return b""  # an empty row: load_image reports it like an empty file

    def dataset(self):
        """The dataset's split, with its image column left encoded (opened once per process)."""
        if self._dataset is None:
            datasets = _datasets()
            try:
                if Path(self.location).is_dir():
                    loaded = datasets.load_from_disk(self.location)
                else:
                    loaded = datasets.load_dataset(self.location, split=self.split)
            except Exception as err:  # datasets raises many kinds; the reason is in the message
                taken = "" if Path(self.location).is_dir() else ", taken as a hub dataset id (no such folder here),"
                raise SourceError(f"{self.location}{taken} could not be opened as a dataset ({err}).") from err
            if isinstance(loaded, datasets.DatasetDict):
                if self.split not in loaded:
                    raise SourceError(f"{self.location} has no split {self.split!r} (splits: {', '.join(loaded)}).")
                loaded = loaded[self.split]
            self._dataset = loaded.cast_column(image_column(loaded, self.location), datasets.Image(decode=False))
        return self._dataset


def image_column(dataset, location: str) -> str:
    """The dataset's first column of images."""
    for name, feature in dataset.features.items():
        if isinstance(feature, _datasets().Image):
            return name
    raise SourceError(f"{location} has no image column (columns: {', '.join(dataset.features)}).")


def _datasets():
    try:
        return importlib.import_module("datasets")
    except ImportError:
        raise SourceError("reading a Hugging Face dataset needs the `datasets` package: pip install datasets") from None


def open_source(location: "str | Path", split: str = "train") -> Source:
    """A folder of images, a `save_to_disk` dataset folder, or a hub dataset id; refused with a plain message."""
    path = Path(location)
    if path.is_dir():
        if any((path / marker).is_file() for marker in DATASET_MARKERS):
            return Source(str(path), "dataset", split)
        return Source(str(path), "folder", split)
    if path.exists():
        raise SourceError(f"{path} is a file: SOURCE is a folder of images or a dataset.")
    if HUB_ID.match(str(location)):
        return Source(str(location), "dataset", split)
    raise SourceError(f"{path} does not exist.")
