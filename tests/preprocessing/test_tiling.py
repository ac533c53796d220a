"""Tile grids at a physical resolution and tile reads, on the synthetic pyramid and real slides."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydantic
import pytest
from PIL import Image

from wsi_mil.errors import TilingError
from wsi_mil.preprocessing.slide import SlideReader, open_slide
from wsi_mil.preprocessing.tiling import (
    TileGrid,
    TilingParams,
    read_tile,
    tile_footprint,
    tile_grid,
    tissue_coverage,
)
from wsi_mil.preprocessing.tissue import TissueMask, TissueParams, segment_tissue


@pytest.fixture(scope="module")
def slide(synthetic_slide) -> SlideReader:
    return open_slide(synthetic_slide.path)


@pytest.fixture(scope="module")
def mask(slide: SlideReader) -> TissueMask:
    return segment_tissue(slide, TissueParams())


@pytest.fixture(scope="module")
def grid(slide: SlideReader, mask: TissueMask) -> TileGrid:
    return tile_grid(slide, mask, TilingParams())


def _rectangle_tiles(synthetic_slide, size: int) -> set[tuple[int, int]]:
    x0, y0, x1, y1 = synthetic_slide.tissue_box
    return {(x, y) for y in range(y0, y1, size) for x in range(x0, x1, size)}


def test_grid_geometry_for_a_quarter_micron_slide_at_half_micron(grid: TileGrid) -> None:
    assert (grid.slide_mpp, grid.target_mpp, grid.tile_px) == (0.25, 0.5, 256)
    assert grid.tile_size_level0 == 512
    assert grid.step_level0 == 512
    assert grid.read_level == 1  # the 2x level
    assert grid.read_size == 256
    assert grid.coords.dtype == np.int64 and grid.coords.shape == (len(grid), 2)
    assert grid.tissue_fractions.dtype == np.float32 and grid.tissue_fractions.shape == (len(grid),)


def test_tiles_lie_on_the_tissue_in_raster_order(synthetic_slide, grid: TileGrid) -> None:
    coords = [tuple(map(int, c)) for c in grid.coords]
    assert coords == sorted(coords, key=lambda c: (c[1], c[0]))
    assert (grid.coords % 512 == 0).all()  # level-0 positions on the 512-px grid
    width, height = synthetic_slide.dimensions
    assert (grid.coords >= 0).all()
    assert (grid.coords[:, 0] + 512 <= width).all() and (grid.coords[:, 1] + 512 <= height).all()
    rectangle = _rectangle_tiles(synthetic_slide, 512)
    assert rectangle <= set(coords)
    cx, cy, radius = *synthetic_slide.disk_center, synthetic_slide.disk_radius
    for x, y in set(coords) - rectangle:
        # The only other tiles overlap the disk by at least a quarter.
        nearest_x, nearest_y = np.clip(cx, x, x + 512), np.clip(cy, y, y + 512)
        assert (nearest_x - cx) ** 2 + (nearest_y - cy) ** 2 < radius**2
    assert (grid.tissue_fractions >= 0.25).all()
    hole_tile = coords.index((2048, 1024))
    # Painted: 1 - (384/512)² = 0.44; the 7x7 median and the closing round the 12x12-px hole's
    # corners (about 20 mask px), which leaves about 0.53.
    assert 0.42 < grid.tissue_fractions[hole_tile] < 0.6


def test_read_tile_matches_a_level0_read_of_the_same_place(
    slide: SlideReader, grid: TileGrid
) -> None:
    for index in (0, len(grid) // 2, len(grid) - 1):
        tile = read_tile(slide, grid, index)
        assert tile.shape == (256, 256, 3) and tile.dtype == np.uint8
        x, y = (int(v) for v in grid.coords[index])
        level0 = Image.fromarray(slide.read_region((x, y), 0, (512, 512))).reduce(2)
        assert np.abs(tile.astype(float) - np.asarray(level0, dtype=float)).mean() < 3.0
    # The painted gradient: red grows with x, so tiles further right are redder.
    left = read_tile(slide, grid, 0)
    right = read_tile(slide, grid, int(np.argmax(grid.coords[:, 0] * (grid.coords[:, 1] == 512))))
    assert right[..., 0].mean() > left[..., 0].mean() + 20


def test_overlap_shortens_the_step(slide: SlideReader, mask: TissueMask) -> None:
    grid = tile_grid(slide, mask, TilingParams(overlap_px=64))
    assert grid.tile_size_level0 == 512
    assert grid.step_level0 == 384
    assert grid.overlap_px == 64
    assert (grid.coords % 384 == 0).all()
    assert np.diff(np.unique(grid.coords[:, 0])).min() == 384


def test_finer_target_than_the_slide_reads_level0_and_upsamples(
    slide: SlideReader, mask: TissueMask
) -> None:
    grid = tile_grid(slide, mask, TilingParams(target_mpp=0.125))
    assert (grid.tile_size_level0, grid.read_level, grid.read_size) == (128, 0, 128)
    index = len(grid) // 2
    tile = read_tile(slide, grid, index)
    assert tile.shape == (256, 256, 3)
    x, y = (int(v) for v in grid.coords[index])
    source = slide.read_region((x, y), 0, (128, 128)).astype(float)
    assert abs(tile.astype(float).mean() - source.mean()) < 2.0


def test_coarse_target_reads_a_coarse_level(slide: SlideReader, mask: TissueMask) -> None:
    grid = tile_grid(slide, mask, TilingParams(target_mpp=1.5, tile_px=64))
    # 64 px at 1.5 µm = 384 level-0 px, a 6x downsample: read at the 4x level and shrink 96 -> 64.
    assert (grid.tile_size_level0, grid.read_level, grid.read_size) == (384, 2, 96)
    assert read_tile(slide, grid, 0).shape == (64, 64, 3)


def test_threshold_zero_keeps_the_whole_grid(slide: SlideReader, mask: TissueMask) -> None:
    grid = tile_grid(slide, mask, TilingParams(min_tissue_fraction=0.0))
    assert len(grid) == (4096 // 512) * (3072 // 512)


def test_empty_mask_gives_an_empty_grid(slide: SlideReader, mask: TissueMask) -> None:
    empty = TissueMask(np.zeros_like(mask.mask), mask.downsample, mask.params)
    grid = tile_grid(slide, empty, TilingParams())
    assert len(grid) == 0
    assert grid.coords.shape == (0, 2) and grid.tissue_fractions.shape == (0,)


def test_params_are_validated() -> None:
    with pytest.raises(pydantic.ValidationError, match="overlap_px"):
        TilingParams(tile_px=256, overlap_px=256)
    for bad in ({"target_mpp": 0}, {"min_tissue_fraction": 1.5}, {"tile_px": 0}):
        with pytest.raises(pydantic.ValidationError):
            TilingParams(**bad)


def test_tissue_at_the_slide_edges_is_tiled_with_padded_edge_tiles(edge_slide, tmp_path: Path) -> None:
    slide = open_slide(edge_slide.path)
    mask = segment_tissue(slide, TissueParams())
    grid = tile_grid(slide, mask, TilingParams())
    width, height = edge_slide.dimensions  # 3300 x 2900 px: no multiple of the 512-px tile
    assert (grid.tile_size_level0, grid.read_level, grid.read_size) == (512, 1, 256)
    right = grid.coords[:, 0] + 512 > width
    bottom = grid.coords[:, 1] + 512 > height
    assert right.any() and bottom.any() and grid.padded_tiles == int((right | bottom).sum())
    assert (grid.coords[:, 0] < width).all() and (grid.coords[:, 1] < height).all()
    # Kept tiles cover the true tissue and the detected tissue; a grid of whole tiles covered 67 %.
    truth = edge_slide.tissue
    covered = tile_footprint(grid.coords, 512, truth.shape, edge_slide.truth_downsample)
    assert covered[truth].mean() > 0.93
    assert tissue_coverage(grid, mask) > 0.93
    # The part of a corner tile outside the slide is the slide's glass colour; inside is tissue.
    [corner] = np.flatnonzero(right & bottom)
    x, y = (int(v) for v in grid.coords[corner])
    inside_w, inside_h = (width - x) // 2, (height - y) // 2  # read at the 2x level
    tile = read_tile(slide, grid, corner).astype(int)
    assert np.abs(tile[:, inside_w + 1 :] - grid.pad_rgb).max() <= 1
    assert np.abs(tile[inside_h + 1 :, :] - grid.pad_rgb).max() <= 1
    assert tile[: inside_h - 1, : inside_w - 1].std() > 10
    assert np.abs(np.asarray(grid.pad_rgb) - np.asarray(mask.background_rgb)).max() == 0
    assert grid.edge_padding() == {"mode": "background", "rgb": list(grid.pad_rgb), "tiles": grid.padded_tiles}


def test_a_grid_reaches_each_edge_with_as_few_tiles_as_it_can(slide: SlideReader, mask: TissueMask) -> None:
    # 4096 x 3072 px, level-0 tiles of 512 with a step of 384: 11 x 8 starts, the last ones
    # (3840, 2688) overhanging by 256 and 128 px; without overlap 512 divides both sides: no padding.
    overlapping = tile_grid(slide, mask, TilingParams(overlap_px=64, min_tissue_fraction=0.0))
    assert len(overlapping) == 11 * 8 and overlapping.padded_tiles == 11 + 8 - 1
    assert overlapping.coords[:, 0].max() == 10 * 384 and overlapping.coords[:, 1].max() == 7 * 384
    whole = tile_grid(slide, mask, TilingParams(min_tissue_fraction=0.0))
    assert whole.padded_tiles == 0


def test_real_svs_at_its_own_resolution(slides_dir: Path) -> None:
    slide = open_slide(slides_dir / "tissue/CMU-1-Small-Region.svs")
    mask = segment_tissue(slide, TissueParams())
    grid = tile_grid(slide, mask, TilingParams())
    # 256 px at 0.5 µm on a 0.499 µm slide: 257 level-0 px, read at level 0 and shrunk to 256.
    assert (grid.tile_size_level0, grid.read_level, grid.read_size) == (257, 0, 257)
    assert 25 < len(grid) < 60  # about a third of 2220x2967 px is tissue: ~33 tiles of 257²
    # The tissue runs off the bottom edge; whole tiles only covered 88 % of it, padded ones 95 %.
    assert tissue_coverage(grid, mask) >= 0.95
    assert grid.padded_tiles > 0
    tile = read_tile(slide, grid, len(grid) // 2)
    assert tile.shape == (256, 256, 3)
    assert tile.std() > 10


def test_real_svs_with_override_uses_its_2x_level(slides_dir: Path) -> None:
    slide = open_slide(slides_dir / "tissue/tcga-cr-7395-01a-01-ts1.svs", mpp_override=0.25)
    grid = tile_grid(slide, segment_tissue(slide, TissueParams()), TilingParams())
    assert (grid.tile_size_level0, grid.read_level, grid.read_size) == (512, 1, 256)
    assert len(grid) > 20
    assert read_tile(slide, grid, 0).shape == (256, 256, 3)


def test_a_tile_below_one_pixel_raises_tiling_error(slides_dir: Path) -> None:
    slide = open_slide(slides_dir / "tiny/boxes.tiff")  # 352.8 µm/px placeholder resolution
    mask = segment_tissue(slide, TissueParams(mode="whole"))
    with pytest.raises(TilingError, match="--slide-mpp"):
        tile_grid(slide, mask, TilingParams())
