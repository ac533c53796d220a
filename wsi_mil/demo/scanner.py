"""Slides as real archives hold them, built from real tissue crops: marker ink around, over, across and
along the tissue (crossing strokes, faint strokes, black over nuclei-rich tissue), tissue cut by the
slide's edge, and tiles whose JPEG data is damaged.

Each builder writes a pyramidal TIFF that OpenSlide opens and returns where the tissue and the ink
really are (`CompositeSlide.tissue` and `.ink`, boolean masks), so tests and
`benchmarks/bench_scanner_slides.py` can measure tissue recall and tiles on ink against known truth.
The tissue comes from a real H&E slide given by the caller (the tests use the TCGA SVS in
`../shared/data/slides`); its pixels are taken as `source_mpp` µm wide.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import tifffile
from scipy import ndimage
from skimage import draw

from wsi_mil.demo.synthetic import BACKGROUND_RGB, write_pyramidal_tiff
from wsi_mil.preprocessing.slide import open_slide
from wsi_mil.preprocessing.tissue import TissueMask, TissueParams

InkColor = Literal["green", "blue", "red", "black"]
InkLayout = Literal["none", "around", "over", "crossing", "border", "faint", "black-over"]

# Light transmitted by one coat of marker ink, per RGB channel (Beer-Lambert: `coats` coats pass
# transmittance ** coats). The scanned colours on glass are about (60, 145, 108) green,
# (53, 72, 181) blue, (205, 53, 72) red and (41, 41, 46) black.
INK_TRANSMITTANCE: dict[InkColor, tuple[float, float, float]] = {
    "green": (0.25, 0.60, 0.45),
    "blue": (0.22, 0.30, 0.75),
    "red": (0.85, 0.22, 0.30),
    "black": (0.17, 0.17, 0.19),
}
# Saturation above which a source pixel counts as tissue (after a 2-px Gaussian): white glass and
# lumens stay below 0.08, the TCGA section's stroma and nuclei lie between 0.3 and 0.7.
_SOURCE_TISSUE_SATURATION = 0.15
_INK_EDGE_UM = 4.0
# A faint stroke (a drying marker, a light touch) lays this many coats.
FAINT_COATS = 0.45


@dataclass(frozen=True)
class Stroke:
    """A marker stroke: a polyline in level-0 px `(x, y)`, `width_um` wide, laying `coats` coats of ink."""

    color: InkColor
    points: tuple[tuple[float, float], ...]
    width_um: float
    coats: float = 1.0


@dataclass(frozen=True)
class CompositeSlide:
    """A built slide and its truth: boolean masks with one pixel per `truth_downsample` level-0 px."""

    path: Path
    mpp: float
    dimensions: tuple[int, int]
    tissue: np.ndarray
    ink: np.ndarray
    truth_downsample: int
    strokes: tuple[Stroke, ...] = ()

    def _fractions(self, truth: np.ndarray, coords: np.ndarray, size0: float) -> np.ndarray:
        return TissueMask(truth, float(self.truth_downsample), TissueParams()).fractions_in(coords, size0)

    def tissue_fractions(self, coords: np.ndarray, size0: float) -> np.ndarray:
        """True tissue fraction `[N]` of square level-0 tiles of side `size0` at top-lefts `coords`."""
        return self._fractions(self.tissue, coords, size0)

    def ink_fractions(self, coords: np.ndarray, size0: float) -> np.ndarray:
        """True ink fraction `[N]` of square level-0 tiles of side `size0` at top-lefts `coords`."""
        return self._fractions(self.ink, coords, size0)


def read_source_tissue(
    source: str | Path, *, level: int = 0, region: tuple[int, int, int, int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """RGB pixels `[h, w, 3]` of a real H&E slide and its tissue mask `[h, w]`.

    `region` is `(x, y, width, height)` in pixels of `level` (default: the whole level).
    """
    with open_slide(source) as slide:
        downsample = slide.level_downsamples[level]
        x, y, width, height = region or (0, 0, *slide.level_dimensions[level])
        rgb = slide.read_region((round(x * downsample), round(y * downsample)), level, (width, height))
    high = rgb.max(axis=-1).astype(np.float32)
    saturation = (high - rgb.min(axis=-1)) / np.maximum(high, 1.0)
    tissue = ndimage.gaussian_filter(saturation, sigma=2) > _SOURCE_TISSUE_SATURATION
    return rgb, tissue


def _glass(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Empty glass: the demo's background colour with mild sensor noise, float32 `[h, w, 3]`."""
    return BACKGROUND_RGB + rng.normal(0, 2, (height, width, 1)).astype(np.float32)


def _paste(
    canvas: np.ndarray,
    truth: np.ndarray,
    piece: np.ndarray,
    piece_tissue: np.ndarray,
    shape: np.ndarray,
    origin: tuple[int, int],
) -> None:
    """Lay the tissue of `piece` inside the boolean `shape` on `canvas` at `origin` (x, y), clipped.

    Only the source's tissue is laid down (soft-edged), so its own glass and lumens show our glass.
    """
    x0, y0 = origin
    height, width = canvas.shape[:2]
    sy0, sx0 = max(0, -y0), max(0, -x0)
    sy1 = min(piece.shape[0], height - y0)
    sx1 = min(piece.shape[1], width - x0)
    window = (slice(y0 + sy0, y0 + sy1), slice(x0 + sx0, x0 + sx1))
    laid = (shape & piece_tissue)[sy0:sy1, sx0:sx1]
    alpha = ndimage.gaussian_filter(laid.astype(np.float32), sigma=1.5)[..., None]
    canvas[window] = piece[sy0:sy1, sx0:sx1] * alpha + canvas[window] * (1 - alpha)
    truth[window] |= laid


def _piece_shape(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """An organic blob filling most of a `height x width` box: an ellipse with a wavy rim."""
    yy, xx = np.mgrid[0:height, 0:width]
    radius = np.hypot((yy - height / 2) / (height / 2), (xx - width / 2) / (width / 2))
    angle = np.arctan2(yy - height / 2, xx - width / 2)
    phases = rng.uniform(0, 2 * np.pi, 3)
    rim = 0.9 + sum(0.04 * np.sin(k * angle + p) for k, p in zip((3, 5, 8), phases, strict=True))
    return radius < rim


def _stroke_coverage(stroke: Stroke, shape: tuple[int, int], mpp: float) -> tuple[np.ndarray, tuple[slice, slice]]:
    """Ink coverage in [0, 1] of a stroke over its bounding window (soft 4-µm edge), and the window."""
    half = stroke.width_um / mpp / 2
    edge = _INK_EDGE_UM / mpp
    points = np.asarray(stroke.points, dtype=np.float64)
    pad = math.ceil(half + edge)
    height, width = shape
    x0 = max(0, math.floor(points[:, 0].min()) - pad)
    y0 = max(0, math.floor(points[:, 1].min()) - pad)
    x1 = min(width, math.ceil(points[:, 0].max()) + pad + 1)
    y1 = min(height, math.ceil(points[:, 1].max()) + pad + 1)
    centre_line = np.zeros((y1 - y0, x1 - x0), dtype=bool)
    for (ax, ay), (bx, by) in itertools.pairwise(points):
        rows, cols = draw.line(round(ay - y0), round(ax - x0), round(by - y0), round(bx - x0))
        inside = (rows >= 0) & (rows < y1 - y0) & (cols >= 0) & (cols < x1 - x0)
        centre_line[rows[inside], cols[inside]] = True
    distance = ndimage.distance_transform_edt(~centre_line)
    coverage = np.clip((half - distance) / edge + 0.5, 0.0, 1.0).astype(np.float32)
    return coverage, (slice(y0, y1), slice(x0, x1))


def _smooth_noise(shape: tuple[int, int], cell: int, rng: np.random.Generator) -> np.ndarray:
    """Unit-variance noise `[h, w]` that varies smoothly over about `cell` px (bilinear upsampling)."""
    coarse = rng.standard_normal((shape[0] // cell + 2, shape[1] // cell + 2))
    fine = ndimage.zoom(coarse, cell, order=1)[: shape[0], : shape[1]]
    return (fine / max(float(fine.std()), 1e-6)).astype(np.float32)


def _apply_ink(
    canvas: np.ndarray, ink_truth: np.ndarray, strokes: Sequence[Stroke], mpp: float, rng: np.random.Generator
) -> None:
    """Darken `canvas` under each stroke as translucent dye would (over glass and tissue alike)."""
    for stroke in strokes:
        coverage, window = _stroke_coverage(stroke, canvas.shape[:2], mpp)
        # Uneven ink load along the stroke: about 0.85-1.15 times its coats, varying over some 100 µm.
        load = stroke.coats * (1.0 + 0.1 * _smooth_noise(coverage.shape, round(100 / mpp), rng))
        coats = coverage * load
        transmittance = np.asarray(INK_TRANSMITTANCE[stroke.color], dtype=np.float32)
        canvas[window] *= transmittance ** coats[..., None]
        ink_truth[window] |= coverage >= 0.5


def _ring(centre: tuple[float, float], radii: tuple[float, float], *, points: int = 240) -> tuple[tuple[float, float], ...]:
    angles = np.linspace(0, 2 * np.pi, points)
    return tuple(
        (centre[0] + radii[0] * math.cos(a), centre[1] + radii[1] * math.sin(a)) for a in angles
    )


def _scribble(x0: float, y0: float, width: float, height: float, turns: int) -> tuple[tuple[float, float], ...]:
    """A handwriting-like zigzag: `turns` loops across a box."""
    t = np.linspace(0, 1, 60 * turns)
    xs = x0 + width * t
    ys = y0 + height / 2 * (1 + np.sin(2 * np.pi * turns * t) * np.cos(np.pi * t))
    return tuple(zip(xs.tolist(), ys.tolist(), strict=True))


def _downsampled_truth(truth: np.ndarray, factor: int) -> np.ndarray:
    """A boolean mask shrunk by `factor`: a coarse pixel is set when at least half its area is."""
    height, width = (truth.shape[0] // factor) * factor, (truth.shape[1] // factor) * factor
    blocks = truth[:height, :width].reshape(height // factor, factor, width // factor, factor)
    return blocks.mean(axis=(1, 3)) >= 0.5


def _nuclei_rich_centre(source: str | Path, level: int, window: tuple[int, int]) -> tuple[int, int]:
    """Centre `(x, y)` in pixels of `level` of the `window`-sized (w, h) box of the source with the most
    hematoxylin-dark pixels (value under 0.45, as nuclei are at a few µm per pixel)."""
    with open_slide(source) as slide:
        rgb = slide.read_region((0, 0), level, slide.level_dimensions[level])
    dark = (rgb.max(axis=-1) < 0.45 * 255).astype(np.float32)
    density = ndimage.uniform_filter(dark, size=(window[1], window[0]), mode="constant")
    half_w, half_h = window[0] // 2 + 1, window[1] // 2 + 1
    inner = density[half_h : dark.shape[0] - half_h, half_w : dark.shape[1] - half_w]
    row, col = np.unravel_index(int(inner.argmax()), inner.shape)
    return int(col) + half_w, int(row) + half_h


def _layout_strokes(
    ink: InkLayout, centres: Sequence[tuple[float, float]], piece: tuple[float, float], scale: float
) -> list[Stroke]:
    """The marker strokes of a layout, for two pieces `piece` (w, h) px wide centred at `centres`."""
    (ax, ay), (bx, by) = centres
    piece_w, piece_h = piece

    def at(x_um: float, y_um: float, origin: tuple[float, float] = (0.0, 0.0)) -> tuple[float, float]:
        return origin[0] + x_um * scale, origin[1] + y_um * scale

    ring_a = (piece_w / 2 + 300 * scale, piece_h / 2 + 300 * scale)
    ring_b = (piece_w / 2 + 280 * scale, piece_h / 2 + 280 * scale)
    if ink == "around":
        return [
            Stroke("green", _ring((ax, ay), ring_a), 250),
            Stroke("blue", _ring((bx, by), ring_b), 220),
            Stroke("red", (at(1950, 150), at(1950, 700)), 280),
            Stroke("red", (at(1800, 500), at(1950, 700), at(2100, 500)), 280),
            Stroke("black", _scribble(*at(1700, 1900), 500 * scale, 500 * scale, 3), 200),
        ]
    if ink == "over":
        return [
            Stroke("green", (at(-700, -500, (ax, ay)), at(700, 450, (ax, ay))), 250),
            Stroke("blue", _scribble(*at(-650, -200, (bx, by)), 1300 * scale, 400 * scale, 2), 220),
            Stroke("red", (at(-650, 250, (ax, ay)), at(650, 150, (ax, ay))), 280),
            Stroke("black", (at(-100, -650, (bx, by)), at(50, 650, (bx, by))), 200),
        ]
    if ink == "crossing":
        # Green across red on the glass between the pieces, blue across red over the second piece.
        return [
            Stroke("green", (at(1600, 150), at(2350, 750)), 250),
            Stroke("red", (at(1600, 750), at(2350, 150)), 250),
            Stroke("blue", (at(-550, -450, (bx, by)), at(550, 450, (bx, by))), 220),
            Stroke("red", (at(-550, 450, (bx, by)), at(550, -450, (bx, by))), 250),
        ]
    if ink == "border":
        # Strokes whose middle follows the tissue's rim: half over tissue, half over glass.
        rim_a = (0.9 * piece_w / 2, 0.9 * piece_h / 2)
        rim_b = (0.9 * piece_w / 2, 0.9 * piece_h / 2)
        return [
            Stroke("green", _ring((ax, ay), rim_a)[100:220], 250),
            Stroke("blue", _ring((bx, by), rim_b)[10:110], 220),
        ]
    if ink == "faint":
        return [
            Stroke("green", _ring((ax, ay), ring_a), 250, FAINT_COATS),
            Stroke("red", (at(-650, 100, (ax, ay)), at(650, 0, (ax, ay))), 280, FAINT_COATS),
            Stroke("blue", _scribble(*at(-650, -200, (bx, by)), 1300 * scale, 400 * scale, 2), 220, FAINT_COATS),
        ]
    if ink == "black-over":
        return [
            Stroke("black", (at(-600, -500, (ax, ay)), at(600, 450, (ax, ay))), 250),
            Stroke("black", (at(-100, -650, (bx, by)), at(50, 650, (bx, by))), 200),
        ]
    return []


def build_inked_slide(
    path: str | Path,
    source: str | Path,
    *,
    ink: InkLayout,
    colors: Sequence[InkColor] = ("green", "blue", "red", "black"),
    pieces: Literal["middle", "nuclei-rich"] = "middle",
    mpp: float = 1.0,
    source_level: int = 1,
    seed: int = 0,
    truth_downsample: int = 4,
) -> CompositeSlide:
    """Two pieces of real tissue on glass (4.0 x 2.6 mm at `mpp`), with marker strokes 200-300 µm wide.

    `ink="around"` circles and annotates the pieces without touching them (the builder checks that no
    ink lies on tissue); `"over"` draws the same colours across them; `"crossing"` crosses green and
    red on the glass and blue and red over a piece; `"border"` runs strokes along the tissue's rim;
    `"faint"` draws light strokes (`FAINT_COATS` coats) around and across; `"black-over"` draws black
    strokes across both pieces; `"none"` is the clean slide. `pieces="nuclei-rich"` cuts the pieces
    from the source's darkest part instead of its middle. The same seed and pieces give the same
    tissue in every layout, so they compare like with like.
    """
    rng = np.random.default_rng(seed)
    scale = 1.0 / mpp  # level-0 px per µm; the layout below is in µm
    width, height = round(4000 * scale), round(2600 * scale)
    canvas = _glass(height, width, rng)
    tissue = np.zeros((height, width), dtype=bool)
    # Two pieces of 900 x 800 µm cut side by side from the source (its middle, or its most
    # nuclei-rich part), laid with their centres at (1000, 1250) and (2950, 1250) µm.
    with open_slide(source) as slide:
        src_w, src_h = slide.level_dimensions[source_level]
    piece_w, piece_h = min(round(900 * scale), src_w // 2 - 10), min(round(800 * scale), src_h - 10)
    src_cx, src_top = src_w // 2, (src_h - piece_h) // 2
    if pieces == "nuclei-rich":
        src_cx, src_cy = _nuclei_rich_centre(source, source_level, (2 * piece_w + 10, piece_h))
        src_top = src_cy - piece_h // 2
    centres = ((1000 * scale, 1250 * scale), (2950 * scale, 1250 * scale))
    for index, (cx, cy) in enumerate(centres):
        sx = src_cx - piece_w - 5 if index == 0 else src_cx + 5
        region = (sx, src_top, piece_w, piece_h)
        piece, piece_tissue = read_source_tissue(source, level=source_level, region=region)
        shape = _piece_shape(piece_h, piece_w, rng)
        origin = (round(cx - piece_w / 2), round(cy - piece_h / 2))
        _paste(canvas, tissue, piece.astype(np.float32), piece_tissue, shape, origin)
    strokes = [s for s in _layout_strokes(ink, centres, (piece_w, piece_h), scale) if s.color in colors]
    ink_truth = np.zeros_like(tissue)
    _apply_ink(canvas, ink_truth, strokes, mpp, rng)
    if ink == "around" and (ink_truth & tissue).any():
        raise AssertionError("the 'around' layout put ink on tissue; the source is too large for it")
    path = Path(path)
    write_pyramidal_tiff(path, np.clip(canvas, 0, 255).astype(np.uint8), mpp=mpp)
    return CompositeSlide(
        path=path,
        mpp=mpp,
        dimensions=(width, height),
        tissue=_downsampled_truth(tissue, truth_downsample),
        ink=_downsampled_truth(ink_truth, truth_downsample),
        truth_downsample=truth_downsample,
        strokes=tuple(strokes),
    )


def build_edge_slide(
    path: str | Path,
    source: str | Path,
    *,
    mpp: float = 0.25,
    size_um: tuple[float, float] = (825.0, 725.0),
    seed: int = 0,
    truth_downsample: int = 4,
) -> CompositeSlide:
    """Real tissue (from the source's level 0) that runs off the slide's right and bottom edges.

    The default 825 x 725 µm at 0.25 µm/px (a 40x scan) is 3300 x 2900 px: not a multiple of a
    512-px tile either way, so a grid that starts at (0, 0) and drops overhanging tiles loses tissue.
    """
    rng = np.random.default_rng(seed)
    width, height = round(size_um[0] / mpp), round(size_um[1] / mpp)
    with open_slide(source) as slide:
        src_w, src_h = slide.dimensions
    piece_w, piece_h = min(width, src_w), min(height, src_h)
    region = ((src_w - piece_w) // 2, (src_h - piece_h) // 2, piece_w, piece_h)
    piece, piece_tissue = read_source_tissue(source, level=0, region=region)
    # An ellipse centred near the bottom-right corner: its visible quarter touches both edges.
    yy, xx = np.mgrid[0:piece_h, 0:piece_w]
    shape = np.hypot((xx - 0.95 * piece_w) / (0.7 * piece_w), (yy - 0.95 * piece_h) / (0.65 * piece_h)) < 1
    canvas = _glass(height, width, rng)
    tissue = np.zeros((height, width), dtype=bool)
    _paste(canvas, tissue, piece.astype(np.float32), piece_tissue, shape, (width - piece_w, height - piece_h))
    path = Path(path)
    write_pyramidal_tiff(path, np.clip(canvas, 0, 255).astype(np.uint8), mpp=mpp)
    truth = _downsampled_truth(tissue, truth_downsample)
    return CompositeSlide(
        path=path,
        mpp=mpp,
        dimensions=(width, height),
        tissue=truth,
        ink=np.zeros_like(truth),
        truth_downsample=truth_downsample,
    )


def damage_tiles(
    path: str | Path, fraction: float, *, level: int = 0, seed: int = 0
) -> list[tuple[int, int, int, int]]:
    """Overwrite the JPEG data of about `fraction` of one pyramid level's TIFF tiles with zeros, in place.

    Tiles are picked at random among the quarter with the most JPEG data (tissue compresses worst;
    blank glass best), so the tissue tiles a pipeline reads hit them. Returns the damaged boxes (x0, y0, x1, y1) in
    pixels of that level. The other levels stay intact, so tissue detection still works.
    """
    rng = np.random.default_rng(seed)
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[level]
        offsets, counts = page.dataoffsets, page.databytecounts
        tile_h, tile_w = page.tilelength, page.tilewidth
        across = math.ceil(page.imagewidth / tile_w)
    sizes = np.asarray(counts)
    busy = np.flatnonzero(sizes > np.percentile(sizes, 75))
    chosen = rng.choice(busy, size=max(1, round(fraction * len(sizes))), replace=False)
    boxes = []
    with open(path, "r+b") as stream:
        for index in sorted(int(i) for i in chosen):
            stream.seek(offsets[index])
            stream.write(bytes(counts[index]))
            x0, y0 = (index % across) * tile_w, (index // across) * tile_h
            boxes.append((x0, y0, x0 + tile_w, y0 + tile_h))
    return boxes
