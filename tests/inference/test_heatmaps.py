"""Heatmap maths: scales, exact tile-to-pixel placement, smoothing, colours, GeoJSON, map selection."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from wsi_mil.errors import HeatmapRequestError
from wsi_mil.inference.heatmaps import (
    RELATIVE_MAX,
    HeatmapOptions,
    TileScores,
    canvas_size,
    colorize,
    heatmap_geojson,
    legend_colors,
    render_heatmap,
    scale_legend,
    scale_scores,
    score_grid,
    smooth_grid,
    smooth_tile_values,
    top_tiles,
)


def scores(**overrides: object) -> TileScores:
    values: dict[str, object] = {
        "coords": np.array([[0, 0], [100, 0], [0, 100], [300, 200]], dtype=np.int64),
        "tile_size_level0": 100,
        "attention": np.array([0.1, 0.2, 0.3, 0.4], dtype=np.float32),
        "maps": {"class_attention": np.array([[1, 2, 3, 4], [4, 3, 2, 1]], dtype=np.float32)},
        "class_names": ("a", "b"),
        "slide_width": 400,
        "slide_height": 300,
    }
    values.update(overrides)
    return TileScores(**values)  # type: ignore[arg-type]


def test_scales() -> None:
    values = np.array([5.0, 1.0, 3.0, 3.0])
    assert scale_scores(values, "raw").tolist() == values.tolist()
    assert scale_scores(values, "minmax").tolist() == [1.0, 0.0, 0.5, 0.5]
    assert scale_scores(values, "percentile").tolist() == [1.0, 0.25, 0.625, 0.625]
    assert scale_scores(np.array([2.0, 2.0]), "minmax").tolist() == [0.5, 0.5]
    # relative: score / mean (here 3), log scale from x1 (0) to x16 (1); at or below the mean: 0
    ratios = np.array([1.0, 2.0, 4.0, RELATIVE_MAX, 2 * RELATIVE_MAX, 0.5, 0.0])  # x mean
    scores = np.concatenate([3.0 * ratios, np.full(93, (300 - 3.0 * ratios.sum()) / 93)])  # mean 3
    assert scores.mean() == pytest.approx(3.0)
    np.testing.assert_allclose(scale_scores(scores, "relative")[:7], [0.0, 0.25, 0.5, 1.0, 1.0, 0.0, 0.0], atol=1e-12)
    assert scale_scores(np.zeros(4), "relative").tolist() == [0.0] * 4
    with pytest.raises(HeatmapRequestError, match=r"never negative.*scale=minmax"):
        scale_scores(np.array([-1.0, 2.0]), "relative")
    with pytest.raises(HeatmapRequestError):
        scale_scores(values, "softmax")  # type: ignore[arg-type]


def test_tiles_land_on_their_level0_pixels() -> None:
    tiles = scores()
    grid = score_grid(
        tiles, np.array([1.0, 2.0, 3.0, 4.0]), size=canvas_size(400, 300, max_size=40)
    )
    assert grid.shape == (30, 40)  # 10 level-0 px per pixel
    assert (
        np.all(grid[0:10, 0:10] == 1)
        and np.all(grid[0:10, 10:20] == 2)
        and np.all(grid[10:20, 0:10] == 3)
    )
    assert np.all(grid[20:30, 30:40] == 4)
    assert np.isnan(grid[10:20, 10:20]).all() and np.isnan(grid[0:20, 20:40]).all()
    # overlapping tiles average
    overlap = scores(coords=np.array([[0, 0], [50, 0], [200, 200], [300, 200]]))
    merged = score_grid(overlap, np.array([1.0, 3.0, 0.0, 0.0]), size=(40, 30))
    assert merged[0, 2] == 1 and merged[0, 7] == 2 and merged[0, 12] == 3


def test_smoothing_keeps_background_empty() -> None:
    grid = np.full((20, 20), np.nan)
    grid[5:15, 5:15] = 0.0
    grid[5:10, 5:15] = 1.0
    smooth = smooth_grid(grid, 2.0)
    assert np.isnan(smooth[:5]).all() and np.isnan(smooth[:, :5]).all()
    assert 0 < smooth[9, 9] < 1 and smooth[5, 5] > smooth[14, 14]
    assert smooth_grid(grid, 0) is grid


def test_smoothing_runs_on_the_tile_grid_and_keeps_its_size_bounded() -> None:
    """A hot tile spreads to its neighbours by distance in tiles; the grid smoothed on has one cell
    per tile (however large the canvas), and tiles strewn over a huge area still fit in a bounded grid."""
    side = 128
    xs, ys = np.meshgrid(np.arange(9), np.arange(9))
    coords = np.stack([xs.ravel(), ys.ravel()], axis=1) * side + 5000
    values = np.zeros(81)
    values[40] = 1.0  # the centre tile (4, 4)
    tiles = scores(
        coords=coords,
        tile_size_level0=side,
        attention=values,
        maps={},
        slide_width=20000,
        slide_height=20000,
    )
    smoothed = smooth_tile_values(tiles, values, 1.0)
    distance = np.hypot(xs.ravel() - 4, ys.ravel() - 4)
    order = np.argsort(distance, kind="stable")
    assert smoothed[40] < 1 and smoothed[40] == smoothed.max()
    assert np.all(np.diff(smoothed[order][distance[order] <= 3]) <= 1e-12)  # falls off with distance
    assert smoothed[0] < 1e-3 and smoothed.sum() == pytest.approx(1.0, rel=0.05)
    assert smooth_tile_values(tiles, values, 0.0) is values
    strewn = scores(coords=np.array([[0, 0], [10**12, 0], [0, 10**12], [10**12, 10**12]]))
    spread = smooth_tile_values(strewn, np.array([1.0, 2.0, 3.0, 4.0]), 10.0)
    assert spread.shape == (4,) and np.isfinite(spread).all()


def test_colours_and_transparency() -> None:
    grid = np.array([[0.0, 1.0, np.nan]])
    rgba = colorize(grid, cmap="jet", vmin=0, vmax=1, alpha=0.5)
    assert rgba.shape == (1, 3, 4) and rgba[0, 2, 3] == 0 and rgba[0, 0, 3] == 128
    assert rgba[0, 0, 2] > rgba[0, 0, 0] and rgba[0, 1, 0] > rgba[0, 1, 2]  # blue low, red high
    with pytest.raises(HeatmapRequestError, match="colormap"):
        colorize(grid, cmap="nope", vmin=0, vmax=1, alpha=1)


def test_render_modes_and_tissue_mask() -> None:
    from PIL import Image

    tiles = scores()
    overlay = render_heatmap(tiles, HeatmapOptions(background="none", max_size=40, alpha=1.0))
    assert overlay.mode == "RGBA" and overlay.size == (40, 30)
    mask = Image.new("L", (4, 3), 255)
    mask.putpixel((0, 0), 0)  # no tissue in the first tile
    masked = np.asarray(
        render_heatmap(
            tiles, HeatmapOptions(scale="percentile", background="none", max_size=40), tissue_mask=mask
        )
    )
    assert masked[0:10, 0:10, 3].max() == 0 and masked[0:10, 10:20, 3].min() > 0
    thumbnail = Image.new("RGB", (8, 6), (10, 200, 10))
    blended = np.asarray(
        render_heatmap(tiles, HeatmapOptions(scale="percentile", max_size=40, alpha=0.5), thumbnail=thumbnail)
    )
    assert blended.shape == (30, 40, 3)
    assert tuple(blended[15, 15]) == (10, 200, 10)  # no tile: thumbnail unchanged


def test_select_maps_and_classes() -> None:
    tiles = scores()
    assert tiles.select()[1] == "attention"
    values, label = tiles.select(class_index=1)
    assert values.tolist() == [4, 3, 2, 1] and label == "class_attention[b]"
    with pytest.raises(HeatmapRequestError, match="out of range"):
        tiles.select(class_index=2)
    plain = scores(maps={"attention_logits": np.zeros((1, 4), dtype=np.float32)})
    with pytest.raises(HeatmapRequestError, match="no per-class map"):
        plain.select(class_index=0)
    assert plain.select("attention_logits")[1] == "attention_logits[0]"
    with pytest.raises(ValueError, match="must be"):
        scores(attention=np.zeros(3))


def test_geojson_is_qupath_tiles_with_measurements() -> None:
    collection = heatmap_geojson(scores(), name="job/slide")
    feature = collection["features"][3]
    assert feature["geometry"]["coordinates"] == [
        [[300, 200], [400, 200], [400, 300], [300, 300], [300, 200]]
    ]
    assert feature["properties"]["objectType"] == "tile"
    measurements = feature["properties"]["measurements"]
    assert (
        measurements["attention"] == pytest.approx(0.4) and measurements["attention_minmax"] == 1.0
    )
    assert measurements["class_attention_a"] == 4 and measurements["class_attention_b"] == 1
    assert (
        heatmap_geojson(scores(), name="job/slide")["features"][0]["id"]
        == collection["features"][0]["id"]
    )
    assert len({f["id"] for f in collection["features"]}) == 4


def test_save_load_round_trip_and_top_tiles(tmp_path: Path) -> None:
    tiles = scores()
    tiles.save(tmp_path / "s.npz")
    loaded = TileScores.load(tmp_path / "s.npz")
    assert loaded.class_names == ("a", "b") and loaded.slide_width == 400
    np.testing.assert_array_equal(loaded.maps["class_attention"], tiles.maps["class_attention"])
    assert top_tiles(np.array([0.1, 0.5, 0.5, 0.2]), 3).tolist() == [1, 2, 3]


def _grid_slide(attention: np.ndarray) -> TileScores:
    side = int(np.sqrt(len(attention)))
    grid = np.arange(len(attention))
    coords = np.stack([grid % side, grid // side], axis=1) * 100
    return TileScores(coords, 100, attention.astype(np.float32), {}, ("normal", "tumor"), side * 100, side * 100)


def test_the_default_scale_keeps_a_slide_without_signal_calm_and_shows_a_lesion() -> None:
    """400 tiles: softmax attention of small noise (no signal) vs the same with 16 lesion tiles
    holding half the attention. The percentile scale paints both slides all over; the default does not."""
    rng = np.random.default_rng(0)
    noise = np.exp(0.2 * rng.normal(size=400))
    flat = noise / noise.sum()
    lesion = np.zeros(400, dtype=bool)
    lesion[[r * 20 + c for r in range(8, 12) for c in range(8, 12)]] = True
    peaked = np.where(lesion, 0.5 / 16, flat * 0.5 / flat[~lesion].sum())

    def opacity(attention: np.ndarray, scale: str) -> np.ndarray:
        image = render_heatmap(_grid_slide(attention), HeatmapOptions(scale=scale, background="none", alpha=1.0, max_size=200))
        return np.asarray(image)[..., 3].reshape(20, 10, 20, 10).mean(axis=(1, 3)).ravel() / 255

    assert HeatmapOptions().scale == "relative"
    assert opacity(flat, "percentile").mean() == 1.0 and opacity(peaked, "percentile").mean() == 1.0
    calm = opacity(flat, "relative")
    assert calm.mean() < 0.1 and calm.max() < 0.25, "no signal: faint at most"
    shown = opacity(peaked, "relative")
    assert shown[lesion].min() > 0.9 and shown[~lesion].max() < 0.1


def test_the_legend_gives_the_score_at_each_colour() -> None:
    values = np.array([1.0, 2.0, 3.0, 6.0])  # mean 3
    relative = scale_legend(values, "relative")
    assert [t.label for t in relative] == ["×1", "×2", "×4", "×8", "×16"]
    assert [t.value for t in relative] == pytest.approx([3, 6, 12, 24, 48])
    assert [t.position for t in relative] == [0, 0.25, 0.5, 0.75, 1]
    minmax = scale_legend(values, "minmax", ticks=3)
    assert [(t.value, t.label) for t in minmax] == [(1.0, "1"), (3.5, "3.5"), (6.0, "6")]
    percentile = scale_legend(values, "percentile", ticks=2)
    assert [(t.value, t.label) for t in percentile] == [(1.0, "0%"), (6.0, "100%")]
    assert [t.value for t in scale_legend(values, "raw", ticks=2)] == [0.0, 1.0]
    colours = legend_colors("jet", "relative", steps=3)
    assert colours[0].endswith("0.00)") and colours[-1].endswith("1.00)")
    assert all(c.endswith("1.00)") for c in legend_colors("jet", "minmax", steps=3))
