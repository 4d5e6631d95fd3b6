"""The shared workspace (models, decoded images, analyses, rebuilt layers and written files, all bounded) and the
small state a page visitor keeps."""
from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from analysis import Analysis, analyze
from explorer.cache import ByteCache, Key, image_digest
from explorer.drawing import Scene
from explorer.inputs import UserError, uploaded_file
from model import LoadedModel, load_image

from .files import FileStore
from .gpu import GPU_ANALYZE, on_zero_gpu
from .model_store import DEFAULT, ModelStore
from .settings import Settings

Progress = Callable[[float, str], None]
Warn = Callable[[str], None]


@dataclass(frozen=True)
class AnalysisKey:
    """Everything an analysis depends on."""

    model: str
    digest: str  # of the decoded image
    resolution: int
    dtype: str = "float32"


@dataclass(frozen=True)
class View:
    """What one page visitor is looking at; the analysis and the image themselves live in the shared cache."""

    key: AnalysisKey
    source: str  # the upload the image came from, to decode again if the cache dropped it
    point: tuple[float, float] | None = None  # the clicked pixel, in the upload's coordinates

    def clicked(self, x: float, y: float) -> "View":
        return dataclasses.replace(self, point=(x, y))


class Workspace:
    """Models, analyses, decoded images, rebuilt layers and written files shared by every visitor, in one cache
    under one byte budget; one forward pass at a time per device slot, one computation for identical requests."""

    def __init__(self, settings: Settings, files: FileStore, upload_roots: Iterable[Path],
                 default: LoadedModel | None = None, device: str | None = None):
        self.settings = settings
        self.cache = ByteCache(settings.cache_bytes, {"layer": settings.rebuild_cache_bytes}, self._evicted)
        self.models = ModelStore(self.cache, settings, default, device)
        self.files = files
        self.upload_roots = tuple(Path(root).resolve() for root in upload_roots)
        self.device_slots = settings.concurrency or (2 if self.models.device_type == "cuda" else 1)
        self._device = threading.BoundedSemaphore(self.device_slots)
        self._decoding = threading.BoundedSemaphore(1)  # one image decoded at a time: its working memory, once
        self.limits = settings.compute_limits(self.models.device_type)  # tokens, work and seconds per analysis

    def _evicted(self, key: Key) -> None:
        """A model dropped for room takes its analyses along: they rebuild rows with its weights."""
        if key[0] == "model":
            self.cache.drop(lambda other: other[0] == "analysis" and other[1].model == key[1])

    def upload(self, value, name: str = "image", warn: Warn | None = None) -> tuple[str, Scene]:
        """(source path, scene) of an uploaded image: checked, decoded once, then served from the cache."""
        path = uploaded_file(value, name, self.upload_roots)
        return str(path), self.scene(str(path), warn)

    def scene(self, source: str, warn: Warn | None = None, digest: str | None = None) -> Scene:
        """The decoded image of an upload (by its digest when known, else decoded again)."""
        found = self.cache.get(("scene", digest)) if digest else None
        if found is not None:
            return found
        try:
            with self._decoding:
                image = load_image(source, warn)
        except FileNotFoundError:
            raise UserError("The uploaded image has expired on the server: upload it again.") from None
        digest = image_digest(image)
        return self.cache.get_or_compute(("scene", digest), lambda: Scene.of(image, digest))

    def key(self, scene: Scene, resolution: int, model: str = DEFAULT, dtype: str = "float32") -> AnalysisKey:
        return AnalysisKey(self.models.check(model), scene.digest, resolution, dtype)

    def analysis(self, key: AnalysisKey, source: str, progress: Progress | None = None,
                 keep_outputs: bool = False) -> Analysis:
        """The analysis for `key`, computed once (concurrent identical requests wait for it), then cached;
        `keep_outputs` for an explanation that follows (see `analyze`; a cached analysis is used as it is)."""
        def compute() -> Analysis:
            scene = self.scene(source, digest=key.digest)
            loaded = self.models.get(key.model, key.dtype)
            with self._device:
                analysis = self._analyze(loaded, scene, key, progress, keep_outputs)
            self.models.get(key.model, key.dtype)  # used last but for the analysis: not the first to go for room
            return analysis
        analysis = self.cache.get_or_compute(("analysis", key), compute)
        self.cache.get(("model", key.model, key.dtype))  # an analysis in use keeps its model recent
        return analysis

    def _analyze(self, loaded: LoadedModel, scene: Scene, key: AnalysisKey, progress: Progress | None,
                 keep_outputs: bool) -> Analysis:
        """The class-token maps first; statistics on first use. On ZeroGPU the forward runs on a lent GPU (no
        progress bar crosses to its process) and rows are rebuilt here, on the CPU, with the same weights."""
        if on_zero_gpu():
            analysis = GPU_ANALYZE(loaded, scene.image, key.resolution, key.dtype, scene.original_size, self.limits)
            analysis.record = analysis.record.moved("cpu", loaded.model.encoder.layers, self.cache)
            return analysis
        return analyze(loaded, scene.image, key.resolution, key.dtype, progress=progress,
                       original_size=scene.original_size, store=self.cache, statistics=False, limits=self.limits,
                       keep_outputs=keep_outputs)

    def device_slot(self) -> threading.BoundedSemaphore:
        """The device semaphore that every analysis holds (`with ws.device_slot(): ...`): the atlas of an uploaded
        zip takes it too."""
        return self._device

    def pin(self, key: AnalysisKey) -> None:
        """Keeps an analysis and its image whatever the budget (the arrival example)."""
        self.cache.pin(("scene", key.digest))
        self.cache.pin(("analysis", key))
