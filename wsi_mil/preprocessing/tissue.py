"""Classical tissue segmentation on a low-resolution copy of the slide, and its QuPath GeoJSON export.

Brightfield: marker ink found by colour and divided out of the colours under it -> HSV saturation ->
median blur -> Otsu on what is not ink, applied everywhere (thin lines under ink dropped, tissue
bridged under strokes that cross it) -> closing -> fill small holes -> drop small objects (the
CLAM recipe, in physical units, plus pen filtering). Fluorescence: the
brightest channel with the triangle threshold (dim autofluorescent tissue over a black background),
then the same cleanup.
"""

from __future__ import annotations

import json
import math
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pydantic
from scipy import ndimage
from skimage import filters, measure, morphology

from wsi_mil.preprocessing.ink import bridge_under_ink, colour_under_ink, detect_ink
from wsi_mil.preprocessing.slide import SlideReader

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)
_FOUR_CONNECTED = ndimage.generate_binary_structure(2, 1)
TISSUE_COLOR = (0, 200, 0)
INK_COLOR = (230, 0, 230)
# Glass in brightfield is bright and near neutral (checked on the slide's dominant colour).
GLASS_MIN_CHANNEL = 170
GLASS_MAX_CHROMA = 40


class TissueParams(pydantic.BaseModel):
    """Settings of the classical tissue detector; all sizes are physical so they hold at any scan mpp.

    `median_kernel` is in mask pixels (at `seg_mpp`). `threshold="auto"` is Otsu in brightfield
    and the triangle method in fluorescence (on the DAPI test slide Otsu keeps only the densest
    nuclei, 18 % of the field, the triangle method the whole section, 79 %). The defaults keep
    fragments of at least 10,000 µm² (60 % of a 256-px tile at 0.5 µm/px) and fill holes under
    4,000 µm² (a quarter of such a tile). With `remove_ink` (brightfield, on a slide whose background
    looks like glass) marker ink is found by colour (`wsi_mil.preprocessing.ink`) and kept out of the
    threshold; under it the tissue rule runs on the colour with the ink divided out, so ink over
    glass is no tissue and tissue under ink stays tissue (its ink is reported per tile). Ink not
    over glass with tissue on both sides within `ink_bridge_um` is tissue too.
    """

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid")

    mode: Literal["brightfield", "fluorescence", "whole"] = "brightfield"
    seg_mpp: float = pydantic.Field(8.0, gt=0, description="µm per mask pixel")
    median_kernel: int = pydantic.Field(7, ge=1, description="median blur size in mask pixels")
    threshold: Literal["auto", "otsu", "triangle"] | int = "auto"
    min_threshold: int = pydantic.Field(
        8,
        ge=0,
        le=255,
        description="floor for automatic thresholds (0-255), so a blank slide yields no tissue",
    )
    closing_um: float = pydantic.Field(32.0, ge=0, description="closing disk diameter in µm")
    min_tissue_area_um2: float = pydantic.Field(10_000.0, ge=0)
    min_hole_area_um2: float = pydantic.Field(
        4_000.0, ge=0, description="holes smaller than this are filled"
    )
    remove_ink: bool = pydantic.Field(True, description="find marker ink and keep it out of the tissue")
    ink_bridge_um: float = pydantic.Field(
        400.0, ge=0, description="tissue under ink strokes up to this wide counts as tissue"
    )
    min_ink_area_um2: float = pydantic.Field(
        5_000.0, ge=0, description="ink-coloured pieces smaller than this are not ink"
    )

    @pydantic.field_validator("threshold")
    @classmethod
    def _threshold_in_byte_range(cls, value: str | int) -> str | int:
        if isinstance(value, int) and not 0 <= value <= 255:
            raise ValueError("threshold must be 'auto', 'otsu', 'triangle' or an integer in 0..255")
        return value


class _AreaSums:
    """Exact covered fractions of level-0 boxes over a boolean raster, from a summed-area table."""

    def __init__(self, raster: np.ndarray, downsample: float) -> None:
        self.shape = raster.shape
        self.downsample = downsample
        self.table = np.zeros((raster.shape[0] + 1, raster.shape[1] + 1), dtype=np.float64)
        self.table[1:, 1:] = raster.cumsum(axis=0, dtype=np.float64).cumsum(axis=1)

    def _integral_at(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Covered area in [0, u) x [0, v) raster px, exact for fractional u, v (bilinear in each cell)."""
        height, width = self.shape
        u = np.clip(u, 0.0, width)
        v = np.clip(v, 0.0, height)
        col = np.minimum(np.floor(u).astype(np.int64), max(width - 1, 0))
        row = np.minimum(np.floor(v).astype(np.int64), max(height - 1, 0))
        fu, fv = u - col, v - row
        table = self.table
        return (
            table[row, col] * (1 - fu) * (1 - fv)
            + table[row, col + 1] * fu * (1 - fv)
            + table[row + 1, col] * (1 - fu) * fv
            + table[row + 1, col + 1] * fu * fv
        )

    def box_fractions(
        self, x0: np.ndarray, y0: np.ndarray, x1: np.ndarray, y1: np.ndarray
    ) -> np.ndarray:
        """Covered fraction of level-0 boxes; parts outside the raster count as uncovered."""
        u0, v0, u1, v1 = (
            np.asarray(a, dtype=np.float64) / self.downsample for a in (x0, y0, x1, y1)
        )
        area = (u1 - u0) * (v1 - v0)
        covered = (
            self._integral_at(u1, v1)
            - self._integral_at(u0, v1)
            - self._integral_at(u1, v0)
            + self._integral_at(u0, v0)
        )
        with np.errstate(divide="ignore", invalid="ignore"):
            fractions = np.where(area > 0, covered / area, 0.0)
        return np.clip(fractions, 0.0, 1.0)

    def square_fractions(self, coords: np.ndarray, size0: float) -> np.ndarray:
        coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
        x0, y0 = coords[:, 0], coords[:, 1]
        return self.box_fractions(x0, y0, x0 + size0, y0 + size0)


@dataclass(eq=False)  # arrays inside: compare by identity
class TissueMask:
    """A boolean tissue mask `[h, w]`; pixel (r, c) covers level-0 [c*ds, (c+1)*ds) x [r*ds, (r+1)*ds).

    `ink` is the marker ink found on the slide, on the same raster (None: none looked for); tissue
    under ink stays in `mask`. `background_rgb` is the slide's dominant colour (its glass, see
    `dominant_color`), None when the slide was not read. Fractions use summed-area tables built on
    first use, so treat the rasters as read-only after that.
    """

    mask: np.ndarray
    downsample: float
    params: TissueParams
    background_rgb: tuple[int, int, int] | None = None
    ink: np.ndarray | None = None
    _sums: dict[str, _AreaSums] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def area_fraction(self) -> float:
        """Fraction of mask pixels that are tissue."""
        return float(self.mask.mean()) if self.mask.size else 0.0

    @property
    def ink_area_fraction(self) -> float:
        """Fraction of mask pixels that are marker ink."""
        return float(self.ink.mean()) if self.ink is not None and self.ink.size else 0.0

    def _area_sums(self, name: str) -> _AreaSums:
        if name not in self._sums:
            raster = self.mask if name == "tissue" else self.ink
            if raster is None:
                raster = np.zeros_like(self.mask)
            self._sums[name] = _AreaSums(raster, self.downsample)
        return self._sums[name]

    def fraction_in(self, x0: float, y0: float, w0: float, h0: float) -> float:
        """Tissue fraction of the level-0 box with top-left (x0, y0) and size (w0, h0)."""
        box = (np.array([x0]), np.array([y0]), np.array([x0 + w0]), np.array([y0 + h0]))
        return float(self._area_sums("tissue").box_fractions(*box)[0])

    def fractions_in(self, coords: np.ndarray, size0: float) -> np.ndarray:
        """Tissue fractions `[N]` of square level-0 boxes of side `size0` at top-lefts `coords [N, 2]`."""
        return self._area_sums("tissue").square_fractions(coords, size0)

    def ink_fractions_in(self, coords: np.ndarray, size0: float) -> np.ndarray:
        """Ink fractions `[N]` of square level-0 boxes of side `size0` at top-lefts `coords [N, 2]`."""
        return self._area_sums("ink").square_fractions(coords, size0)


def _saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation of RGB `[h, w, 3]` (uint8, or float on the same scale) as uint8 `[h, w]` (0 where black)."""
    high = rgb.max(axis=-1).astype(np.float32)
    low = rgb.min(axis=-1).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        saturation = np.where(high > 0, (high - low) / high, 0.0)
    return np.round(saturation * 255).astype(np.uint8)


def dominant_color(rgb: np.ndarray) -> tuple[int, int, int]:
    """The most common colour of uint8 RGB `[h, w, 3]`: the median of its fullest 16-level colour bin.

    Glass fills the largest single colour bin on nearly every slide, even where tissue covers more
    area than glass, because tissue spreads over many colours.
    """
    pixels = rgb.reshape(-1, 3)
    bins = (pixels >> 4).astype(np.int32)
    keys = (bins[:, 0] << 8) | (bins[:, 1] << 4) | bins[:, 2]
    fullest = np.bincount(keys, minlength=4096).argmax()
    median = np.median(pixels[keys == fullest], axis=0)
    red, green, blue = (round(float(value)) for value in median)
    return (red, green, blue)


def is_glass_color(rgb: tuple[int, int, int]) -> bool:
    """Whether a colour looks like empty glass under brightfield: bright and near neutral."""
    return min(rgb) >= GLASS_MIN_CHANNEL and max(rgb) - min(rgb) <= GLASS_MAX_CHROMA


def _threshold(signal: np.ndarray, params: TissueParams, *, exclude: np.ndarray) -> np.ndarray:
    """Foreground where uint8 `signal` exceeds the fixed or automatic threshold.

    Automatic thresholds are computed without the `exclude` pixels and floored at `min_threshold`;
    a constant signal has no foreground.
    """
    method = params.threshold
    if isinstance(method, int):
        return signal > method
    values = signal[~exclude]
    if values.size == 0 or values.min() == values.max():
        return np.zeros(signal.shape, dtype=bool)
    if method == "auto":
        method = "otsu" if params.mode == "brightfield" else "triangle"
    automatic = filters.threshold_otsu if method == "otsu" else filters.threshold_triangle
    return signal > max(float(automatic(values)), float(params.min_threshold))


def _clean(foreground: np.ndarray, params: TissueParams, *, mask_mpp: float) -> np.ndarray:
    """Closing, then fill small holes, then drop small objects; sizes converted from µm to mask px."""
    pixel_area_um2 = mask_mpp * mask_mpp
    radius = round(params.closing_um / mask_mpp / 2)
    if radius > 0:
        foreground = morphology.closing(foreground, morphology.disk(radius), mode="ignore")
    max_hole_px = math.ceil(params.min_hole_area_um2 / pixel_area_um2) - 1
    if max_hole_px > 0:
        foreground = morphology.remove_small_holes(foreground, max_size=max_hole_px)
    max_object_px = math.ceil(params.min_tissue_area_um2 / pixel_area_um2) - 1
    if max_object_px > 0:
        foreground = morphology.remove_small_objects(
            foreground, max_size=max_object_px, connectivity=2
        )
    return foreground


def segment_tissue(slide: SlideReader, params: TissueParams) -> TissueMask:
    """Tissue mask of a slide at `params.seg_mpp`; an empty mask (not an error) when none is found.

    Reads the pyramid level closest below `seg_mpp` and area-resamples it, so mask pixels are
    exactly `downsample` level-0 px wide. Needs the slide's mpp (raises `MissingMppError`).
    """
    slide_mpp = slide.mpp.mpp
    width0, height0 = slide.dimensions
    downsample = max(1.0, params.seg_mpp / slide_mpp)
    mask_w = max(1, math.floor(width0 / downsample))
    mask_h = max(1, math.floor(height0 / downsample))
    region = (0.0, 0.0, mask_w * downsample, mask_h * downsample)
    rgb = slide.read_resampled((mask_w, mask_h), region=region)
    background = dominant_color(rgb)
    if params.mode == "whole":
        return TissueMask(np.ones((mask_h, mask_w), dtype=bool), downsample, params, background)
    mask_mpp = slide_mpp * downsample
    ink = np.zeros((mask_h, mask_w), dtype=bool)
    # Ink rules assume glass behind the strokes; a dark or coloured background gets a QC warning.
    if params.mode == "brightfield" and params.remove_ink and is_glass_color(background):
        ink = detect_ink(rgb, mask_mpp=mask_mpp, min_area_um2=params.min_ink_area_um2)
    over_glass = np.zeros_like(ink)
    if params.mode != "brightfield":
        signal = rgb.max(axis=-1)
    elif ink.any():
        colour, over_glass = colour_under_ink(rgb, ink, background, mask_mpp=mask_mpp)
        signal = _saturation(colour)
    else:
        signal = _saturation(rgb)
    if params.median_kernel > 1:
        signal = ndimage.median_filter(signal, size=params.median_kernel, mode="nearest")
    foreground = _threshold(signal, params, exclude=ink)
    if ink.any():
        # Lines one or two pixels wide under ink are the partly covered edges of strokes, not tissue;
        # tissue on both sides of a stroke stays tissue under it where the ink is not over glass.
        under_ink = ndimage.binary_opening(foreground & ink, _FOUR_CONNECTED)
        foreground = (foreground & ~ink) | under_ink
        width_px = params.ink_bridge_um / mask_mpp
        foreground |= bridge_under_ink(foreground & ~ink, ink & ~over_glass, width_px=width_px)
    cleaned = _clean(foreground, params, mask_mpp=mask_mpp)
    return TissueMask(cleaned, downsample, params, background, ink)


def _signed_area(ring: np.ndarray) -> float:
    """Shoelace area of a closed ring `[K, 2]` of (x, y); positive when counter-clockwise (y up)."""
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]))


def _largest_ring(
    region: np.ndarray, *, offset: tuple[int, int], fully_connected: str, tolerance: float
) -> np.ndarray | None:
    """Outer boundary of a boolean region as a closed (x, y) ring in mask px, simplified."""
    padded = np.pad(region, 1)
    contours = measure.find_contours(
        padded.astype(np.float32), 0.5, fully_connected=fully_connected
    )
    best: np.ndarray | None = None
    best_area = 0.0
    for contour in contours:
        simplified = measure.approximate_polygon(contour, tolerance) if tolerance > 0 else contour
        if len(simplified) < 4:
            continue
        # (row, col) in the padded crop -> continuous mask coordinates, pixel i spanning [i, i+1).
        ring = np.column_stack(
            (simplified[:, 1] - 1 + offset[1] + 0.5, simplified[:, 0] - 1 + offset[0] + 0.5)
        )
        area = abs(_signed_area(ring))
        if area > best_area:
            best, best_area = ring, area
    return best


def _oriented(ring: np.ndarray, *, counter_clockwise: bool) -> np.ndarray:
    return ring if (_signed_area(ring) > 0) == counter_clockwise else ring[::-1]


def _to_level0(ring: np.ndarray, downsample: float) -> list[list[float]]:
    return [[round(float(x) * downsample, 1), round(float(y) * downsample, 1)] for x, y in ring]


def tissue_contours(
    mask: TissueMask, *, simplify_px: float = 0.45, layer: Literal["tissue", "ink"] = "tissue"
) -> list[dict[str, Any]]:
    """Tissue (or, with `layer="ink"`, marker-ink) polygons in level-0 px:
    `[{"exterior": ring, "holes": [ring, ...]}, ...]`.

    One polygon per 8-connected piece; rings are closed `[[x, y], ...]` lists, exteriors
    counter-clockwise and holes clockwise (RFC 7946). Douglas-Peucker with `simplify_px` mask px;
    staying under half a pixel keeps straight mask edges in place (4-5x fewer vertices).
    """
    raster = mask.mask if layer == "tissue" else mask.ink
    if raster is None:
        return []
    labels, _ = ndimage.label(raster, structure=_EIGHT_CONNECTED)
    polygons: list[dict[str, Any]] = []
    for index, bounds in enumerate(ndimage.find_objects(labels), start=1):
        if bounds is None:
            continue
        offset = (bounds[0].start, bounds[1].start)
        piece = labels[bounds] == index
        filled = ndimage.binary_fill_holes(piece)
        exterior = _largest_ring(
            filled, offset=offset, fully_connected="high", tolerance=simplify_px
        )
        if exterior is None:
            continue
        holes: list[list[list[float]]] = []
        hole_labels, _ = ndimage.label(filled & ~piece)
        for hole_index, hole_bounds in enumerate(ndimage.find_objects(hole_labels), start=1):
            if hole_bounds is None:
                continue
            hole_offset = (offset[0] + hole_bounds[0].start, offset[1] + hole_bounds[1].start)
            ring = _largest_ring(
                hole_labels[hole_bounds] == hole_index,
                offset=hole_offset,
                fully_connected="low",
                tolerance=simplify_px,
            )
            if ring is not None:
                holes.append(_to_level0(_oriented(ring, counter_clockwise=False), mask.downsample))
        polygons.append(
            {
                "exterior": _to_level0(
                    _oriented(exterior, counter_clockwise=True), mask.downsample
                ),
                "holes": holes,
            }
        )
    return polygons


def _annotation(name: str, classification: str, color: tuple[int, int, int], polygons: list) -> dict[str, Any]:
    """One QuPath annotation Feature holding a Polygon or MultiPolygon."""
    if len(polygons) == 1:
        geometry: dict[str, Any] = {"type": "Polygon", "coordinates": polygons[0]}
    else:
        geometry = {"type": "MultiPolygon", "coordinates": polygons}
    # A content-derived id keeps the output byte-identical across runs.
    feature_id = uuid.uuid5(uuid.NAMESPACE_OID, json.dumps([name, classification, geometry]))
    return {
        "type": "Feature",
        "id": str(feature_id),
        "geometry": geometry,
        "properties": {
            "objectType": "annotation",
            "name": name,
            "classification": {"name": classification, "color": list(color)},
            "isLocked": False,
        },
    }


def tissue_geojson(mask: TissueMask, *, name: str = "tissue") -> dict[str, Any]:
    """A QuPath-importable GeoJSON FeatureCollection of the tissue (level-0 px, origin top-left).

    One annotation Feature classified "Tissue", and one classified "Ink" when marker ink was found,
    each holding a Polygon or MultiPolygon; no tissue and no ink give an empty FeatureCollection.
    """
    features = []
    for layer, classification, color in (("tissue", "Tissue", TISSUE_COLOR), ("ink", "Ink", INK_COLOR)):
        polygons = [[p["exterior"], *p["holes"]] for p in tissue_contours(mask, layer=layer)]
        if polygons:
            label = name if layer == "tissue" else f"{name} ink"
            features.append(_annotation(label, classification, color, polygons))
    return {"type": "FeatureCollection", "features": features}
