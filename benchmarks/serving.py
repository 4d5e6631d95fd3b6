"""Starting the app (`python app.py`) in a process of its own on a free port, and a headless Chromium page, for the
benchmarks that measure it as a visitor meets it."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 300
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(**env: str) -> tuple[subprocess.Popen, str]:
    """The running app and its URL, once it answers; `env` adds environment variables (e.g. GRADIO_TEMP_DIR)."""
    port = free_port()
    env = {**os.environ, "GRADIO_SERVER_PORT": str(port), "GRADIO_SERVER_NAME": "127.0.0.1",
           "GRADIO_ANALYTICS_ENABLED": "False", **env}
    app = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline and app.poll() is None:
        try:
            urllib.request.urlopen(url, timeout=1)
            return app, url
        except OSError:
            time.sleep(0.5)
    app.kill()
    raise RuntimeError(f"the app did not start (exit status {app.poll()})")


@contextmanager
def chromium_page(width: int = 1400, height: int = 1000, priority: str = "normal") -> Iterator:
    """A page of Debian's headless Chromium driven by Playwright, the browser closed on leaving.

    priority "idle": Chromium runs only on the cycles the app and this process leave (SCHED_IDLE), as a visitor's
    browser on a machine of its own takes none of the server's. At "normal", run as root, Chromium raises its display
    and IO threads to nice -8, above the app's threads (nice 0), and is run before the model when both are ready."""
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        with tempfile.TemporaryDirectory() as folder:
            browser = p.chromium.launch(executable_path=_chromium(folder, priority), args=CHROMIUM_ARGS)
            try:
                yield browser.new_page(viewport={"width": width, "height": height})
            finally:
                browser.close()


def _chromium(folder: str, priority: str) -> str:
    """Chromium's executable, or for priority "idle" a script in `folder` that starts it under Linux's SCHED_IDLE
    policy (util-linux's chrt): its processes and threads inherit it, and renicing them leaves it as it is."""
    if priority == "normal":
        return CHROMIUM
    if priority != "idle":
        raise ValueError(f"priority must be 'normal' or 'idle', got {priority!r}")
    script = Path(folder) / "chromium"
    script.write_text(f'#!/bin/sh\nexec chrt --idle 0 {CHROMIUM} "$@"\n')
    script.chmod(0o755)
    return str(script)
