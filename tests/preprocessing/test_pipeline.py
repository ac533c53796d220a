"""One slide end to end on slides as scanners deliver them: ink, tissue at the edges, damaged tiles."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from wsi_mil.demo.scanner import damage_tiles
from wsi_mil.errors import SlideOpenError
from wsi_mil.preprocessing.batch import SlideTask, run_batch
from wsi_mil.preprocessing.feature_file import read_feature_file
from wsi_mil.preprocessing.pipeline import PreprocessConfig, one_line_reason, preprocess_slide
from wsi_mil.preprocessing.tiling import TilingParams
from wsi_mil.preprocessing.tissue import INK_COLOR

FAST = PreprocessConfig(encoder="test-encoder", weights="random", num_workers=0, batch_size=32)


def _count_color(path: Path, color: tuple[int, int, int]) -> int:
    with Image.open(path) as image:
        return int((np.asarray(image.convert("RGB")) == color).all(axis=-1).sum())


def test_ink_is_recorded_per_tile_shown_in_qc_and_exported_as_its_own_class(inked_slides, tmp_path: Path) -> None:
    results = {
        layout: preprocess_slide(inked_slides[layout].path, tmp_path, FAST, slide_id=layout)
        for layout in ("none", "over")
    }
    for layout, result in results.items():
        assert result.status == "done", result.reason
        bag = read_feature_file(result.feature_path)
        ink = bag.tile_data["ink_fraction"]
        assert ink.shape == (bag.num_tiles,) and ink.dtype == np.float32
        assert result.qc["inked_tiles"] == int((ink >= 0.25).sum())
        classes = [f["properties"]["classification"]["name"]
                   for f in json.loads((tmp_path / "tissue" / f"{layout}.geojson").read_text())["features"]]
        if layout == "none":
            assert not ink.any() and result.warnings == [] and classes == ["Tissue"]
            assert _count_color(tmp_path / "qc" / "none.png", INK_COLOR) == 0
        else:
            assert result.qc["inked_tiles"] > 5 and classes == ["Tissue", "Ink"]
            assert any("marker ink" in warning for warning in result.warnings)
            assert _count_color(tmp_path / "qc" / "over.png", INK_COLOR) > 1000


def test_edge_padding_is_recorded_in_the_provenance(edge_slide, tmp_path: Path) -> None:
    result = preprocess_slide(edge_slide.path, tmp_path, FAST)
    assert result.status == "done", result.reason
    provenance = read_feature_file(result.feature_path).provenance()
    assert provenance.edge_padding["mode"] == "background"
    assert provenance.edge_padding["tiles"] == result.qc["padded_edge_tiles"] > 0
    assert provenance.edge_padding["rgb"] == result.qc["background_rgb"] == list(provenance.background_rgb)
    assert result.qc["tissue_coverage"] > 0.93


def _damaged_copy(edge_slide, tmp_path: Path, fraction: float) -> tuple[Path, list]:
    path = tmp_path / "damaged.tiff"
    shutil.copy(edge_slide.path, path)
    return path, damage_tiles(path, fraction)


def test_unreadable_tiles_are_left_out_and_recorded_with_any_number_of_workers(edge_slide, tmp_path: Path) -> None:
    path, boxes = _damaged_copy(edge_slide, tmp_path, 0.05)
    tiling = TilingParams(target_mpp=0.25)  # read level 0, where the damage is: 256-px tiles on the TIFF's
    bags = {}
    for workers in (0, 2):
        config = FAST.model_copy(update={"tiling": tiling, "num_workers": workers, "max_unreadable_fraction": 0.2})
        result = preprocess_slide(path, tmp_path / f"w{workers}", config)
        assert result.status == "done", result.reason
        damaged = {(x0, y0) for x0, y0, _, _ in boxes}
        hit = sorted(tuple(c) for c in result.qc["unreadable_coords"])
        assert len(hit) == result.qc["unreadable_tiles"] >= 2 and set(hit) <= damaged
        bag = read_feature_file(result.feature_path)
        assert bag.num_tiles == result.tiles and not {tuple(c) for c in bag.coords.tolist()} & damaged
        assert bag.tile_data["ink_fraction"].shape == (bag.num_tiles,)
        [warning] = [w for w in result.warnings if "could not be read" in w]
        assert "Not a JPEG file" in warning and "\n" not in warning
        status = json.loads((tmp_path / f"w{workers}" / "status" / "damaged.json").read_text())
        assert status["qc"]["unreadable_tiles"] == len(hit)
        bags[workers] = bag
    np.testing.assert_array_equal(bags[0].features, bags[2].features)
    np.testing.assert_array_equal(bags[0].coords, bags[2].coords)


def test_too_many_unreadable_tiles_fail_the_slide_with_a_one_line_reason(edge_slide, tmp_path: Path) -> None:
    path, _ = _damaged_copy(edge_slide, tmp_path, 0.2)
    config = FAST.model_copy(update={"tiling": TilingParams(target_mpp=0.25), "num_workers": 2})
    [result] = run_batch([SlideTask(str(path), "damaged")], tmp_path, config)
    assert result.status == "failed"
    assert result.reason.startswith("damaged.tiff: more than 5% of its ")
    assert "Not a JPEG file" in result.reason
    assert "\n" not in result.reason and "Traceback" not in result.reason and "DataLoader" not in result.reason
    assert not (tmp_path / "features" / "damaged.h5").exists()
    assert not list(tmp_path.rglob(".*.tmp"))
    with open(tmp_path / "summary.csv", newline="") as stream:
        [row] = list(csv.DictReader(stream))
    assert row["status"] == "failed" and row["reason"] == result.reason


def test_a_worker_error_becomes_its_original_last_line() -> None:
    wrapped = RuntimeError(
        "Caught ValueError in DataLoader worker process 1.\nOriginal Traceback (most recent call last):\n"
        '  File "x.py", line 1, in f\n    g()\nValueError: bad tile size\n'
    )
    assert one_line_reason(wrapped) == "ValueError: bad tile size"
    assert one_line_reason(SlideOpenError("a.svs: cannot open:\n  truncated")) == "a.svs: cannot open: truncated"
    assert one_line_reason(KeyError("x")) == "KeyError: 'x'"
