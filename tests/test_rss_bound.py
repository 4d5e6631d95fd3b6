"""Resident memory stays within the cache budget: in a fresh process, the app's handlers analyse 30 different images
at 224 to 1022 px (class-token maps, a clicked patch, rollout) with VIT_INSPECT_CACHE_MB=256, and the process never
holds more than baseline + 1.25 × budget + 250 MB."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # starts the app, a browser or a fresh process, or runs the default model
ROOT = Path(__file__).resolve().parents[1]
BUDGET_MB = 256
SCRIPT = """
import json, os, random, sys, time
sys.path.insert(0, {root!r})
from pathlib import Path
from PIL import Image
import app
from server.api import Api

def rss_mb():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

workspace = app.workspace_for(None, "cpu")
api = Api(workspace)
workspace.models.get("default")
folder = Path(workspace.upload_roots[0]) / "rss-test"
folder.mkdir(parents=True, exist_ok=True)
photos = [Image.open(Path({root!r}) / "assets" / n).convert("RGB") for n in ("chelsea.png", "astronaut.png",
          "coffee.png", "rocket.jpg")]
rng = random.Random(0)
baseline, samples = rss_mb(), []
for i in range(30):
    photo = photos[i % 4]
    w, h = rng.randint(photo.width // 2, photo.width), rng.randint(photo.height // 2, photo.height)
    left, top = rng.randint(0, photo.width - w), rng.randint(0, photo.height - h)
    path = folder / f"image{{i}}.png"
    photo.crop((left, top, left + w, top + h)).save(path)
    upload = {{"path": str(path), "meta": {{"_type": "gradio.FileData"}}}}
    resolution = (224, 518, 770, 1022)[i % 4]
    api.cls_attention(upload, -1, "mean", resolution)
    api.patch_attention(upload, w / 2, h / 2, 5, "2", "column", resolution)
    api.rollout(upload, "max", 0.5, resolution)
    samples.append(rss_mb())
print(json.dumps({{"baseline": baseline, "samples": samples, "cache": workspace.cache.bytes_of() / 2**20}}))
"""


def test_resident_memory_stays_within_the_budget(tmp_path):
    env = {**os.environ, "VIT_INSPECT_CACHE_MB": str(BUDGET_MB), "GRADIO_TEMP_DIR": str(tmp_path / "managed")}
    done = subprocess.run([sys.executable, "-c", SCRIPT.format(root=str(ROOT))], env=env, capture_output=True,
                          text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    bound = result["baseline"] + 1.25 * BUDGET_MB + 250
    assert result["cache"] <= BUDGET_MB * 1.05  # the budget itself is kept (the newest item may exceed it alone)
    assert max(result["samples"]) <= bound, (result["baseline"], result["samples"])
