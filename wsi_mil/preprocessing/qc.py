"""Quality-control outputs: a thumbnail with tissue contours and kept tiles, written atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from wsi_mil.atomic import atomic_open, write_json_atomic
from wsi_mil.preprocessing.slide import SlideReader
from wsi_mil.preprocessing.tiling import TileGrid
from wsi_mil.preprocessing.tissue import TISSUE_COLOR, TissueMask, tissue_contours

TILE_OUTLINE_COLOR = (30, 90, 255)
HOLE_COLOR = (255, 140, 0)


def render_qc_thumbnail(
    slide: SlideReader,
    mask: TissueMask,
    grid: TileGrid | None,
    *,
    max_size: int = 1024,
) -> Image.Image:
    """RGB thumbnail (longest side `max_size`) for checking by eye: tissue outlines green, holes
    orange, kept tiles outlined blue."""
    thumbnail = slide.get_thumbnail((max_size, max_size))
    scale = thumbnail.width / slide.dimensions[0]
    draw = ImageDraw.Draw(thumbnail)
    line_width = max(1, round(max_size / 512))
    if grid is not None and len(grid):
        side = grid.tile_size_level0 * scale
        for x, y in grid.coords.astype(np.float64) * scale:
            draw.rectangle((x, y, x + side, y + side), outline=TILE_OUTLINE_COLOR, width=1)
    for polygon in tissue_contours(mask):
        rings = [(polygon["exterior"], TISSUE_COLOR)] + [(h, HOLE_COLOR) for h in polygon["holes"]]
        for ring, color in rings:
            points = [(x * scale, y * scale) for x, y in ring]
            draw.line(points, fill=color, width=line_width, joint="curve")
    return thumbnail


def save_png_atomic(image: Image.Image, path: str | Path) -> None:
    """Write `image` as PNG to `path` atomically."""
    with atomic_open(path, "wb") as stream:
        image.save(stream, format="PNG")


def save_json_atomic(obj: Any, path: str | Path) -> None:
    """Write `obj` as strict JSON (no NaN/Infinity; numpy values and paths allowed) to `path` atomically."""
    write_json_atomic(obj, path)
