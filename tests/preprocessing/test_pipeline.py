"""One slide end to end on slides as scanners deliver them: ink, tissue at the edges, damaged tiles."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from wsi_mil.preprocessing.feature_file import read_feature_file
from wsi_mil.preprocessing.pipeline import PreprocessConfig, preprocess_slide
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
