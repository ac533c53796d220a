"""Attention heatmaps from one coordinate contract: level-0 tile boxes `(x, y, tile_size_level0)`.

Scores go onto a raster that covers the whole level-0 slide at a known downsample (a pixel takes
the mean score of the tiles that cover its centre), are optionally smoothed, coloured with a
matplotlib colormap and blended on the slide thumbnail, masked to tissue. The same boxes give a
QuPath GeoJSON (one `tile` per instance, scores as `measurements`, as WSInfer writes them) and a
JSON table. Scales: `relative` (the default: score ÷ the slide's mean on a log scale from ×1 to
×16, opacity growing with it, so a slide without signal stays calm), `percentile` (rank within the
slide, as CLAM's heatmaps), `minmax` (linear from the slide's lowest to highest) and `raw` (the
model's values on a fixed 0..1 colour range). `scale_legend` gives the score at each colour.

Nothing here knows a service or a job: inputs are per-tile scores, level-0 coords and a tile size.
"""

from __future__ import annotations

import io
import math
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image
from scipy import ndimage, stats

from wsi_mil.atomic import atomic_open
from wsi_mil.errors import HeatmapRequestError

Scale = Literal["relative", "percentile", "minmax", "raw"]
SCALES: tuple[str, ...] = ("relative", "percentile", "minmax", "raw")
#: the `relative` scale's top: tiles scoring this many times the slide's mean (or more) get full colour
RELATIVE_MAX = 16.0
ATTENTION = "attention"
#: the most cells tiles are smoothed on; tiles spread wider share coarser cells
MAX_SMOOTHING_CELLS = 1 << 20
#: maps whose rows are classes when their row count equals the number of classes (first found wins)
PER_CLASS_MAPS = ("class_attention", "branch_attention", "tile_probability")
_GEOJSON_NAMESPACE = uuid.UUID("6f0d2c1e-6a43-4c1f-9a39-1d7f1f2b0d55")


@dataclass(frozen=True)
class TileScores:
    """Per-tile outputs of one slide's model run, in tile order.

    `coords [N, 2]` level-0 top-left (x, y); `attention [N]` the model's canonical attention;
    `maps` each `[K, N]` (per class, branch or head, as the model names them).
    """

    coords: np.ndarray
    tile_size_level0: int
    attention: np.ndarray
    maps: dict[str, np.ndarray]
    class_names: tuple[str, ...]
    slide_width: int
    slide_height: int

    def __post_init__(self) -> None:
        count = self.coords.shape[0]
        if self.coords.shape != (count, 2) or self.attention.shape != (count,):
            raise ValueError(
                f"coords must be [N, 2] and attention [N]; got {self.coords.shape}, {self.attention.shape}"
            )
        for name, values in self.maps.items():
            if values.ndim != 2 or values.shape[1] != count:
                raise ValueError(f"map {name!r} must be [K, {count}], got {values.shape}")

    @property
    def num_tiles(self) -> int:
        """Number of tiles N."""
        return int(self.coords.shape[0])

    def save(self, path: str | Path) -> None:
        """Write an `.npz` atomically."""
        arrays = {f"map__{name}": values for name, values in self.maps.items()}
        with atomic_open(path, "wb") as handle:
            np.savez(
                handle,
                coords=self.coords.astype(np.int64),
                attention=self.attention.astype(np.float32),
                tile_size_level0=np.int64(self.tile_size_level0),
                class_names=np.array(self.class_names, dtype=str),
                slide_size=np.array([self.slide_width, self.slide_height], dtype=np.int64),
                **arrays,
            )

    @classmethod
    def load(cls, path: str | Path) -> TileScores:
        """Read scores written by `save`."""
        with np.load(Path(path), allow_pickle=False) as data:
            maps = {
                key.removeprefix("map__"): data[key]
                for key in data.files
                if key.startswith("map__")
            }
            width, height = (int(v) for v in data["slide_size"])
            return cls(
                coords=data["coords"],
                tile_size_level0=int(data["tile_size_level0"]),
                attention=data["attention"],
                maps=maps,
                class_names=tuple(str(c) for c in data["class_names"]),
                slide_width=width,
                slide_height=height,
            )

    def per_class_map(self) -> str | None:
        """The name of the first map with one row per class, or None."""
        for name in (*PER_CLASS_MAPS, *sorted(self.maps)):
            values = self.maps.get(name)
            if values is not None and values.shape[0] == len(self.class_names) > 1:
                return name
        return None

    def select(
        self, map_name: str | None = None, class_index: int | None = None
    ) -> tuple[np.ndarray, str]:
        """The score vector `[N]` to draw and its label.

        No arguments: the attention. `class_index` alone: that row of the model's per-class map.
        `map_name` (+ `class_index`, the row, default 0): any stored map.
        """
        if map_name in (None, ATTENTION) and class_index is None:
            return self.attention, ATTENTION
        if map_name in (None, ATTENTION):
            map_name = self.per_class_map()
            if map_name is None:
                raise HeatmapRequestError(
                    f"this model gives no per-class map (maps: {', '.join(sorted(self.maps)) or 'none'}); "
                    "leave out class_index to draw the attention"
                )
        values = self.maps.get(str(map_name))
        if values is None:
            raise HeatmapRequestError(
                f"no map {map_name!r}; available: {', '.join([ATTENTION, *sorted(self.maps)])}"
            )
        row = 0 if class_index is None else class_index
        if not 0 <= row < values.shape[0]:
            raise HeatmapRequestError(
                f"class_index {row} out of range 0..{values.shape[0] - 1} for map {map_name!r}"
            )
        label = f"{map_name}[{row}]"
        if values.shape[0] == len(self.class_names):
            label = f"{map_name}[{self.class_names[row]}]"
        return values[row], label


def _slide_mean(values: np.ndarray) -> float:
    """The mean the `relative` scale divides by; scores must not be negative."""
    if values.size and values.min() < 0:
        raise HeatmapRequestError(
            "the relative scale needs scores that are never negative (attention, probabilities); "
            "these have negative values: use scale=minmax or scale=percentile"
        )
    return float(values.mean()) if values.size else 0.0


def scale_scores(values: np.ndarray, scale: Scale) -> np.ndarray:
    """Scores `[N]` mapped to [0, 1] for colouring (raw: unchanged).

    relative: log(score / slide mean) / log(RELATIVE_MAX), clipped (at or below the mean: 0);
    percentile: rank / N, in (0, 1]; minmax: linear from the lowest (0) to the highest (1) score.
    """
    values = np.asarray(values, dtype=np.float64)
    if scale == "raw":
        return values
    if scale == "relative":
        mean = _slide_mean(values)
        if mean <= 0:
            return np.zeros_like(values)
        ratio = np.maximum(values / mean, 1.0)
        return np.clip(np.log(ratio) / np.log(RELATIVE_MAX), 0.0, 1.0)
    if scale == "percentile":
        if values.size == 0:
            return values
        return stats.rankdata(values, method="average") / values.size
    if scale == "minmax":
        low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if high - low <= 0:
            return np.full_like(values, 0.5)
        return (values - low) / (high - low)
    raise HeatmapRequestError(f"unknown scale {scale!r}; use one of {', '.join(SCALES)}")


def canvas_size(slide_width: int, slide_height: int, *, max_size: int) -> tuple[int, int]:
    """`(w, h)` of a raster of the whole slide whose longer side is `max_size` pixels."""
    scale = max_size / max(slide_width, slide_height)
    return max(1, round(slide_width * scale)), max(1, round(slide_height * scale))


def _pixel_span(start0: float, end0: float, per_pixel: float, limit: int) -> tuple[int, int]:
    """Pixels `[a, b)` whose centres fall in the level-0 interval `[start0, end0)`."""
    a = math.ceil(start0 / per_pixel - 0.5)
    b = math.ceil(end0 / per_pixel - 0.5)
    return max(0, a), min(limit, b)


def score_grid(scores: TileScores, values: np.ndarray, *, size: tuple[int, int]) -> np.ndarray:
    """A float raster `[h, w]` of the whole slide: the mean of `values` over the tiles covering each
    pixel centre, NaN where no tile is. Pixel (i, j) covers level-0 `[j, j+1) * W / w` (and same for y)."""
    width, height = size
    per_px_x = scores.slide_width / width
    per_px_y = scores.slide_height / height
    total = np.zeros((height, width), dtype=np.float64)
    count = np.zeros((height, width), dtype=np.int32)
    side = scores.tile_size_level0
    for (x, y), value in zip(scores.coords, values, strict=True):
        x0, x1 = _pixel_span(float(x), float(x + side), per_px_x, width)
        y0, y1 = _pixel_span(float(y), float(y + side), per_px_y, height)
        total[y0:y1, x0:x1] += value
        count[y0:y1, x0:x1] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def smooth_tile_values(scores: TileScores, values: np.ndarray, sigma_tiles: float) -> np.ndarray:
    """Per-tile `values [N]` smoothed by a NaN-aware Gaussian of `sigma_tiles` on the tile grid.

    Tiles go into cells one tile wide (tiles sharing a cell are averaged), so the work grows with
    the number of tiles, never with the size of the picture; tiles strewn over more than
    `MAX_SMOOTHING_CELLS` cells share coarser cells (and sigma shrinks with them).
    """
    values = np.asarray(values, dtype=np.float64)
    if sigma_tiles <= 0 or values.size == 0:
        return values
    cells = (scores.coords - scores.coords.min(axis=0)) // scores.tile_size_level0
    spread = cells.max(axis=0) + 1
    coarsen = max(1, math.ceil(math.sqrt(int(spread[0]) * int(spread[1]) / MAX_SMOOTHING_CELLS)))
    cells //= coarsen
    columns, rows = (int(n) + 1 for n in cells.max(axis=0))
    total = np.zeros((rows, columns))
    count = np.zeros((rows, columns))
    np.add.at(total, (cells[:, 1], cells[:, 0]), values)
    np.add.at(count, (cells[:, 1], cells[:, 0]), 1.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        grid = np.where(count > 0, total / count, np.nan)
    return smooth_grid(grid, sigma_tiles / coarsen)[cells[:, 1], cells[:, 0]]


def smooth_grid(grid: np.ndarray, sigma_px: float) -> np.ndarray:
    """Gaussian smoothing that ignores NaN (normalised convolution) and keeps NaN where it was."""
    if sigma_px <= 0:
        return grid
    valid = ~np.isnan(grid)
    filled = np.where(valid, grid, 0.0)
    numerator = ndimage.gaussian_filter(filled, sigma_px, mode="constant")
    denominator = ndimage.gaussian_filter(valid.astype(np.float64), sigma_px, mode="constant")
    with np.errstate(invalid="ignore", divide="ignore"):
        smoothed = numerator / denominator
    return np.where(valid, smoothed, np.nan)


def _colormap(cmap: str) -> Any:
    from matplotlib import colormaps  # on first use: importing the service need not load matplotlib

    try:
        return colormaps[cmap]
    except KeyError as err:
        raise HeatmapRequestError(
            f"unknown colormap {cmap!r}; use a matplotlib name such as jet, viridis, inferno"
        ) from err


def colorize(
    grid: np.ndarray, *, cmap: str, vmin: float, vmax: float, alpha: float, fade: bool = False
) -> np.ndarray:
    """RGBA uint8 `[h, w, 4]` of a grid: colormap over `[vmin, vmax]` (clipped), transparent where NaN.

    With `fade` the opacity grows with the value (`alpha` at `vmax`, transparent at `vmin`).
    """
    colormap = _colormap(cmap)
    span = vmax - vmin if vmax > vmin else 1.0
    normalised = np.clip((np.nan_to_num(grid, nan=vmin) - vmin) / span, 0.0, 1.0)
    rgba = colormap(normalised, bytes=True)  # [h, w, 4] uint8
    opacity = alpha * (normalised if fade else 1.0)
    rgba[..., 3] = np.where(np.isnan(grid), 0, np.round(255 * opacity)).astype(np.uint8)
    return rgba


@dataclass(frozen=True)
class LegendTick:
    """One tick of a colour bar: its place on the bar (0..1), the score there and its label."""

    position: float
    value: float
    label: str


def scale_legend(values: np.ndarray, scale: Scale, *, ticks: int = 5) -> list[LegendTick]:
    """The score at evenly spaced places of the colour bar, labelled in the scale's own unit
    (×ratio for relative, rank for percentile, the score for minmax and raw)."""
    values = np.asarray(values, dtype=np.float64)
    positions = np.linspace(0.0, 1.0, ticks)
    if scale == "relative":
        mean = _slide_mean(values)
        ratios = RELATIVE_MAX**positions
        return [LegendTick(float(p), float(mean * r), f"×{r:.3g}") for p, r in zip(positions, ratios, strict=True)]
    if scale == "percentile":
        quantiles = np.quantile(values, positions) if values.size else np.zeros_like(positions)
        return [LegendTick(float(p), float(v), f"{p:.0%}") for p, v in zip(positions, quantiles, strict=True)]
    if scale == "minmax":
        low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        scores = low + positions * (high - low)
    elif scale == "raw":
        scores = positions
    else:
        raise HeatmapRequestError(f"unknown scale {scale!r}; use one of {', '.join(SCALES)}")
    return [LegendTick(float(p), float(v), f"{v:.3g}") for p, v in zip(positions, scores, strict=True)]


def legend_colors(cmap: str, scale: Scale, *, steps: int = 11) -> list[str]:
    """CSS `rgba(...)` colours along the colour bar, fading as the heatmap does on the relative scale."""
    colormap = _colormap(cmap)
    positions = np.linspace(0.0, 1.0, steps)
    fade = scale == "relative"
    colours = []
    for position, (red, green, blue, _) in zip(positions, colormap(positions, bytes=True), strict=True):
        opacity = position if fade else 1.0
        colours.append(f"rgba({red}, {green}, {blue}, {opacity:.2f})")
    return colours


@dataclass(frozen=True)
class HeatmapOptions:
    """What to draw: which scores, how they are scaled, smoothed and coloured, and over what."""

    scale: Scale = "relative"
    map_name: str | None = None
    class_index: int | None = None
    cmap: str = "jet"
    alpha: float = 0.5
    smooth_tiles: float = 0.0
    max_size: int = 2048
    background: Literal["thumbnail", "none"] = "thumbnail"


def render_heatmap(
    scores: TileScores,
    options: HeatmapOptions,
    *,
    thumbnail: Image.Image | None = None,
    tissue_mask: Image.Image | None = None,
) -> Image.Image:
    """The heatmap as a PIL image covering the whole level-0 slide at `canvas_size(..., max_size)`.

    With `background="thumbnail"` the colours are blended (`alpha`) on the slide thumbnail and the
    result is RGB; with `"none"` it is RGBA, transparent off the tiles (an overlay for a viewer).
    Colour is drawn only on tissue when `tissue_mask` (any size, covering the whole slide) is given.
    """
    values, _ = scores.select(options.map_name, options.class_index)
    scaled = smooth_tile_values(scores, scale_scores(values, options.scale), options.smooth_tiles)
    size = canvas_size(scores.slide_width, scores.slide_height, max_size=options.max_size)
    grid = score_grid(scores, scaled, size=size)
    if tissue_mask is not None:
        mask = np.asarray(tissue_mask.convert("L").resize(size, Image.Resampling.NEAREST)) > 0
        grid = np.where(mask, grid, np.nan)
    vmin, vmax = (0.0, 1.0)
    fade = options.scale == "relative"
    if options.background == "none":
        return Image.fromarray(
            colorize(grid, cmap=options.cmap, vmin=vmin, vmax=vmax, alpha=options.alpha, fade=fade), "RGBA"
        )
    colours = colorize(grid, cmap=options.cmap, vmin=vmin, vmax=vmax, alpha=options.alpha, fade=fade)
    base = (
        np.asarray(
            thumbnail.convert("RGB").resize(size, Image.Resampling.BILINEAR), dtype=np.float32
        )
        if thumbnail is not None
        else np.full((size[1], size[0], 3), 255.0, dtype=np.float32)
    )
    weight = (colours[..., 3:] / 255.0).astype(np.float32)
    blended = base * (1 - weight) + colours[..., :3].astype(np.float32) * weight
    return Image.fromarray(np.clip(blended + 0.5, 0, 255).astype(np.uint8), "RGB")


def png_bytes(image: Image.Image) -> bytes:
    """PNG-encoded bytes of an image (fast zlib level; heatmaps compress well)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False, compress_level=3)
    return buffer.getvalue()


def tile_columns(
    attention: np.ndarray, maps: Mapping[str, np.ndarray], class_names: Sequence[str]
) -> dict[str, np.ndarray]:
    """Every per-tile score as a named column: `attention`, then each map row, named
    `<map>_<class>` for per-class maps, `<map>_<row>` for other multi-row maps, `<map>` for one row."""
    table = {ATTENTION: np.asarray(attention, dtype=np.float64)}
    for name, values in sorted(maps.items()):
        per_class = values.shape[0] == len(class_names)
        for row in range(values.shape[0]):
            suffix = class_names[row] if per_class else str(row)
            table[f"{name}_{suffix}" if values.shape[0] > 1 else name] = values[row].astype(np.float64)
    return table


def measurements(scores: TileScores) -> dict[str, np.ndarray]:
    """Every per-tile number worth exporting: attention on all three scales, then each map row."""
    columns = tile_columns(scores.attention, scores.maps, scores.class_names)
    return {
        ATTENTION: columns.pop(ATTENTION),
        f"{ATTENTION}_percentile": scale_scores(scores.attention, "percentile"),
        f"{ATTENTION}_minmax": scale_scores(scores.attention, "minmax"),
        **columns,
    }


def heatmap_geojson(scores: TileScores, *, name: str) -> dict[str, Any]:
    """A QuPath-importable FeatureCollection: one `tile` square per instance in level-0 pixels,
    closed rings, `measurements` as a dict of the per-tile scores; ids are stable per (name, index)."""
    table = measurements(scores)
    keys = list(table)
    side = int(scores.tile_size_level0)
    features = []
    for index, (x, y) in enumerate(scores.coords.tolist()):
        ring = [[x, y], [x + side, y], [x + side, y + side], [x, y + side], [x, y]]
        features.append(
            {
                "type": "Feature",
                "id": str(uuid.uuid5(_GEOJSON_NAMESPACE, f"{name}/{index}")),
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": {
                    "objectType": "tile",
                    "isLocked": True,
                    "name": f"tile {index}",
                    "measurements": {key: float(table[key][index]) for key in keys},
                },
            }
        )
    return {"type": "FeatureCollection", "features": features}


def top_tiles(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the `k` highest scores, highest first (ties: lower index first)."""
    order = np.argsort(-np.asarray(values, dtype=np.float64), kind="stable")
    return order[: max(0, k)]
