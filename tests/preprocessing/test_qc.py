"""QC thumbnail drawing and atomic PNG/JSON writes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsi_mil.demo.synthetic import write_pyramidal_tiff
from wsi_mil.preprocessing.pipeline import PreprocessConfig, preprocess_slide
from wsi_mil.preprocessing.qc import (
    TILE_OUTLINE_COLOR,
    WARNING_COLOR,
    background_warning,
    render_qc_thumbnail,
    save_json_atomic,
    save_png_atomic,
)
from wsi_mil.preprocessing.slide import open_slide
from wsi_mil.preprocessing.tiling import TilingParams, tile_grid
from wsi_mil.preprocessing.tissue import TISSUE_COLOR, TissueParams, segment_tissue


def _count_color(image: Image.Image, color: tuple[int, int, int]) -> int:
    return int((np.asarray(image) == color).all(axis=-1).sum())


def test_qc_thumbnail_draws_contours_and_tiles_in_place(synthetic_slide) -> None:
    slide = open_slide(synthetic_slide.path)
    mask = segment_tissue(slide, TissueParams())
    grid = tile_grid(slide, mask, TilingParams())
    with_tiles = render_qc_thumbnail(slide, mask, grid, max_size=512)
    assert with_tiles.mode == "RGB" and with_tiles.size == (512, 384)
    assert _count_color(with_tiles, TISSUE_COLOR) > 200
    assert _count_color(with_tiles, TILE_OUTLINE_COLOR) > 200
    pixels = np.asarray(with_tiles)
    scale = 512 / 4096
    # The left edge of the tissue rectangle (x = 1024) is outlined; the blank top-left is untouched.
    x_edge = round(1024 * scale)
    edge_column = pixels[round(800 * scale) : round(1800 * scale), x_edge - 2 : x_edge + 3]
    assert (edge_column == TISSUE_COLOR).all(axis=-1).any(axis=1).mean() > 0.9
    assert (pixels[:50, :100] > 230).all()
    without_tiles = render_qc_thumbnail(slide, mask, None, max_size=512)
    assert _count_color(without_tiles, TILE_OUTLINE_COLOR) == 0
    assert _count_color(without_tiles, TISSUE_COLOR) > 200


FAST = PreprocessConfig(encoder="test-encoder", weights="random", num_workers=0, batch_size=32)


def test_qc_warns_when_the_background_is_far_from_glass(inked_slides, tmp_path: Path) -> None:
    clean = inked_slides["none"]
    # The same pixels stored as YCbCr but read as RGB: what a mislabelled DICOM looks like.
    with open_slide(clean.path) as slide:
        pixels = slide.read_region((0, 0), 0, slide.dimensions)
    mislabelled = Image.fromarray(pixels).convert("YCbCr")
    path = tmp_path / "mislabelled.tiff"
    write_pyramidal_tiff(path, np.asarray(mislabelled), mpp=clean.mpp)
    results = {
        name: preprocess_slide(slide_path, tmp_path / name, FAST)
        for name, slide_path in (("clean", clean.path), ("mislabelled", path))
    }
    assert results["clean"].warnings == []
    glass = np.median(pixels[:200, :200], axis=(0, 1))
    np.testing.assert_allclose(results["clean"].qc["background_rgb"], glass, atol=3)
    [warning] = results["mislabelled"].warnings
    assert "far from the expected glass colour" in warning and "colour space" in warning
    status = json.loads((tmp_path / "mislabelled" / "status" / "mislabelled.json").read_text())
    assert status["warnings"] == [warning]
    with Image.open(tmp_path / "mislabelled" / "qc" / "mislabelled.png") as qc:
        assert _count_color(qc.convert("RGB"), WARNING_COLOR) > 100  # written on the QC image
    with Image.open(tmp_path / "clean" / "qc" / "none.png") as qc:
        assert _count_color(qc.convert("RGB"), WARNING_COLOR) == 0


def test_qc_warns_when_a_fluorescence_slide_runs_as_brightfield(slides_dir: Path) -> None:
    slide = open_slide(slides_dir / "tissue/test3-DAPI-2-(387).ndpi")
    brightfield = segment_tissue(slide, TissueParams())
    assert "fluorescence" in background_warning(brightfield)
    assert background_warning(segment_tissue(slide, TissueParams(mode="fluorescence"))) is None


def _leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_save_png_atomic_writes_replaces_and_cleans_up(tmp_path: Path) -> None:
    target = tmp_path / "qc" / "thumb.png"
    save_png_atomic(Image.new("RGB", (8, 4), (10, 20, 30)), target)
    save_png_atomic(Image.new("RGB", (3, 3), (40, 50, 60)), target)
    with Image.open(target) as written:
        assert written.size == (3, 3) and written.getpixel((1, 1)) == (40, 50, 60)
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask
    # A failing write leaves the previous file intact and no temporary behind.
    with pytest.raises(OSError):
        save_png_atomic(Image.new("CMYK", (2, 2)), target)  # PNG has no CMYK
    with Image.open(target) as kept:
        assert kept.size == (3, 3)
    assert _leftovers(target.parent) == []


def test_save_json_atomic_handles_numpy_and_rejects_nan(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    payload = {"n": np.int64(3), "fractions": np.array([0.5, 1.0], dtype=np.float32), "p": tmp_path}
    save_json_atomic(payload, target)
    assert json.loads(target.read_text()) == {"n": 3, "fractions": [0.5, 1.0], "p": str(tmp_path)}
    with pytest.raises(ValueError, match="Out of range float"):
        save_json_atomic({"auc": float("nan")}, target)
    with pytest.raises(TypeError, match="not JSON serializable"):
        save_json_atomic({"x": object()}, target)
    assert json.loads(target.read_text())["n"] == 3
    assert _leftovers(tmp_path) == []
