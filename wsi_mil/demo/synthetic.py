"""Synthetic whole-slide images that OpenSlide opens: pyramidal tiled JPEG TIFFs with an mpp tag.

Each slide shows H&E-like tissue (pink stroma with purple nuclei) on a white background; a
"positive" slide also holds a lesion, a region of dense, large, dark nuclei at a known level-0 box,
so that tests and the demo can check that tiles, attention and heatmaps land on it.
"""

from __future__ import annotations

import csv
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import tifffile
from scipy import ndimage

from wsi_mil.atomic import atomic_open, atomic_path, write_json_atomic

STROMA_RGB = np.array([232, 168, 196], dtype=np.float32)
NUCLEUS_RGB = np.array([118, 62, 150], dtype=np.float32)
LESION_NUCLEUS_RGB = np.array([62, 28, 102], dtype=np.float32)
BACKGROUND_RGB = np.array([243, 243, 241], dtype=np.float32)


@dataclass(frozen=True)
class DemoSlide:
    """One synthetic slide: its file, label, and the lesion's level-0 box `(x, y, w, h)` if positive."""

    slide_id: str
    path: str
    label: str
    lesion_box: tuple[int, int, int, int] | None
    mpp: float
    width: int
    height: int


def blob_mask(shape: tuple[int, int], rng: np.random.Generator, *, coverage: float) -> np.ndarray:
    """Smooth random blobs covering about `coverage` of the area, away from the border."""
    h, w = shape
    coarse = ndimage.gaussian_filter(rng.standard_normal((h // 32 + 1, w // 32 + 1)), sigma=3)
    field = ndimage.zoom(coarse, 32, order=1)[:h, :w]
    yy, xx = np.mgrid[0:h, 0:w]
    border = np.minimum.reduce([yy, xx, h - 1 - yy, w - 1 - xx]) / (0.12 * min(h, w))
    field = field - (1 - np.clip(border, 0, 1)) * 2 * field.std()
    return field > np.quantile(field, 1 - coverage)


def _nuclei(shape: tuple[int, int], rng: np.random.Generator, *, density: float, radius: int) -> np.ndarray:
    """A float map in [0, 1] of round nuclei with centres spread at `density` per pixel."""
    count = int(density * shape[0] * shape[1])
    centres = np.zeros(shape, dtype=np.float32)
    centres[rng.integers(0, shape[0], count), rng.integers(0, shape[1], count)] = 1.0
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    disk = (yy**2 + xx**2 <= radius**2).astype(np.float32)
    return np.clip(ndimage.convolve(centres, disk, mode="constant"), 0, 1)


def render_slide_pixels(
    width: int, height: int, *, seed: int, lesion_box: tuple[int, int, int, int] | None
) -> np.ndarray:
    """Render `[height, width, 3]` uint8 pixels of a synthetic H&E slide (lesion inside `lesion_box`)."""
    rng = np.random.default_rng(seed)
    tissue = blob_mask((height, width), rng, coverage=0.45)
    if lesion_box is not None:
        x, y, w, h = lesion_box
        tissue[y : y + h, x : x + w] = True
    grain = rng.normal(0, 6, (height, width, 1)).astype(np.float32)
    fibres = ndimage.gaussian_filter(rng.standard_normal((height, width)), sigma=(1, 6)).astype(np.float32)
    stroma = STROMA_RGB + grain + 40 * fibres[..., None]
    nuclei = _nuclei((height, width), rng, density=0.0012, radius=3)[..., None]
    img = stroma * (1 - nuclei) + NUCLEUS_RGB * nuclei
    if lesion_box is not None:
        x, y, w, h = lesion_box
        dense = _nuclei((h, w), rng, density=0.006, radius=5)[..., None]
        img[y : y + h, x : x + w] = img[y : y + h, x : x + w] * (1 - dense) + LESION_NUCLEUS_RGB * dense
    background = BACKGROUND_RGB + rng.normal(0, 2, (height, width, 1)).astype(np.float32)
    edge = ndimage.gaussian_filter(tissue.astype(np.float32), sigma=2)[..., None]
    return np.clip(img * edge + background * (1 - edge), 0, 255).astype(np.uint8)


def write_pyramidal_tiff(
    path: str | Path, pixels: np.ndarray, *, mpp: float, tile: int = 256, min_level_size: int = 256, quality: int = 90
) -> None:
    """Write `pixels` as a tiled JPEG TIFF pyramid (halving per level) that OpenSlide opens.

    The resolution tags carry the mpp (pixels per centimetre), which OpenSlide reports as
    `openslide.mpp-x`. Written atomically.
    """
    with atomic_path(path) as temp, tifffile.TiffWriter(temp) as writer:
        level, factor = pixels, 1
        while True:
            px_per_cm = 1e4 / (mpp * factor)
            writer.write(
                level,
                tile=(tile, tile),
                compression="jpeg",
                compressionargs={"level": quality},
                photometric="rgb",
                resolution=(px_per_cm, px_per_cm),
                resolutionunit="CENTIMETER",
                subfiletype=0 if factor == 1 else 1,
                software="wsi-mil demo",
            )
            if min(level.shape[:2]) // 2 < min_level_size:
                break
            level, factor = level[::2, ::2], factor * 2


def write_synthetic_slide(
    path: str | Path,
    *,
    width: int = 3072,
    height: int = 3072,
    mpp: float = 0.5,
    seed: int = 0,
    lesion_box: tuple[int, int, int, int] | None = None,
) -> Path:
    """Render and write one synthetic slide; returns its path."""
    pixels = render_slide_pixels(width, height, seed=seed, lesion_box=lesion_box)
    write_pyramidal_tiff(path, pixels, mpp=mpp)
    return Path(path)


def make_demo_cohort(
    out_dir: str | Path, *, num_slides: int = 6, size: int = 3072, mpp: float = 0.5, seed: int = 0
) -> list[DemoSlide]:
    """Write a balanced cohort of synthetic slides plus `labels.csv` and `cohort.json` into `out_dir`.

    Half the slides are "tumor" with a lesion at a seeded place; the rest are "normal". Existing
    slides with the same name are kept, so calling this twice is cheap.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    slides = []
    for i in range(num_slides):
        positive = i % 2 == 0
        slide_id = f"demo_{i:02d}_{'tumor' if positive else 'normal'}"
        box = None
        if positive:
            side = size // 4
            x, y = (int(v) for v in rng.integers(size // 5, size - size // 5 - side, 2))
            box = (x, y, side, side)
        path = out / f"{slide_id}.tiff"
        if not path.exists():
            write_synthetic_slide(path, width=size, height=size, mpp=mpp, seed=seed * 1000 + i, lesion_box=box)
        slides.append(DemoSlide(slide_id, str(path), "tumor" if positive else "normal", box, mpp, size, size))
    with atomic_open(out / "labels.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["slide_id", "label", "case_id"])
        writer.writerows([s.slide_id, s.label, f"case_{s.slide_id}"] for s in slides)
    write_json_atomic([asdict(s) for s in slides], out / "cohort.json")
    return slides
