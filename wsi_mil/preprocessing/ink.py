"""Marker ink on a brightfield slide, found by colour on the low-resolution copy used for tissue, and
the colour of what lies under it.

Pathologists circle regions and write on the glass with green, blue, red and black markers. H&E
tissue is pink to purple (hue about 250-345°); the rules below take what no H&E stain makes: green
and cyan hues, blue, red-orange, and dark neutral grey. They are HSV versions of the common pen
filters (histolab, deephistopath), loosened for faint strokes and checked on the real slides in
../shared (at most a few tens of pixels per slide, removed by the minimum area) and on composites
with known ink (docs/preprocessing.md). A stain that is itself green, blue or red (IHC chromogens,
special stains) needs `TissueParams(remove_ink=False)`.

Marker ink is a translucent dye: it multiplies the light that passes, so in optical density (OD,
-log10 of the transmitted fraction) a stroke adds its own OD to whatever lies under it, glass or
tissue. `colour_under_ink` subtracts, pixel by pixel, the OD of the same ink over glass nearby and
gives back the colour underneath, on which the ordinary tissue rule then runs.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
from scipy import ndimage
from skimage import morphology
from skimage.color import rgb2hsv

# (hue range in degrees [low, high), minimum saturation): a hue range with low > high wraps past 360.
# Blue and red take faint strokes (under half a coat) too: no H&E pixel of the real slides in ../shared
# has a red hue with saturation above 0.02, and blue ones above 0.33 are scattered specks.
INK_HUE_RULES: dict[str, tuple[float, float, float]] = {
    "green": (70.0, 180.0, 0.20),
    "blue": (180.0, 250.0, 0.33),
    "red": (345.0, 15.0, 0.35),
}
# Black and dark-grey markers: dark and nearly neutral, or darker than any stained tissue.
BLACK_MAX_VALUE = 0.40
BLACK_MAX_SATURATION = 0.35
ANY_COLOUR_MAX_VALUE = 0.18
# Ink pixels are grown by this much so the faint rim of a stroke is not taken for tissue.
INK_RIM_UM = 16.0
# Holes in the ink up to this area are ink too: where two strokes cross, the mixed colour (green
# over red is dark brown, red over blue dark purple) matches no rule.
INK_HOLE_UM2 = 160_000.0
# Ink over glass is smooth: its OD varies less than this within 3x3 pixels (summed over the
# channels, beyond sensor noise); tissue under ink keeps its texture (nuclei, fibres, lumens).
SMOOTH_INK_MAX_TEXTURE = 0.08
# A smooth patch must hold a disk of this radius (mask px) to serve as the ink's reference colour,
# and come within GLASS_CONTACT_PX of bare glass (a pixel within GLASS_TOLERANCE grey levels of the
# glass colour in every channel) unless its colour shows it is more ink.
SMOOTH_INK_RADIUS_PX = 2
GLASS_CONTACT_PX = 10
GLASS_TOLERANCE = 25
# A pixel is measured against two inks crossing when both are this near and it holds at least
# both (within this OD, for the uneven ink load).
CROSSING_REACH_UM = 400.0
CROSSING_TOLERANCE_OD = 0.1
# Channels darker than this (0-255) carry no signal (quantisation, JPEG noise); full weight from
# DARK_CHANNEL_FLOOR + DARK_CHANNEL_RAMP up.
DARK_CHANNEL_FLOOR = 4.0
DARK_CHANNEL_RAMP = 12.0


def _in_hue_range(hue: np.ndarray, low: float, high: float) -> np.ndarray:
    if low <= high:
        return (hue >= low) & (hue < high)
    return (hue >= low) | (hue < high)


def ink_classes(rgb: np.ndarray) -> np.ndarray:
    """uint8 `[h, w]` of uint8 RGB `[h, w, 3]`: 0 where no rule takes the pixel, else 1 + the index of
    the first hue rule that does (green, blue, red), or 1 + their number for black."""
    hsv = rgb2hsv(rgb)
    hue, saturation, value = hsv[..., 0] * 360.0, hsv[..., 1], hsv[..., 2]
    classes = np.zeros(hue.shape, dtype=np.uint8)
    for index, (low, high, min_saturation) in enumerate(INK_HUE_RULES.values(), start=1):
        classes[(classes == 0) & _in_hue_range(hue, low, high) & (saturation >= min_saturation)] = index
    black = ((value < BLACK_MAX_VALUE) & (saturation < BLACK_MAX_SATURATION)) | (value < ANY_COLOUR_MAX_VALUE)
    classes[(classes == 0) & black] = len(INK_HUE_RULES) + 1
    return classes


def ink_pixels(rgb: np.ndarray) -> np.ndarray:
    """Boolean `[h, w]`: pixels of uint8 RGB `[h, w, 3]` whose colour is marker ink by the rules above."""
    return ink_classes(rgb) > 0


def detect_ink(rgb: np.ndarray, *, mask_mpp: float, min_area_um2: float) -> np.ndarray:
    """Marker ink on a low-resolution RGB copy `[h, w, 3]` with `mask_mpp` µm pixels, as a boolean mask.

    Ink-coloured pieces smaller than `min_area_um2` are dropped (stain specks, debris); the rest are
    grown by `INK_RIM_UM` to take in the strokes' faint rims, and holes in them up to `INK_HOLE_UM2`
    (crossings of two strokes) are filled.
    """
    ink = ink_pixels(rgb)
    pixel_area_um2 = mask_mpp * mask_mpp
    max_speck_px = math.ceil(min_area_um2 / pixel_area_um2) - 1
    if max_speck_px > 0:
        ink = morphology.remove_small_objects(ink, max_size=max_speck_px, connectivity=2)
    rim_px = INK_RIM_UM / mask_mpp
    if rim_px >= 0.5 and ink.any():
        ink = ndimage.distance_transform_edt(~ink) <= rim_px
    max_hole_px = math.ceil(INK_HOLE_UM2 / pixel_area_um2) - 1
    if max_hole_px > 0 and ink.any():
        ink = morphology.remove_small_holes(ink, max_size=max_hole_px)
    return ink


def optical_density(rgb: np.ndarray, background: tuple[int, int, int]) -> np.ndarray:
    """float32 `[h, w, 3]` OD of RGB `[h, w, 3]` against the glass colour: -log10(rgb / background)."""
    glass = np.asarray(background, dtype=np.float32)
    return -np.log10(np.maximum(rgb.astype(np.float32), 1.0) / np.maximum(glass, 1.0))


def _glass_noise(rgb: np.ndarray, background: tuple[int, int, int]) -> np.ndarray:
    """Per-channel sensor noise `[3]` (0-255): the robust spread of the pixels close to the glass colour."""
    offsets = rgb.reshape(-1, 3).astype(np.float32) - np.asarray(background, dtype=np.float32)
    glass = offsets[(np.abs(offsets) < 15).all(axis=1)]
    if glass.size == 0:
        return np.ones(3, dtype=np.float32)
    spread = np.median(np.abs(glass - np.median(glass, axis=0)), axis=0)
    return np.maximum(1.4826 * spread, 1.0).astype(np.float32)


def _texture(od: np.ndarray, mean_rgb: np.ndarray, noise: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """OD standard deviation in 3x3 pixels beyond the expected sensor noise, weighted and summed over channels.

    Noise of `noise` grey levels is `noise / (I ln 10)` in OD at intensity I, so dark ink is not
    taken for textured tissue.
    """
    mean = ndimage.uniform_filter(od, size=(3, 3, 1))
    variance = np.clip(ndimage.uniform_filter(od * od, size=(3, 3, 1)) - mean * mean, 0.0, None)
    noise_od = noise / (np.maximum(mean_rgb, 1.0) * math.log(10))
    return (np.sqrt(np.clip(variance - noise_od**2, 0.0, None)) * weight).sum(axis=-1)


def _ink_references(
    od: np.ndarray, smooth: np.ndarray, near_glass: np.ndarray, background: tuple[int, int, int]
) -> np.ndarray:
    """The smooth ink patches that show ink over glass: those next to glass, and those whose colour
    beyond that ink is ink again (a crossing, a second coat), not tissue."""
    labels, count = ndimage.label(smooth, structure=np.ones((3, 3), dtype=bool))
    index = np.arange(1, count + 1)
    anchored = np.zeros(count + 1, dtype=bool)
    anchored[1:] = ndimage.maximum(near_glass, labels, index).astype(bool)
    if not anchored.any():
        return anchored[labels]
    _, (rows, cols) = ndimage.distance_transform_edt(~anchored[labels], return_indices=True)
    excess = od - od[rows, cols]
    mean_excess = np.stack([ndimage.mean(excess[..., c], labels, index) for c in range(3)], axis=-1)
    glass = np.asarray(background, dtype=np.float32)
    beyond = np.clip(glass * np.power(10.0, -mean_excess), 0, 255).astype(np.uint8)
    anchored[1:] |= ink_pixels(beyond[None])[0]
    return anchored[labels]


def _reference_od(od: np.ndarray, references: np.ndarray, classes: np.ndarray, *, reach_px: float) -> np.ndarray:
    """OD `[h, w, 3]` of the ink each pixel is measured against: the nearest reference pixel's, or the
    sum of the nearest references of two colours (both within `reach_px`) where the pixel holds at
    least both and that explains more of it -- a crossing of two strokes."""
    _, (rows, cols) = ndimage.distance_transform_edt(~references, return_indices=True)
    reference = od[rows, cols]
    nearest_by_colour = []
    for colour_class in np.unique(classes[references]):
        distance, (rows, cols) = ndimage.distance_transform_edt(
            ~(references & (classes == colour_class)), return_indices=True
        )
        nearest_by_colour.append((distance <= reach_px, od[rows, cols]))
    unexplained = np.clip(od - reference, 0.0, None).sum(axis=-1)
    for (near_a, od_a), (near_b, od_b) in itertools.combinations(nearest_by_colour, 2):
        crossing = od_a + od_b
        rest = od - crossing
        pair_unexplained = np.clip(rest, 0.0, None).sum(axis=-1)
        better = near_a & near_b & (rest >= -CROSSING_TOLERANCE_OD).all(axis=-1) & (pair_unexplained < unexplained)
        reference[better] = crossing[better]
        unexplained[better] = pair_unexplained[better]
    return reference


def colour_under_ink(
    rgb: np.ndarray, ink: np.ndarray, background: tuple[int, int, int], *, mask_mpp: float
) -> tuple[np.ndarray, np.ndarray]:
    """float32 `[h, w, 3]`: `rgb` with the marker ink divided out of the `ink` pixels (others unchanged),
    and the boolean `[h, w]` ink pixels taken to lie over glass.

    Ink over glass is smooth: smooth ink patches that touch the glass, or whose colour beyond that
    ink is ink again (where strokes cross), are their own reference and come out as glass. Every
    other ink pixel (tissue under the stroke, the stroke's rim) takes as reference the OD of the
    nearest such pixel -- the same stroke over glass -- and keeps what it has beyond it. Nearest,
    not per stroke, so crossing strokes of different colours each keep their own reference; where
    a pixel holds two colours of ink (within `CROSSING_REACH_UM`), it is measured against both. Less
    ink than the reference (a rim, a thinner coat) is no tissue: that part is dropped along the
    ink's own direction, so a neutral black reference never bleaches tissue colour. Near-black
    channels are ignored. With no reference at all, ink pixels come out as glass.
    """
    colour = rgb.astype(np.float32)
    over_glass = np.zeros(ink.shape, dtype=bool)
    rows, cols = np.nonzero(ink)
    if rows.size == 0:
        return colour, over_glass
    # Work on the ink's bounding box plus a margin (texture, glass next to the ink) for large slides.
    margin = SMOOTH_INK_RADIUS_PX + GLASS_CONTACT_PX + 2
    box = (
        slice(max(int(rows.min()) - margin, 0), int(rows.max()) + margin + 1),
        slice(max(int(cols.min()) - margin, 0), int(cols.max()) + margin + 1),
    )
    crop, crop_ink = colour[box], ink[box]
    glass = np.asarray(background, dtype=np.float32)
    od = optical_density(crop, background)
    mean_rgb = ndimage.uniform_filter(crop, size=(3, 3, 1))
    weight = np.clip((mean_rgb - DARK_CHANNEL_FLOOR) / DARK_CHANNEL_RAMP, 0.0, 1.0)
    texture = _texture(od, mean_rgb, _glass_noise(rgb, background), weight)
    smooth = crop_ink & (texture < SMOOTH_INK_MAX_TEXTURE)
    smooth = ndimage.binary_opening(smooth, morphology.disk(SMOOTH_INK_RADIUS_PX))
    bare_glass = ~crop_ink & (np.abs(crop - glass) < GLASS_TOLERANCE).all(axis=-1)
    near_glass = ndimage.distance_transform_edt(~bare_glass) <= GLASS_CONTACT_PX
    references = _ink_references(od, smooth, near_glass, background)
    over_glass[box] = references
    reach_px = CROSSING_REACH_UM / mask_mpp
    if not references.any():
        crop[crop_ink] = glass
        return colour, over_glass
    reference = _reference_od(od, references, ink_classes(crop.astype(np.uint8)), reach_px=reach_px)
    excess = od - reference
    direction = reference / np.maximum(np.linalg.norm(reference, axis=-1, keepdims=True), 1e-6)
    along = (excess * direction).sum(axis=-1, keepdims=True)
    excess = (excess - np.minimum(along, 0.0) * direction) * weight
    crop[crop_ink] = (glass * np.power(10.0, -excess))[crop_ink]
    return colour, over_glass


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
