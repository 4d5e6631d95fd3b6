"""Starting the app (`python app.py`) in a process of its own on a free port, for the benchmarks that measure it
as a visitor meets it."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 300


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
