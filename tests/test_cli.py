"""The command line on a folder of two images: maps, GIFs and .npz exports for each, no UI."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.slow  # starts the app, a browser or a fresh process, or runs the default model
ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "explorer", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_folder_of_two_images(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(ROOT / "assets" / "chelsea.png", images / "cat.png")
    shutil.copy(ROOT / "assets" / "rocket.jpg", images / "rocket.jpg")
    (images / "notes.txt").write_text("not an image, not picked up")
    out = tmp_path / "out"
    done = run_cli(str(images), "--out", str(out), "--resolution", "224", "--layers", "3", "-1", "--head", "2")
    assert done.returncode == 0, done.stderr
    assert "images" in done.stderr  # the progress bar
    assert sorted(p.name for p in out.iterdir()) == ["cat", "rocket"]
    for name, size in (("cat", (451, 300)), ("rocket", (640, 427))):
        folder = out / name
        expected = {"cls_layer03_2.png", "cls_layer03_heads.png", "cls_layer11_2.png", "cls_layer11_heads.png",
                    "rollout_mean.png", "cls_layers_2.gif", "analysis.npz", "analysis.json"}
        assert {p.name for p in folder.iterdir()} == expected
        assert Image.open(folder / "cls_layer11_2.png").size == size  # drawn over the original image
        assert Image.open(folder / "cls_layers_2.gif").n_frames == 12
        meta = json.loads((folder / "analysis.json").read_text())
        arrays = np.load(folder / "analysis.npz")
        assert arrays["cls_attention"].shape == (12, 6, meta["grid_h"], meta["grid_w"])
        assert meta["layer"] == 11 and meta["head"] == 2 and meta["original_size"] == {"height": size[1],
                                                                                        "width": size[0]}


def test_bad_source_and_bad_image(tmp_path):
    missing = run_cli(str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    (tmp_path / "broken.png").write_bytes(b"not really a png")
    broken = run_cli(str(tmp_path / "broken.png"), "--out", str(tmp_path / "o"), "--resolution", "224")
    assert broken.returncode == 1 and "skipped broken.png" in broken.stderr and "not a readable image" in broken.stderr
