"""Where the per-image step runs: in this process (the default), or on Ray Data across machines and GPUs.

Both feed the same `Measurer` batches of image references and hand each batch's rows to the same writer, in this
process, so the atlas on disk is the same whichever engine made it.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import pyarrow as pa

from .measure import Measurer, refs_table
from .sources import ImageRef

Commit = Callable[[pa.Table], None]  # writes one batch's rows (and counts them for the progress bar)
ENGINES = ("local", "ray")


class EngineError(RuntimeError):
    """An engine that cannot start here; the message says what to install or change."""


@dataclass(frozen=True)
class RayOptions:
    """How Ray Data runs the step: `actors` copies of the model, each with these CPUs and GPUs."""

    actors: int = 1
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0


def batches(refs: list[ImageRef], size: int) -> list[list[ImageRef]]:
    return [refs[start:start + size] for start in range(0, len(refs), size)]


def run_local(measurer: Measurer, refs: list[ImageRef], batch_size: int, commit: Commit) -> None:
    """One model in this process; the next batch is decoded while this one is analysed, so at most two batches of
    decoded images and one analysis are held at a time."""
    pending = [refs_table(batch) for batch in batches(refs, batch_size)]
    decoded = measurer.decode(pending[0]) if pending else []
    for index in range(len(pending)):
        current = decoded
        decoded = measurer.decode(pending[index + 1]) if index + 1 < len(pending) else []
        commit(measurer.measure(current))


def import_ray():
    """Ray, imported on first use; a plain message when it is not installed."""
    try:
        return importlib.import_module("ray")
    except ImportError:
        raise EngineError("--engine ray needs Ray Data: pip install -r requirements-ray.txt") from None


def run_ray(measurer_args: dict, refs: list[ImageRef], batch_size: int, commit: Commit, options: RayOptions) -> None:
    """The same step as a Ray Data `map_batches` stage on an actor pool (one model per actor, a GPU each when
    asked); the batches come back to this process to be written. Joins the Ray instance already started, else
    `ray.init()` (a cluster's when RAY_ADDRESS is set; every node needs this project's requirements and must reach
    SOURCE)."""
    ray = import_ray()
    if not refs:
        return
    if not ray.is_initialized():
        ray.init(runtime_env={"py_modules": _own_packages()})
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = context.print_on_execution_start = False  # this process shows its own bar
    dataset = ray.data.from_arrow([refs_table(batch) for batch in batches(refs, batch_size)])
    threads = max(1, int(options.cpus_per_actor))
    stage = dataset.map_batches(Measurer, fn_constructor_kwargs={**measurer_args, "threads": threads},
                                batch_size=batch_size, batch_format="pyarrow",
                                compute=ray.data.ActorPoolStrategy(size=options.actors),
                                num_cpus=options.cpus_per_actor, num_gpus=options.gpus_per_actor)
    for batch in stage.iter_batches(batch_size=None, batch_format="pyarrow"):
        commit(batch)


def _own_packages() -> list:
    """This project's packages, shipped to Ray's workers (on a cluster they do not have the checkout)."""
    return [importlib.import_module(name) for name in ("analysis", "explorer", "model", "visualizer")]
