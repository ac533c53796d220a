"""MIL model benchmark: CPU forward time and peak memory of every registered model against bag size.

    uv run --locked python benchmarks/bench_models.py [--quick] [--out results.json]
    uv run --locked python benchmarks/bench_models.py --mamba-ratio   # MambaMIL / ABMIL only

Every registered model (`list_models()`, after importing every module of `wsi_mil.models`) runs a
forward pass on one random bag `[1, N, 1024]` in eval mode under `torch.inference_mode()`, for
N = 1k, 10k, 50k, 100k, 200k (`--quick`: 1k and 10k; `--sizes` to choose), after one warm-up
pass on 256 instances. Each (model, N) cell runs in a fresh forked process, so its peak memory is
its own: peak RSS (`ru_maxrss`) minus the RSS measured after the
model and the bag were built. A cell is stopped and reported as "> limit" when it runs longer than
`--time-limit` seconds or its RSS exceeds `--memory-limit-gb`, and skipped when the model's last
cell predicts it would (time and memory extrapolated with the model's own growth, at least
linear). Growth per doubling of N is 2^slope of a least-squares fit of log time (log memory)
against log N over the cells with N ≥ 10k. MambaMIL's selective-scan time is measured inside its
forward and compared with ABMIL's forward time at the same N, in the same run.

`--mamba-ratio` measures only ABMIL and MambaMIL at N = 10k and 50k (or `--sizes`), each in two
modes: forward (as above) and training step (train mode, forward + backward of the summed logits,
after a warm-up step that also compiles the fused CPU kernels), with wall and CPU seconds and peak
RSS per cell, and prints MambaMIL / ABMIL ratios per N and mode (JSON default:
`benchmarks/results/mamba_vs_abmil.json`).

The JSON (`--out`) is rewritten after every cell, so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import multiprocessing as mp
import os
import pkgutil
import platform
import resource
import statistics
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import psutil
import torch

import wsi_mil.models
from wsi_mil.models import create_model, list_models

ROOT = Path(__file__).resolve().parents[1]
FULL_SIZES = (1_000, 10_000, 50_000, 100_000, 200_000)
QUICK_SIZES = (1_000, 10_000)
MAMBA_RATIO_SIZES = (10_000, 50_000)
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "models.json"
MODES = ("forward", "train")
IN_DIM = 1024
NUM_CLASSES = 2
MIB = 1 << 20
#: a cell repeats its forward pass (up to MAX_REPEATS, median reported) while the passes so far
#: took less than REPEAT_BUDGET_S in total; `--mamba-ratio` cells run at least MIN_RATIO_REPEATS
MAX_REPEATS = 3
MIN_RATIO_REPEATS = 2
WARMUP_SIZE = 256
REPEAT_BUDGET_S = 3.0


def import_model_families() -> dict[str, str]:
    """Import every module of `wsi_mil.models` so all families register; return import failures."""
    failures = {}
    for module in pkgutil.iter_modules(wsi_mil.models.__path__, f"{wsi_mil.models.__name__}."):
        try:
            importlib.import_module(module.name)
        except Exception as err:  # a family module under construction must not stop the benchmark
            failures[module.name] = f"{type(err).__name__}: {err}"
    return failures


def current_rss() -> int:
    return psutil.Process().memory_info().rss


def run_cell(
    name: str, size: int, threads: int, connection: Connection, mode: str = "forward", min_repeats: int = 1
) -> None:
    """Child process: build the model and the bag, time up to MAX_REPEATS passes, report the median.

    A pass is a forward under `inference_mode` (`mode="forward"`) or, for `mode="train"`, a
    forward and backward of the summed logits in train mode."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    scan_seconds = [0.0]
    if name == "mamba_mil":
        import wsi_mil.models.mamba_mil as mamba_module

        scan = mamba_module.selective_scan

        def timed_scan(*args: Any, **kwargs: Any) -> torch.Tensor:
            start = time.perf_counter()
            result = scan(*args, **kwargs)
            scan_seconds[0] += time.perf_counter() - start
            return result

        mamba_module.selective_scan = timed_scan
    model = create_model(name, IN_DIM, NUM_CLASSES).train(mode == "train")
    grad_mode = torch.enable_grad() if mode == "train" else torch.inference_mode()

    def one_pass(bag: torch.Tensor) -> None:
        output = model(bag)
        if mode == "train":
            output.logits.sum().backward()
            model.zero_grad(set_to_none=True)

    with grad_mode:  # warm-up: first-call costs (kernel selection and compilation, allocator) excluded
        one_pass(torch.randn(1, WARMUP_SIZE, IN_DIM))
    bag = torch.randn(1, size, IN_DIM)
    baseline = current_rss()
    times, cpu_times, scans = [], [], []
    with grad_mode:
        while len(times) < min_repeats or (len(times) < MAX_REPEATS and sum(times) < REPEAT_BUDGET_S):
            scan_seconds[0] = 0.0
            start, cpu_start = time.perf_counter(), time.process_time()
            one_pass(bag)
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
            scans.append(scan_seconds[0])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    connection.send(
        {
            "seconds": statistics.median(times),
            "all_seconds": times,
            "cpu_seconds": statistics.median(cpu_times),
            "scan_seconds": statistics.median(scans) if name == "mamba_mil" else None,
            "peak_rss_mb": peak / MIB,
            "baseline_rss_mb": baseline / MIB,
            "forward_peak_mb": max(peak - baseline, 0) / MIB,
            "parameters": sum(p.numel() for p in model.parameters()),
        }
    )


def measure(
    name: str, size: int, *, threads: int, time_limit: float, memory_limit_gb: float,
    mode: str = "forward", min_repeats: int = 1,
) -> dict[str, Any]:
    """Run one cell in a forked child, killing it past the time or memory limit."""
    receiver, sender = mp.get_context("fork").Pipe(duplex=False)
    child = mp.get_context("fork").Process(
        target=run_cell, args=(name, size, threads, sender, mode, min_repeats)
    )
    start = time.perf_counter()
    child.start()
    watched = psutil.Process(child.pid)
    peak_seen, status = 0, "ok"
    while child.is_alive():
        child.join(0.2)
        try:
            peak_seen = max(peak_seen, watched.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        if peak_seen > memory_limit_gb * (1 << 30):
            status = f"> {memory_limit_gb:g} GB"
        elif time.perf_counter() - start > min_repeats * time_limit + REPEAT_BUDGET_S + 60:  # + build
            status = f"> {time_limit:g} s"
        if status != "ok":
            child.kill()
            child.join()
            return {"status": status, "wall_seconds": time.perf_counter() - start, "rss_seen_mb": peak_seen / MIB}
    if receiver.poll():
        result = receiver.recv()
        status = f"> {time_limit:g} s" if result["seconds"] > time_limit else "ok"
        return {"status": status, **result, "wall_seconds": time.perf_counter() - start}
    return {"status": f"crashed (exit code {child.exitcode})", "wall_seconds": time.perf_counter() - start}


def growth_per_doubling(points: list[tuple[int, float]]) -> float | None:
    """2^slope of the least-squares line through (log2 N, log2 value), N ≥ 10k (all N if fewer)."""
    usable = [(n, v) for n, v in points if v > 0]
    large = [(n, v) for n, v in usable if n >= 10_000]
    fit = large if len(large) >= 2 else usable
    if len(fit) < 2:
        return None
    xs = [math.log2(n) for n, _ in fit]
    ys = [math.log2(v) for _, v in fit]
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mean_x) ** 2 for x in xs
    )
    return 2.0**slope


def predicted_over_limit(history: list[tuple[int, dict[str, Any]]], size: int, *, time_limit: float, memory_limit_gb: float) -> str | None:
    """Why the next cell would exceed a limit, extrapolated from this model's measured cells."""
    if not history:
        return None
    last_size, last = history[-1]
    if last["status"] != "ok":
        return last["status"]
    ratio = size / last_size
    time_growth = growth_per_doubling([(n, r["seconds"]) for n, r in history if r["status"] == "ok"]) or 2.0
    exponent = max(1.0, math.log2(time_growth))
    if last["seconds"] * ratio**exponent > 1.5 * time_limit:
        return f"> {time_limit:g} s (predicted {last['seconds'] * ratio**exponent:.0f} s)"
    memory = last["baseline_rss_mb"] + max(last["forward_peak_mb"], 1.0) * ratio
    if memory > 1.2 * memory_limit_gb * 1024:
        return f"> {memory_limit_gb:g} GB (predicted {memory / 1024:.1f} GB)"
    return None


def format_cell(result: dict[str, Any]) -> str:
    measured = f"{result['seconds']:.2f} s / {result['forward_peak_mb']:.0f} MB" if "seconds" in result else ""
    if result["status"] == "ok":
        return measured
    return f"{result['status']} ({measured})" if measured else result["status"]


def format_growth(value: float | None) -> str:
    return "–" if value is None else f"×{value:.2f}"


def markdown_tables(results: dict[str, Any]) -> str:
    sizes = results["sizes"]
    header = "| model | params | " + " | ".join(f"N = {n:,}" for n in sizes) + " | time ×/doubling | memory ×/doubling |"
    lines = [header, "|" + "---|" * (len(sizes) + 4)]
    for name, row in results["models"].items():
        cells = [format_cell(row["cells"].get(str(n), {"status": "not run"})) for n in sizes]
        params = next((c["parameters"] for c in row["cells"].values() if "parameters" in c), None)
        lines.append(
            f"| {name} | {params / 1e6:.2f} M | " if params else f"| {name} | – | "
        )
        lines[-1] += " | ".join(cells) + f" | {format_growth(row['time_growth'])} | {format_growth(row['memory_growth'])} |"
    if results["mamba_vs_abmil"]:
        lines += ["", "| N | MambaMIL forward s | MambaMIL scan s | ABMIL forward s | forward ratio | scan / ABMIL |", "|---|---|---|---|---|---|"]
        for entry in results["mamba_vs_abmil"]:
            lines.append(
                f"| {entry['size']:,} | {entry['mamba_seconds']:.2f} | {entry['scan_seconds']:.2f} | "
                f"{entry['abmil_seconds']:.3f} | ×{entry['forward_ratio']:.0f} | ×{entry['scan_ratio']:.0f} |"
            )
    return "\n".join(lines)


def summarise(results: dict[str, Any]) -> None:
    """Fill growth factors and the MambaMIL / ABMIL comparison from the measured cells."""
    for row in results["models"].values():
        ok = [(int(n), c) for n, c in row["cells"].items() if c["status"] == "ok"]
        row["time_growth"] = growth_per_doubling([(n, c["seconds"]) for n, c in ok])
        row["memory_growth"] = growth_per_doubling([(n, c["forward_peak_mb"]) for n, c in ok if c["forward_peak_mb"] > 10])
    comparison = []
    mamba = results["models"].get("mamba_mil", {}).get("cells", {})
    abmil = results["models"].get("abmil", {}).get("cells", {})
    for size in results["sizes"]:
        m, a = mamba.get(str(size)), abmil.get(str(size))
        if m and a and m["status"] == "ok" and a["status"] == "ok":
            comparison.append(
                {
                    "size": size,
                    "mamba_seconds": m["seconds"],
                    "scan_seconds": m["scan_seconds"],
                    "abmil_seconds": a["seconds"],
                    "forward_ratio": m["seconds"] / a["seconds"],
                    "scan_ratio": m["scan_seconds"] / a["seconds"],
                }
            )
    results["mamba_vs_abmil"] = comparison


def mamba_ratio_table(results: dict[str, Any]) -> str:
    """Markdown: per N and mode, ABMIL and MambaMIL wall / CPU seconds, peak RSS and the ratios."""
    lines = [
        "| N | pass | ABMIL s (CPU s) | MambaMIL s (CPU s) | of which forward scans | wall ratio | CPU ratio | peak RSS ABMIL / MambaMIL (above baseline) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for entry in results["ratios"]:
        a, m = entry["abmil"], entry["mamba_mil"]
        lines.append(
            f"| {entry['size']:,} | {entry['mode']} | {a['seconds']:.2f} ({a['cpu_seconds']:.2f}) | "
            f"{m['seconds']:.2f} ({m['cpu_seconds']:.2f}) | {m['scan_seconds']:.2f} | "
            f"×{entry['wall_ratio']:.1f} | ×{entry['cpu_ratio']:.1f} | "
            f"{a['peak_rss_mb'] / 1024:.2f} / {m['peak_rss_mb'] / 1024:.2f} GB "
            f"({a['forward_peak_mb'] / 1024:.2f} / {m['forward_peak_mb'] / 1024:.2f}) |"
        )
    return "\n".join(lines)


def run_mamba_ratio(args: argparse.Namespace, sizes: tuple[int, ...]) -> None:
    """ABMIL and MambaMIL, forward and training step, each cell in its own process; ratios per N."""
    out = args.out if args.out != DEFAULT_OUT else DEFAULT_OUT.with_name("mamba_vs_abmil.json")
    results: dict[str, Any] = {
        "sizes": list(sizes),
        "setup": {
            "torch": torch.__version__,
            "cpu_count": os.cpu_count(),
            "threads": args.threads,
            "load_average_start": os.getloadavg(),
        },
        "cells": [],
        "ratios": [],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    for size in sizes:
        for mode in MODES:
            pair = {}
            for name in ("abmil", "mamba_mil"):
                cell = measure(
                    name, size, threads=args.threads, time_limit=args.time_limit,
                    memory_limit_gb=args.memory_limit_gb, mode=mode, min_repeats=MIN_RATIO_REPEATS,
                )
                results["cells"].append({"model": name, "size": size, "mode": mode, **cell})
                print(f"{name:>10} N={size:>7,} {mode:>7}: {format_cell(cell)}", file=sys.stderr, flush=True)
                pair[name] = cell
            if all(c["status"] == "ok" for c in pair.values()):
                results["ratios"].append(
                    {
                        "size": size,
                        "mode": mode,
                        **pair,
                        "wall_ratio": pair["mamba_mil"]["seconds"] / pair["abmil"]["seconds"],
                        "cpu_ratio": pair["mamba_mil"]["cpu_seconds"] / pair["abmil"]["cpu_seconds"],
                    }
                )
            results["setup"]["load_average_end"] = os.getloadavg()
            out.write_text(json.dumps(results, indent=2))
    print(mamba_ratio_table(results))
    print(f"\nJSON: {out}", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N = 1k and 10k only (about 2 minutes)")
    parser.add_argument("--mamba-ratio", action="store_true", help="MambaMIL vs ABMIL, forward and training step")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--models", default="*", help="fnmatch pattern over registered model names")
    parser.add_argument("--sizes", help="comma-separated bag sizes instead of the default ladder")
    parser.add_argument("--time-limit", type=float, default=120.0, help="seconds per forward pass")
    parser.add_argument("--memory-limit-gb", type=float, default=16.0, help="RSS limit per cell")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    args = parser.parse_args()

    failures = import_model_families()
    names = list_models(args.models)
    sizes = MAMBA_RATIO_SIZES if args.mamba_ratio else QUICK_SIZES if args.quick else FULL_SIZES
    if args.sizes:
        sizes = tuple(sorted(int(n) for n in args.sizes.split(",")))
    if args.mamba_ratio:
        run_mamba_ratio(args, sizes)
        return
    results: dict[str, Any] = {
        "sizes": list(sizes),
        "in_dim": IN_DIM,
        "setup": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "threads": args.threads,
            "time_limit_s": args.time_limit,
            "memory_limit_gb": args.memory_limit_gb,
            "load_average_start": os.getloadavg(),
            "import_failures": failures,
        },
        "models": {name: {"cells": {}} for name in names},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for failure in failures.items():
        print("import failed:", *failure, file=sys.stderr)
    for size in sizes:
        for name in names:
            history = [(int(n), c) for n, c in results["models"][name]["cells"].items()]
            skip = predicted_over_limit(history, size, time_limit=args.time_limit, memory_limit_gb=args.memory_limit_gb)
            if skip:
                cell = {"status": skip, "skipped": True}
            else:
                cell = measure(name, size, threads=args.threads, time_limit=args.time_limit, memory_limit_gb=args.memory_limit_gb)
            results["models"][name]["cells"][str(size)] = cell
            print(f"{name:>20} N={size:>7,}: {format_cell(cell)}", file=sys.stderr, flush=True)
            results["setup"]["load_average_end"] = os.getloadavg()
            summarise(results)
            args.out.write_text(json.dumps(results, indent=2))
    print(markdown_tables(results))
    print(f"\nJSON: {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
