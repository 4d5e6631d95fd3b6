"""Visualizer: numpy in, images out; shapes, pixel values and layouts."""
import io
import json

import numpy as np
import pytest
from matplotlib import colormaps
from PIL import Image

import visualizer
from model import ImageGeometry


def plain(width, height, value=100):
    return Image.new("RGB", (width, height), (value, value, value))


def test_colorize_endpoints_match_matplotlib():
    colours = visualizer.colorize(np.array([[0.0, 1.0]]), "viridis")
    for i, v in enumerate((0.0, 1.0)):
        expected = np.round(np.array(colormaps["viridis"](v)[:3]) * 255)
        assert np.abs(colours[0, i].astype(int) - expected).max() <= 1
    with pytest.raises(ValueError, match="unknown colormap"):
        visualizer.colorize(np.zeros((2, 2)), "no-such-map")


def test_normalizations():
    values = np.array([[1.0, 2.0], [3.0, 5.0]])
    np.testing.assert_allclose(visualizer.normalize_map(values, "minmax"), [[0, 0.25], [0.5, 1]])
    np.testing.assert_allclose(visualizer.normalize_map(values, "max"), values / 5)
    assert visualizer.normalize_map(np.full((3, 3), 7.0)).max() == 0  # constant map: no division by zero
    spiky = np.linspace(0, 1, 400).reshape(20, 20)
    spiky[-1, -1] = 1000  # one sink token
    robust = visualizer.normalize_map(spiky, "robust")
    assert robust[-1, -1] == 1 and robust[0, 0] == 0 and 0.45 < robust[10, 0] < 0.55
    assert visualizer.normalize_map(spiky, "minmax")[10, 0] < 0.01  # what the sink does without it


def test_overlay_opacity_extremes():
    image = plain(30, 20)
    heat = np.random.default_rng(0).random((2, 3))
    assert np.array_equal(np.asarray(visualizer.overlay(image, heat, opacity=0.0)), np.asarray(image))
    full = np.asarray(visualizer.overlay(image, heat, opacity=1.0, cmap="gray", normalize="minmax", smooth=False))
    assert set(np.unique(full[..., 0])) <= set(np.unique(visualizer.colorize(np.linspace(0, 1, 256), "gray")))
    assert visualizer.overlay(image, heat).size == image.size


@pytest.mark.parametrize("size", [(451, 300), (300, 451)])
def test_hot_patch_lights_exactly_its_box_on_non_square_images(size):
    width, height = size
    geometry = ImageGeometry(orig_h=height, orig_w=width, grid_h=5, grid_w=7, patch_size=14)
    heat = np.zeros((5, 7))
    heat[3, 2] = 1.0
    out = np.asarray(visualizer.overlay(plain(width, height, 0), heat, opacity=1.0, cmap="gray",
                                        normalize="minmax", smooth=False))
    left, top, right, bottom = geometry.patch_box(3, 2)
    lit = np.argwhere(out[..., 0] > 128)
    assert lit[:, 0].min() == round(top) and lit[:, 0].max() == round(bottom) - 1
    assert lit[:, 1].min() == round(left) and lit[:, 1].max() == round(right) - 1
    assert geometry.patch_at((left + right) / 2, (top + bottom) / 2) == (3, 2)


def test_mark_patch_draws_outline_without_mutating():
    image = plain(50, 40, 0)
    marked = visualizer.mark_patch(image, (10, 10, 20, 20), color=(0, 255, 0), width=1)
    assert np.asarray(image).max() == 0
    pixels = np.asarray(marked)
    assert tuple(pixels[10, 15]) == (0, 255, 0) and tuple(pixels[15, 15]) == (0, 0, 0)


def test_head_grid_layout():
    tiles = [plain(40, 20, v) for v in (10, 60, 110, 160, 210)]
    grid = visualizer.head_grid(tiles, [f"head {i}" for i in range(5)], columns=3, tile_width=80)
    assert grid.width > 3 * 80 and grid.height > 2 * 40
    with pytest.raises(ValueError):
        visualizer.head_grid(tiles, ["too few"])


def test_atlas_click_mapping_inverts_layout():
    maps = np.random.default_rng(1).random((4, 3, 5, 8))
    image, layout = visualizer.atlas(maps, thumb_width=40)
    assert image.size[0] >= layout.margin_left + 3 * 40
    for layer in range(4):
        for head in range(3):
            left, top, right, bottom = layout.box(layer, head)
            assert layout.cell_at((left + right) / 2, (top + bottom) / 2) == (layer, head)
            assert layout.cell_at(left, top) == (layer, head)
    assert layout.cell_at(1, 1) is None


def test_stats_heatmap_and_line_chart_render():
    heat = visualizer.stats_heatmap(np.arange(12.0).reshape(4, 3), "entropy")
    chart = visualizer.line_chart({"mean": np.arange(5.0), "head 0": np.ones(5)}, "layer", "distance", "t")
    assert heat.width > 100 and heat.height > 100 and chart.width > 100
    assert np.asarray(heat).std() > 10  # not a blank canvas


def test_gif_round_trip():
    frames = [plain(32, 24, v) for v in (0, 120, 240)]
    data = visualizer.animation_gif(frames, duration_ms=250, captions=["a", "b", "c"])
    gif = Image.open(io.BytesIO(data))
    assert gif.n_frames == 3 and gif.size == (32, 24) and gif.info["duration"] == 250
    with pytest.raises(ValueError):
        visualizer.animation_gif([plain(10, 10), plain(11, 10)])


def test_npz_and_json_round_trip(tmp_path):
    arrays = {"cls": np.arange(24, dtype=np.float32).reshape(2, 3, 4)}
    npz, sidecar = visualizer.export_npz(tmp_path / "out", arrays, {"layer": np.int64(3), "grid": (3, 4)})
    assert np.array_equal(np.load(npz)["cls"], arrays["cls"])
    meta = json.loads(sidecar.read_text())
    assert meta["layer"] == 3 and meta["grid"] == [3, 4] and meta["arrays"]["cls"]["shape"] == [2, 3, 4]


def test_rgb_image_is_crisp_patches():
    rgb = np.zeros((2, 2, 3))
    rgb[0, 1] = (1, 0, 0)
    out = np.asarray(visualizer.rgb_image(rgb, (40, 20)))
    assert tuple(out[5, 30]) == (255, 0, 0) and tuple(out[5, 10]) == (0, 0, 0)
