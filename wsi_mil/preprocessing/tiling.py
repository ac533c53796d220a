"""Tiling at a physical resolution: a regular level-0 grid filtered by tissue fraction, and tile reads.

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

    @pydantic.model_validator(mode="after")
    def _overlap_below_tile(self) -> TilingParams:
        if self.overlap_px >= self.tile_px:
            raise ValueError(
                f"overlap_px ({self.overlap_px}) must be below tile_px ({self.tile_px})"
            )
        return self


@dataclass(eq=False)  # arrays inside: compare by identity
class TileGrid:
    """Kept tiles of one slide: level-0 top-left `coords [N, 2]` (x, y) in raster order, plus how to read them."""

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

    def __len__(self) -> int:
        return int(self.coords.shape[0])


def tile_grid(slide: SlideReader, mask: TissueMask, params: TilingParams) -> TileGrid:
    """The regular grid of tiles lying fully inside the slide whose tissue fraction meets the threshold.

    The grid starts at level-0 (0, 0) with step `round((tile_px - overlap_px) * target_mpp / slide_mpp)`.
    No tile kept gives an empty grid (the caller reports `no_tissue`). Raises `TilingError` when a
    tile would be smaller than one level-0 pixel and `MissingMppError` when the slide has no mpp.
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
    xs = np.arange(0, width0 - tile_size_level0 + 1, step_level0, dtype=np.int64)
    ys = np.arange(0, height0 - tile_size_level0 + 1, step_level0, dtype=np.int64)
    grid_y, grid_x = np.meshgrid(ys, xs, indexing="ij")
    candidates = np.column_stack((grid_x.ravel(), grid_y.ravel()))
    fractions = mask.fractions_in(candidates, tile_size_level0).astype(np.float32)
    keep = fractions >= params.min_tissue_fraction
    return TileGrid(
        coords=np.ascontiguousarray(candidates[keep]),
        tile_size_level0=tile_size_level0,
        step_level0=step_level0,
        read_level=read_level,
        read_size=read_size,
        tile_px=params.tile_px,
        target_mpp=params.target_mpp,
        slide_mpp=slide_mpp,
        overlap_px=params.overlap_px,
        tissue_fractions=fractions[keep],
    )


def read_tile(slide: SlideReader, grid: TileGrid, index: int) -> np.ndarray:
    """uint8 `[tile_px, tile_px, 3]` RGB of tile `index`, read at `grid.read_level` and resized.

    Resizing is Pillow BILINEAR, which Pillow antialiases when shrinking (its kernel widens with the
    scale), on the exact level-pixel extent of the tile; when `read_size == tile_px` the read is used
    as is (scale error under one pixel). Deterministic; reuses the reader's open handle.
    """
    x, y = grid.coords[index]
    size = grid.read_size
    region = slide.read_region_image((int(x), int(y)), grid.read_level, (size, size))
    if size != grid.tile_px:
        extent = min(float(size), grid.tile_size_level0 / slide.level_downsamples[grid.read_level])
        region = region.resize(
            (grid.tile_px, grid.tile_px), Image.Resampling.BILINEAR, box=(0.0, 0.0, extent, extent)
        )
    return np.array(region)
