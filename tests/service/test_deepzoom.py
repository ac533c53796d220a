"""Deep Zoom generators: descriptor, tiles, 404s, the bounded cache, broken slides."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsi_mil.errors import SlideOpenError, TileNotFoundError
from wsi_mil.service.deepzoom import DeepZoomCache, open_deepzoom


def test_tiles_of_a_real_slide(slides_dir: Path) -> None:
    zoom = open_deepzoom(slides_dir / "tissue" / "CMU-1-Small-Region.svs")
    assert 'Width="2220"' in zoom.dzi_xml() and zoom.bounds == (0, 0, 2220, 2967)
    top = zoom.generator.level_count - 1
    tile = Image.open(io.BytesIO(zoom.tile_jpeg(top, (0, 0))))
    assert tile.format == "JPEG" and tile.size == (255, 255)
    cols, _ = zoom.generator.level_tiles[top]
    with pytest.raises(TileNotFoundError):
        zoom.tile_jpeg(top, (cols, 0))
    with pytest.raises(TileNotFoundError):
        zoom.tile_jpeg(top + 1, (0, 0))


def test_broken_slides_raise_slide_open_error(slides_dir: Path) -> None:
    for name in ("broken.svs", "unopenable.tiff", "kidney-48-5.tif"):
        with pytest.raises(SlideOpenError):
            open_deepzoom(slides_dir / "broken" / name)
    unreadable = open_deepzoom(slides_dir / "broken" / "unreadable.svs")
    with pytest.raises(SlideOpenError, match="Deep Zoom tile"):
        unreadable.tile_jpeg(unreadable.generator.level_count - 1, (0, 0))


def test_cache_is_bounded_and_reuses_generators(slides_dir: Path) -> None:
    cache = DeepZoomCache(capacity=2)
    paths = [
        slides_dir / "tiny" / "small.svs",
        slides_dir / "tiny" / "boxes.tiff",
        slides_dir / "tissue" / "CMU-1-Small-Region.svs",
    ]
    first = cache.get(paths[0])
    assert cache.get(paths[0]) is first
    cache.get(paths[1])
    cache.get(paths[2])
    assert len(cache) == 2
    assert cache.get(paths[0]) is not first  # evicted, reopened
    cache.forget(paths[0])
    assert len(cache) == 1


def test_dicom_tiles_come_through_the_colour_corrected_reader(slides_dir: Path) -> None:
    """The DICOM series of CMU-1-Small-Region labels YCbCr frames RGB; its Deep Zoom tiles must
    show the SVS's colours (the reader's correction), not OpenSlide's salmon glass and teal tissue."""
    svs = open_deepzoom(slides_dir / "tissue" / "CMU-1-Small-Region.svs")
    dicom = open_deepzoom(slides_dir / "tissue" / "dicom-cmu-1-small-region" / "level-0-frames-0-30.dcm")
    assert dicom.dzi_xml() == svs.dzi_xml() and dicom.bounds == svs.bounds
    top = svs.generator.level_count - 1
    for address in ((2, 3), (0, 0), (8, 11)):  # tissue, glass, the padded bottom-right corner
        wanted = np.asarray(Image.open(io.BytesIO(svs.tile_jpeg(top, address))), dtype=float)
        got = np.asarray(Image.open(io.BytesIO(dicom.tile_jpeg(top, address))), dtype=float)
        assert got.shape == wanted.shape
        assert np.abs(got - wanted).mean() < 10, address
        np.testing.assert_allclose(got.mean(axis=(0, 1)), wanted.mean(axis=(0, 1)), atol=4)
