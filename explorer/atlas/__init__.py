"""A dataset atlas: head statistics and class-token maps for every image of a folder or dataset, in Parquet, with
their aggregate over the dataset; made in this process or on Ray (`python -m explorer atlas`)."""
from .aggregate import INTERVAL
from .build import build_atlas
from .engines import RayOptions
from .reader import Atlas, load_atlas
from .sources import Source, SourceError, open_source
from .store import AtlasError

__all__ = ["INTERVAL", "Atlas", "AtlasError", "RayOptions", "Source", "SourceError", "build_atlas", "load_atlas",
           "open_source"]
