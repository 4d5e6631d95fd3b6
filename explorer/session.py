"""What one visitor is looking at, and the shared workspace (models, analyses) it is computed from."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

from PIL import Image

from analysis import Analysis, analyze
from analysis.stats import DEFAULT_STAT_QUERIES

from .cache import AnalysisCache, image_digest
from .models import DEFAULT, ModelStore
from .views import Scene

MIN_RESOLUTION, MAX_RESOLUTION, DEFAULT_RESOLUTION = 224, 2048, 518


@dataclass(frozen=True)
class Session:
    """One image at one resolution with one model; the analysis itself lives in the shared cache."""

    scene: Scene = field(compare=False)
    digest: str
    resolution: int
    model_key: str = DEFAULT
    stat_queries: int | None = DEFAULT_STAT_QUERIES
    dtype: str = "float32"
    point: tuple[float, float] | None = None  # the clicked pixel on the original image

    @property
    def key(self) -> tuple:
        return self.model_key, self.digest, self.resolution, self.stat_queries, self.dtype

    def clicked(self, x: float, y: float) -> "Session":
        return replace(self, point=(x, y))

    def clicked_point(self) -> tuple[float, float]:
        """The clicked pixel, or the image centre before any click."""
        if self.point is not None:
            return self.point
        return self.scene.original.width / 2, self.scene.original.height / 2


def check_resolution(resolution: float) -> int:
    value = int(round(resolution))
    if not MIN_RESOLUTION <= value <= MAX_RESOLUTION:
        raise ValueError(f"resolution must be between {MIN_RESOLUTION} and {MAX_RESOLUTION} px, got {value}")
    return value


class Workspace:
    """Models and analyses shared by every session."""

    def __init__(self, models: ModelStore, cache: AnalysisCache):
        self.models = models
        self.cache = cache

    def open(self, image: Image.Image, resolution: float, model_key: str = DEFAULT,
             stat_queries: int | None = DEFAULT_STAT_QUERIES, dtype: str = "float32") -> Session:
        return Session(Scene.of(image), image_digest(image), check_resolution(resolution), model_key or DEFAULT,
                       stat_queries, dtype)

    def analysis(self, session: Session, progress: Callable[[float, str], None] | None = None) -> Analysis:
        """The session's analysis, computed once and then served from the cache."""
        def compute() -> Analysis:
            loaded = self.models.get(session.model_key)
            return analyze(loaded, session.scene.original, session.resolution, session.dtype,
                           session.stat_queries, progress)
        return self.cache.get_or_compute(session.key, compute)
