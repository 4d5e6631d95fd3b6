"""Why the atlas's Ray engine uses plain actors: the time from asking for one actor to its first result, for a plain Ray
actor and for a Ray Data `map_batches` stage on an actor pool, side by side in one run, with a trivial step (no torch,
no model), so that only Ray's own start is measured. Ray is started first and not counted; each variant runs
`--repeats` times in turn (medians reported). The Ray Data variant needs `pip install "ray[data]"`.

    python benchmarks/ray_actor_start.py
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import pyarrow as pa
import ray

BATCHES, BATCH = 12, 4


class Step:
    """A trivial per-batch step: the time it was constructed and the time it ran, per row."""

    def __init__(self):
        self.born = time.time()

    def __call__(self, batch: pa.Table) -> pa.Table:
        return pa.table({"born": [self.born] * batch.num_rows, "ran": [time.time()] * batch.num_rows})

    run = __call__  # a plain actor's method (Ray Data calls the object itself)


def plain_actor() -> tuple[float, float]:
    """(seconds to the actor's construction, seconds to the last of BATCHES results) with one plain actor."""
    started = time.time()
    actor = ray.remote(num_cpus=1)(Step).remote()
    tables = ray.get([actor.run.remote(pa.table({"x": list(range(BATCH))})) for _ in range(BATCHES)])
    done = time.time()
    ray.kill(actor)
    return tables[0]["born"][0].as_py() - started, done - started


def ray_data_pool() -> tuple[float, float]:
    """The same through Ray Data: `map_batches` on an `ActorPoolStrategy` of one actor."""
    started = time.time()
    dataset = ray.data.from_arrow([pa.table({"x": list(range(BATCH))}) for _ in range(BATCHES)])
    stage = dataset.map_batches(Step, batch_size=BATCH, batch_format="pyarrow",
                                compute=ray.data.ActorPoolStrategy(size=1), num_cpus=1)
    born = min(batch["born"][0].as_py() for batch in stage.iter_batches(batch_size=None, batch_format="pyarrow"))
    return born - started, time.time() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = context.print_on_execution_start = False
    time.sleep(3)  # Ray's idle workers start after init
    runs = {"plain actor": [], "Ray Data actor pool": []}
    for _ in range(args.repeats):
        for name, run in (("plain actor", plain_actor), ("Ray Data actor pool", ray_data_pool)):
            runs[name].append(run())
            print(f"{name}: constructed after {runs[name][-1][0]:.2f} s, {BATCHES} batches done after "
                  f"{runs[name][-1][1]:.2f} s, load average {os.getloadavg()[0]:.2f}", flush=True)
    ray.shutdown()
    print(f"\n| variant | to the actor's construction (s) | to {BATCHES} batches done (s) |\n|---|---|---|")
    for name, measured in runs.items():
        born, done = (statistics.median(v) for v in zip(*measured))
        print(f"| {name} | {born:.2f} | {done:.2f} |")


if __name__ == "__main__":
    main()
