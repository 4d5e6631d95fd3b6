"""Visualizer: numpy in, images out; shapes, pixel values and layouts."""
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from matplotlib import colormaps
from PIL import Image

import visualizer
from model import ImageGeometry

ROOT = Path(__file__).resolve().parents[1]


def plain(width, height, value=100):
    return Image.new("RGB", (width, height), (value, value, value))


def gradient(width, height):
    y, x = np.mgrid[0:height, 0:width]
    return Image.fromarray(np.stack([x * 255 // width, y * 255 // height, 0 * x + 90], -1).astype(np.uint8))


def test_importing_visualizer_pulls_in_neither_torch_nor_pyplot():
    code = "import sys, visualizer; print(sorted(m for m in ('torch', 'matplotlib.pyplot') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("cmap", ["viridis", "inferno", "gray", "tab10"])
def test_colorize_endpoints_match_matplotlib(cmap):
    colours = visualizer.colorize(np.array([[0.0, 1.0]]), cmap)
    assert colours.shape == (1, 2, 3) and colours.dtype == np.uint8
    assert np.array_equal(colours[0], colormaps[cmap]([0.0, 1.0], bytes=True)[:, :3])
    for i, v in enumerate((0.0, 1.0)):
        assert np.abs(colours[0, i].astype(int) - np.array(colormaps[cmap](v)[:3]) * 255).max() <= 1
    assert np.array_equal(visualizer.colorize(np.array([-3.0, 7.0]), cmap), colours[0])  # out of range is clipped


def test_unknown_colormap_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown colormap 'no-such-map'"):
        visualizer.colorize(np.zeros((2, 2)), "no-such-map")


def test_available_colormaps_are_a_curated_list_of_perceptual_and_diverging_ones():
    names = visualizer.available_colormaps()
    assert names[:4] == ["inferno", "viridis", "magma", "plasma"] and "coolwarm" in names
    assert not {"jet", "flag", "prism", "Paired", "turbo"} & set(names) and len(names) <= 10
    assert len(names) == len(set(names)) and all(name in colormaps for name in names)


def test_scale_range_is_what_normalize_sends_to_the_ends():
    values = np.linspace(0, 1, 400).reshape(20, 20)
    values[-1, -1] = 50.0  # a sink token
    low, high = visualizer.scale_range(values, "robust")
    assert low == 0 and 0.98 < high < 1.0
    np.testing.assert_allclose(visualizer.normalize_map(values, "robust"), np.clip(values / high, 0, 1), rtol=1e-6)
    assert visualizer.scale_range(values, "max") == (0.0, 50.0) and visualizer.scale_range(values, "none") == (0, 1)


def test_top_mass_mask_keeps_the_smallest_set_holding_the_fraction():
    values = np.array([[0.5, 0.05], [0.25, 0.2]])
    assert visualizer.top_mass_mask(values, 0.5).tolist() == [[True, False], [False, False]]
    assert visualizer.top_mass_mask(values, 0.6).tolist() == [[True, False], [True, False]]
    assert visualizer.top_mass_mask(values, 0.9).tolist() == [[True, False], [True, True]]
    assert visualizer.top_mass_mask(values, 0.99).tolist() == [[True, True], [True, True]]
    assert visualizer.top_mass_mask(values * 10, 0.75).tolist() == [[True, False], [True, False]]  # scale-free
    with pytest.raises(ValueError):
        visualizer.top_mass_mask(values, 0.0)


def test_masked_overlay_dims_what_is_outside_and_colorbar_frames_below():
    image = plain(40, 20, 200)
    heat = np.array([[1.0, 0.0]])
    out = np.asarray(visualizer.overlay(image, heat, opacity=1.0, cmap="gray", smooth=False, mask=heat > 0.5))
    assert (out[:, :20] == 255).all() and (out[:, 20:] == round(200 * 0.35)).all()
    framed = visualizer.with_colorbar(image, "gray", 0.0, 0.25, label="attention")
    assert framed.size == (40, 20 + 34) and np.array_equal(np.asarray(framed)[:20], np.asarray(image))


def test_normalizations():
    values = np.array([[1.0, 2.0], [3.0, 5.0]])
    np.testing.assert_allclose(visualizer.normalize_map(values, "minmax"), [[0, 0.25], [0.5, 1]])
    np.testing.assert_allclose(visualizer.normalize_map(values, "max"), values / 5)
    np.testing.assert_allclose(visualizer.normalize_map(values - 1.5, "none"), [[0, 0.5], [1, 1]])
    assert visualizer.normalize_map(values).dtype == np.float32
    for mode in ("minmax", "robust"):
        constant = visualizer.normalize_map(np.full((3, 3), 7.0), mode)
        assert np.array_equal(constant, np.zeros((3, 3))), mode  # no division by zero
    assert np.array_equal(visualizer.normalize_map(np.zeros((3, 3)), "max"), np.zeros((3, 3)))
    assert np.array_equal(visualizer.normalize_map(np.full((3, 3), 7.0), "max"), np.ones((3, 3)))  # each is the max
    with pytest.raises(ValueError, match="normalize must be one of"):
        visualizer.normalize_map(values, "zscore")


def test_percentile_clipping_keeps_a_sink_token_from_washing_out_the_map():
    spiky = np.linspace(0, 1, 400).reshape(20, 20)
    spiky[-1, -1] = 1000  # one sink token
    assert visualizer.normalize_map(spiky, "minmax")[10, 0] < 0.01  # what the sink does unclipped
    for robust in (visualizer.normalize_map(spiky, "robust"), visualizer.normalize_map(spiky, clip_percentile=99)):
        assert robust[-1, -1] == 1 and robust[0, 0] == 0 and 0.45 < robust[10, 0] < 0.55
    sparse = np.zeros((40, 40))
    sparse[0, :3] = 1.0  # 99th percentile is 0: clipping would flatten the map, so it is skipped
    assert visualizer.normalize_map(sparse, "robust")[0, 0] == 1


def test_overlay_opacity_extremes_are_the_image_and_the_pure_colormap():
    image = gradient(37, 23)
    heat = np.random.default_rng(0).random((3, 5))
    assert np.array_equal(np.asarray(visualizer.overlay(image, heat, opacity=0.0)), np.asarray(image))
    for smooth in (False, True):
        full = visualizer.overlay(image, heat, opacity=1.0, cmap="viridis", smooth=smooth)
        expected = visualizer.colorize(visualizer.upsample(visualizer.normalize_map(heat), (37, 23), smooth), "viridis")
        assert full.size == image.size and np.array_equal(np.asarray(full), expected)
    half = np.asarray(visualizer.overlay(image, heat, opacity=0.5), dtype=int)
    assert 0 < np.abs(half - np.asarray(image, dtype=int)).mean() < 128
    with pytest.raises(ValueError):
        visualizer.overlay(image, heat, opacity=1.5)


@pytest.mark.parametrize("size", [(451, 300), (300, 451), (98, 70)])
def test_hot_patch_lights_exactly_its_box_on_non_square_images(size):
    width, height = size
    geometry = ImageGeometry(orig_h=height, orig_w=width, grid_h=5, grid_w=7, patch_size=14)
    heat = np.zeros((5, 7))
    heat[3, 2] = 1.0
    out = np.asarray(visualizer.overlay(plain(width, height, 0), heat, opacity=1.0, cmap="gray", smooth=False))
    left, top, right, bottom = geometry.patch_box(3, 2)
    y, x = np.mgrid[0:height, 0:width] + 0.5  # pixel centres
    inside = (left <= x) & (x < right) & (top <= y) & (y < bottom)
    assert inside.sum() > 0 and np.array_equal(out[..., 0] == 255, inside)
    assert np.array_equal(out[..., 0] == 0, ~inside)
    smooth = np.asarray(visualizer.overlay(plain(width, height, 0), heat, opacity=1.0, cmap="gray", smooth=True))
    peak_y, peak_x = np.unravel_index(np.argmax(smooth[..., 0]), (height, width))
    assert left <= peak_x + 0.5 < right and top <= peak_y + 0.5 < bottom


@pytest.mark.parametrize("orig_h, orig_w, grid_h, grid_w", [(300, 451, 5, 7), (451, 300, 16, 12), (97, 203, 6, 14)])
def test_nearest_upsampling_agrees_with_patch_at_for_every_pixel(orig_h, orig_w, grid_h, grid_w):
    geometry = ImageGeometry(orig_h, orig_w, grid_h, grid_w, patch_size=16)
    index = visualizer.upsample(np.arange(grid_h * grid_w).reshape(grid_h, grid_w), (orig_w, orig_h), smooth=False)
    assert index.shape == (orig_h, orig_w)
    expected = [[row * grid_w + col for col, row in
                 (geometry.patch_at(x + 0.5, y + 0.5)[::-1] for x in range(orig_w))] for y in range(orig_h)]
    assert np.array_equal(index, np.array(expected))


def test_rgb_image_is_crisp_patches_at_the_given_size():
    rgb = np.zeros((2, 3, 3))
    rgb[0, 1] = (1, 0, 0)
    out = visualizer.rgb_image(rgb, (60, 20))
    pixels = np.asarray(out)
    assert out.size == (60, 20)
    assert np.all(pixels[:10, 20:40] == (255, 0, 0)) and pixels[:10, :20].max() == 0 and pixels[10:].max() == 0


def test_mark_patch_outlines_the_box_without_mutating_the_input():
    image = plain(50, 40, 0)
    marked = visualizer.mark_patch(image, (10, 10, 20, 20), color=(0, 255, 0), width=1)
    assert np.asarray(image).max() == 0 and marked.size == image.size
    pixels = np.asarray(marked)
    green = np.all(pixels == (0, 255, 0), axis=-1)
    assert green[10, 10:20].all() and green[19, 10:20].all() and green[10:20, 10].all() and green[10:20, 19].all()
    assert green.sum() == 36  # the outline only: 4 sides of 10 px, corners once
    several = np.asarray(visualizer.mark_patches(image, [(0, 0, 10, 10), (30, 20, 50, 40)], color=(255, 0, 0)))
    red = np.all(several == (255, 0, 0), axis=-1)
    assert red[0, 0] and red[39, 49] and not red[5, 5] and not red[30, 40]  # auto width 2 leaves interiors


def test_head_grid_places_every_tile_at_tile_width_in_rows():
    values = (10, 60, 110, 160, 210)
    tiles = [Image.new("RGB", (40, 20), (v, 0, 255 - v)) for v in values]
    grid = np.asarray(visualizer.head_grid(tiles, [f"head {i}" for i in range(5)], tile_width=80))
    centres = []
    for v in values:
        where = np.argwhere(np.all(grid == (v, 0, 255 - v), axis=-1))
        assert len(where) == 80 * 40  # each tile once, resized to 80 × 40
        centres.append(where.mean(axis=0))
    rows = [round(c[0]) for c in centres]
    assert rows[0] == rows[1] == rows[2] < rows[3] == rows[4]  # default columns: ceil(sqrt(5)) = 3
    assert centres[0][1] < centres[1][1] < centres[2][1] and centres[3][1] == pytest.approx(centres[0][1])
    assert (grid[: int(centres[0][0]) - 20] < 100).all(axis=-1).any()  # dark label text above the first row
    titled = visualizer.head_grid(tiles, list("abcde"), columns=5, tile_width=80, title="layer 3")
    assert titled.width > 5 * 80 and titled.height > 40
    with pytest.raises(ValueError):
        visualizer.head_grid(tiles, ["too few"])


def test_atlas_draws_each_map_in_its_cell_and_click_mapping_inverts_layout():
    maps = np.random.default_rng(1).random((4, 3, 5, 8))
    image, layout = visualizer.atlas(maps, cmap="viridis", thumb_width=40, selected=(2, 1))
    assert layout == visualizer.atlas_layout(4, 3, 5, 8, thumb_width=40) and image.size == layout.size
    assert (layout.thumb_w, layout.thumb_h) == (40, 25)
    pixels = np.asarray(image)
    for layer in range(4):
        for head in range(3):
            left, top, right, bottom = layout.box(layer, head)
            for x, y in [(left, top), (right - 1, bottom - 1), ((left + right) / 2, (top + bottom) / 2)]:
                assert layout.cell_at(x, y) == (layer, head)
            assert layout.cell_at(right + 0.5, top) is None and layout.cell_at(left, bottom + 0.5) is None  # gaps
            thumb = visualizer.upsample(visualizer.normalize_map(maps[layer, head]), (40, 25), smooth=False)
            assert np.array_equal(pixels[top:bottom, left:right], visualizer.colorize(thumb, "viridis"))
    assert layout.cell_at(1, 1) is None and layout.cell_at(*layout.size) is None
    left, top, _, _ = layout.box(2, 1)
    assert tuple(pixels[top - 1, left + 5]) == (0, 200, 255)  # the selected cell's outline
    assert (pixels[: layout.margin_top] < 100).all(axis=-1).any()  # column labels
    assert (pixels[:, : layout.margin_left] < 100).all(axis=-1).any()  # row labels
    shared, _ = visualizer.atlas(maps * 0.5, cmap="gray", thumb_width=40, value_range=(0.0, 1.0))
    left, top, right, bottom = layout.box(0, 0)
    expected = visualizer.upsample(maps[0, 0] * 0.5, (40, 25), smooth=False)
    assert np.abs(np.asarray(shared)[top:bottom, left:right, 0] - expected * 255).max() <= 2  # 256-entry LUT


def test_stats_heatmap_shows_the_colormap_and_marks_the_selection():
    heat = visualizer.stats_heatmap(np.arange(12.0).reshape(4, 3), "entropy", cmap="viridis")
    colours = {tuple(c) for c in np.asarray(heat).reshape(-1, 3)}
    viridis = colormaps["viridis"]([0.0, 1.0], bytes=True)[:, :3]
    assert heat.mode == "RGB" and heat.width > 200 and heat.height > 200
    assert tuple(viridis[0]) in colours and tuple(viridis[1]) in colours
    marked = visualizer.stats_heatmap(np.arange(12.0).reshape(4, 3), "entropy", cmap="viridis", selected=(2, 1))
    assert (0, 200, 255) in {tuple(c) for c in np.asarray(marked).reshape(-1, 3)}
    assert (0, 200, 255) not in colours


def test_colorbar_strip_has_the_exact_size_and_the_colormap_ends():
    legend = np.asarray(visualizer.colorbar_image("inferno", width=200, height=40, vmin=0, vmax=0.5, label="mass"))
    assert legend.shape == (40, 200, 3)
    ends = colormaps["inferno"]([0.0, 1.0], bytes=True)[:, :3]
    assert np.array_equal(legend[5, 0], ends[0]) and np.array_equal(legend[5, -1], ends[1])
    assert (legend[25:] < 100).all(axis=-1).any()  # the numbers under the strip


def test_gif_round_trip():
    frames = [plain(64, 48, v) for v in (0, 120, 240)]
    data = visualizer.animation_gif(frames, duration_ms=250, captions=["layer 0", "layer 1", "layer 2"])
    gif = Image.open(io.BytesIO(data))
    assert gif.n_frames == 3 and gif.size == (64, 48) and gif.info["duration"] == 250 and gif.info["loop"] == 0
    gif.seek(1)
    frame = np.asarray(gif.convert("RGB"))
    assert np.array_equal(frame[-1, -1], (120, 120, 120))  # content kept
    assert np.array_equal(frame[1, 1], (0, 0, 0))  # caption band
    with pytest.raises(ValueError, match="same size"):
        visualizer.animation_gif([plain(10, 10), plain(11, 10)])
    with pytest.raises(ValueError):
        visualizer.animation_gif(frames, captions=["too few"])


def test_png_bytes_round_trip():
    image = gradient(30, 20)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(visualizer.png_bytes(image)))), np.asarray(image))


def test_npz_and_json_round_trip():
    arrays = {"cls": np.arange(24, dtype=np.float32).reshape(2, 3, 4), "norms": np.ones((5,), dtype=np.float16)}
    metadata = {"layer": np.int64(3), "grid": (3, 4), "mean": np.float32(0.5), "box": np.array([1, 2]), "bad": np.nan}
    npz, sidecar = visualizer.npz_bytes(arrays, metadata)
    assert visualizer.npz_bytes(arrays, metadata) == (npz, sidecar)  # the same content, the same bytes
    with np.load(io.BytesIO(npz)) as loaded:
        assert set(loaded.files) == {"cls", "norms"}
        assert np.array_equal(loaded["cls"], arrays["cls"]) and loaded["norms"].dtype == np.float16
    meta = json.loads(sidecar)
    assert meta["layer"] == 3 and meta["grid"] == [3, 4] and meta["mean"] == 0.5 and meta["box"] == [1, 2]
    assert meta["bad"] is None
    assert meta["arrays"] == {"cls": {"shape": [2, 3, 4], "dtype": "float32"},
                              "norms": {"shape": [5], "dtype": "float16"}}
    with pytest.raises(ValueError, match="arrays"):
        visualizer.npz_bytes(arrays, {"arrays": 1})


def test_depth_scatter_puts_each_head_at_its_value_and_rings_the_selection():
    values = np.array([[90.0, 10.0], [50.0, 50.0]])  # layer 0: head 0 far, head 1 near
    chart = np.asarray(visualizer.depth_scatter(values, "mean attention distance (px)", "fig. 7"))
    assert chart.shape[2] == 3 and chart.shape[1] > 400

    def leftmost_dot_row(index):  # the layer-0 dot: the legend's markers are on the right
        ys, xs = np.nonzero((chart == colormaps["tab10"](index, bytes=True)[:3]).all(-1))
        return ys[xs <= xs.min() + 3].mean()

    assert leftmost_dot_row(0) < leftmost_dot_row(1) - 50  # larger values are drawn higher
    ringed = np.asarray(visualizer.depth_scatter(values, "px", "fig. 7", selected=(1, 0)))
    dark = lambda image: int((image < 40).all(-1).sum())
    assert dark(ringed) > dark(np.asarray(visualizer.depth_scatter(values, "px", "fig. 7"))) + 30
    with pytest.raises(ValueError, match="layers, heads"):
        visualizer.depth_scatter(np.ones(4), "px", "t")


def test_long_chart_titles_wrap_inside_the_image():
    title = "mean attention distance as in Dosovitskiy et al. 2021, fig. 7: " + "a long definition " * 8
    charts = (visualizer.stats_heatmap(np.ones((3, 2)), title), visualizer.depth_scatter(np.ones((3, 2)), "px", title))
    for chart in charts:
        pixels = np.asarray(chart)
        band = pixels[: pixels.shape[0] // 4]  # the title's rows
        assert (band < 100).all(-1).any()  # the title is drawn ...
        assert not (band[:, :3] < 200).any() and not (band[:, -3:] < 200).any()  # ... and not cut at either edge
