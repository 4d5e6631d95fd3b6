"""Making an atlas: the images of a source not yet in the output folder, through an engine, into the folder, then
the aggregate over everything the folder holds."""
from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
from tqdm import tqdm

from analysis import ComputeLimits, Deadline
from model import LoadedModel, load_model

from .aggregate import write_aggregate
from .engines import Commit, RayOptions, run_local, run_ray, start_ray, stop_ray
from .measure import Measurer, settings_of
from .sources import Source, SourceError
from .store import AtlasWriter

logger = logging.getLogger("vit-inspect")
DEFAULT_BATCH = 16  # images per part file and per Ray batch


def build_atlas(source: Source, out: Path, model: "LoadedModel | str | None" = None, resolution: int = 518,
                queries: str = "spread", engine: str = "local", batch_size: int = DEFAULT_BATCH,
                device: str | None = None, ray_options: RayOptions = RayOptions(), progress: bool = True,
                limits: ComputeLimits | None = None, deadline: Deadline | None = None, decoders: int = 2,
                report: Callable[[int, int], None] | None = None) -> dict:
    """Analyses every image of `source` that `out` does not hold yet, writes them batch by batch, then the
    aggregate; returns the summary (also written to out/summary.json).

    Args:
        model: a loaded model (the tests' tiny one), or what `model.load_model` loads (None: the embedded default).
            With the Ray engine each actor loads its own copy from the same name.
        queries: "spread" (512 patch queries per layer, as the page) or "all" (every query, exact).
        progress: a progress bar on the terminal.
        limits, deadline, decoders: the caps on each analysis, one deadline for the whole run (images reached after
            it are skipped) and the decoding threads (the served app's; in-process engine).
        report: told (images done, images in all) after each batch.
    """
    started = time.perf_counter()
    if source.kind == "folder" and out.resolve().is_relative_to(Path(source.location).resolve()):
        raise SourceError(f"--out {out} is inside SOURCE {source.location}: its files would be taken for images.")
    refs = source.refs()
    if not refs:
        raise SourceError(f"{source.location} holds no images.")
    actors = []
    if engine == "ray":  # the actors start and load their models while this process loads its own
        actors = start_ray({"model": model, "source": source, "resolution": resolution, "queries": queries,
                            "device": "cuda" if ray_options.gpus_per_actor > 0 else "cpu"}, ray_options)
    try:
        loaded = model if isinstance(model, LoadedModel) else load_model(model, device)
        settings = settings_of(loaded, resolution, queries, source)
        writer = AtlasWriter(out, settings)
        todo = [ref for ref in refs if ref.name not in writer.done]
        logger.info("%d images in %s, %d already in %s", len(refs), source.location, len(refs) - len(todo), out)

        def run(commit: Commit) -> None:
            if engine == "ray":
                run_ray(actors, todo, batch_size, commit)
                return
            measurer = Measurer(loaded, source, resolution, queries, decoders=decoders, limits=limits,
                                deadline=deadline)
            try:
                run_local(measurer, todo, batch_size, commit)
            finally:
                measurer.close()

        failures = _written(writer, len(refs), len(refs) - len(todo), run, progress, report)
    finally:
        if actors:
            stop_ray(actors)
    return write_aggregate(out, settings, failures, time.perf_counter() - started)


def _written(writer: AtlasWriter, total: int, done: int, run: Callable[[Commit], None], progress: bool,
             report: Callable[[int, int], None] | None) -> list[tuple[str, str]]:
    """Runs the engine (`run`, handed the function that writes each batch) with a progress bar over `total` images,
    `done` of them already written; the images skipped, with why."""
    failures: list[tuple[str, str]] = []
    bar = tqdm(total=total, initial=done, desc="atlas", unit="image", disable=not progress)

    def commit(batch: pa.Table) -> None:
        nonlocal done
        for name, reason in writer.write(batch):
            failures.append((name, reason))
            tqdm.write(f"skipped {name}: {reason}", file=sys.stderr)
        bar.update(batch.num_rows)
        done += batch.num_rows
        if report is not None:
            report(done, total)

    try:
        run(commit)
    finally:
        bar.close()
    return failures
