"""Marker-ink colour rules, and the colour under ink recovered by dividing the ink out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from wsi_mil.demo.scanner import FAINT_COATS, INK_TRANSMITTANCE
from wsi_mil.preprocessing.ink import bridge_under_ink, colour_under_ink, detect_ink, ink_pixels
from wsi_mil.preprocessing.slide import open_slide
from wsi_mil.preprocessing.tissue import _saturation, dominant_color

GLASS = np.array([241.0, 240.0, 237.0])
# Tissue colours at 8 µm/px: pale eosin, dense eosin (TCGA), stroma, hematoxylin-rich purple.
TISSUE = np.array([[232, 168, 196], [205, 95, 150], [225, 150, 190], [120, 70, 150]], dtype=float)
TCGA = "tissue/tcga-cr-7395-01a-01-ts1.svs"


def _swatches(colors: np.ndarray) -> np.ndarray:
    return np.clip(colors, 0, 255).astype(np.uint8).reshape(1, -1, 3)


@pytest.mark.parametrize("color", ["green", "blue", "red", "black"])
def test_each_marker_colour_on_glass_and_over_pink_tissue_is_ink(color: str) -> None:
    transmittance = np.asarray(INK_TRANSMITTANCE[color])
    # Light to heavy strokes; coloured ones down to a faint stroke where its load is lowest (0.85x).
    # (A faint black stroke is plain grey: not told apart from shadows and debris.)
    lightest = 0.6 if color == "black" else 0.85 * FAINT_COATS
    coats = np.array([lightest, 0.6, 1.0, 1.3])[:, None]
    on_glass = GLASS * transmittance**coats
    over_stroma = TISSUE[[0, 2]] * transmittance
    assert ink_pixels(_swatches(np.vstack([on_glass, over_stroma]))).all()


def test_stained_tissue_and_glass_are_not_ink() -> None:
    assert not ink_pixels(_swatches(np.vstack([TISSUE, GLASS[None]]))).any()


def _real_slide_at_8um(path: Path, override: float | None) -> np.ndarray:
    slide = open_slide(path, mpp_override=override)
    downsample = 8.0 / slide.mpp.mpp
    width, height = slide.dimensions
    return slide.read_resampled((int(width / downsample), int(height / downsample)))


@pytest.mark.parametrize(
    ("file_name", "override"),
    [("tissue/CMU-1-Small-Region.svs", None), (TCGA, 0.5)],
)
def test_no_ink_is_found_on_real_clean_slides(slides_dir: Path, file_name: str, override: float | None) -> None:
    rgb = _real_slide_at_8um(slides_dir / file_name, override)
    assert ink_pixels(rgb).mean() < 0.002  # a few dark or teal specks at most
    assert not detect_ink(rgb, mask_mpp=8.0, min_area_um2=5000).any()


def _stroke(rgb: np.ndarray, rows: slice, cols: slice, color: str) -> None:
    """Lay one coat of `color` ink over a box of `rgb` (float), in place: light is multiplied."""
    rgb[rows, cols] *= np.asarray(INK_TRANSMITTANCE[color], dtype=np.float32)


def test_colour_under_ink_gives_back_the_tissue_and_the_glass(slides_dir: Path) -> None:
    clean = _real_slide_at_8um(slides_dir / TCGA, 0.5)
    background = dominant_color(clean)
    # A green band across the section and a red one crossing it over tissue, a short green one
    # crossing the red over the glass above the section, and a black band along its lower part.
    inked = clean.astype(np.float32)
    height, width = clean.shape[:2]
    red = slice(width // 3, width // 3 + 32)
    _stroke(inked, slice(height // 2 - 15, height // 2 + 15), slice(0, width), "green")
    _stroke(inked, slice(2, 28), slice(width // 3 - 50, width // 3 + 82), "green")
    _stroke(inked, slice(0, height), red, "red")
    _stroke(inked, slice(height - 60, height - 35), slice(0, width), "black")
    inked = np.clip(inked, 0, 255).astype(np.uint8)
    ink = detect_ink(inked, mask_mpp=8.0, min_area_um2=5000)
    truth = np.zeros(clean.shape[:2], dtype=bool)
    truth[height // 2 - 15 : height // 2 + 15] = truth[:, red] = True
    truth[2:28, width // 3 - 50 : width // 3 + 82] = truth[height - 60 : height - 35] = True
    assert (ink[truth]).all()  # the crossings of green and red (dark brown, no rule's colour) too

    tissue_level = 0.2 * 255  # saturation: glass is far below, stained tissue far above
    clean_tissue = _saturation(clean) > tissue_level
    colour, over_glass = colour_under_ink(inked, ink, background, mask_mpp=8.0)
    recovered = _saturation(colour) > tissue_level
    under = truth & clean_tissue
    assert under.sum() > 2000
    # Tissue under the strokes is partly tissue again by colour (without the division: none) ...
    assert recovered[under].mean() > 0.4
    assert not (_saturation(np.where(ink[..., None], background, inked)) > tissue_level)[under].any()
    # ... and with the bridge over ink not over glass (as segment_tissue does) nearly all of it.
    bridged = recovered | bridge_under_ink(recovered & ~ink, ink & ~over_glass, width_px=50)
    assert bridged[under].mean() > 0.85
    # Ink over glass is found as such and is no tissue; nothing outside the ink changes.
    glass = truth & (clean.min(axis=-1) > 225)
    assert glass.sum() > 1000
    assert over_glass[glass].mean() > 0.6 and recovered[glass].mean() < 0.06  # stroke rims
    crossing_over_glass = np.zeros_like(glass)
    crossing_over_glass[5:25, red] = True  # inside the crossing: measured against green plus red
    assert (crossing_over_glass <= glass).all() and not recovered[crossing_over_glass].any()
    assert (recovered[~ink] == (_saturation(inked) > tissue_level)[~ink]).all()
    # No ink: the colours come back as they are.
    untouched, none_over_glass = colour_under_ink(inked, np.zeros_like(ink), background, mask_mpp=8.0)
    np.testing.assert_array_equal(untouched, inked.astype(np.float32))
    assert not none_over_glass.any()


def test_bridge_keeps_ink_between_tissue_and_leaves_ink_on_glass() -> None:
    tissue = np.zeros((60, 100), dtype=bool)
    tissue[10:50, 10:40] = tissue[10:50, 60:90] = True
    ink = np.zeros_like(tissue)
    ink[:, 40:60] = True  # a 20-px stroke between two halves of tissue, running onto glass
    under = bridge_under_ink(tissue, ink, width_px=30)
    assert under[16:44, 40:60].all()  # between the halves: tissue under the stroke
    assert not under[:5].any() and not under[55:].any()  # beyond the tissue: ink on glass
    assert not bridge_under_ink(tissue, ink, width_px=10).any()  # too narrow to span the stroke
