"""Peak extra resident memory of the served app (`python app.py` in its own process) for a full analysis.

The app is started on a free port, warmed up with a small request on another image, then its high-water mark is
reset and the class-token maps (/cls_attention) and rollout (/rollout) of one image are requested through
gradio_client: what a visitor's first look at an image costs the Space.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from measure import PeakMeter

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _connect(url: str, app: subprocess.Popen):
    from gradio_client import Client
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if app.poll() is not None:
            raise RuntimeError(f"the app exited with status {app.returncode}")
        try:
            return Client(url, verbose=False)
        except Exception:  # not listening yet
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def served_peak_extra_mb(size: int, image: Path, warmup_image: Path) -> dict:
    """Starts the app, measures one full analysis of `image` at `size` px through the API, stops the app."""
    from gradio_client import handle_file
    port = _free_port()
    env = {**os.environ, "GRADIO_SERVER_PORT": str(port), "GRADIO_SERVER_NAME": "127.0.0.1",
           "GRADIO_ANALYTICS_ENABLED": "False"}
    app = subprocess.Popen([sys.executable, str(ROOT / "app.py")], cwd=ROOT, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = _connect(f"http://127.0.0.1:{port}/", app)
        client.predict(image=handle_file(str(warmup_image)), layer=-1, head="mean", resolution=224,
                       api_name="/cls_attention")
        meter = PeakMeter("cpu", pid=app.pid)
        meter.start()
        start = time.perf_counter()
        client.predict(image=handle_file(str(image)), layer=-1, head="mean", resolution=size,
                       api_name="/cls_attention")
        client.predict(image=handle_file(str(image)), fusion="mean", discard_ratio=0.0, resolution=size,
                       api_name="/rollout")
        return {"size": size, "seconds": time.perf_counter() - start, "peak_extra_mb": meter.peak_extra_mb()}
    finally:
        app.terminate()
        app.wait(timeout=30)
