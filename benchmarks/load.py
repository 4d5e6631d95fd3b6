"""The app under load, as a public Space meets it: resident memory and disk while it serves many visitors.

Starts `python app.py` in a fresh process (its own managed folder), then
  1. sends 40 concurrent /cls_attention calls, each with a different image, and
  2. sends 150 sequential calls with different images at 224 to 1022 px (class-token maps, rollout, statistics),
sampling the server's resident memory and its folder's size, and prints a table. Requests beyond the queue's size
are answered "busy", which the table counts.

    python benchmarks/load.py                       # default budget (VIT_INSPECT_CACHE_MB=4096)
    VIT_INSPECT_CACHE_MB=256 python benchmarks/load.py --sequential 30
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image
from serving import ROOT, start_app

RESOLUTIONS = (224, 518, 770, 1022)
MB = 2**20


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def folder_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / MB


def distinct_images(count: int, folder: Path, seed: int = 0) -> list[Path]:
    """Crops of the example photos, each a different picture of 300 to 1400 px."""
    rng = random.Random(seed)
    photos = [Image.open(ROOT / "assets" / name).convert("RGB") for name in
              ("chelsea.png", "astronaut.png", "coffee.png", "rocket.jpg")]
    paths = []
    for i in range(count):
        photo = photos[i % len(photos)]
        w, h = rng.randint(photo.width // 2, photo.width), rng.randint(photo.height // 2, photo.height)
        left, top = rng.randint(0, photo.width - w), rng.randint(0, photo.height - h)
        scale = rng.uniform(300, 1400) / max(w, h)
        size = (max(16, round(w * scale)), max(16, round(h * scale)))
        image = photo.crop((left, top, left + w, top + h)).resize(size)
        paths.append(folder / f"image{i:03d}.png")
        image.save(paths[-1])
    return paths


class Sampler(threading.Thread):
    """Samples the server's resident memory every 0.2 s; keeps the peak."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak, self.running = pid, 0.0, True

    def run(self):
        while self.running:
            self.peak = max(self.peak, rss_mb(self.pid))
            time.sleep(0.2)


def call(client, image: Path, index: int) -> str:
    from gradio_client import handle_file
    resolution = RESOLUTIONS[index % len(RESOLUTIONS)]
    try:
        if index % 3 == 0:
            client.predict(handle_file(str(image)), "mean", 0.0, resolution, api_name="/rollout")
        elif index % 3 == 1:
            client.predict(handle_file(str(image)), resolution, api_name="/head_statistics")
        else:
            client.predict(handle_file(str(image)), -1, "mean", resolution, api_name="/cls_attention")
        return "ok"
    except Exception as err:  # the client raises for busy answers and errors alike
        busy = "busy" in str(err) or "Queue is full" in str(err)  # ours, or gradio_client's own words
        return "busy" if busy else f"error: {err}"


def row(phase: str, outcomes: list[str], seconds: float, sampler: Sampler, server, managed: Path, base: float) -> str:
    counts = {kind: sum(o.startswith(kind) for o in outcomes) for kind in ("ok", "busy", "error")}
    return (f"| {phase} | {len(outcomes)} | {counts['ok']} | {counts['busy']} | {counts['error']} | {seconds:.0f} | "
            f"{base:.0f} | {sampler.peak:.0f} | {rss_mb(server.pid):.0f} | {folder_mb(managed):.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrent", type=int, default=40)
    parser.add_argument("--sequential", type=int, default=150)
    args = parser.parse_args()
    from gradio_client import Client
    work = Path(tempfile.mkdtemp(prefix="vit-inspect-load-"))
    managed, images = work / "managed", work / "images"
    images.mkdir()
    pictures = distinct_images(args.concurrent + args.sequential, images)
    server, url = start_app(GRADIO_TEMP_DIR=str(managed))
    try:
        base = rss_mb(server.pid)
        print(f"budget VIT_INSPECT_CACHE_MB={os.environ.get('VIT_INSPECT_CACHE_MB', '4096')}, "
              f"disk VIT_INSPECT_DISK_MB={os.environ.get('VIT_INSPECT_DISK_MB', '2048')}\n")
        print("| phase | requests | ok | busy | errors | seconds | RSS at start MB | RSS peak MB | RSS end MB | "
              "folder MB |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        sampler = Sampler(server.pid)
        sampler.start()
        started = time.perf_counter()
        with ThreadPoolExecutor(args.concurrent) as pool:
            clients = list(pool.map(lambda _: Client(url, verbose=False), range(args.concurrent)))
            outcomes = list(pool.map(lambda i: call(clients[i], pictures[i], 2), range(args.concurrent)))
        print(row("concurrent, 518 px", outcomes, time.perf_counter() - started, sampler, server, managed, base),
              flush=True)
        failures = [o for o in outcomes if o.startswith("error")]
        client, outcomes = Client(url, verbose=False), []
        started = time.perf_counter()
        for i, picture in enumerate(pictures[args.concurrent:]):
            outcomes.append(call(client, picture, i))
            if (i + 1) % 30 == 0 or i + 1 == args.sequential:
                print(row(f"sequential, first {i + 1}", outcomes, time.perf_counter() - started, sampler, server,
                          managed, base), flush=True)
        sampler.running = False
        failures += [o for o in outcomes if o.startswith("error")]
        for failure in sorted(set(failures))[:5]:
            print(f"\n{failures.count(failure)} × {failure}")
    finally:
        server.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
