"""Preprocessing on slides as they come from the scanner: marker ink, tissue at the slide's edges and
the mislabelled-colour DICOM, measured against known truth (issue 10; tables in docs/preprocessing.md).

    uv run --locked python benchmarks/bench_scanner_slides.py [--out results.json]

Composites are built from real tissue of the TCGA and CMU SVSs in ../shared (`wsi_mil.demo.scanner`); the
real CMU SVS and its DICOM conversion come from ../shared as they are. Tissue detection and tiling
run with the default settings (256 px at 0.5 µm/px, tissue fraction >= 0.25); no encoder runs.
Definitions:
- tissue recall (mask): share of the true tissue that the tissue mask covers;
- tissue recall (tiles): share of the true tissue that kept tiles cover;
- recall vs clean: tissue recall (tiles) over that of the same tissue without ink;
- tiles on ink: share of kept tiles whose area is at least 25 % ink (truth);
- tiles on glass ink: kept tiles at least 25 % ink (truth) with under 10 % true tissue (ink over
  bare glass taken for tissue);
- coverage of tissue polygons: share of the area of the slide's own tissue polygons (the GeoJSON
  the pipeline writes) that kept tiles cover.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from skimage import draw

from wsi_mil.demo.scanner import CompositeSlide, build_edge_slide, build_inked_slide
from wsi_mil.preprocessing.qc import background_warning
from wsi_mil.preprocessing.slide import SlideReader, open_slide
from wsi_mil.preprocessing.tiling import (
    TileGrid,
    TilingParams,
    tile_footprint,
    tile_grid,
    tissue_coverage,
)
from wsi_mil.preprocessing.tissue import TissueMask, TissueParams, segment_tissue, tissue_contours

ROOT = Path(__file__).resolve().parents[1]
SHARED_SLIDES = Path(os.environ.get("WSI_MIL_SHARED", ROOT.parent / "shared")) / "data" / "slides"
TCGA = SHARED_SLIDES / "tissue" / "tcga-cr-7395-01a-01-ts1.svs"
CMU = SHARED_SLIDES / "tissue" / "CMU-1-Small-Region.svs"
CMU_DICOM = SHARED_SLIDES / "tissue" / "dicom-cmu-1-small-region" / "level-0-frames-0-30.dcm"
ON_INK = 0.25


def polygon_raster(mask: TissueMask, shape: tuple[int, int], downsample: float) -> np.ndarray:
    """The tissue polygons (as written to the GeoJSON) rasterised at `downsample` level-0 px per pixel."""
    raster = np.zeros(shape, dtype=bool)
    for polygon in tissue_contours(mask):
        for ring, value in [(polygon["exterior"], True)] + [(h, False) for h in polygon["holes"]]:
            points = np.asarray(ring) / downsample - 0.5
            rows, cols = draw.polygon(points[:, 1], points[:, 0], shape)
            raster[rows, cols] = value
    return raster


def mask_on_truth(mask: TissueMask, truth: np.ndarray, downsample: float) -> np.ndarray:
    """The detected mask sampled at the centres of the truth raster's pixels."""
    rows = np.minimum(((np.arange(truth.shape[0]) + 0.5) * downsample / mask.downsample).astype(int), mask.mask.shape[0] - 1)
    cols = np.minimum(((np.arange(truth.shape[1]) + 0.5) * downsample / mask.downsample).astype(int), mask.mask.shape[1] - 1)
    inside_rows = (np.arange(truth.shape[0]) + 0.5) * downsample < mask.mask.shape[0] * mask.downsample
    inside_cols = (np.arange(truth.shape[1]) + 0.5) * downsample < mask.mask.shape[1] * mask.downsample
    sampled = mask.mask[np.ix_(rows, cols)]
    return sampled & inside_rows[:, None] & inside_cols[None, :]


def segment_and_tile(path: Path) -> tuple[SlideReader, TissueMask, TileGrid]:
    slide = open_slide(path)
    mask = segment_tissue(slide, TissueParams())
    return slide, mask, tile_grid(slide, mask, TilingParams())


def composite_row(name: str, composite: CompositeSlide, clean: dict[str, Any] | None) -> dict[str, Any]:
    slide, mask, grid = segment_and_tile(composite.path)
    truth, ds = composite.tissue, composite.truth_downsample
    covered = tile_footprint(grid.coords, grid.tile_size_level0, truth.shape, ds)
    true_ink = composite.ink_fractions(grid.coords, grid.tile_size_level0)
    true_tissue = composite.tissue_fractions(grid.coords, grid.tile_size_level0)
    recall = float(covered[truth].mean())
    row: dict[str, Any] = {
        "slide": name,
        "tiles": len(grid),
        "tiles_vs_clean": None if clean is None else round(len(grid) / clean["tiles"], 3),
        "tissue_recall_mask": round(float(mask_on_truth(mask, truth, ds)[truth].mean()), 3),
        "tissue_recall_tiles": round(recall, 3),
        "recall_vs_clean": None if clean is None else round(recall / clean["tissue_recall_tiles"], 3),
        "tiles_on_ink": round(float((true_ink >= ON_INK).mean()) if len(grid) else 0.0, 3),
        "tiles_on_glass_ink": int(((true_ink >= ON_INK) & (true_tissue < 0.1)).sum()),
        "coverage_of_tissue_polygons": round(float(covered[polygon_raster(mask, truth.shape, ds)].mean()), 3),
    }
    detected = getattr(grid, "ink_fractions", None)
    if detected is not None and composite.ink.any():
        inked = true_ink >= ON_INK
        row["ink_flag_recall"] = round(float((detected[inked] >= ON_INK).mean()), 3) if inked.any() else None
        row["ink_flag_false_positive"] = round(float((detected[~inked] >= ON_INK).mean()), 3) if (~inked).any() else None
    slide.close()
    return row


def real_slide_row(name: str, path: Path) -> dict[str, Any]:
    slide, mask, grid = segment_and_tile(path)
    ds = 4.0
    shape = (int(slide.dimensions[1] // ds), int(slide.dimensions[0] // ds))
    polygons = polygon_raster(mask, shape, ds)
    covered = tile_footprint(grid.coords, grid.tile_size_level0, shape, ds)
    row = {
        "slide": name,
        "tiles": len(grid),
        "coverage_of_tissue_polygons": round(float(covered[polygons].mean()), 3),
        "coverage_of_tissue_mask": round(tissue_coverage(grid, mask), 3),
        "background_rgb": list(mask.background_rgb),
        "qc_warning": background_warning(mask) or "",
    }
    slide.close()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    rows: dict[str, list[dict[str, Any]]] = {"ink": [], "edges": [], "real": []}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        every = ("green", "blue", "red", "black")
        variants = (
            ("clean", "none", (), "middle"),
            ("green, blue, red ink around the tissue", "around", ("green", "blue", "red"), "middle"),
            ("green, blue, red, black ink around the tissue", "around", every, "middle"),
            ("green, blue, red, black ink over the tissue", "over", every, "middle"),
            ("green x red crossing over glass, blue x red over tissue", "crossing", every, "middle"),
            ("green, blue strokes along the tissue's rim", "border", every, "middle"),
            ("faint green ring, faint red and blue strokes across", "faint", every, "middle"),
            ("clean, nuclei-rich pieces", "none", (), "nuclei-rich"),
            ("black strokes over nuclei-rich tissue", "black-over", every, "nuclei-rich"),
        )
        # TCGA: dense, strongly stained tumour (its level 1 taken as 1 µm/px); CMU: paler skin with
        # loose dermis (its 0.5-µm pixels taken as 1 µm, so the pieces hold more of its tissue).
        for source_name, source, level in (("TCGA", TCGA, 1), ("CMU", CMU, 0)):
            clean: dict[str, Any] | None = None
            for index, (name, layout, colors, pieces) in enumerate(variants):
                composite = build_inked_slide(
                    folder / f"ink-{source_name}-{index}.tiff",
                    source,
                    ink=layout,
                    colors=colors,
                    pieces=pieces,
                    source_level=level,
                )
                row = composite_row(f"{source_name}: {name}", composite, None if layout == "none" else clean)
                clean = row if layout == "none" else clean
                rows["ink"].append(row)
        edge = build_edge_slide(folder / "edge.tiff", TCGA)
        rows["edges"].append(composite_row("edge composite (0.25 µm/px)", edge, None))
    rows["real"].append(real_slide_row("CMU-1-Small-Region.svs", CMU))
    rows["real"].append(real_slide_row("CMU-1-Small-Region DICOM series", CMU_DICOM))
    for group, entries in rows.items():
        print(f"\n## {group}")
        keys = list(dict.fromkeys(k for row in entries for k in row))
        print("| " + " | ".join(keys) + " |")
        print("|" + "---|" * len(keys))
        for row in entries:
            print("| " + " | ".join(str(row.get(k, "")) for k in keys) + " |")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
