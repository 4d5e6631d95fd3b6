"""The dataset atlas's throughput: images per second for the default model (DINOv2 ViT-S/14) at 224 and 518 px,
in this process and through Ray actors on this machine, side by side from one run.

A folder of distinct images is made from the four assets (flipped, rotated and cropped copies; four aspect ratios).
For each resolution the two engines run in turn on it, for a few rounds (medians reported), each into a new atlas
folder, each loading the model itself (the weights are converted once beforehand into a private cache); Ray is
started once, before any timing, with every CPU, and runs one actor holding every CPU (as many torch threads as
the in-process run). "seconds" is
the whole `build_atlas` call: the model's loading (for Ray: the actor's start too), the batches, the aggregate;
"steady" is the rate from the first batch written to the last but one (the statistics parts' times, batches of 4),
which leaves those fixed costs out (Ray hands over its last two batches together, so the last is not counted).

OpenMP's threads wait passively (OMP_WAIT_POLICY=PASSIVE, set here unless already set, and inherited by Ray's
workers): on a machine shared with other work, spinning threads lose most of their time (on this project's 2-core
machine under a load average of 5, one 224 px analysis took 3 s spinning and 0.2 s passive).

    python benchmarks/atlas_throughput.py                       # 128 images at 224 px, 32 at 518 px
    python benchmarks/atlas_throughput.py --sizes 224 --images 16 --repeats 1
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image, ImageOps

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported (see the docstring)
IMAGES_PER_SIZE = {224: 128, 518: 32}  # 128: the images Dosovitskiy et al.'s fig. 7 averages over
BATCH = 4
VARIANTS = (lambda im: im, ImageOps.mirror, ImageOps.flip, lambda im: im.rotate(180),
            lambda im: im.crop((0, 0, im.width * 3 // 4, im.height)),
            lambda im: im.crop((0, 0, im.width, im.height * 3 // 4)))


def make_images(folder: Path, count: int) -> Path:
    """`count` distinct images from the assets: each asset under each variant in turn."""
    folder.mkdir(parents=True, exist_ok=True)
    assets = [Image.open(p).convert("RGB") for p in sorted((ROOT / "assets").glob("*.*g"))]
    for index in range(count):
        variant = VARIANTS[index // len(assets) % len(VARIANTS)]
        variant(assets[index % len(assets)]).save(folder / f"{index:04d}.png")
    return folder


def timed_run(images: Path, out: Path, resolution: int, engine: str) -> tuple[float, float]:
    """(seconds for the whole `build_atlas` call, images per second between the first and last batch written)."""
    from explorer.atlas import RayOptions, build_atlas, open_source
    started = time.perf_counter()
    build_atlas(open_source(images), out, None, resolution, engine=engine, batch_size=BATCH,
                          ray_options=RayOptions(actors=1, cpus_per_actor=os.cpu_count() or 1), progress=False)
    seconds = time.perf_counter() - started
    written = sorted(p.stat().st_mtime for p in (out / "statistics").glob("part-*.parquet"))
    return seconds, BATCH * (len(written) - 2) / (written[-2] - written[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=list(IMAGES_PER_SIZE))
    parser.add_argument("--images", type=int, default=None, help="images per size (default: 128 at 224, 32 at 518)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of (local, Ray) per size; medians reported")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="atlas-bench-"))
    os.environ["VIT_INSPECT_CACHE"] = str(work / "weights")  # Ray's workers inherit it
    from model import load_model
    load_model(None)  # converts the default weights once, before anything is timed
    import ray
    started = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    ray_start = time.perf_counter() - started
    rows, loads = [], [os.getloadavg()[0]]
    print(f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}", flush=True)
    for size in args.sizes:
        count = args.images or IMAGES_PER_SIZE.get(size, 16)
        images = make_images(work / f"images-{size}-{count}", count)
        runs = {"local": [], "ray": []}
        for repeat in range(args.repeats):
            for engine in runs:
                runs[engine].append(timed_run(images, work / f"atlas-{size}-{engine}-{repeat}", size, engine))
                loads.append(os.getloadavg()[0])
                print(f"{size} px {engine}: {runs[engine][-1][0]:.1f} s, steady {runs[engine][-1][1]:.2f} images/s, "
                      f"load average {loads[-1]:.2f}", flush=True)
        steady_ratios = [local[1] / ray_run[1] for local, ray_run in zip(runs["local"], runs["ray"])]
        local_seconds, local_steady = (statistics.median(v) for v in zip(*runs["local"]))
        for engine, measured in runs.items():
            seconds, steady = (statistics.median(v) for v in zip(*measured))
            spread = "" if engine == "local" else f" ({min(steady_ratios):.2f}–{max(steady_ratios):.2f}× by round)"
            rows.append(f"| {size} | {count} | {engine} | {seconds:.1f} | {count / seconds:.2f} | "
                        f"{seconds / local_seconds:.2f}× | {steady:.2f} | {local_steady / steady:.2f}×{spread} |")
    ray.shutdown()
    print(f"\nRay started in {ray_start:.1f} s (not counted below); 1-minute load average {min(loads):.2f} to "
          f"{max(loads):.2f}; {os.cpu_count()} CPUs; medians of {args.repeats} rounds\n")
    print("| px | images | engine | seconds | images/s | time / in-process | steady images/s | steady time / "
          "in-process |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
