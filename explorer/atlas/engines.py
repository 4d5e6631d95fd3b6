"""Where the per-image step runs: in this process (the default), or on Ray actors across machines and GPUs.

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
IN_FLIGHT = 2  # batches queued per Ray actor: the next one is there when the current one is done


class EngineError(RuntimeError):
    """An engine that cannot start here; the message says what to install or change."""


@dataclass(frozen=True)
class RayOptions:
    """How Ray runs the step: `actors` copies of the model, each with these CPUs and GPUs."""

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
        raise EngineError("--engine ray needs Ray: pip install -r requirements-ray.txt") from None


def start_ray(measurer_args: dict, options: RayOptions) -> list:
    """Asks Ray for the pool of actors (one model per actor, a GPU each when asked); they start and load their
    models while the caller goes on. Joins the Ray instance already started, else `ray.init()` (a cluster's when
    RAY_ADDRESS is set; every node needs this project's requirements and must reach SOURCE).

    Plain actors rather than a Ray Data `map_batches` stage: Ray Data's actor pool took 3–22 s on this project's
    loaded 2-core machine to start one trivial actor (its worker imports Ray Data's stack first), a plain actor
    1–2 s (`benchmarks/ray_actor_start.py`)."""
    ray = import_ray()
    if not ray.is_initialized():
        ray.init(runtime_env={"py_modules": _own_packages()})
    worker = ray.remote(num_cpus=options.cpus_per_actor, num_gpus=options.gpus_per_actor)(Measurer)
    threads = max(1, int(options.cpus_per_actor))
    return [worker.remote(**measurer_args, threads=threads) for _ in range(options.actors)]


def stop_ray(actors: list) -> None:
    ray = import_ray()
    for actor in actors:
        ray.kill(actor)


def run_ray(actors: list, refs: list[ImageRef], batch_size: int, commit: Commit) -> None:
    """The same step on the actors of `start_ray`, each kept busy with IN_FLIGHT batches queued; the batches come
    back to this process to be written as they finish."""
    ray = import_ray()
    todo = iter(batches(refs, batch_size))
    running: dict = {}  # the result of each batch sent → the actor working on it

    def send(actor) -> None:
        batch = next(todo, None)
        if batch is not None:
            running[actor.measure_batch.remote(refs_table(batch))] = actor

    for _ in range(IN_FLIGHT):
        for actor in actors:
            send(actor)
    while running:
        [done], _ = ray.wait(list(running), num_returns=1)
        actor = running.pop(done)
        commit(ray.get(done))
        send(actor)


def _own_packages() -> list:
    """This project's packages, shipped to Ray's workers (on a cluster they do not have the checkout)."""
    return [importlib.import_module(name) for name in ("analysis", "explorer", "model", "visualizer")]
