"""The shared workspace (models, cached analyses and images, files) and the small state a page visitor keeps."""
from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from analysis import Analysis, analyze
from analysis.stats import DEFAULT_STAT_QUERIES
from model import LoadedModel, load_image

from .cache import AnalysisCache, image_digest
from .files import FileStore
from .gpu import GPU_ANALYZE, on_zero_gpu
from .inputs import UserError, uploaded_file
from .models import DEFAULT, ModelStore
from .views import Scene

MIN_RESOLUTION, MAX_RESOLUTION, DEFAULT_RESOLUTION = 224, 2048, 518
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


def resolution_limits(patch_size: int) -> tuple[int, int]:
    """The smallest and largest long side a slider stepping by `patch_size` from MIN_RESOLUTION can reach."""
    return MIN_RESOLUTION, MIN_RESOLUTION + (MAX_RESOLUTION - MIN_RESOLUTION) // patch_size * patch_size


class Workspace:
    """Models, analyses, decoded images and written files shared by every visitor; one forward pass at a time
    per device slot, and one computation for concurrent identical requests."""

    def __init__(self, models: ModelStore, cache: AnalysisCache, files: FileStore, upload_roots: Iterable[Path],
                 device_slots: int = 1):
        self.models = models
        self.cache = cache
        self.files = files
        self.upload_roots = tuple(Path(root).resolve() for root in upload_roots)
        self.device_slots = device_slots
        self._device = threading.BoundedSemaphore(device_slots)
        models.on_unload = lambda model: cache.drop(lambda key: key[0] == "analysis" and key[1].model == model)

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
            image = load_image(source, warn)
        except FileNotFoundError:
            raise UserError("The uploaded image has expired on the server: upload it again.") from None
        digest = image_digest(image)
        return self.cache.get_or_compute(("scene", digest), lambda: Scene.of(image, digest))

    def key(self, scene: Scene, resolution: int, model: str = DEFAULT, dtype: str = "float32") -> AnalysisKey:
        return AnalysisKey(self.models.check(model), scene.digest, resolution, dtype)

    def analysis(self, key: AnalysisKey, source: str, progress: Progress | None = None) -> Analysis:
        """The analysis for `key`, computed once (concurrent identical requests wait for it), then cached."""
        def compute() -> Analysis:
            scene = self.scene(source, digest=key.digest)
            loaded = self.models.get(key.model, key.dtype)
            with self._device:
                return analyze_scene(loaded, scene, key.resolution, key.dtype, progress)
        return self.cache.get_or_compute(("analysis", key), compute)


def analyze_scene(loaded: LoadedModel, scene: Scene, resolution: int, dtype: str = "float32",
                  progress: Progress | None = None) -> Analysis:
    """The analysis of an upload, its geometry in the upload's own pixels (the model may see a reduced copy).

    On ZeroGPU the forward runs on a lent GPU (no progress bar crosses to its process) and rows are rebuilt here,
    on the CPU, with the same weights."""
    if on_zero_gpu():
        analysis = GPU_ANALYZE(loaded, scene.image, resolution, dtype)
        analysis.record = analysis.record.moved("cpu", loaded.model.encoder.layers)
    else:
        analysis = analyze(loaded, scene.image, resolution, dtype, DEFAULT_STAT_QUERIES, progress)
    width, height = scene.original_size
    analysis.geometry = dataclasses.replace(analysis.geometry, orig_w=width, orig_h=height)
    return analysis
