"""Marker-ink colour rules and the bridge that keeps tissue under strokes drawn across it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from wsi_mil.demo.scanner import INK_TRANSMITTANCE
from wsi_mil.preprocessing.ink import bridge_under_ink, detect_ink, ink_pixels
from wsi_mil.preprocessing.slide import open_slide

GLASS = np.array([241.0, 240.0, 237.0])
# Tissue colours at 8 µm/px: pale eosin, dense eosin (TCGA), stroma, hematoxylin-rich purple.
TISSUE = np.array([[232, 168, 196], [205, 95, 150], [225, 150, 190], [120, 70, 150]], dtype=float)


def _swatches(colors: np.ndarray) -> np.ndarray:
    return np.clip(colors, 0, 255).astype(np.uint8).reshape(1, -1, 3)


@pytest.mark.parametrize("color", ["green", "blue", "red", "black"])
def test_each_marker_colour_on_glass_and_over_pink_tissue_is_ink(color: str) -> None:
    transmittance = np.asarray(INK_TRANSMITTANCE[color])
    coats = np.array([0.6, 1.0, 1.3])[:, None]  # light to heavy strokes
    on_glass = GLASS * transmittance**coats
    over_stroma = TISSUE[[0, 2]] * transmittance
    assert ink_pixels(_swatches(np.vstack([on_glass, over_stroma]))).all()


def test_stained_tissue_and_glass_are_not_ink() -> None:
    assert not ink_pixels(_swatches(np.vstack([TISSUE, GLASS[None]]))).any()


@pytest.mark.parametrize(
    ("file_name", "override"),
    [("tissue/CMU-1-Small-Region.svs", None), ("tissue/tcga-cr-7395-01a-01-ts1.svs", 0.5)],
)
def test_no_ink_is_found_on_real_clean_slides(slides_dir: Path, file_name: str, override: float | None) -> None:
    slide = open_slide(slides_dir / file_name, mpp_override=override)
    downsample = 8.0 / slide.mpp.mpp
    width, height = slide.dimensions
    rgb = slide.read_resampled((int(width / downsample), int(height / downsample)))
    assert ink_pixels(rgb).mean() < 0.002  # a few dark or teal specks at most
    assert not detect_ink(rgb, mask_mpp=8.0, min_area_um2=5000).any()


def test_bridge_keeps_ink_between_tissue_and_leaves_ink_on_glass() -> None:
    tissue = np.zeros((60, 100), dtype=bool)
    tissue[10:50, 10:40] = tissue[10:50, 60:90] = True
    ink = np.zeros_like(tissue)
    ink[:, 40:60] = True  # a 20-px stroke between two halves of tissue, running onto glass
    under = bridge_under_ink(tissue, ink, width_px=30)
    assert under[16:44, 40:60].all()  # between the halves: tissue under the stroke
    assert not under[:5].any() and not under[55:].any()  # beyond the tissue: ink on glass
    assert not bridge_under_ink(tissue, ink, width_px=10).any()  # too narrow to span the stroke
