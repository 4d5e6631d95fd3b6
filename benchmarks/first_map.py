"""From an upload of a new photo to its first map, in Chromium, against a plain forward of the same model on the same
image, in one run.

Starts `python app.py` on a free port, opens the page in headless Chromium (Debian's, driven by Playwright), and for
each resolution uploads each photo (none analysed before) and times, in the browser, from the file input's change to
the moment the class-token map of that photo has loaded; the median over the photos is the wait. Right after each
upload, once the page has drawn that photo's other views and is idle again, this process times the same photo at the
same resolution, best of three each: the default model's plain forward (fused attention, nothing returned), the
analysis alone (`analyze` as the page's event calls it) and the image's preprocessing. Timed next to each other, the
wait and its forward see the machine at the same speed (this machine's forward moves by up to a third within a minute).
Prints a table of them beside the status line's analysis time (the analysis inside the served page's event) and the
ratio of the wait to the forward: the wait less the served analysis is the round trip (upload, queue, the map's
delivery), and each photo uploaded once more, its analysis cached, shows that path with no model work; the served
analysis (one, after the page idled) against the analysis alone (the best of three in a row) is what the server loses
beside the browser on the same cores and what a first analysis after idling costs more than a warm one.

With `--browser idle` Chromium runs only on the cycles the app and this process leave (Linux's SCHED_IDLE, see
`serving.chromium_page`), as a visitor's browser on a machine of its own takes none of the server's: the wait then
shows what is left when the browser does not compete for the server's two cores.

    python benchmarks/first_map.py                          # 518 and 1022 px, astronaut, coffee, rocket
    python benchmarks/first_map.py --sizes 518 --photos assets/coffee.png
    python benchmarks/first_map.py --browser idle
"""
from __future__ import annotations

import argparse
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from serving import ROOT, chromium_page, start_app

PHOTOS = [ROOT / "assets" / name for name in ("astronaut.png", "coffee.png", "rocket.jpg")]
# Resolves with the milliseconds from the file input's change to the moment the <img> in #cls-view shows a new
# src that has loaded, and the status line then.
FIRST_MAP = """([old]) => { let start = null;
  document.addEventListener('change', (event) => { if (start === null) start = event.timeStamp; },
                            {capture: true, once: true});
  window.__shown = new Promise(resolve => {
  setTimeout(() => resolve([NaN, '']), 600000);
  const root = document.querySelector('#cls-view');
  const done = () => resolve([performance.now() - start, document.querySelector('#status').innerText]);
  const check = () => { const img = root.querySelector('img');
    if (!img || img.getAttribute('src') === old || start === null) return false;
    if (img.complete && img.naturalWidth) done(); else img.addEventListener('load', done, {once: true});
    return true; };
  const seen = new MutationObserver(() => { if (check()) seen.disconnect(); });
  seen.observe(root, {subtree: true, childList: true, attributes: true}); }); }"""


# The status line once the removal's analysis has ended (not merely changed: Gradio's loading tracker changes its
# text at once).
CLEARED = "() => document.querySelector('#status').innerText.includes('Upload an image')"


def set_resolution(page, size: int) -> None:
    """Types the resolution and presses Enter with no image shown, so that no photo is analysed at `size` before it
    is timed (the shown one would be, and its upload would then be a cache hit)."""
    box = page.locator("#resolution input[type=number]")
    if box.input_value() != str(size):
        remove_image(page)
        box.fill(str(size))
        box.press("Enter")
        time.sleep(1)  # an analysis of no image: the status line stays as it is


def remove_image(page) -> None:
    """Removes the image shown, and waits for its analysis (and what came before it in the queue) to end."""
    remove = page.locator("#image-input button[aria-label='Remove Image']")
    if remove.count():
        remove.click()
        page.wait_for_function(CLEARED, timeout=600_000)  # "Upload an image…", maps cleared


def upload_times(page, photo: Path) -> tuple[float, str]:
    """Seconds from choosing `photo` in the image input to its first map shown, and the status line."""
    time.sleep(4)  # the previous photo's other views are drawn after its first map: let them finish
    remove_image(page)
    time.sleep(1)  # and the removal's own redraw, which follows its analysis: the upload starts on an idle page
    old = page.evaluate("document.querySelector('#cls-view img')?.getAttribute('src') ?? null")
    page.evaluate(FIRST_MAP, [old])
    page.locator("#image-input input[type=file]").set_input_files(str(photo))
    ms, status = page.evaluate("window.__shown")
    return ms / 1000, status


def served_seconds(status: str) -> float:
    """The analysis's seconds from the status line ("… · analysed in 1.23 s"); NaN where it gives none."""
    found = re.search(r"analysed in ([0-9.]+) s", status)
    return float(found.group(1)) if found else float("nan")


def browser_waits(sizes: list[int], photos: list[Path], timed: Callable[[Path, int], tuple],
                  browser: str = "normal") -> tuple[
        dict[int, list[tuple[float, str]]], dict[int, list[float]], dict[int, list[tuple]]]:
    """Per size: each photo's first upload (seconds, status line) and `timed(photo, size)` right after it, then the
    seconds of each photo's upload once more, its analysis cached: the framework's own path, with no model work.
    `browser`: Chromium's CPU priority ("normal" or "idle", see `serving.chromium_page`)."""
    app, url = start_app()
    try:
        with chromium_page(priority=browser) as page:
            page.goto(url)
            page.wait_for_selector("#cls-view img", timeout=120_000)
            waits, forwards, cached = {}, {}, {}
            for size in sizes:
                set_resolution(page, size)
                waits[size], forwards[size] = [], []
                for photo in photos:
                    waits[size].append(upload_times(page, photo))
                    time.sleep(4)  # its other views drawn: the page and the app idle again
                    forwards[size].append(timed(photo, size))
                cached[size] = [upload_times(page, photo)[0] for photo in photos]
            return waits, cached, forwards
    finally:
        app.kill()
        app.wait()


def forward_timer() -> Callable[[Path, int], tuple[float, float, float]]:
    """(photo, size) → the best of three plain forwards, analyses alone and preprocessings, in seconds."""
    import sys

    import torch
    sys.path.insert(0, str(ROOT))
    from analysis import analyze
    from model import load_image, load_model
    loaded = load_model(None, device="cpu")

    def timed(photo: Path, size: int) -> tuple[float, float, float]:
        image = load_image(photo)
        prep, fwd, alone = [], [], []
        for _ in range(3):
            with torch.inference_mode():
                started = time.perf_counter()
                pixels, _ = loaded.preprocessing(image, size)
                prep.append(time.perf_counter() - started)
                started = time.perf_counter()
                loaded.model(pixels, interpolate_pos_encoding=True)
                fwd.append(time.perf_counter() - started)
            started = time.perf_counter()
            analyze(loaded, image, size, statistics=False)  # as the page's event runs it (server.workspace)
            alone.append(time.perf_counter() - started)
        return min(fwd), min(alone), min(prep)
    timed(PHOTOS[0], 224)  # thread pools and kernels' one-time buffers
    return timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[518, 1022])
    parser.add_argument("--photos", type=Path, nargs="+", default=PHOTOS)
    parser.add_argument("--browser", choices=("normal", "idle"), default="normal",
                        help="Chromium's CPU priority: idle runs it only on the cycles the server leaves")
    args = parser.parse_args()
    waits, cached, forwards = browser_waits(args.sizes, args.photos, forward_timer(), args.browser)
    print(f"Chromium at {args.browser} priority\n")
    print("| px | photo | upload → first map (s) | served analysis (s) | analysis alone (s) | plain forward (s) | "
          "preprocessing (s) |")
    print("|---|---|---|---|---|---|---|")
    for size in args.sizes:
        for photo, (wait, status), (forward, alone, prep) in zip(args.photos, waits[size], forwards[size]):
            print(f"| {size} | {photo.name} | {wait:.2f} | {served_seconds(status):.2f} | {alone:.2f} | "
                  f"{forward:.2f} | {prep:.3f} |")
    print("\n| px | median wait (s) | median served analysis (s) | median analysis alone (s) | median forward (s) | "
          "ratio |")
    print("|---|---|---|---|---|---|")
    for size in args.sizes:
        wait = statistics.median(w for w, _ in waits[size])
        served = statistics.median(served_seconds(s) for _, s in waits[size])
        alone = statistics.median(a for _, a, _ in forwards[size])
        forward = statistics.median(f for f, _, _ in forwards[size])
        print(f"| {size} | {wait:.2f} | {served:.2f} | {alone:.2f} | {forward:.2f} | {wait / forward:.2f}× |")
    print("\nWhere the wait goes, per photo (lowest–highest): the round trip (wait − served analysis), the same upload "
          "again with its analysis cached, the analysis alone against the forward, the served analysis against the "
          "analysis alone.\n")
    print("| px | round trip (s) | cached re-upload (s) | analysis alone ÷ forward | served ÷ alone |")
    print("|---|---|---|---|---|")
    for size in args.sizes:
        trips, engine, beside = [], [], []
        for (wait, status), (forward, alone, _) in zip(waits[size], forwards[size]):
            trips.append(wait - served_seconds(status))
            engine.append(alone / forward)
            beside.append(served_seconds(status) / alone)
        print(f"| {size} | {min(trips):.2f}–{max(trips):.2f} | {min(cached[size]):.2f}–{max(cached[size]):.2f} | "
              f"{min(engine):.2f}–{max(engine):.2f}× | {min(beside):.2f}–{max(beside):.2f}× |")

if __name__ == "__main__":
    main()
