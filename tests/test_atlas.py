"""The dataset atlas: its Parquet rows against single-image analyses, resuming, bad images and arguments, the
aggregate's intervals from their definition, the Ray engine against the in-process one, reading an atlas back."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from scipy import stats as scipy_stats

import explorer.atlas.measure as measure_module
import explorer.atlas.store as store_module
from analysis import STAT_LABELS, analyze, predicted_saliency, predictions
from explorer.atlas import AtlasError, RayOptions, build_atlas, load_atlas, open_source
from explorer.cli import main as cli_main
from model import load_image
from model.heads import ClassifierHead, SaliencyDecoder
from tests.helpers import random_image, randomize, tiny_loaded

ROOT = Path(__file__).resolve().parents[1]
MEMORY_PX, MEMORY_IMAGES = 384, (4, 16)  # a wider tiny model at 2,305 tokens keeps about 9 MB per analysis
MEMORY_CHILD = f"""
import json, sys
from pathlib import Path
sys.path.insert(0, {str(ROOT)!r})
from analysis import analyze
from explorer.atlas import build_atlas, open_source
from tests.helpers import random_image, tiny_loaded

def status_mb(field):
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field + ":"))
    return int(line.split()[1]) / 1024

work = Path(sys.argv[1])
loaded = tiny_loaded(hidden_size=256, intermediate_size=256)
peaks = []
for count in (2, *{MEMORY_IMAGES}):  # the first run warms up thread pools, kernels and Arrow's allocator
    folder = work / f"images{{count}}"
    folder.mkdir()
    for seed in range(count):
        random_image({MEMORY_PX}, {MEMORY_PX}, seed).save(folder / f"{{seed:03d}}.png")
    base = status_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    summary = build_atlas(open_source(folder), work / f"out{{count}}", loaded, {MEMORY_PX}, batch_size=4,
                          progress=False)
    assert summary["images"] == count
    peaks.append(status_mb("VmHWM") - base)
kept = analyze(loaded, random_image({MEMORY_PX}, {MEMORY_PX}), {MEMORY_PX}).nbytes / 2**20
print(json.dumps({{"peak_extra_mb": dict(zip({MEMORY_IMAGES}, peaks[1:])), "kept_mb": kept}}))
"""
PX = 64  # the tiny model (patch 8) sees grids of up to 8 × 8: fast, and every query is averaged
SIZES = {"a.png": (40, 64), "b.png": (64, 48), "c.jpg": (56, 56), "d.png": (48, 72), "sub/e.png": (64, 64)}


def make_folder(folder: Path) -> Path:
    """Five images of four input sizes (one in a subfolder), a corrupt one and a text file."""
    (folder / "sub").mkdir(parents=True)
    for seed, (name, (height, width)) in enumerate(SIZES.items()):
        random_image(height, width, seed).save(folder / name)
    (folder / "broken.png").write_bytes(b"not really a png")
    (folder / "notes.txt").write_text("not an image, not picked up")
    return folder


@pytest.fixture(scope="module")
def loaded():
    return tiny_loaded()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("atlas") / "images")


@pytest.fixture(scope="module")
def direct(loaded, images):
    """Each image's statistics and last-layer maps, from the single-image analysis."""
    out = {}
    for name in SIZES:
        analysis = analyze(loaded, load_image(images / name), PX)
        out[name] = (analysis.statistics.as_dict(), analysis.cls_maps(analysis.num_layers - 1))
    return out


@pytest.fixture(scope="module")
def atlas_folder(loaded, images, tmp_path_factory):
    out = tmp_path_factory.mktemp("atlas") / "out"
    build_atlas(open_source(images), out, loaded, PX, batch_size=2, progress=False)
    return out


def test_rows_are_the_single_image_statistics(atlas_folder, direct):
    table = pd.read_parquet(atlas_folder / "statistics")  # the folder of parts, as pandas reads it
    assert list(table.columns) == ["image", "layer", "head", *STAT_LABELS]
    assert len(table) == len(SIZES) * 3 * 4 and not table.duplicated(["image", "layer", "head"]).any()
    for name, (statistics, _) in direct.items():
        rows = table[table["image"] == name].sort_values(["layer", "head"])
        for statistic, values in statistics.items():
            np.testing.assert_array_equal(rows[statistic].to_numpy().reshape(3, 4), values)
    settings = json.loads(pq.read_schema(next((atlas_folder / "statistics").glob("part-*"))).metadata[
        b"vit_inspect_atlas"])
    assert (settings["model"], settings["resolution"], settings["queries"], settings["num_layers"],
            settings["num_heads"]) == ("tiny", PX, "spread", 3, 4)


def test_maps_thumbnails_and_ranking_read_back(atlas_folder, direct):
    atlas = load_atlas(atlas_folder)
    assert list(atlas.images["image"]) == sorted(SIZES)
    for name, (statistics, maps) in direct.items():
        np.testing.assert_array_equal(atlas.cls_maps(name), maps.astype(np.float16).astype(np.float32))
        height, width = SIZES[name]
        assert atlas.thumbnail(name).size == (width, height)  # smaller than 224 px: kept at its size
    by_entropy = sorted(direct, key=lambda name: direct[name][0]["cls_patch_entropy"][2, 1])
    assert list(atlas.ranked(2, 1, "cls_patch_entropy", count=3)["image"]) == by_entropy[:3]
    assert list(atlas.ranked(2, 1, "cls_patch_entropy", count=2, lowest=False)["image"]) == by_entropy[::-1][:2]
    with pytest.raises(KeyError):
        atlas.cls_maps("missing.png")


def test_without_a_head_the_prediction_columns_are_null(atlas_folder):
    atlas = load_atlas(atlas_folder)
    assert atlas.settings["prediction"] is None
    assert atlas.images[["top_classes", "saliency_mean", "region_share"]].isna().all().all()


def with_head(kind: str):
    """The tiny tower with a random classifier (7 classes, read from the class token) or saliency decoder."""
    loaded = tiny_loaded(seed=3)
    with torch.no_grad():
        if kind == "classes":
            loaded.head = ClassifierHead("class", 32, 7, 1).eval()
            loaded.labels = tuple(f"label {i}" for i in range(7))
        else:
            loaded.head = SaliencyDecoder((32, 8, 8, 4)).eval()
        randomize(loaded.head, seed=4)
    return loaded


@pytest.mark.parametrize("kind", ["classes", "saliency"])
def test_the_prediction_per_image_is_the_single_image_one(kind, images, tmp_path):
    loaded = with_head(kind)
    build_atlas(open_source(images), tmp_path / "out", loaded, PX, batch_size=2, progress=False)
    atlas = load_atlas(tmp_path / "out")
    assert atlas.settings["prediction"] == kind
    for name in SIZES:
        row = atlas.images[atlas.images["image"] == name].iloc[0]
        analysis = analyze(loaded, load_image(images / name), PX)
        if kind == "classes":
            top = predictions(loaded, analysis, 5)
            assert list(row["top_classes"]) == [p.index for p in top]
            assert list(row["top_labels"]) == [f"label {p.index}" for p in top]
            np.testing.assert_allclose(row["top_probabilities"], [p.probability for p in top], rtol=1e-6)
            assert np.isnan(row["saliency_mean"])
        else:
            saliency = predicted_saliency(loaded, analysis)  # (input_h, input_w)
            region = saliency >= 0.5  # the decoder's own region, else its top 20 %
            if not region.any():
                region = saliency >= np.sort(saliency.ravel())[::-1][int(0.2 * saliency.size) - 1]
            np.testing.assert_allclose(row["saliency_mean"], saliency.mean(), rtol=1e-6)
            np.testing.assert_allclose(row["region_share"], region.mean(), rtol=1e-6)
            assert row["top_classes"] is None


def test_corrupt_image_is_reported_and_skipped(atlas_folder):
    summary = json.loads((atlas_folder / "summary.json").read_text())
    assert summary["images"] == len(SIZES)
    assert [s["image"] for s in summary["skipped"]] == ["broken.png"]
    assert "not a readable image" in summary["skipped"][0]["reason"]


def test_aggregate_is_the_t_interval_of_the_mean(atlas_folder, direct):
    aggregate = pd.read_parquet(atlas_folder / "aggregate.parquet")
    summary = json.loads((atlas_folder / "summary.json").read_text())
    n = len(direct)
    for statistic in STAT_LABELS:
        values = np.stack([direct[name][0][statistic] for name in direct]).astype(np.float64)  # (images, L, H)
        mean = values.mean(0)
        low, high = scipy_stats.t.interval(0.95, n - 1, loc=mean, scale=scipy_stats.sem(values, axis=0))
        rows = aggregate[aggregate["statistic"] == statistic].sort_values(["layer", "head"])
        assert (rows["n"] == n).all()
        for column, expected in (("mean", mean), ("low", low), ("high", high)):
            np.testing.assert_allclose(rows[column].to_numpy().reshape(3, 4), expected, rtol=1e-9, atol=1e-9)
            np.testing.assert_allclose(summary["aggregate"][statistic][column], expected, rtol=1e-9, atol=1e-9)
    figure = Image.open(atlas_folder / "mean_attention_distance.png")
    assert figure.size[0] > 300 and len(np.unique(np.asarray(figure))) > 10


def test_resume_after_an_interruption_adds_no_duplicates(loaded, images, atlas_folder, tmp_path, monkeypatch):
    out = tmp_path / "out"
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # in the third batch (d.png, sub/e.png; broken.png shared the second with c.jpg)
            raise KeyboardInterrupt
        return analyze(*args, **kwargs)

    monkeypatch.setattr(measure_module, "analyze", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_atlas(open_source(images), out, loaded, PX, batch_size=2, progress=False)
    assert len(list((out / "statistics").glob("part-*.parquet"))) == 2  # the first two batches only
    assert set(pd.read_parquet(out / "statistics")["image"]) == {"a.png", "b.png", "c.jpg"}
    calls.clear()
    monkeypatch.setattr(measure_module, "analyze", lambda *a, **k: calls.append(1) or analyze(*a, **k))
    build_atlas(open_source(images), out, loaded, PX, batch_size=2, progress=False)
    assert len(calls) == 2  # only the images not yet in the atlas
    pd.testing.assert_frame_equal(load_atlas(out).statistics, load_atlas(atlas_folder).statistics)


def test_a_batch_stopped_between_its_two_parts_is_done_again(loaded, images, atlas_folder, tmp_path, monkeypatch):
    out = tmp_path / "out"
    write = store_module.write_atomic

    def fail_second_statistics_part(table, path):
        if path.parent.name == "statistics" and path.name == "part-000001.parquet":
            (path.parent / f".{path.name}.tmp").write_bytes(b"half a row group")  # as a kill mid-write leaves it
            raise OSError("disk full")
        write(table, path)

    monkeypatch.setattr(store_module, "write_atomic", fail_second_statistics_part)
    with pytest.raises(OSError):
        build_atlas(open_source(images), out, loaded, PX, batch_size=2, progress=False)
    assert (out / "images" / "part-000001.parquet").exists()  # the images part of a batch that did not commit
    assert set(pd.read_parquet(out / "images")["image"]) - set(pd.read_parquet(out / "statistics")["image"])
    monkeypatch.setattr(store_module, "write_atomic", write)
    build_atlas(open_source(images), out, loaded, PX, batch_size=2, progress=False)
    atlas = load_atlas(out)
    assert not any(out.rglob(".*.tmp"))
    pd.testing.assert_frame_equal(atlas.statistics, load_atlas(atlas_folder).statistics)
    pd.testing.assert_frame_equal(atlas.images, load_atlas(atlas_folder).images)


def test_resuming_with_other_settings_is_refused(loaded, images, atlas_folder, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(atlas_folder, out)
    with pytest.raises(AtlasError, match="resolution=64"):
        build_atlas(open_source(images), out, loaded, PX + 8, progress=False)


def test_load_atlas_refuses_a_damaged_folder(atlas_folder, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(atlas_folder, out)
    shutil.copy(out / "statistics" / "part-000000.parquet", out / "statistics" / "part-000009.parquet")
    with pytest.raises(AtlasError, match="twice"):
        load_atlas(out)
    (out / "statistics" / "part-000009.parquet").unlink()
    (out / "summary.json").unlink()
    with pytest.raises(AtlasError, match="unfinished"):
        load_atlas(out)
    with pytest.raises(AtlasError, match="no atlas"):
        load_atlas(tmp_path)


def test_a_datasets_folder_is_a_source(loaded, tmp_path):
    import datasets  # optional for the atlas, imported only for this source; installed for the tests
    pictures = [random_image(48, 64, seed=7), random_image(64, 40, seed=8)]
    dataset = datasets.Dataset.from_dict({"label": [0, 1], "picture": pictures}).cast_column("picture",
                                                                                             datasets.Image())
    dataset.save_to_disk(str(tmp_path / "dataset"))
    build_atlas(open_source(tmp_path / "dataset"), tmp_path / "out", loaded, PX, progress=False)
    atlas = load_atlas(tmp_path / "out")
    assert list(atlas.images["image"]) == ["train/000000", "train/000001"]
    for index, picture in enumerate(pictures):
        expected = analyze(loaded, picture, PX).statistics.mean_distance_px
        rows = atlas.statistics[atlas.statistics["image"] == f"train/{index:06d}"]
        np.testing.assert_array_equal(rows["mean_distance_px"].to_numpy().reshape(3, 4), expected)


@pytest.mark.parametrize("args, message", [
    (["{tmp}/nowhere", "--out", "{tmp}/o"], "does not exist"),
    (["{images}/a.png", "--out", "{tmp}/o"], "is a file"),
    (["{tmp}/empty", "--out", "{tmp}/o"], "holds no images"),
    (["{images}", "--out", "{images}/a.png"], "--out {images}/a.png is a file"),
    (["{images}", "--out", "{images}"], "holds other files"),
    (["{images}", "--out", "{images}/sub/atlas"], "is inside SOURCE"),
    (["{images}", "--out", "{tmp}/o", "--resolution", "100"], "resolution must be a whole number from 224"),
    (["{images}", "--out", "{tmp}/o", "--batch", "0"], "--batch and --actors must be at least 1"),
])
def test_bad_arguments_exit_2_with_a_plain_message(images, tmp_path, capsys, args, message):
    (tmp_path / "empty").mkdir()
    fill = {"tmp": tmp_path, "images": images}
    assert cli_main(["atlas", *(a.format(**fill) for a in args)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message.format(**fill) in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow  # starts Ray
def test_ray_makes_the_same_atlas(loaded, images, atlas_folder, tmp_path):
    import ray  # optional (requirements-ray.txt), installed for the tests
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        build_atlas(open_source(images), tmp_path / "out", loaded, PX, engine="ray", batch_size=2,
                    ray_options=RayOptions(actors=1, cpus_per_actor=1), progress=False)
    finally:
        ray.shutdown()
    atlas, local = load_atlas(tmp_path / "out"), load_atlas(atlas_folder)
    pd.testing.assert_frame_equal(atlas.statistics, local.statistics)
    pd.testing.assert_frame_equal(atlas.images, local.images)
    pd.testing.assert_frame_equal(atlas.aggregate, local.aggregate)
    assert [s["image"] for s in atlas.summary["skipped"]] == ["broken.png"]


@pytest.mark.slow  # a fresh process
def test_memory_does_not_grow_with_the_number_of_images(tmp_path):
    done = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(tmp_path)], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    few, many = (result["peak_extra_mb"][str(count)] for count in MEMORY_IMAGES)
    growth = (MEMORY_IMAGES[1] - MEMORY_IMAGES[0]) * result["kept_mb"]  # what keeping every analysis would add
    assert many - few < 0.25 * growth, result


@pytest.mark.slow  # a fresh process running the default model
def test_command_line_with_the_default_model(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(ROOT / "assets" / "chelsea.png", images / "cat.png")
    shutil.copy(ROOT / "assets" / "rocket.jpg", images / "rocket.jpg")
    done = subprocess.run([sys.executable, "-m", "explorer", "atlas", str(images), "--out", str(tmp_path / "out"),
                           "--resolution", "224"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "atlas" in done.stderr and "2 images in" in done.stderr  # the progress bar, then the count
    atlas = load_atlas(tmp_path / "out")
    assert atlas.settings["model"].startswith("DINOv2 ViT-S/14") and atlas.settings["resolution"] == 224
    assert len(atlas.statistics) == 2 * 12 * 6 and atlas.cls_maps("cat.png").shape == (6, 11, 16)
