"""Marker ink on a brightfield slide, found by colour on the low-resolution copy used for tissue.

Pathologists circle regions and write on the glass with green, blue, red and black markers. H&E
tissue is pink to purple (hue about 250-345°); the rules below take what no H&E stain makes: green
and cyan hues, saturated blue, saturated red-orange, and dark neutral grey. They are HSV versions of
the common pen filters (histolab, deephistopath), checked on the real slides in ../shared (at most a
few tens of pixels per slide, removed by the minimum area) and on composites with known ink
(docs/preprocessing.md). A stain that is itself green, blue or red (IHC chromogens, special stains)
needs `TissueParams(remove_ink=False)`.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage
from skimage import morphology
from skimage.color import rgb2hsv

# (hue range in degrees [low, high), minimum saturation): a hue range with low > high wraps past 360.
INK_HUE_RULES: dict[str, tuple[float, float, float]] = {
    "green": (70.0, 180.0, 0.20),
    "blue": (180.0, 250.0, 0.40),
    "red": (345.0, 15.0, 0.50),
}
# Black and dark-grey markers: dark and nearly neutral, or darker than any stained tissue.
BLACK_MAX_VALUE = 0.40
BLACK_MAX_SATURATION = 0.35
ANY_COLOUR_MAX_VALUE = 0.18
# Ink pixels are grown by this much so the faint rim of a stroke is not taken for tissue.
INK_RIM_UM = 16.0


def _in_hue_range(hue: np.ndarray, low: float, high: float) -> np.ndarray:
    if low <= high:
        return (hue >= low) & (hue < high)
    return (hue >= low) | (hue < high)


def ink_pixels(rgb: np.ndarray) -> np.ndarray:
    """Boolean `[h, w]`: pixels of uint8 RGB `[h, w, 3]` whose colour is marker ink by the rules above."""
    hsv = rgb2hsv(rgb)
    hue, saturation, value = hsv[..., 0] * 360.0, hsv[..., 1], hsv[..., 2]
    ink = (value < BLACK_MAX_VALUE) & (saturation < BLACK_MAX_SATURATION)
    ink |= value < ANY_COLOUR_MAX_VALUE
    for low, high, min_saturation in INK_HUE_RULES.values():
        ink |= _in_hue_range(hue, low, high) & (saturation >= min_saturation)
    return ink


def detect_ink(rgb: np.ndarray, *, mask_mpp: float, min_area_um2: float) -> np.ndarray:
    """Marker ink on a low-resolution RGB copy `[h, w, 3]` with `mask_mpp` µm pixels, as a boolean mask.

    Ink-coloured pieces smaller than `min_area_um2` are dropped (stain specks, debris); the rest are
    grown by `INK_RIM_UM` to take in the strokes' faint rims.
    """
    ink = ink_pixels(rgb)
    max_speck_px = math.ceil(min_area_um2 / (mask_mpp * mask_mpp)) - 1
    if max_speck_px > 0:
        ink = morphology.remove_small_objects(ink, max_size=max_speck_px, connectivity=2)
    rim_px = INK_RIM_UM / mask_mpp
    if rim_px >= 0.5 and ink.any():
        ink = ndimage.distance_transform_edt(~ink) <= rim_px
    return ink


def bridge_under_ink(tissue: np.ndarray, ink: np.ndarray, *, width_px: float) -> np.ndarray:
    """Ink pixels with tissue on both sides within `width_px`: tissue under a stroke drawn across it.

    A morphological closing of the tissue by a disk `width_px` across (done with distance
    transforms, so its cost does not grow with the width), kept only where there is ink.
    """
    radius = width_px / 2
    if radius < 0.5 or not tissue.any() or not ink.any():
        return np.zeros_like(ink)
    margin = math.ceil(radius) + 1  # beyond the raster is glass, so the closing does not stick there
    padded = np.pad(tissue, margin)
    dilated = ndimage.distance_transform_edt(~padded) <= radius
    closed = ndimage.distance_transform_edt(dilated) > radius
    return closed[margin:-margin, margin:-margin] & ink
