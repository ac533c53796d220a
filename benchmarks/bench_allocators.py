"""Allocator benchmark: the encoder's forward pass (and optionally the whole pipeline stage) under
each candidate allocator, each in a fresh process, candidates interleaved in rounds so that a
shared machine's load falls on all of them alike.

    uv run --locked python benchmarks/bench_allocators.py [--rounds 3] [--batches 4] [--stage-tiles 0]

Candidates: glibc defaults; glibc told by mallopt (in the running process) or by GLIBC_TUNABLES
(at exec) never to mmap or trim; the same plus transparent huge pages for malloc (glibc.malloc.hugetlb=1);
torch's own huge-page switch (THP_MEM_ALLOC_ENABLE=1); the jemalloc that the ray wheel ships,
preloaded with decay off and with its default decay; mimalloc from --mimalloc PATH if given.
Per candidate: tiles/s, user and system CPU seconds per tile, minor page faults per tile and peak
RSS (ru_maxrss), and the ratio of its tiles/s to glibc's in the same round.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def candidates(mimalloc: Path | None) -> dict[str, dict[str, str]]:
    """Name → environment added to the child's (the `mallopt` candidate is applied inside the child)."""
    from wsi_mil.allocator import GLIBC_TUNABLES, JEMALLOC_CONF, jemalloc_library

    table: dict[str, dict[str, str]] = {
        "glibc": {},
        "glibc mallopt (in process)": {"BENCH_MALLOPT": "1", "WSI_MIL_ALLOCATOR": "glibc"},
        "glibc tunables (exec)": {"GLIBC_TUNABLES": GLIBC_TUNABLES},
        "glibc tunables + hugetlb": {"GLIBC_TUNABLES": GLIBC_TUNABLES + ":glibc.malloc.hugetlb=1"},
        "torch THP_MEM_ALLOC_ENABLE": {"THP_MEM_ALLOC_ENABLE": "1"},
    }
    library = jemalloc_library()
    if library is not None:
        table["jemalloc, decay off"] = {"LD_PRELOAD": str(library), "MALLOC_CONF": JEMALLOC_CONF}
        table["jemalloc, default decay"] = {"LD_PRELOAD": str(library)}
    if mimalloc is not None:
        table["mimalloc, purge off"] = {"LD_PRELOAD": str(mimalloc), "MIMALLOC_PURGE_DELAY": "-1",
                                        "MIMALLOC_ALLOW_LARGE_OS_PAGES": "0"}
    return table


def child(args: argparse.Namespace) -> None:
    """Run in a candidate's process: build the encoder, time the forward (and the stage), print JSON."""
    if os.environ.get("BENCH_MALLOPT"):
        from wsi_mil.allocator import tune_this_process

        tune_this_process()
    import torch

    from wsi_mil.allocator import active_allocator
    from wsi_mil.preprocessing.encoders import load_encoder
    from wsi_mil.preprocessing.extract import measure_forward_throughput

    torch.set_num_threads(args.threads)
    encoder = load_encoder(args.encoder, weights="random", device="cpu")
    measure_forward_throughput(encoder, batch_size=args.batch_size, n_batches=1, precision=args.precision)
    before, faults_before, t0 = _cpu(), _faults(), time.perf_counter()
    rate = measure_forward_throughput(encoder, batch_size=args.batch_size, n_batches=args.batches,
                                      precision=args.precision, warmup_batches=0)
    wall = time.perf_counter() - t0
    tiles = args.batch_size * args.batches
    user, system = (a - b for a, b in zip(_cpu(), before, strict=True))
    row = {"forward_tiles_per_s": rate, "user_s_per_tile": user / tiles, "sys_s_per_tile": system / tiles,
           "minor_faults_per_tile": (_faults() - faults_before) / tiles, "forward_wall_s": wall,
           "allocator": active_allocator()}
    if args.stage_tiles:
        row.update(_stage(encoder, args))
    row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(row), flush=True)


def _stage(encoder: object, args: argparse.Namespace) -> dict[str, float]:
    """Tiles/s of `extract_features` (DataLoader workers decode while the model runs) on the first
    `--stage-tiles` tiles (the real slide's tissue tiles, repeated), and the children's CPU time."""
    import dataclasses

    import numpy as np

    from wsi_mil.preprocessing.extract import extract_features
    from wsi_mil.preprocessing.slide import open_slide
    from wsi_mil.preprocessing.tiling import TilingParams, tile_grid
    from wsi_mil.preprocessing.tissue import TissueParams, segment_tissue

    with open_slide(args.slide) as slide:
        grid = tile_grid(slide, segment_tissue(slide, TissueParams()), TilingParams(target_mpp=0.5, tile_px=256))
        grid = dataclasses.replace(grid, coords=np.resize(grid.coords, (args.stage_tiles, 2)),
                                   ink_fractions=None, tissue_fractions=np.resize(grid.tissue_fractions, args.stage_tiles))
        start, t0 = _cpu(include_children=True), time.perf_counter()
        tiles = sum(len(f) for _, f in extract_features(slide, grid, encoder, batch_size=args.batch_size,
                                                          num_workers=args.workers, precision=args.precision))
        wall = time.perf_counter() - t0
        user, system = (a - b for a, b in zip(_cpu(include_children=True), start, strict=True))
    return {"stage_tiles_per_s": tiles / wall, "stage_cpu_s_per_tile": (user + system) / tiles,
            "stage_sys_share": system / max(user + system, 1e-9)}


def _cpu(*, include_children: bool = False) -> tuple[float, float]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    user, system = usage.ru_utime, usage.ru_stime
    if include_children:
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        user, system = user + children.ru_utime, system + children.ru_stime
    return user, system


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", type=int, default=4, help="timed forward batches per process")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--encoder", default="resnet50-trunc")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--stage-tiles", type=int, default=0, help="also time the pipeline stage on this many tiles")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--slide", type=Path, default=ROOT.parent / "shared" / "data" / "slides" / "tissue" / "CMU-1-Small-Region.svs")
    parser.add_argument("--only", action="append", default=[], help="run this candidate (repeatable; default all)")
    parser.add_argument("--mimalloc", type=Path, default=None, help="a libmimalloc.so to include")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "allocators.json")
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    table = candidates(args.mimalloc)
    if args.only:
        table = {k: v for k, v in table.items() if k in args.only}
    passthrough = ["--batches", str(args.batches), "--batch-size", str(args.batch_size), "--threads", str(args.threads),
                   "--encoder", args.encoder, "--precision", args.precision, "--stage-tiles", str(args.stage_tiles),
                   "--workers", str(args.workers), "--slide", str(args.slide)]
    clean = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MALLOC_CONF", "GLIBC_TUNABLES")}
    clean["WSI_MIL_ALLOCATOR"] = "system"
    rows: list[dict[str, object]] = []
    for round_index in range(args.rounds):
        for name, extra in table.items():
            done = subprocess.run([sys.executable, __file__, "--child", *passthrough], env={**clean, **extra},
                                  capture_output=True, text=True, check=False)
            lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
            if not lines:
                print(f"{name}: failed\n{done.stderr[-2000:]}", flush=True)
                continue
            row = {"candidate": name, "round": round_index, "load_1min": os.getloadavg()[0],
                   **json.loads(lines[-1].removeprefix("RESULT "))}
            rows.append(row)
            print(json.dumps(row), flush=True)
    summary = summarise(rows, list(table))
    for line in summary:
        print(json.dumps(line))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": {"cpus": len(os.sched_getaffinity(0)), "platform": platform.platform()},
                                    "settings": vars(args) | {"out": str(args.out), "slide": str(args.slide),
                                                              "mimalloc": str(args.mimalloc)},
                                    "rows": rows, "summary": summary}, indent=2))


def summarise(rows: list[dict[str, object]], names: list[str]) -> list[dict[str, object]]:
    """Per candidate: medians over rounds, and the median over rounds of its ratio to glibc's rate."""
    by_round = {(r["candidate"], r["round"]): r for r in rows}
    out = []
    for name in names:
        mine = [r for r in rows if r["candidate"] == name]
        if not mine:
            continue
        line: dict[str, object] = {"candidate": name, "runs": len(mine)}
        for key in ("forward_tiles_per_s", "user_s_per_tile", "sys_s_per_tile", "minor_faults_per_tile", "peak_rss_mb",
                    "stage_tiles_per_s", "stage_cpu_s_per_tile", "stage_sys_share", "load_1min"):
            values = [float(r[key]) for r in mine if key in r]
            if values:
                line[key] = round(statistics.median(values), 4)
        for key in ("forward_tiles_per_s", "stage_tiles_per_s"):
            ratios = [float(r[key]) / float(by_round[("glibc", r["round"])][key]) for r in mine
                      if ("glibc", r["round"]) in by_round and key in r]
            if ratios:
                line[f"{key}_vs_glibc"] = round(statistics.median(ratios), 3)
        out.append(line)
    return out


if __name__ == "__main__":
    main()
