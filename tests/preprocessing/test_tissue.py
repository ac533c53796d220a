"""Tissue segmentation, tissue fractions of level-0 boxes and the QuPath GeoJSON export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydantic
import pytest

from wsi_mil.errors import MissingMppError
from wsi_mil.preprocessing.slide import open_slide
from wsi_mil.preprocessing.tiling import TilingParams, tile_footprint, tile_grid
from wsi_mil.preprocessing.tissue import (
    INK_COLOR,
    TissueMask,
    TissueParams,
    segment_tissue,
    tissue_contours,
    tissue_geojson,
)

NDPI = "tissue/test3-DAPI-2-(387).ndpi"


def _ring_area(ring: list[list[float]]) -> float:
    points = np.asarray(ring)
    x, y = points[:, 0], points[:, 1]
    return 0.5 * float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]))


def _polygon_area(rings: list[list[list[float]]]) -> float:
    """Area of a GeoJSON polygon (exterior minus holes)."""
    return abs(_ring_area(rings[0])) - sum(abs(_ring_area(hole)) for hole in rings[1:])


@pytest.fixture(scope="module")
def synthetic_mask(synthetic_slide) -> TissueMask:
    return segment_tissue(open_slide(synthetic_slide.path), TissueParams())


def test_mask_covers_the_painted_tissue_and_nothing_else(synthetic_slide, synthetic_mask) -> None:
    mask = synthetic_mask
    assert mask.downsample == pytest.approx(8.0 / synthetic_slide.mpp)
    assert mask.mask.shape == (3072 // 32, 4096 // 32)
    assert mask.mask.dtype == bool
    x0, y0, x1, y1 = synthetic_slide.tissue_box
    hx0, hy0, hx1, hy1 = synthetic_slide.hole_box
    tissue_only = (x1 - x0) * (y1 - y0) - (hx1 - hx0) * (hy1 - hy0)
    assert mask.fraction_in(x0, y0, x1 - x0, y1 - y0) * (x1 - x0) * (y1 - y0) == pytest.approx(
        tissue_only, rel=0.02
    )
    assert mask.fraction_in(hx0 + 32, hy0 + 32, 320, 320) < 0.05  # the hole stays open
    sx0, sy0 = synthetic_slide.speck_box[:2]
    assert mask.fraction_in(sx0 - 64, sy0 - 64, 168, 168) == 0.0  # 100 µm² speck removed
    assert mask.fraction_in(0, 0, 1024, 3072) == 0.0  # background left of the tissue
    cx, cy = synthetic_slide.disk_center
    assert mask.fraction_in(cx - 150, cy - 150, 300, 300) == 1.0
    expected_fraction = synthetic_slide.tissue_area() / (4096 * 3072)
    assert mask.area_fraction == pytest.approx(expected_fraction, rel=0.05)


def test_fractions_are_exact_area_weighted_coverage() -> None:
    rng = np.random.default_rng(3)
    grid = rng.random((12, 15)) > 0.5
    mask = TissueMask(grid, 4.0, TissueParams())
    coords = rng.integers(-160, 960, size=(40, 2)) / 16  # fractional level-0 positions
    fractions = mask.fractions_in(coords, 7.5)
    # Brute force on a grid of 1/16 level-0 px, where these boxes have integer bounds.
    fine = np.kron(grid, np.ones((64, 64), dtype=bool))
    for (x, y), fraction in zip(coords, fractions, strict=True):
        u0, v0 = round(x * 16), round(y * 16)
        u1, v1 = u0 + 120, v0 + 120
        window = fine[max(v0, 0) : max(v1, 0), max(u0, 0) : max(u1, 0)]
        assert fraction == pytest.approx(window.sum() / 120**2, abs=1e-9)
        assert mask.fraction_in(x, y, 7.5, 7.5) == pytest.approx(fraction)


def test_fluorescence_mode_finds_the_section_where_brightfield_calls_everything_tissue(
    slides_dir: Path,
) -> None:
    slide = open_slide(slides_dir / NDPI)
    fluorescence = segment_tissue(slide, TissueParams(mode="fluorescence"))
    brightfield = segment_tissue(slide, TissueParams(mode="brightfield"))
    # Black background has high HSV saturation, so brightfield keeps it all.
    assert brightfield.area_fraction > 0.98
    assert 0.6 < fluorescence.area_fraction < 0.92
    assert brightfield.area_fraction - fluorescence.area_fraction > 0.08
    width, height = slide.dimensions
    # The black strip along the bottom edge is background; the nuclei-dense band above it is not.
    assert fluorescence.fraction_in(0, height - 200, width, 200) < 0.3
    assert fluorescence.fraction_in(0, int(height * 0.7), width, int(height * 0.1)) > 0.9


@pytest.mark.parametrize(
    ("file_name", "override", "low", "high"),
    [
        ("tissue/CMU-1-Small-Region.svs", None, 0.25, 0.45),
        ("tissue/tcga-cr-7395-01a-01-ts1.svs", 0.25, 0.5, 0.8),
    ],
)
def test_brightfield_fraction_on_real_he_slides(
    slides_dir: Path, file_name: str, override: float | None, low: float, high: float
) -> None:
    slide = open_slide(slides_dir / file_name, mpp_override=override)
    mask = segment_tissue(slide, TissueParams())
    assert low < mask.area_fraction < high
    geojson = tissue_geojson(mask)
    polygons = geojson["features"][0]["geometry"]["coordinates"]
    if geojson["features"][0]["geometry"]["type"] == "Polygon":
        polygons = [polygons]
    polygon_area = sum(_polygon_area(p) for p in polygons)
    assert polygon_area == pytest.approx(mask.mask.sum() * mask.downsample**2, rel=0.05)


def test_segmentation_needs_the_slide_mpp(slides_dir: Path) -> None:
    with pytest.raises(MissingMppError, match="--slide-mpp"):
        segment_tissue(
            open_slide(slides_dir / "tissue/tcga-cr-7395-01a-01-ts1.svs"), TissueParams()
        )


def test_blank_slide_gives_an_empty_mask_not_an_error(blank_slide: Path) -> None:
    mask = segment_tissue(open_slide(blank_slide), TissueParams())
    assert mask.mask.shape == (128, 128)
    assert not mask.mask.any()
    assert mask.area_fraction == 0.0
    assert tissue_contours(mask) == []
    assert tissue_geojson(mask) == {"type": "FeatureCollection", "features": []}
    # A fixed threshold is used as given (no floor): every pixel is brighter than 0.
    fixed = TissueParams(mode="fluorescence", threshold=0)
    assert segment_tissue(open_slide(blank_slide), fixed).area_fraction == 1.0


def test_whole_mode_marks_everything(synthetic_slide) -> None:
    mask = segment_tissue(open_slide(synthetic_slide.path), TissueParams(mode="whole"))
    assert mask.mask.all()
    [polygon] = tissue_contours(mask)
    xs, ys = np.asarray(polygon["exterior"]).T
    assert (xs.min(), ys.min(), xs.max(), ys.max()) == pytest.approx((0, 0, 4096, 3072), abs=1)


def test_params_are_frozen_and_validated() -> None:
    params = TissueParams()
    with pytest.raises(pydantic.ValidationError):
        params.seg_mpp = 4.0  # type: ignore[misc]
    for bad in ({"threshold": 300}, {"threshold": "mean"}, {"seg_mpp": 0}, {"mode": "ihc"}):
        with pytest.raises(pydantic.ValidationError):
            TissueParams(**bad)
    assert TissueParams(threshold=40).threshold == 40


def test_geojson_is_a_qupath_annotation_in_level0_pixels(synthetic_slide, synthetic_mask) -> None:
    geojson = tissue_geojson(synthetic_mask, name="synthetic tissue")
    assert json.loads(json.dumps(geojson)) == geojson
    assert geojson["type"] == "FeatureCollection"
    [feature] = geojson["features"]
    assert feature["type"] == "Feature"
    assert feature["properties"]["objectType"] == "annotation"
    assert feature["properties"]["name"] == "synthetic tissue"
    assert feature["properties"]["classification"]["name"] == "Tissue"
    assert (
        feature["id"]
        == tissue_geojson(synthetic_mask, name="synthetic tissue")["features"][0]["id"]
    )
    geometry = feature["geometry"]
    assert geometry["type"] == "MultiPolygon"
    polygons = geometry["coordinates"]
    assert len(polygons) == 2  # the rectangle (with its hole) and the disk; the speck is gone
    width, height = synthetic_slide.dimensions
    for polygon in polygons:
        for ring in polygon:
            assert ring[0] == ring[-1] and len(ring) >= 4
            points = np.asarray(ring)
            assert (points >= 0).all()
            assert (points[:, 0] <= width).all() and (points[:, 1] <= height).all()
        assert _ring_area(polygon[0]) > 0  # exterior counter-clockwise
        assert all(_ring_area(hole) < 0 for hole in polygon[1:])
    rectangle = max(polygons, key=lambda p: _polygon_area(p))
    assert len(rectangle) == 2  # exterior + the hole
    hole = np.asarray(rectangle[1])
    hole_bounds = (*hole.min(axis=0), *hole.max(axis=0))
    assert hole_bounds == pytest.approx(synthetic_slide.hole_box, abs=48)  # within 1.5 mask px
    total = sum(_polygon_area(p) for p in polygons)
    assert total == pytest.approx(
        synthetic_mask.mask.sum() * synthetic_mask.downsample**2, rel=0.03
    )
    assert total == pytest.approx(synthetic_slide.tissue_area(), rel=0.05)


def _tiles_and_truth(composite, params: TissueParams | None = None, tiling: TilingParams | None = None):
    """Tissue mask and tile grid of a composite, and the true ink fraction of each kept tile."""
    slide = open_slide(composite.path)
    mask = segment_tissue(slide, params or TissueParams())
    grid = tile_grid(slide, mask, tiling or TilingParams())
    return mask, grid, composite.ink_fractions(grid.coords, grid.tile_size_level0)


def test_ink_around_the_tissue_is_neither_tissue_nor_tiled(inked_slides) -> None:
    _, clean_grid, _ = _tiles_and_truth(inked_slides["none"])
    mask, grid, true_ink = _tiles_and_truth(inked_slides["around"])
    # The same tiles as without ink: none on ink (before the fix 75 % of 247 tiles lay on ink).
    assert len(grid) == len(clean_grid) > 40
    np.testing.assert_array_equal(grid.coords, clean_grid.coords)
    assert (true_ink == 0).all() and (grid.ink_fractions == 0).all()
    # The ink is found (grown by its 16-µm rim) and never overlaps the true tissue.
    composite = inked_slides["around"]
    detected = TissueMask(mask.ink, mask.downsample, mask.params)
    truth_ink = TissueMask(composite.ink, composite.truth_downsample, mask.params)
    assert detected.area_fraction == pytest.approx(truth_ink.area_fraction, rel=0.2)
    assert not (mask.mask & mask.ink).any()
    # Switching the ink filter off shows what it prevents.
    unfiltered, _, unfiltered_ink = _tiles_and_truth(composite, TissueParams(remove_ink=False))
    assert unfiltered.ink is None or not unfiltered.ink.any()
    assert (unfiltered_ink >= 0.25).mean() > 0.5


def _tissue_recall_by_tiles(composite, grid) -> float:
    covered = tile_footprint(grid.coords, grid.tile_size_level0, composite.tissue.shape, composite.truth_downsample)
    return float(covered[composite.tissue].mean())


def test_ink_over_the_tissue_keeps_the_tissue_under_it_and_flags_its_tiles(inked_slides) -> None:
    composite = inked_slides["over"]
    _, clean_grid, _ = _tiles_and_truth(inked_slides["none"])
    _, grid, true_ink = _tiles_and_truth(composite)
    true_tissue = composite.tissue_fractions(grid.coords, grid.tile_size_level0)
    # The tissue under the strokes stays: the tiles cover as much tissue as on the clean slide
    # (0.741 of it before the ink was divided out, against 0.965 clean) ...
    clean_recall = _tissue_recall_by_tiles(inked_slides["none"], clean_grid)
    assert _tissue_recall_by_tiles(composite, grid) >= 0.95 * clean_recall
    assert ((true_ink >= 0.5) & (true_tissue >= 0.5)).sum() >= 20
    # ... and carry their ink fraction: every tile that is a quarter ink is flagged, clean ones are not.
    assert (grid.ink_fractions[true_ink >= 0.25] >= 0.25).all()
    assert (grid.ink_fractions[true_ink == 0] < 0.25).mean() > 0.9
    assert ((true_ink >= 0.25) & (true_tissue < 0.1)).sum() <= 0.02 * len(grid)  # ink over bare glass
    # Dropping tiles above an ink fraction keeps only the cleaner ones.
    _, strict, strict_ink = _tiles_and_truth(composite, tiling=TilingParams(max_ink_fraction=0.25))
    assert len(strict) < len(grid) and (strict.ink_fractions <= 0.25).all()
    assert (strict_ink < 0.5).all()


def test_ink_over_loose_pale_tissue_keeps_it_and_few_tiles_lie_on_glass_ink(cmu_inked_slides) -> None:
    composite, clean = cmu_inked_slides["over"], cmu_inked_slides["none"]
    _, grid, true_ink = _tiles_and_truth(composite)
    _, clean_grid, _ = _tiles_and_truth(clean)
    true_tissue = composite.tissue_fractions(grid.coords, grid.tile_size_level0)
    # 0.213 of the tissue before the ink was divided out, against 0.761 clean.
    assert _tissue_recall_by_tiles(composite, grid) >= 0.95 * _tissue_recall_by_tiles(clean, clean_grid)
    # Where green crosses red beside the tissue, each pixel is measured against both inks (5 tiles
    # on glass ink without that, 4 without dropping the strokes' thin partly covered edges).
    assert ((true_ink >= 0.25) & (true_tissue < 0.1)).sum() <= 2
    assert (grid.ink_fractions[true_ink >= 0.25] >= 0.25).all()


@pytest.mark.parametrize("layout", ["crossing", "border", "faint", "black-over"])
def test_strokes_that_break_naive_fixes_keep_the_tissue_and_leave_glass_ink_out(hard_inked_slides, layout) -> None:
    composite, clean = hard_inked_slides[layout], hard_inked_slides[layout, "none"]
    _, grid, true_ink = _tiles_and_truth(composite)
    _, clean_grid, _ = _tiles_and_truth(clean)
    true_tissue = composite.tissue_fractions(grid.coords, grid.tile_size_level0)
    assert _tissue_recall_by_tiles(composite, grid) >= 0.95 * _tissue_recall_by_tiles(clean, clean_grid)
    assert ((true_ink >= 0.25) & (true_tissue < 0.1)).sum() <= 0.02 * len(grid)  # ink over bare glass
    if layout != "faint":  # a faint red stroke over eosin looks like eosin: not all its tiles are flagged
        # (one border tile, 25 % ink, is measured 24 %: mask pixels are 8 µm)
        assert (grid.ink_fractions[true_ink >= 0.25] >= 0.2).all()


def test_geojson_carries_ink_as_its_own_class(inked_slides) -> None:
    mask = segment_tissue(open_slide(inked_slides["around"].path), TissueParams())
    features = tissue_geojson(mask, name="inked")["features"]
    assert [f["properties"]["classification"]["name"] for f in features] == ["Tissue", "Ink"]
    assert features[1]["properties"]["classification"]["color"] == list(INK_COLOR)
    ink_polygons = features[1]["geometry"]["coordinates"]
    ink_area = sum(_polygon_area(p) for p in ink_polygons)
    assert ink_area == pytest.approx(mask.ink.sum() * mask.downsample**2, rel=0.05)
