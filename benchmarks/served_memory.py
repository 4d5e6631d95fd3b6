"""Peak extra resident memory of the served app (`python app.py` in its own process) for a full analysis.

The app is started on a free port, warmed up with a small request on another image, then its high-water mark is
reset and the class-token maps (/cls_attention) and rollout (/rollout) of one image are requested through
gradio_client: what a visitor's first look at an image costs the Space.
"""
from __future__ import annotations

import time
from pathlib import Path

from measure import PeakMeter
from serving import start_app


def served_peak_extra_mb(size: int, image: Path, warmup_image: Path) -> dict:
    """Starts the app, measures one full analysis of `image` at `size` px through the API, stops the app."""
    from gradio_client import Client, handle_file
    app, url = start_app()
    try:
        client = Client(url, verbose=False)
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
