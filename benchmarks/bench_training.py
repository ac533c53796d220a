"""Training throughput: one bag per step vs padded batches vs PackMIL packing, and MHIM-MIL's
overhead over its baseline, all measured in one run on one synthetic cohort.

    uv run --locked python benchmarks/bench_training.py [--quick] [--bags N] [--device cuda]

The cohort: `--bags` bags (default 1,000) whose sizes are lognormal (median `--median` 8,000
instances, log-sd `--sigma` 0.6, clipped to [256, 60,000]), D = 1,024, random binary labels. The
features are views into one shared random bank held in host memory at `--dtype` (default float16,
what `wsi-mil preprocess` writes), so generating the cohort costs nothing and the numbers measure
the training step as the trainer runs it (its feature cache, batching, host-to-device copy,
forward, backward, optimiser), not feature-file reading.

Every setup trains `--model` (default `abmil`, gated) for one epoch through `wsi_mil.training.fit`
with the same bags; the validation part is two small bags so validation costs nothing. Each setup
runs in its own process (so its peak memory is its own), after a short warm-up epoch (CUDA
context, kernel selection, allocator). Reported: epoch seconds, bags/s, cohort instances/s
(instances of the bags trained on, whatever a method drops), how the step ran (padded tensor or
bag by bag), peak memory (GPU memory on CUDA, the process's peak RSS on CPU, with the RSS before
training beside it), each setup's ratio to the one-bag setup of the same run, and MHIM-MIL's
epoch time over its one-bag baseline. Bags per CPU-second (user + system time of the setup's
process) sit beside bags/s: on a machine shared with other jobs they move less than wall time.
With `--bags` below the cohort size the epoch time for the
whole cohort is extrapolated and marked so. Device: CUDA when present, else CPU (`--device`).
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wsi_mil.atomic import write_json_atomic
from wsi_mil.models import create_model
from wsi_mil.training.bag import Bag
from wsi_mil.training.batching import BagStore
from wsi_mil.training.config import TrainConfig
from wsi_mil.training.methods import create_method
from wsi_mil.training.trainer import EpochReport, fit

ROOT = Path(__file__).resolve().parents[1]

#: setup name -> (method, method kwargs, batch size or None = --batch-size, trainer overrides)
SETUPS: dict[str, tuple[str, dict[str, Any], int | None, dict[str, Any]]] = {
    "one_bag": ("plain", {}, 1, {}),
    "padded": ("plain", {}, None, {}),
    "padded_tensor": ("plain", {}, None, {"batch_execution": "padded"}),
    "padded_capped": ("plain", {}, None, {"max_instances": 8192}),
    "packmil": ("packmil", {"residual_loss": "focal"}, None, {}),
    "packmil_ads": ("packmil", {"residual_loss": "focal", "downsample": "ads", "downsample_ratio": 4}, None, {}),
    "packmil_downsample": (
        "packmil", {"residual_loss": "focal", "downsample": "attention", "downsample_ratio": 4}, None, {}
    ),
    "mhim_v1": (
        "mhim", {"version": "v1", "high_mask_ratio": 0.01, "random_mask_ratio": 0.5, "momentum": 0.9997}, 1, {}
    ),
    "mhim_v2": ("mhim", {"version": "v2"}, 1, {}),
}
DEFAULT_SETUPS = ("one_bag", "padded", "padded_tensor", "padded_capped", "packmil", "packmil_ads", "mhim_v1", "mhim_v2")


def lognormal_sizes(count: int, *, median: float, sigma: float, seed: int, low: int = 256, high: int = 60_000) -> np.ndarray:
    """`count` bag sizes, lognormal around `median` with log-sd `sigma`, clipped to [low, high]."""
    rng = np.random.default_rng(seed)
    return np.clip(np.round(median * np.exp(sigma * rng.standard_normal(count))), low, high).astype(np.int64)


def synthetic_cohort(sizes: np.ndarray, *, dim: int, seed: int, dtype: torch.dtype = torch.float32) -> list[Bag]:
    """Bags whose features are views of one random bank (no per-bag memory), balanced random labels."""
    generator = torch.Generator().manual_seed(seed)
    bank = torch.empty(int(sizes.max()) + 65_536, dim, dtype=dtype)
    for chunk in bank.split(8192):  # drawn in float32 chunk by chunk: no float32 copy of the whole bank
        chunk.copy_(torch.randn(chunk.shape, generator=generator))
    offsets = torch.randint(0, 65_536, (len(sizes),), generator=generator).tolist()
    labels = torch.randperm(len(sizes), generator=generator) % 2
    return [
        Bag(bank[offset : offset + int(size)], int(label), f"bag_{i:04d}")
        for i, (size, offset, label) in enumerate(zip(sizes, offsets, labels.tolist(), strict=True))
    ]


def config_for(setup: str, *, batch_size: int, device: str, seed: int) -> TrainConfig:
    """The trainer settings of one setup (deterministic algorithms off, as for a speed run)."""
    method, _, fixed_batch, overrides = SETUPS[setup]
    return TrainConfig(
        model="abmil", method=method, epochs=1, batch_size=fixed_batch or batch_size,
        lr=1e-4, optimizer="adamw", deterministic=False, device=device, seed=seed, patience=None,
        selection_metric="loss", **overrides,
    )


def peak_rss_gb() -> float:
    """This process's peak resident memory so far (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def cpu_seconds() -> float:
    """User + system CPU time of this process so far (every thread)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_setup(setup: str, options: dict[str, Any]) -> dict[str, Any]:
    """Build the cohort, train one warm-up and one timed epoch of `setup`; runs in its own process."""
    args = argparse.Namespace(**options)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    sizes = lognormal_sizes(args.cohort_bags, median=args.median, sigma=args.sigma, seed=args.seed)
    cohort = synthetic_cohort(sizes, dim=args.dim, seed=args.seed, dtype=getattr(torch, args.dtype))
    pinned = device.startswith("cuda")
    bags = BagStore(cohort[: args.bags], pin_memory=pinned)  # the trainer's feature cache, built before timing
    val = BagStore([Bag(cohort[0].features[:64], 0, "val_0"), Bag(cohort[1].features[:64], 1, "val_1")], pin_memory=pinned)
    method_name, method_kwargs, _, _ = SETUPS[setup]
    config = config_for(setup, batch_size=args.batch_size, device=device, seed=args.seed)

    def one_epoch(train: Sequence[Bag]) -> EpochReport:
        reports: list[EpochReport] = []
        torch.manual_seed(args.seed)
        model = create_model(args.model, args.dim, 2)
        method = create_method(method_name, **method_kwargs)
        fit(model, method, train, val, config=config, num_classes=2, on_epoch_end=reports.append)
        return reports[-1]

    rss_before = peak_rss_gb()
    one_epoch(BagStore(cohort[: max(2, 2 * config.batch_size)], pin_memory=pinned))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    cpu_started = cpu_seconds()
    started = time.perf_counter()
    report = one_epoch(bags)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    cpu = cpu_seconds() - cpu_started
    instances = int(sum(bag.features.shape[0] for bag in bags))
    per_bag = config.batch_execution == "per_bag" or (config.batch_execution == "auto" and device == "cpu")
    row = {
        "setup": setup, "method": method_name, "method_kwargs": method_kwargs,
        "batch_size": config.batch_size, "max_instances": config.max_instances,
        "execution": "per bag" if per_bag or config.batch_size == 1 else "padded tensor",
        "bags": len(bags), "steps": -(-len(bags) // config.batch_size),
        "epoch_seconds": seconds, "fit_epoch_seconds": report.seconds,
        "bags_per_second": len(bags) / seconds, "cohort_instances_per_second": instances / seconds,
        "cpu_seconds": cpu, "bags_per_cpu_second": len(bags) / cpu,
        "train_loss": report.train_loss,
        "peak_gpu_memory_gb": torch.cuda.max_memory_allocated() / 1e9 if device.startswith("cuda") else None,
        "rss_before_training_gb": rss_before, "peak_rss_gb": peak_rss_gb(),
    }
    if "main_tokens" in report.train_terms:
        row["mean_main_tokens_per_step"] = report.train_terms["main_tokens"]
        row["mean_residual_tokens_per_step"] = report.train_terms.get("residual_tokens")
    return row


def run_isolated(setup: str, options: dict[str, Any]) -> dict[str, Any]:
    """`run_setup` in a fresh process, so peak memory and allocator state are the setup's own."""
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(run_setup, setup, options).result()


def markdown_table(rows: list[dict[str, Any]], *, cohort_bags: int) -> str:
    """The results as a Markdown table, ratios against the `one_bag` row of the same run."""
    base = next(r for r in rows if r["setup"] == "one_bag")
    extrapolated = rows[0]["bags"] != cohort_bags
    lines = [
        f"| setup | bags/step | step runs | bags/s | epoch of {cohort_bags:,} bags{' (extrapolated)' if extrapolated else ''} "
        "| cohort instances/s | × one-bag | bags per CPU-second (× one-bag) | peak memory |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        epoch = r["epoch_seconds"] * cohort_bags / r["bags"]
        if r["peak_gpu_memory_gb"] is not None:
            memory = f"{r['peak_gpu_memory_gb']:.1f} GB GPU"
        else:
            memory = f"{r['peak_rss_gb']:.1f} GB RSS ({r['rss_before_training_gb']:.1f} before)"
        lines.append(
            f"| {r['setup']} | {r['batch_size']} | {r['execution']} | {r['bags_per_second']:.2f} | {epoch:,.0f} s "
            f"| {r['cohort_instances_per_second']:,.0f} | {r['bags_per_second'] / base['bags_per_second']:.2f} "
            f"| {r['bags_per_cpu_second']:.2f} ({r['bags_per_cpu_second'] / base['bags_per_cpu_second']:.2f}) | {memory} |"
        )
    overheads = [
        f"{r['setup']} {r['epoch_seconds'] / r['bags'] / (base['epoch_seconds'] / base['bags']):.2f}×"
        for r in rows if r["method"] == "mhim"
    ]
    if overheads:
        lines.append("")
        lines.append(f"MHIM-MIL epoch time over its one-bag baseline: {', '.join(overheads)}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bags", type=int, default=1000, help="bags trained per setup (the cohort is always --cohort-bags)")
    parser.add_argument("--cohort-bags", type=int, default=1000)
    parser.add_argument("--median", type=float, default=8000.0)
    parser.add_argument("--sigma", type=float, default=0.6)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--dtype", choices=("float16", "float32"), default="float16", help="dtype the features are held in")
    parser.add_argument("--model", default="abmil")
    parser.add_argument("--batch-size", type=int, default=8, help="slides per step of the padded and PackMIL setups")
    parser.add_argument("--setups", default=",".join(DEFAULT_SETUPS), help=f"comma-separated, of: {', '.join(SETUPS)}")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="64 bags per setup (epoch time extrapolated)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "training_throughput.json")
    args = parser.parse_args()
    if args.quick:
        args.bags = 64
    args.device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    setups = [s for s in args.setups.split(",") if s]
    unknown = sorted(set(setups) - set(SETUPS))
    if unknown:
        parser.error(f"unknown setup(s) {unknown}; --setups takes {', '.join(SETUPS)}")
    options = {k: v for k, v in vars(args).items() if k != "out"}
    sizes = lognormal_sizes(args.cohort_bags, median=args.median, sigma=args.sigma, seed=args.seed)
    print(f"cohort: {len(sizes)} bags, sizes median {np.median(sizes):.0f}, mean {sizes.mean():.0f}, "
          f"p5 {np.percentile(sizes, 5):.0f}, p95 {np.percentile(sizes, 95):.0f}, max {sizes.max()}; "
          f"training {min(args.bags, len(sizes))} bags per setup on {args.device}, features {args.dtype}; "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    rows = []
    for setup in setups:
        row = run_isolated(setup, options)
        rows.append(row)
        print(f"{setup:20s} {row['bags_per_second']:7.2f} bags/s  epoch {row['epoch_seconds']:8.1f} s  "
              f"({row['execution']}; load {os.getloadavg()[0]:.1f})", flush=True)
    result = {
        "cohort": {"bags": args.cohort_bags, "median": args.median, "sigma": args.sigma, "dim": args.dim,
                   "dtype": args.dtype, "size_median": float(np.median(sizes)), "size_mean": float(sizes.mean()),
                   "size_p95": float(np.percentile(sizes, 95)), "size_max": int(sizes.max())},
        "bags_per_setup": rows[0]["bags"] if rows else 0, "model": args.model, "batch_size": args.batch_size,
        "device": args.device,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "torch_threads": args.threads or torch.get_num_threads(),
                    "allocator": os.environ.get("LD_PRELOAD") or "default (glibc malloc)",
                    "load_average_at_end": os.getloadavg(),
                    "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None},
        "date": time.strftime("%Y-%m-%d"),
        "rows": rows,
    }
    if any(r["setup"] == "one_bag" for r in rows):
        result["table"] = markdown_table(rows, cohort_bags=args.cohort_bags)
        print(result["table"])
    write_json_atomic(result, args.out)
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
