"""What an idle page costs when the browser and the server share this machine's CPU (as in `first_map.py`): the
CPU seconds Chromium and the app's process use over a quiet interval with the page open, against a static page and
a page running nothing but a `requestAnimationFrame` loop, and how often the app's page asks for animation frames
(and from which script, the last time it did).

    python benchmarks/browser_idle.py                 # 10 s per page
    python benchmarks/browser_idle.py --seconds 30
"""
from __future__ import annotations

import argparse
import os
import time

from serving import chromium_page, start_app

STATIC = "data:text/html,<h1>static</h1>"
ANIMATION_LOOP = "data:text/html,<h1>loop</h1><script>function f() { requestAnimationFrame(f) }; f()</script>"
# Counts the page's requestAnimationFrame calls and keeps the last caller's stack.
COUNT_FRAMES = """(() => { window.__frames = 0; const request = window.requestAnimationFrame.bind(window);
  window.requestAnimationFrame = (callback) => { window.__frames++; window.__caller = new Error().stack;
                                                 return request(callback); }; })()"""


def chromium_pids() -> list[str]:
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"chrom" in f.read():
                    pids.append(pid)
        except OSError:
            continue
    return pids


def cpu_seconds(pids: list[str]) -> float:
    """User + system CPU seconds of these processes (those gone since are left out)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def idle(seconds: float, app_pid: int) -> tuple[float, float]:
    """Chromium's and the app's CPU seconds over `seconds` of doing nothing."""
    browser, app = chromium_pids(), [str(app_pid)]
    before = cpu_seconds(browser), cpu_seconds(app)
    time.sleep(seconds)
    return cpu_seconds(browser) - before[0], cpu_seconds(app) - before[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    app, url = start_app()
    try:
        with chromium_page(1280, 900) as page:
            page.add_init_script(COUNT_FRAMES)
            rows = []
            for name, address in (("static page", STATIC), ("requestAnimationFrame loop", ANIMATION_LOOP),
                                  ("the app's page", url)):
                page.goto(address)
                if address == url:
                    page.wait_for_selector("#cls-view img", timeout=300_000)  # the first analysis has ended
                time.sleep(3)
                frames = page.evaluate("window.__frames")
                rows.append((name, *idle(args.seconds, app.pid),
                             (page.evaluate("window.__frames") - frames) / args.seconds))
            caller = page.evaluate("window.__caller") or ""
    finally:
        app.kill()
    print(f"{args.seconds:.0f} s idle per page, 1-minute load {os.getloadavg()[0]:.1f} at the end\n")
    print("| page | Chromium CPU (s) | app's CPU (s) | animation frames asked per second |")
    print("|---|---|---|---|")
    for name, browser_cpu, app_cpu, rate in rows:
        print(f"| {name} | {browser_cpu:.2f} | {app_cpu:.2f} | {rate:.0f} |")
    scripts = [line.strip() for line in caller.splitlines()[2:4]]
    print(f"\nthe app's page's last requestAnimationFrame came from: {' ← '.join(scripts) or 'nowhere'}")


if __name__ == "__main__":
    main()
