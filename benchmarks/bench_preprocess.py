"""Preprocessing benchmark, every figure from one run so the ratios compare like with like:

- whole process: `wsi-mil preprocess` started as a user starts it (default allocator, threads,
  workers and `--compile auto`), tiles/s from start to exit, CPU seconds of the process tree (user +
  sys), tiles per CPU-second, peak RSS of the tree, start-up overhead (wall outside the slide), and
  the same with `WSI_MIL_ALLOCATOR=system` (glibc defaults) for the allocator's effect;
- stage: `preprocess_slide` in this process (feature-extraction tiles/s: decoding and the model with
  the planned threads and workers) and, in the same process and allocator, the forward-only rate of
  the same encoder right before and after it (`measure_forward_throughput`: random decoded tiles
  through `embed`), with the CPU per tile of both;
- the naive per-tile fp32 loop CLAM runs (same process and allocator);
- torch.compile: compile seconds, eager against compiled forward-only, and the tile count from
  which compiling pays off;
- optionally (`--rss`) peak RSS while a ~100k-tile slide streams through (tiny encoder).

    make bench-preprocess            # = uv run --locked python benchmarks/bench_preprocess.py
    uv run --locked python benchmarks/bench_preprocess.py [--quick] [--large-size 10000] [--rss]

Slides: the real `CMU-1-Small-Region.svs` from ../shared, and a pyramidal TIFF of `--large-size`²
px at 0.5 µm/px assembled from real tissue crops of it (cached under benchmarks/.cache; 10,000² px
gives ~1,300 tissue tiles, the slide size of issue 11's table). Encoder: resnet50-trunc with random
weights (weights change values, not speed). The script restarts itself with the allocator the
command line uses (`wsi_mil.allocator`), so the in-process figures share the CLI's allocator.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
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

from wsi_mil.allocator import active_allocator, reexec_with_allocator
from wsi_mil.demo.synthetic import blob_mask, write_pyramidal_tiff
from wsi_mil.preprocessing.encoders import Encoder, load_encoder
from wsi_mil.preprocessing.extract import measure_forward_throughput, plan_cpu_use, usable_cpus
from wsi_mil.preprocessing.pipeline import PreprocessConfig, preprocess_slide
from wsi_mil.preprocessing.slide import open_slide
from wsi_mil.preprocessing.tiling import TilingParams, tile_grid
from wsi_mil.preprocessing.tissue import TissueParams, segment_tissue

ROOT = Path(__file__).resolve().parents[1]
SHARED_SLIDES = Path(os.environ.get("WSI_MIL_SHARED", ROOT.parent / "shared")) / "data" / "slides"
CACHE = ROOT / "benchmarks" / ".cache"
ENCODER = "resnet50-trunc"


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
    torch.set_num_threads(usable_cpus())
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


def sample_peak_rss(proc: subprocess.Popen[str]) -> tuple[threading.Thread, list[int]]:
    """Start sampling the RSS of `proc`'s process tree every 50 ms; the peak ends up in the list."""
    peak = [0]
    ps = psutil.Process(proc.pid)

    def sample() -> None:
        while proc.poll() is None:
            try:
                peak[0] = max(peak[0], sum(p.memory_info().rss for p in (ps, *ps.children(recursive=True))))
            except psutil.Error:
                pass
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    return sampler, peak


def whole_process(slide_path: Path, *, allocator: str | None) -> dict[str, object]:
    """`wsi-mil preprocess SLIDE` from start to exit (defaults, random weights), with `allocator`
    as WSI_MIL_ALLOCATOR (None: the default)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("WSI_MIL_ALLOCATOR", "WSI_MIL_ALLOCATOR_ACTIVE", "LD_PRELOAD", "MALLOC_CONF", "GLIBC_TUNABLES")}
    if allocator is not None:
        env["WSI_MIL_ALLOCATOR"] = allocator
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "wsi_mil.cli", "preprocess", str(slide_path), "--out", tmp,
                   "--encoder", ENCODER, "--weights", "random"]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        sampler, peak = sample_peak_rss(proc)
        _, err = proc.communicate()
        wall = time.perf_counter() - started
        sampler.join()
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if proc.returncode != 0:
            raise RuntimeError(f"wsi-mil preprocess failed: {err[-2000:]}")
        status = json.loads(next((Path(tmp) / "status").glob("*.json")).read_text())
        runtime = json.loads((Path(tmp) / "run_config.json").read_text())
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    tiles = int(status["tiles"])
    timings = status["timings"]
    return {
        "allocator": runtime["runtime"]["allocator"],
        "threads": runtime["config"]["num_threads"],
        "workers": runtime["config"]["num_workers"],
        "tiles": tiles,
        "wall_s": round(wall, 1),
        "tiles_per_s": round(tiles / wall, 2),
        "stage_tiles_per_s": round(tiles / timings["features_s"], 2),
        "compile_s": timings.get("compile_s"),
        "cpu_s": round(cpu, 1),
        "sys_share": round((after.ru_stime - before.ru_stime) / max(cpu, 1e-9), 3),
        "tiles_per_cpu_s": round(tiles / cpu, 3),
        "peak_rss_gb": round(peak[0] / 2**30, 2),
        "overhead_outside_slide_s": round(wall - status["seconds"], 1),
    }


def stage_and_forward(slide_path: Path, config: PreprocessConfig) -> dict[str, object]:
    """`preprocess_slide` in this process, with the forward-only rate of its encoder measured right
    before and right after it (their mean is the reference: a shared machine drifts), and the CPU
    seconds per tile of both (this process and any reaped workers), which drift much less."""
    encoder = load_encoder(config.encoder, weights="random", device="cpu")
    measure_forward_throughput(encoder, batch_size=config.batch_size, n_batches=1)  # first-call costs

    def forward_only() -> tuple[float, float]:
        cpu = tree_cpu_s()
        rate = measure_forward_throughput(encoder, batch_size=config.batch_size, n_batches=4, warmup_batches=0)
        return rate, (tree_cpu_s() - cpu) / (4 * config.batch_size)

    before, before_cpu = forward_only()
    cpu = tree_cpu_s()
    with tempfile.TemporaryDirectory() as tmp:
        result = preprocess_slide(slide_path, tmp, config, encoder=encoder)
    stage_cpu = (tree_cpu_s() - cpu) / max(result.tiles, 1)
    assert result.status == "done", result.reason
    after, after_cpu = forward_only()
    stage = result.tiles / result.timings["features_s"]
    forward = (before + after) / 2
    return {"tiles": result.tiles, "tissue_and_tiling_s": result.timings["tissue_and_tiling_s"],
            "stage_tiles_per_s": round(stage, 2), "forward_only_tiles_per_s": round(forward, 2),
            "forward_only_before_after": [round(before, 2), round(after, 2)],
            "stage_vs_forward_only": round(stage / forward, 3),
            "slide_cpu_ms_per_tile": round(stage_cpu * 1e3, 2),
            "forward_only_cpu_ms_per_tile": round((before_cpu + after_cpu) / 2 * 1e3, 2),
            "compiled": encoder.compiled is not None}


def compile_payoff(config: PreprocessConfig) -> dict[str, object]:
    """Eager against compiled forward-only rates of a fresh encoder in this process, the compile
    seconds (with the user's inductor cache as it is), and the tiles from which compiling pays off."""
    encoder: Encoder = load_encoder(config.encoder, weights="random", device="cpu")
    eager = measure_forward_throughput(encoder, batch_size=config.batch_size, n_batches=3)
    seconds = encoder.compile(batch_size=config.batch_size)
    if seconds is None:
        return {"compiled": False}
    compiled = measure_forward_throughput(encoder, batch_size=config.batch_size, n_batches=3)
    saving = 1 / eager - 1 / compiled
    return {"compile_s": round(seconds, 1), "eager_tiles_per_s": round(eager, 2),
            "compiled_tiles_per_s": round(compiled, 2), "compiled_vs_eager": round(compiled / eager, 3),
            "break_even_tiles": round(seconds / saving) if saving > 0 else None}


def tree_cpu_s() -> float:
    """User + system CPU seconds of this process and its reaped children (DataLoader workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def workers_sweep(slide_path: Path, config: PreprocessConfig, *, tiles: int, rounds: int = 2) -> list[dict[str, object]]:
    """Stage tiles/s (`extract_features` on the first `tiles` tissue tiles) for 0 (threads of this
    process decode), 1 and 2 decoding worker processes and 1 or all threads, rounds interleaved, each against the forward-only rate measured
    right after it in this process; and the CPU seconds per tile of both (process + workers), which
    a shared machine's load disturbs much less than the rates."""
    import dataclasses

    from wsi_mil.preprocessing.extract import extract_features

    encoder = load_encoder(config.encoder, weights="random", device="cpu")
    cpus = usable_cpus()
    settings = [(cpus, 0), (cpus, 1), (cpus, 2), (max(1, cpus - 1), 1)]
    rows = []
    with open_slide(slide_path) as slide:
        grid = tile_grid(slide, segment_tissue(slide, config.tissue), config.tiling)
        grid = dataclasses.replace(grid, coords=grid.coords[:tiles], tissue_fractions=grid.tissue_fractions[:tiles],
                                   ink_fractions=None)
        for round_index in range(rounds):
            for threads, workers in settings:
                torch.set_num_threads(threads)
                cpu, started = tree_cpu_s(), time.perf_counter()
                done = sum(len(f) for _, f in extract_features(slide, grid, encoder, batch_size=config.batch_size,
                                                                 num_workers=workers))
                stage, stage_cpu = done / (time.perf_counter() - started), (tree_cpu_s() - cpu) / done
                cpu = tree_cpu_s()
                forward = measure_forward_throughput(encoder, batch_size=config.batch_size, n_batches=2, warmup_batches=0)
                forward_cpu = (tree_cpu_s() - cpu) / (2 * config.batch_size)
                row = {"round": round_index, "threads": threads, "workers": workers, "stage_tiles_per_s": round(stage, 2),
                       "forward_only_tiles_per_s": round(forward, 2), "stage_vs_forward_only": round(stage / forward, 3),
                       "stage_cpu_s_per_tile": round(stage_cpu, 4), "forward_cpu_s_per_tile": round(forward_cpu, 4),
                       "forward_vs_stage_cpu_per_tile": round(forward_cpu / stage_cpu, 3),
                       "load_1min": round(os.getloadavg()[0], 1)}
                print(json.dumps(row), flush=True)
                rows.append(row)
    torch.set_num_threads(cpus)
    return rows


def bench_slide(name: str, slide_path: Path, config: PreprocessConfig, *, baseline_tiles: int,
                system_allocator: bool) -> dict[str, object]:
    row: dict[str, object] = {"slide": name, "whole_process": whole_process(slide_path, allocator=None)}
    if system_allocator:
        row["whole_process_glibc_defaults"] = whole_process(slide_path, allocator="system")
    row["in_process"] = stage_and_forward(slide_path, config)
    naive = naive_clam_like_rate(slide_path, config, max_tiles=baseline_tiles)
    whole = row["whole_process"]
    inproc = row["in_process"]
    row["naive_fp32_tiles_per_s"] = round(naive, 2)
    row["ratios"] = {
        "whole_process_vs_naive": round(whole["tiles_per_s"] / naive, 2),
        "stage_vs_naive": round(inproc["stage_tiles_per_s"] / naive, 2),
        "stage_vs_forward_only": inproc["stage_vs_forward_only"],
        "whole_process_vs_forward_only": round(whole["tiles_per_s"] / inproc["forward_only_tiles_per_s"], 3),
    }
    if system_allocator:
        system = row["whole_process_glibc_defaults"]
        row["ratios"]["allocator_speedup_whole_process"] = round(whole["tiles_per_s"] / system["tiles_per_s"], 2)
        row["ratios"]["allocator_peak_rss_ratio"] = round(whole["peak_rss_gb"] / max(system["peak_rss_gb"], 1e-9), 2)
    print(json.dumps(row), flush=True)
    return row


def peak_rss_100k(slide_path: Path) -> dict[str, float]:
    """Peak RSS (process tree, sampled) while a ~100k-tile slide is processed with the tiny encoder."""
    code = (
        "import sys; from wsi_mil.preprocessing.pipeline import *; from wsi_mil.preprocessing.tiling import TilingParams;"
        "from wsi_mil.preprocessing.tissue import TissueParams;"
        "c=PreprocessConfig(encoder='test-encoder', weights='random', batch_size=256,"
        "tissue=TissueParams(mode='whole'), tiling=TilingParams(target_mpp=0.5, tile_px=62, min_tissue_fraction=0.0));"
        "r=preprocess_slide(sys.argv[1], sys.argv[2], c); print(r.status, r.tiles, r.seconds, r.reason)"
    )
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.Popen([sys.executable, "-c", code, str(slide_path), tmp], stdout=subprocess.PIPE, text=True)
        sampler, peak = sample_peak_rss(proc)
        out, _ = proc.communicate()
        sampler.join()
    status, tiles, seconds, *_ = out.split()
    return {"tiles": int(tiles), "status": status, "seconds": float(seconds), "peak_rss_gb": round(peak[0] / 2**30, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the real slide only, no compile check")
    parser.add_argument("--large-size", type=int, default=10000, help="side of the large slide in px")
    parser.add_argument("--no-system-allocator", action="store_true", help="skip the glibc-defaults whole-process runs")
    parser.add_argument("--rss", action="store_true", help="also the ~100k-tile peak-RSS run (20,000² slide)")
    parser.add_argument("--workers-sweep", type=int, default=0, metavar="TILES",
                        help="also compare decoding workers and threads on this many tiles of the large slide")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "preprocess.json")
    args = parser.parse_args()
    reexec_with_allocator()
    real = SHARED_SLIDES / "tissue" / "CMU-1-Small-Region.svs"
    if not real.exists():
        sys.exit(f"needs the team's test slides at {real}")
    config = PreprocessConfig(encoder=ENCODER, weights="random", tiling=TilingParams(target_mpp=0.5, tile_px=256),
                              tissue=TissueParams())
    plan = plan_cpu_use("cpu")
    results: dict[str, object] = {
        "machine": {"usable_cpus": usable_cpus(), "platform": platform.platform(), "torch": torch.__version__,
                    "plan": {"threads": plan.threads, "workers": plan.workers}},
        "allocator": active_allocator(),
        "load_before": os.getloadavg(),
        "started": time.strftime("%Y-%m-%d %H:%M"),
        "slides": [],
    }
    slides = [("CMU-1-Small-Region.svs (real)", real, 64)]
    if not args.quick:
        size = args.large_size
        slides.append((f"{size} x {size} of real tissue crops", build_large_slide(real, CACHE / f"large_real_tissue_{size}.tiff", size=size), 256))
    for name, path, baseline_tiles in slides:
        results["slides"].append(bench_slide(name, path, config, baseline_tiles=baseline_tiles,
                                             system_allocator=not args.no_system_allocator))
    if args.workers_sweep and not args.quick:
        results["workers_sweep"] = workers_sweep(slides[-1][1], config, tiles=args.workers_sweep)
    if not args.quick:
        results["compile"] = compile_payoff(config)
        print(json.dumps(results["compile"]), flush=True)
    if args.rss:
        large = build_large_slide(real, CACHE / "large_real_tissue_20000.tiff", size=20000)
        results["peak_rss_100k_tiles"] = peak_rss_100k(large)
        print(json.dumps(results["peak_rss_100k_tiles"]), flush=True)
    results["load_after"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
