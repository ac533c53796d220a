"""Deep Zoom tiles of a job's slide for OpenSeadragon, from openslide's `DeepZoomGenerator`.

The generator reads through the project's `SlideReader` (not OpenSlide directly), so the viewer
shows the colours the features were computed from (e.g. DICOM frames mislabelled RGB are
corrected). Generators are cached per slide file in a bounded LRU, so a viewer's hundreds of tile
requests reuse one open slide. Tile geometry follows openslide's DeepZoom server: 254 px tiles
with a 1 px overlap (256 px per request), `limit_bounds=True`; `bounds` says which level-0 region
the Deep Zoom image covers so overlays in level-0 pixels can be placed on it.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import openslide
from openslide.deepzoom import DeepZoomGenerator
from PIL import Image

from wsi_mil.errors import SlideOpenError, TileNotFoundError
from wsi_mil.preprocessing.slide import SlideReader

TILE_SIZE = 254
OVERLAP = 1
JPEG_QUALITY = 80


@dataclass(frozen=True)
class SlideDeepZoom:
    """One slide's Deep Zoom pyramid; `bounds` `(x, y, w, h)` is the level-0 region it shows."""

    generator: DeepZoomGenerator
    bounds: tuple[int, int, int, int]

    def dzi_xml(self) -> str:
        """The `.dzi` descriptor OpenSeadragon reads (JPEG tiles)."""
        return self.generator.get_dzi("jpeg")

    def tile_jpeg(self, level: int, address: tuple[int, int]) -> bytes:
        """JPEG bytes of the tile at `address` = (col, row); `TileNotFoundError` outside the pyramid."""
        col, row = address
        if not 0 <= level < self.generator.level_count:
            raise TileNotFoundError(f"level {level} is outside 0..{self.generator.level_count - 1}")
        cols, rows = self.generator.level_tiles[level]
        if not (0 <= col < cols and 0 <= row < rows):
            raise TileNotFoundError(
                f"tile ({col}, {row}) is outside level {level}'s {cols}x{rows} tiles"
            )
        try:
            tile = self.generator.get_tile(level, address)
        except SlideOpenError as err:
            raise SlideOpenError(
                f"reading Deep Zoom tile {level}/{col}_{row} failed: {err}"
            ) from err
        buffer = io.BytesIO()
        tile.convert("RGB").save(buffer, format="JPEG", quality=JPEG_QUALITY)
        return buffer.getvalue()


def slide_bounds(
    properties: Mapping[str, str], dimensions: tuple[int, int]
) -> tuple[int, int, int, int]:
    """The level-0 region `(x, y, w, h)` a `limit_bounds` Deep Zoom image shows (whole slide if unset)."""
    width, height = dimensions
    x = int(properties.get(openslide.PROPERTY_NAME_BOUNDS_X, 0))
    y = int(properties.get(openslide.PROPERTY_NAME_BOUNDS_Y, 0))
    w = int(properties.get(openslide.PROPERTY_NAME_BOUNDS_WIDTH, width))
    h = int(properties.get(openslide.PROPERTY_NAME_BOUNDS_HEIGHT, height))
    return x, y, w, h


class _ReaderAsOpenSlide:
    """The part of OpenSlide's interface `DeepZoomGenerator` uses, answered by a `SlideReader`."""

    def __init__(self, reader: SlideReader) -> None:
        self._reader = reader

    @property
    def properties(self) -> Mapping[str, str]:
        return self._reader.properties

    @property
    def dimensions(self) -> tuple[int, int]:
        return self._reader.dimensions

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return self._reader.level_dimensions

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return self._reader.level_downsamples

    def get_best_level_for_downsample(self, downsample: float) -> int:
        return self._reader.best_level_for_downsample(downsample)

    def read_region(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> Image.Image:
        return self._reader.read_region_rgba(location, level, size)


def open_deepzoom(path: str | Path) -> SlideDeepZoom:
    """Open `path` with the slide reader and wrap it in a Deep Zoom generator; raises `SlideOpenError`
    (a slide whose pixels do not decode opens, and its tiles raise)."""
    reader = SlideReader(path)
    try:
        generator = DeepZoomGenerator(
            _ReaderAsOpenSlide(reader), tile_size=TILE_SIZE, overlap=OVERLAP, limit_bounds=True
        )
    except (openslide.OpenSlideError, OSError, ValueError) as err:
        raise SlideOpenError(f"{Path(path).name}: cannot open for Deep Zoom: {err}") from err
    return SlideDeepZoom(generator, slide_bounds(reader.properties, reader.dimensions))


class DeepZoomCache:
    """At most `capacity` open Deep Zoom generators, least recently used evicted; thread-safe.

    An evicted generator is not closed explicitly (a request may still be reading from it); its
    OpenSlide handle closes when the last reference goes.
    """

    def __init__(self, capacity: int = 8) -> None:
        self.capacity = capacity
        self._items: OrderedDict[Path, SlideDeepZoom] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, path: str | Path) -> SlideDeepZoom:
        """The slide's Deep Zoom generator, opened on first use (raises `SlideOpenError`)."""
        key = Path(path).resolve()
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
                return item
        item = open_deepzoom(key)
        with self._lock:
            self._items[key] = item
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return item

    def forget(self, path: str | Path) -> None:
        """Drop a slide's generator (its file is about to be deleted)."""
        with self._lock:
            self._items.pop(Path(path).resolve(), None)

    def clear(self) -> None:
        """Drop every cached generator."""
        with self._lock:
            self._items.clear()
