"""Quality-control outputs: a thumbnail with tissue contours, kept tiles and warnings, written
atomically, and the background-colour check behind one of those warnings."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from wsi_mil.atomic import atomic_open, write_json_atomic
from wsi_mil.preprocessing.slide import SlideReader
from wsi_mil.preprocessing.tiling import TileGrid
from wsi_mil.preprocessing.tissue import (
    INK_COLOR,
    TISSUE_COLOR,
    TissueMask,
    is_glass_color,
    tissue_contours,
)

TILE_OUTLINE_COLOR = (30, 90, 255)
HOLE_COLOR = (255, 140, 0)
WARNING_COLOR = (200, 0, 0)
# Under fluorescence the background is dark.
FLUORESCENCE_MAX_CHANNEL = 80


def background_warning(mask: TissueMask) -> str | None:
    """A warning when the slide's background colour is far from what glass looks like in its mode.

    Catches colours decoded in the wrong colour space (a DICOM whose header mislabels its frames) and
    fluorescence slides run in brightfield mode (or the reverse).
    """
    rgb = mask.background_rgb
    if rgb is None:
        return None
    if mask.params.mode == "fluorescence":
        if max(rgb) <= FLUORESCENCE_MAX_CHANNEL:
            return None
        return (
            f"background colour {rgb} is not dark as a fluorescence background is; "
            "is this a brightfield slide? (--tissue-mode brightfield)"
        )
    if is_glass_color(rgb):
        return None
    if max(rgb) <= FLUORESCENCE_MAX_CHANNEL:
        hint = "a dark background: is this a fluorescence slide? (--tissue-mode fluorescence)"
    else:
        hint = "colours may be decoded in the wrong colour space or the scan is badly white-balanced"
    return f"background colour {rgb} is far from the expected glass colour (bright, near-neutral); {hint}"


def render_qc_thumbnail(
    slide: SlideReader,
    mask: TissueMask,
    grid: TileGrid | None,
    *,
    max_size: int = 1024,
    warnings: Sequence[str] = (),
) -> Image.Image:
    """RGB thumbnail (longest side `max_size`) for checking by eye: tissue outlines green, holes
    orange, marker ink outlined and hatched magenta, kept tiles outlined blue, and each warning
    written in red across the top."""
    thumbnail = slide.get_thumbnail((max_size, max_size))
    scale = thumbnail.width / slide.dimensions[0]
    draw = ImageDraw.Draw(thumbnail)
    line_width = max(1, round(max_size / 512))
    if grid is not None and len(grid):
        side = grid.tile_size_level0 * scale
        for x, y in grid.coords.astype(np.float64) * scale:
            draw.rectangle((x, y, x + side, y + side), outline=TILE_OUTLINE_COLOR, width=1)
    if mask.ink is not None and mask.ink.any():
        _shade_ink(thumbnail, mask)
    for layer, color in (("tissue", TISSUE_COLOR), ("ink", INK_COLOR)):
        for polygon in tissue_contours(mask, layer=layer):
            rings = [(polygon["exterior"], color)] + [(h, HOLE_COLOR) for h in polygon["holes"]]
            for ring, ring_color in rings:
                points = [(x * scale, y * scale) for x, y in ring]
                draw.line(points, fill=ring_color, width=line_width, joint="curve")
    _draw_warnings(draw, warnings, width=thumbnail.width, size=max(10, round(max_size / 64)))
    return thumbnail


def _shade_ink(thumbnail: Image.Image, mask: TissueMask) -> None:
    """Hatch the marker ink in `INK_COLOR` (every other diagonal line), in place."""
    ink = Image.fromarray(mask.ink).resize(thumbnail.size, Image.Resampling.NEAREST)
    width, height = thumbnail.size
    diagonal = (np.add.outer(np.arange(height), np.arange(width)) // 3) % 4 == 0
    hatch = np.asarray(ink) & diagonal
    pixels = np.asarray(thumbnail).copy()
    pixels[hatch] = INK_COLOR
    thumbnail.paste(Image.fromarray(pixels))


def _draw_warnings(draw: ImageDraw.ImageDraw, warnings: Sequence[str], *, width: int, size: int) -> None:
    """Write each warning on a white band across the top, wrapped to the image width."""
    font = ImageFont.load_default(size=size)
    chars_per_line = max(20, int(width / (0.55 * size)))
    lines = [line for warning in warnings for line in textwrap.wrap(f"warning: {warning}", chars_per_line)]
    for row, line in enumerate(lines):
        top = row * (size + 4)
        draw.rectangle((0, top, width, top + size + 4), fill=(255, 255, 255))
        draw.text((4, top + 2), line, fill=WARNING_COLOR, font=font)


def save_png_atomic(image: Image.Image, path: str | Path) -> None:
    """Write `image` as PNG to `path` atomically."""
    with atomic_open(path, "wb") as stream:
        image.save(stream, format="PNG")


def save_json_atomic(obj: Any, path: str | Path) -> None:
    """Write `obj` as strict JSON (no NaN/Infinity; numpy values and paths allowed) to `path` atomically."""
    write_json_atomic(obj, path)
