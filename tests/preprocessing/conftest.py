"""Synthetic pyramidal TIFF slides with tissue at known places, written once per session with tifffile."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tifffile

SYNTHETIC_MPP = 0.25
SYNTHETIC_SIZE = (4096, 3072)  # level-0 (width, height)
SYNTHETIC_DOWNSAMPLES = (1, 2, 4, 8)


@dataclass(frozen=True)
class SyntheticSlide:
    """Where things are on the synthetic slide, in level-0 px; boxes are (x0, y0, x1, y1)."""

    path: Path
    mpp: float
    dimensions: tuple[int, int]
    tissue_box: tuple[int, int, int, int]
    hole_box: tuple[int, int, int, int]
    disk_center: tuple[int, int]
    disk_radius: int
    speck_box: tuple[int, int, int, int]

    def tissue_area(self) -> float:
        """Level-0 px² of tissue that segmentation should keep (rectangle minus hole, plus disk)."""
        (x0, y0, x1, y1), (hx0, hy0, hx1, hy1) = self.tissue_box, self.hole_box
        return (x1 - x0) * (y1 - y0) - (hx1 - hx0) * (hy1 - hy0) + np.pi * self.disk_radius**2


def _tissue_color(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """H&E-like pink whose red grows with x and blue with y, so misplaced reads show."""
    red = 140 + 100 * x / SYNTHETIC_SIZE[0]
    blue = 110 + 100 * y / SYNTHETIC_SIZE[1]
    green = np.full_like(red, 70)
    return np.stack(np.broadcast_arrays(red, green, blue), axis=-1).astype(np.uint8)


def _paint(slide: SyntheticSlide) -> np.ndarray:
    width, height = slide.dimensions
    image = np.full((height, width, 3), 245, dtype=np.uint8)
    x0, y0, x1, y1 = slide.tissue_box
    ys, xs = np.mgrid[y0:y1, x0:x1]
    image[y0:y1, x0:x1] = _tissue_color(xs, ys)
    hx0, hy0, hx1, hy1 = slide.hole_box
    image[hy0:hy1, hx0:hx1] = 245
    cx, cy = slide.disk_center
    ys, xs = np.ogrid[:height, :width]
    image[(xs - cx) ** 2 + (ys - cy) ** 2 < slide.disk_radius**2] = (150, 60, 170)
    sx0, sy0, sx1, sy1 = slide.speck_box
    image[sy0:sy1, sx0:sx1] = (150, 60, 170)
    return image


def write_pyramid_tiff(
    path: Path,
    image: np.ndarray,
    *,
    downsamples: tuple[int, ...],
    mpp: float | None,
    description: str | None = None,
) -> Path:
    """A tiled JPEG pyramid (one TIFF page per level) with the mpp in the resolution tags."""
    resolution = {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}
    with tifffile.TiffWriter(path) as tif:
        for index, downsample in enumerate(downsamples):
            level = image[::downsample, ::downsample]
            tif.write(
                np.ascontiguousarray(level),
                tile=(256, 256),
                compression="jpeg",
                photometric="rgb",
                subfiletype=0 if index == 0 else 1,
                description=description if index == 0 else None,
                metadata=None,
                **(resolution if mpp is not None else {}),
            )
    return path


@pytest.fixture(scope="session")
def synthetic_slide(tmp_path_factory: pytest.TempPathFactory) -> SyntheticSlide:
    """A 4096x3072 generic TIFF at 0.25 µm/px, levels 1/2/4/8, tissue rectangle with a hole + disk."""
    slide = SyntheticSlide(
        path=tmp_path_factory.mktemp("synthetic") / "synthetic.tiff",
        mpp=SYNTHETIC_MPP,
        dimensions=SYNTHETIC_SIZE,
        tissue_box=(1024, 512, 3072, 2048),
        hole_box=(2112, 1088, 2496, 1472),
        disk_center=(3500, 2600),
        disk_radius=300,
        speck_box=(200, 2600, 240, 2640),
    )
    write_pyramid_tiff(
        slide.path, _paint(slide), downsamples=SYNTHETIC_DOWNSAMPLES, mpp=SYNTHETIC_MPP
    )
    return slide


@pytest.fixture(scope="session")
def blank_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2048x2048 all-background generic TIFF at 0.5 µm/px with mild noise."""
    noise = np.random.default_rng(0).normal(0, 2, size=(2048, 2048, 3))
    image = np.clip(240 + noise, 0, 255).astype(np.uint8)
    path = tmp_path_factory.mktemp("blank") / "blank.tiff"
    return write_pyramid_tiff(path, image, downsamples=(1, 4), mpp=0.5)


@pytest.fixture(scope="session")
def aperio_without_mpp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An Aperio-described TIFF with no `MPP =` field but 0.25 µm/px in its resolution tags."""
    image = np.full((512, 512, 3), 230, dtype=np.uint8)
    path = tmp_path_factory.mktemp("aperio") / "no-mpp.svs"
    description = "Aperio Image Library v12.0.0\r\n512x512 (256x256) JPEG/RGB Q=70|AppMag = 20"
    return write_pyramid_tiff(path, image, downsamples=(1,), mpp=0.25, description=description)


TCGA = "tissue/tcga-cr-7395-01a-01-ts1.svs"


@pytest.fixture(scope="session")
def inked_slides(slides_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Real TCGA tissue on glass (4 x 2.6 mm at 1 µm/px): clean, with green/blue/red/black marker
    strokes 200-300 µm wide around the tissue, and with the same colours over it; truth included."""
    from wsi_mil.demo.scanner import build_inked_slide

    folder = tmp_path_factory.mktemp("inked")
    return {
        layout: build_inked_slide(folder / f"{layout}.tiff", slides_dir / TCGA, ink=layout)
        for layout in ("none", "around", "over")
    }


@pytest.fixture(scope="session")
def cmu_inked_slides(slides_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The CMU slide's paler, looser skin (its 0.5-µm pixels taken as 1 µm) clean and with the same
    strokes over it as `inked_slides["over"]`; JPEG noise makes its dark crossings rough."""
    from wsi_mil.demo.scanner import build_inked_slide

    folder = tmp_path_factory.mktemp("cmu-inked")
    source = slides_dir / "tissue" / "CMU-1-Small-Region.svs"
    return {
        layout: build_inked_slide(folder / f"{layout}.tiff", source, ink=layout, source_level=0)
        for layout in ("none", "over")
    }


@pytest.fixture(scope="session")
def hard_inked_slides(slides_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The same TCGA composites with strokes that break naive fixes -- two colours crossing over glass
    and over tissue, strokes along the tissue's rim, faint strokes, black strokes over nuclei-rich
    tissue -- each paired with its clean slide (key `(layout, "none")`)."""
    from wsi_mil.demo.scanner import build_inked_slide

    folder = tmp_path_factory.mktemp("hard-inked")
    slides = {}
    for layout, pieces in (("crossing", "middle"), ("border", "middle"), ("faint", "middle"), ("black-over", "nuclei-rich")):
        for ink in (layout, "none"):
            if (pieces, ink) not in slides:
                slides[pieces, ink] = build_inked_slide(
                    folder / f"{pieces}-{ink}.tiff", slides_dir / TCGA, ink=ink, pieces=pieces
                )
        slides[layout] = slides[pieces, layout]
        slides[layout, "none"] = slides[pieces, "none"]
    return slides


@pytest.fixture(scope="session")
def edge_slide(slides_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """Real TCGA tissue running off the right and bottom edges of a 3300 x 2900 px, 0.25 µm/px slide."""
    from wsi_mil.demo.scanner import build_edge_slide

    return build_edge_slide(tmp_path_factory.mktemp("edge") / "edge.tiff", slides_dir / TCGA)
