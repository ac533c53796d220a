"""Quality-control outputs: a thumbnail with tissue contours and kept tiles, and atomic file writes.

Atomic writes go to a hidden temporary file in the destination folder and are moved into place with
`os.replace`, so a crash never leaves a truncated PNG or JSON behind.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image, ImageDraw

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


@contextmanager
def _atomic_target(path: str | Path, mode: str) -> Iterator[IO[Any]]:
    """A temporary file beside `path`, renamed onto it when the block succeeds, removed otherwise."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temp_name = target.parent / f".{target.name}.{uuid.uuid4().hex}.tmp"
    # Created like any new file (0o666 minus the umask), unlike mkstemp's 0o600.
    descriptor = os.open(temp_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(descriptor, mode) as stream:
            yield stream
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temp_name, target)
    except BaseException:
        temp_name.unlink(missing_ok=True)
        raise


def save_png_atomic(image: Image.Image, path: str | Path) -> None:
    """Write `image` as PNG to `path` atomically."""
    with _atomic_target(path, "wb") as stream:
        image.save(stream, format="PNG")


def _json_default(value: Any) -> Any:
    """Encode numpy scalars/arrays and paths, which `json` does not know."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"object of type {type(value).__name__} is not JSON serializable")


def save_json_atomic(obj: Any, path: str | Path) -> None:
    """Write `obj` as strict JSON (no NaN/Infinity; numpy values and paths allowed) to `path` atomically."""
    with _atomic_target(path, "w") as stream:
        json.dump(obj, stream, indent=2, allow_nan=False, default=_json_default)
        stream.write("\n")
