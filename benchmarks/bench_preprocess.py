"""Preprocessing benchmark: tissue + tiling time, end-to-end tiles/s against the encoder's
forward-only ceiling and against a naive CLAM-like per-tile fp32 loop, and peak RSS on a
100k-tile slide. Everything is measured in one run, so the ratios compare like with like.

    uv run --locked python benchmarks/bench_preprocess.py [--quick] [--out results.json]

Slides: the real `CMU-1-Small-Region.svs` from ../shared, and a 20,000 × 20,000 px pyramidal TIFF
assembled from real tissue crops of it (cached under benchmarks/.cache). Encoder: resnet50-trunc
with random weights (weights change values, not speed).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch
from PIL import Image

from wsi_mil.demo.synthetic import blob_mask, write_pyramidal_tiff
from wsi_mil.preprocessing.encoders import load_encoder
from wsi_mil.preprocessing.extract import measure_forward_throughput
from wsi_mil.preprocessing.pipeline import PreprocessConfig, preprocess_slide
from wsi_mil.preprocessing.slide import open_slide
from wsi_mil.preprocessing.tiling import TilingParams, tile_grid
from wsi_mil.preprocessing.tissue import TissueParams, segment_tissue

ROOT = Path(__file__).resolve().parents[1]
SHARED_SLIDES = Path(os.environ.get("WSI_MIL_SHARED", ROOT.parent / "shared")) / "data" / "slides"
CACHE = ROOT / "benchmarks" / ".cache"


def build_large_slide(source: Path, path: Path, *, size: int = 20000, seed: int = 0) -> Path:
    """A `size`² pyramidal TIFF (0.5 µm/px) whose tissue is made of real crops of `source`."""
    if path.exists():
        return path
    rng = np.random.default_rng(seed)
    with open_slide(source) as slide:
        w, h = slide.dimensions
        full = slide.read_region((0, 0), 0, (w, h))
    crop = 512
    crops = []
    for y in range(0, h - crop, crop // 2):
        for x in range(0, w - crop, crop // 2):
            c = full[y : y + crop, x : x + crop]
            if (c.mean(axis=2) < 200).mean() > 0.6:  # mostly tissue
                crops.append(c)
    canvas = np.full((size, size, 3), 242, dtype=np.uint8)
    cells = size // crop
    tissue = blob_mask((cells, cells), rng, coverage=0.55) if cells >= 64 else np.ones((cells, cells), bool)
    for cy, cx in zip(*np.nonzero(tissue), strict=True):
        c = crops[rng.integers(len(crops))]
        c = np.rot90(c, rng.integers(4))
        canvas[cy * crop : (cy + 1) * crop, cx * crop : (cx + 1) * crop] = c
    path.parent.mkdir(parents=True, exist_ok=True)
    write_pyramidal_tiff(path, canvas, mpp=0.5)
    return path


def naive_clam_like_rate(slide_path: Path, config: PreprocessConfig, *, max_tiles: int) -> float:
    """Tiles/s of the baseline: per-tile read + PIL resize + per-tile tensor conversion, fp32 model,
    no workers, no channels_last, no autocast — the loop CLAM's extractor runs."""
    encoder = load_encoder(config.encoder, weights="random", device="cpu")
    cfg = encoder.cfg
    mean = torch.tensor(cfg.mean).view(3, 1, 1)
    std = torch.tensor(cfg.std).view(3, 1, 1)
    with open_slide(slide_path) as slide:
        grid = tile_grid(slide, segment_tissue(slide, config.tissue), config.tiling)
        n = min(max_tiles, len(grid))
        start = time.perf_counter()
        batch: list[torch.Tensor] = []
        with torch.no_grad():
            for i in range(n):
                x, y = (int(v) for v in grid.coords[i])
                region = slide.read_region((x, y), grid.read_level, (grid.read_size, grid.read_size))
                img = Image.fromarray(region).resize((cfg.img_size, cfg.img_size), Image.BILINEAR)
                t = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float().div(255)
                batch.append((t - mean) / std)
                if len(batch) == 32 or i == n - 1:
                    encoder.model(torch.stack(batch))
                    batch = []
        return n / (time.perf_counter() - start)


def bench_slide(name: str, slide_path: Path, config: PreprocessConfig, *, baseline_tiles: int) -> dict[str, float]:
    with open_slide(slide_path) as slide:
        t0 = time.perf_counter()
        mask = segment_tissue(slide, config.tissue)
        grid = tile_grid(slide, mask, config.tiling)
        tissue_tiling_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        result = preprocess_slide(slide_path, tmp, config)
        wall = time.perf_counter() - t0
    assert result.status == "done", result.reason
    encoder = load_encoder(config.encoder, weights="random", device="cpu")
    forward_rate = measure_forward_throughput(encoder, batch_size=config.batch_size, n_batches=4, precision="bf16")
    end_to_end = result.tiles / result.timings["features_s"]
    baseline = naive_clam_like_rate(slide_path, config, max_tiles=baseline_tiles)
    row = {
        "slide": name,
        "tiles": result.tiles,
        "tissue_and_tiling_s": round(tissue_tiling_s, 2),
        "end_to_end_tiles_per_s": round(end_to_end, 1),
        "whole_slide_wall_s": round(wall, 1),
        "forward_only_tiles_per_s": round(forward_rate, 1),
        "ratio_vs_forward_only": round(end_to_end / forward_rate, 2),
        "naive_fp32_tiles_per_s": round(baseline, 1),
        "speedup_vs_naive": round(end_to_end / baseline, 2),
        "grid_tiles": len(grid),
    }
    print(json.dumps(row), flush=True)
    return row


def peak_rss_100k(slide_path: Path) -> dict[str, float]:
    """Peak RSS (process tree, sampled) while a ~100k-tile slide is processed with the tiny encoder."""
    code = (
        "import sys; from wsi_mil.preprocessing.pipeline import *; from wsi_mil.preprocessing.tiling import TilingParams;"
        "from wsi_mil.preprocessing.tissue import TissueParams;"
        "c=PreprocessConfig(encoder='test-encoder', weights='random', num_workers=2, batch_size=256,"
        "tissue=TissueParams(mode='whole'), tiling=TilingParams(target_mpp=0.5, tile_px=62, min_tissue_fraction=0.0));"
        "r=preprocess_slide(sys.argv[1], sys.argv[2], c); print(r.status, r.tiles, r.seconds, r.reason)"
    )
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.Popen([sys.executable, "-c", code, str(slide_path), tmp], stdout=subprocess.PIPE, text=True)
        peak = 0
        ps = psutil.Process(proc.pid)

        def sample() -> None:
            nonlocal peak
            while proc.poll() is None:
                try:
                    tree = [ps, *ps.children(recursive=True)]
                    peak = max(peak, sum(p.memory_info().rss for p in tree))
                except psutil.Error:
                    pass
                time.sleep(0.05)

        sampler = threading.Thread(target=sample)
        sampler.start()
        out, _ = proc.communicate()
        sampler.join()
    status, tiles, seconds, *_ = out.split()
    return {"tiles": int(tiles), "status": status, "seconds": float(seconds), "peak_rss_gb": round(peak / 2**30, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="real slide only, fewer baseline tiles, no 100k run")
    parser.add_argument("--large-size", type=int, default=20000, help="side of the large slide in px")
    parser.add_argument("--skip-rss", action="store_true", help="skip the 100k-tile peak-RSS run")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "preprocess.json")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 2)
    real = SHARED_SLIDES / "tissue" / "CMU-1-Small-Region.svs"
    if not real.exists():
        sys.exit(f"needs the team's test slides at {real}")
    config = PreprocessConfig(encoder="resnet50-trunc", weights="random", num_workers=2, batch_size=64,
                              tiling=TilingParams(target_mpp=0.5, tile_px=256), tissue=TissueParams())
    rows = [bench_slide("CMU-1-Small-Region.svs (real)", real, config, baseline_tiles=64 if args.quick else 96)]
    results: dict[str, object] = {"machine": {"cpus": os.cpu_count(), "torch": torch.__version__}, "slides": rows}
    if not args.quick:
        size = args.large_size
        large = build_large_slide(real, CACHE / f"large_real_tissue_{size}.tiff", size=size)
        rows.append(bench_slide(f"{size} x {size} of real tissue crops", large, config, baseline_tiles=256))
        if not args.skip_rss:
            results["peak_rss_100k_tiles"] = peak_rss_100k(large)
            print(json.dumps(results["peak_rss_100k_tiles"]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
