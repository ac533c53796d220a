"""Tiling at a physical resolution: a regular level-0 grid over the whole slide (edge tiles padded)
filtered by tissue fraction, and tile reads.

A tile is `tile_px` pixels at `target_mpp`, i.e. `tile_size_level0` level-0 pixels; it is read from
the coarsest pyramid level that is still at least as fine as the target, then resized.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pydantic
from PIL import Image

from wsi_mil.errors import TilingError
from wsi_mil.preprocessing.slide import SlideReader
from wsi_mil.preprocessing.tissue import TissueMask

# Reads at most this much smaller than `tile_size_level0 / level_downsample` still count as covering
# it (guards against 256.0000001 -> 257 from floating-point downsamples).
_SIZE_EPSILON = 1e-3


class TilingParams(pydantic.BaseModel):
    """Tile geometry in physical units: `tile_px` pixels at `target_mpp`, `overlap_px` shared pixels."""

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid")

    target_mpp: float = pydantic.Field(0.5, gt=0)
    tile_px: int = pydantic.Field(256, ge=1)
    overlap_px: int = pydantic.Field(
        0, ge=0, description="pixels shared by neighbours, at target_mpp"
    )
    min_tissue_fraction: float = pydantic.Field(0.25, ge=0, le=1)
    max_ink_fraction: float = pydantic.Field(
        1.0, ge=0, le=1, description="tiles with more marker ink than this are dropped (1: keep all)"
    )

    @pydantic.model_validator(mode="after")
    def _overlap_below_tile(self) -> TilingParams:
        if self.overlap_px >= self.tile_px:
            raise ValueError(
                f"overlap_px ({self.overlap_px}) must be below tile_px ({self.tile_px})"
            )
        return self


@dataclass(eq=False)  # arrays inside: compare by identity
class TileGrid:
    """Kept tiles of one slide: level-0 top-left `coords [N, 2]` (x, y) in raster order, plus how to read them.

    `ink_fractions [N]` is the share of each tile under marker ink. `padded_tiles` of them overhang
    the slide's right or bottom edge; the part outside reads as `pad_rgb`, the slide's background
    colour.
    """

    coords: np.ndarray
    tile_size_level0: int
    step_level0: int
    read_level: int
    read_size: int
    tile_px: int
    target_mpp: float
    slide_mpp: float
    overlap_px: int
    tissue_fractions: np.ndarray
    pad_rgb: tuple[int, int, int] = (255, 255, 255)
    padded_tiles: int = 0
    ink_fractions: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.coords.shape[0])

    def edge_padding(self) -> dict[str, object]:
        """How tiles that overhang the slide's right or bottom edge are filled (for the provenance)."""
        return {"mode": "background", "rgb": list(self.pad_rgb), "tiles": self.padded_tiles}


def _grid_starts(extent: int, tile: int, step: int) -> np.ndarray:
    """Tile starts along one axis from 0: as few as reach the far edge, the last one overhanging it."""
    count = math.ceil(max(extent - tile, 0) / step) + 1
    return np.arange(count, dtype=np.int64) * step


def tile_grid(slide: SlideReader, mask: TissueMask, params: TilingParams) -> TileGrid:
    """The regular grid of tiles over the whole slide whose tissue fraction meets the threshold.

    The grid starts at level-0 (0, 0) with step `round((tile_px - overlap_px) * target_mpp / slide_mpp)`
    and runs until a tile reaches the right and bottom edges; such a last tile overhangs the edge and
    its outside part is padded with the slide's background colour (`mask.background_rgb`, else
    white), as CLAM and TRIDENT keep edge tiles. The tissue fraction counts the padding as
    background. Tiles whose marker-ink fraction exceeds `params.max_ink_fraction` are dropped
    (by default none: the fraction is recorded instead). No tile kept gives an empty grid (the
    caller reports `no_tissue`). Raises `TilingError` when a tile would be smaller than one level-0
    pixel and `MissingMppError` when the slide has no mpp.
    """
    slide_mpp = slide.mpp.mpp
    level0_per_target_px = params.target_mpp / slide_mpp
    tile_size_level0 = round(params.tile_px * level0_per_target_px)
    step_level0 = round((params.tile_px - params.overlap_px) * level0_per_target_px)
    if tile_size_level0 < 1 or step_level0 < 1:
        raise TilingError(
            f"{slide.name}: a {params.tile_px}-px tile at {params.target_mpp} µm/px covers less than "
            f"one pixel of a {slide_mpp:g} µm/px slide; check the slide mpp (manifest column `mpp` "
            "or `--slide-mpp`) or raise `target_mpp`/`tile_px`"
        )
    read_level = slide.best_level_for_downsample(max(1.0, level0_per_target_px))
    level_downsample = slide.level_downsamples[read_level]
    read_size = max(1, math.ceil(tile_size_level0 / level_downsample - _SIZE_EPSILON))

    width0, height0 = slide.dimensions
    xs = _grid_starts(width0, tile_size_level0, step_level0)
    ys = _grid_starts(height0, tile_size_level0, step_level0)
    grid_y, grid_x = np.meshgrid(ys, xs, indexing="ij")
    candidates = np.column_stack((grid_x.ravel(), grid_y.ravel()))
    fractions = mask.fractions_in(candidates, tile_size_level0).astype(np.float32)
    ink = mask.ink_fractions_in(candidates, tile_size_level0).astype(np.float32)
    keep = (fractions >= params.min_tissue_fraction) & (ink <= params.max_ink_fraction)
    coords = np.ascontiguousarray(candidates[keep])
    overhang = (coords[:, 0] + tile_size_level0 > width0) | (coords[:, 1] + tile_size_level0 > height0)
    return TileGrid(
        coords=coords,
        tile_size_level0=tile_size_level0,
        step_level0=step_level0,
        read_level=read_level,
        read_size=read_size,
        tile_px=params.tile_px,
        target_mpp=params.target_mpp,
        slide_mpp=slide_mpp,
        overlap_px=params.overlap_px,
        tissue_fractions=fractions[keep],
        pad_rgb=mask.background_rgb or (255, 255, 255),
        padded_tiles=int(overhang.sum()),
        ink_fractions=ink[keep],
    )


def tile_footprint(
    coords: np.ndarray, size0: float, shape: tuple[int, int], downsample: float
) -> np.ndarray:
    """Boolean raster `shape` (one pixel per `downsample` level-0 px): pixels whose centre lies in
    one of the square level-0 tiles of side `size0` at top-lefts `coords [N, 2]`."""
    height, width = shape
    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)

    def first_centre_at_or_after(v: np.ndarray, limit: int) -> np.ndarray:
        return np.clip(np.ceil(v / downsample - 0.5), 0, limit).astype(np.int64)

    c0, c1 = (first_centre_at_or_after(coords[:, 0] + d, width) for d in (0.0, size0))
    r0, r1 = (first_centre_at_or_after(coords[:, 1] + d, height) for d in (0.0, size0))
    # Each box adds 1 inside itself in a 2-D difference array; the cumulative sum counts the cover.
    corners = np.zeros((height + 1, width + 1), dtype=np.int64)
    np.add.at(corners, (r0, c0), 1)
    np.add.at(corners, (r0, c1), -1)
    np.add.at(corners, (r1, c0), -1)
    np.add.at(corners, (r1, c1), 1)
    return corners.cumsum(axis=0).cumsum(axis=1)[:height, :width] > 0


def tissue_coverage(grid: TileGrid, mask: TissueMask) -> float:
    """Share of the tissue mask's area that the kept tiles cover (1.0 when there is no tissue)."""
    if not mask.mask.any():
        return 1.0
    covered = tile_footprint(grid.coords, grid.tile_size_level0, mask.mask.shape, mask.downsample)
    return float(covered[mask.mask].mean())


def read_tile(slide: SlideReader, grid: TileGrid, index: int) -> np.ndarray:
    """uint8 `[tile_px, tile_px, 3]` RGB of tile `index`, read at `grid.read_level` and resized.

    Resizing is Pillow BILINEAR, which Pillow antialiases when shrinking (its kernel widens with the
    scale), on the exact level-pixel extent of the tile; when `read_size == tile_px` the read is used
    as is (scale error under one pixel). The part of an edge tile outside the slide is `grid.pad_rgb`.
    Deterministic; reuses the reader's open handle.
    """
    x, y = grid.coords[index]
    size = grid.read_size
    region = slide.read_region_image(
        (int(x), int(y)), grid.read_level, (size, size), background=grid.pad_rgb
    )
    if size != grid.tile_px:
        extent = min(float(size), grid.tile_size_level0 / slide.level_downsamples[grid.read_level])
        region = region.resize(
            (grid.tile_px, grid.tile_px), Image.Resampling.BILINEAR, box=(0.0, 0.0, extent, extent)
        )
    return np.array(region)
