"""A dataset atlas: head statistics and class-token maps for every image of a folder or dataset, in Parquet, with
their aggregate over the dataset; made in this process or on Ray (`python -m explorer atlas`).

The names below are imported on first use (PEP 562), so that a Ray worker importing the per-image step
(`explorer.atlas.measure`) does not import the aggregate's, the reader's and the writer's libraries (SciPy's
statistics, pandas, Arrow's datasets): seconds of each actor's start on a small machine."""
import importlib

_WHERE = {"INTERVAL": "aggregate", "build_atlas": "build", "RayOptions": "engines", "Atlas": "reader",
          "load_atlas": "reader", "Source": "sources", "SourceError": "sources", "open_source": "sources",
          "AtlasError": "store"}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
