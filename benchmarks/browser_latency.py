"""What a visitor feels: milliseconds from a control change to the new map shown, measured in Chromium.

Starts `python app.py` on a free port, opens the page in headless Chromium (Debian's, driven by Playwright), and
for each resolution steps the layer slider, picks heads, moves the opacity and changes the colormap, timing each
from the input event to the moment the class-token map's new image has loaded. Prints the medians as a table.

    python benchmarks/browser_latency.py                   # 518 and 2044 px, 15 changes per control
    python benchmarks/browser_latency.py --sizes 518 --repeats 5
"""
from __future__ import annotations

import argparse
import statistics
import time

from serving import chromium_page, start_app

# Resolves with the milliseconds from the next input event (key or pointer press, its own timestamp) to the moment
# the <img> inside `selector` shows a new src that has finished loading (NaN after ten minutes without one).
NEW_IMAGE = """([selector, old]) => { let start = null;
  const mark = (event) => { if (start === null) start = event.timeStamp; };
  for (const type of ['keydown', 'pointerdown', 'mousedown'])
    document.addEventListener(type, mark, {capture: true, once: true});
  window.__shown = new Promise(resolve => {
  setTimeout(() => resolve(NaN), 600000);
  const root = document.querySelector(selector);
  const check = () => { const img = root.querySelector('img');
    if (!img || img.getAttribute('src') === old) return false;
    if (img.complete && img.naturalWidth) resolve(performance.now() - start);
    else img.addEventListener('load', () => resolve(performance.now() - start), {once: true});
    return true; };
  if (!check()) { const seen = new MutationObserver(() => { if (check()) seen.disconnect(); });
    seen.observe(root, {subtree: true, childList: true, attributes: true}); }
}); }"""


def timed(page, action, selector: str = "#cls-view") -> float:
    """Milliseconds from the input event `action` makes to the new image of `selector` shown."""
    old = page.locator(f"{selector} img").get_attribute("src")
    page.evaluate(NEW_IMAGE, [selector, old])
    action()
    return page.evaluate("window.__shown")


def analyse_at(page, size: int) -> float:
    """Types the resolution and presses Enter; seconds until the new analysis's map is shown (0 if already there)."""
    box = page.locator("#resolution input[type=number]")
    if box.input_value() == str(size):
        return 0.0
    started = time.perf_counter()
    timed(page, lambda: (box.fill(str(size)), box.press("Enter")))
    return time.perf_counter() - started


def opened(page, elem_id: str, option: str):
    """Opens a dropdown (not timed) and returns the click on `option` (timed)."""
    page.locator(f"#{elem_id} input").click()
    choice = page.get_by_role("option", name=option, exact=True)
    choice.wait_for()
    return choice.click


def measure(page, repeats: int) -> dict[str, list[float]]:
    layer = page.locator("#layer input[type=range]")
    opacity = page.locator("#opacity input[type=range]")
    heads = ["0", "3", "mean", "5", "max", "1"]
    cmaps = ["viridis", "magma", "inferno", "cividis"]
    def key(slider, i):
        slider.focus()
        return lambda: page.keyboard.press("ArrowLeft" if i % 2 == 0 else "ArrowRight")

    cases = {  # each prepares the change (not timed) and returns the input event that makes it (timed)
        "layer step": lambda i: key(layer, i),
        "head pick": lambda i: opened(page, "head", heads[i % len(heads)]),
        "opacity": lambda i: key(opacity, i),
        "colormap": lambda i: opened(page, "cmap", cmaps[i % len(cmaps)]),
    }
    out = {}
    for name, prepare in cases.items():
        times = []
        for i in range(repeats):
            times.append(timed(page, prepare(i)))
            time.sleep(0.15)
        out[name] = [t for t in times if t == t]  # NaN: no new image came
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[518, 2044])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--url", help="measure an app that is already running instead of starting one")
    args = parser.parse_args()
    app, url = (None, args.url) if args.url else start_app()
    try:
        with chromium_page() as page:
            started = time.perf_counter()
            page.goto(url)
            page.wait_for_selector("#cls-view img", timeout=120_000)
            print(f"first maps shown {time.perf_counter() - started:.1f} s after opening the page\n")
            print("| px | control | median ms | min–max ms | changes |")
            print("|---|---|---|---|---|")
            for size in args.sizes:
                seconds = analyse_at(page, size)
                for name, times in measure(page, args.repeats).items():
                    print(f"| {size} | {name} | {statistics.median(times):.0f} | {min(times):.0f}–{max(times):.0f} | "
                          f"{len(times)} |", flush=True)
                print(f"| {size} | (analysis after Enter: {seconds:.1f} s) | | | |", flush=True)
    finally:
        if app is not None:
            app.kill()


if __name__ == "__main__":
    main()
