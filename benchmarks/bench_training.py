"""Training throughput: one bag per step vs padded batches vs PackMIL packing, and MHIM-MIL's
overhead over its baseline, all measured in one run on one synthetic cohort.

    uv run --locked python benchmarks/bench_training.py [--quick] [--bags N] [--device cuda]

The cohort: `--bags` bags (default 1,000) whose sizes are lognormal (median `--median` 8,000
instances, log-sd `--sigma` 0.6, clipped to [256, 60,000]), D = 1,024, random binary labels. The
features are views into one shared random bank held in host memory, so generating the cohort
costs nothing and the numbers measure the training step (batching, host-to-device copy,
forward, backward, optimiser) as the trainer runs it, not feature-file reading.

Every setup trains `--model` (default `abmil`, gated) for one epoch through `wsi_mil.training.fit`
with the same bags in the same order (the trainer's seeded shuffle); the validation part is two
small bags so validation costs nothing. Each setup first runs a short warm-up (CUDA context,
kernel selection). Reported: epoch seconds, bags/s, cohort instances/s (instances of the bags
trained on, whatever a method drops), instances the model actually saw, peak GPU memory, and each
setup's ratio to the one-bag baseline of the same run. With `--bags` below the cohort size the
epoch time for 1,000 bags is extrapolated and marked so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wsi_mil.models import create_model
from wsi_mil.training.bag import Bag
from wsi_mil.training.config import TrainConfig
from wsi_mil.training.methods import create_method
from wsi_mil.training.trainer import EpochReport, fit

ROOT = Path(__file__).resolve().parents[1]

#: setup name -> (method, method kwargs, batch size or None = --batch-size, max_instances)
SETUPS: dict[str, tuple[str, dict[str, Any], int | None, int | None]] = {
    "one_bag": ("plain", {}, 1, None),
    "padded": ("plain", {}, None, None),
    "padded_capped": ("plain", {}, None, 8192),
    "packmil": ("packmil", {"residual_loss": "focal"}, None, None),
    "packmil_downsample": ("packmil", {"residual_loss": "focal", "downsample": "attention", "downsample_ratio": 4}, None, None),
    "packmil_ads": ("packmil", {"residual_loss": "focal", "downsample": "ads", "downsample_ratio": 4}, None, None),
    "mhim_v1": ("mhim", {"version": "v1", "high_mask_ratio": 0.01, "random_mask_ratio": 0.5, "momentum": 0.9997}, 1, None),
    "mhim_v2": ("mhim", {"version": "v2"}, 1, None),
}


def lognormal_sizes(count: int, *, median: float, sigma: float, seed: int, low: int = 256, high: int = 60_000) -> np.ndarray:
    """`count` bag sizes, lognormal around `median` with log-sd `sigma`, clipped to [low, high]."""
    rng = np.random.default_rng(seed)
    return np.clip(np.round(median * np.exp(sigma * rng.standard_normal(count))), low, high).astype(np.int64)


def synthetic_cohort(sizes: np.ndarray, *, dim: int, seed: int) -> list[Bag]:
    """Bags whose features are views of one random bank (no per-bag memory), balanced random labels."""
    generator = torch.Generator().manual_seed(seed)
    bank = torch.randn(int(sizes.max()) + 65_536, dim, generator=generator)
    offsets = torch.randint(0, 65_536, (len(sizes),), generator=generator).tolist()
    labels = torch.randperm(len(sizes), generator=generator) % 2
    return [
        Bag(bank[offset : offset + int(size)], int(label), f"bag_{i:04d}")
        for i, (size, offset, label) in enumerate(zip(sizes, offsets, labels.tolist(), strict=True))
    ]


def config_for(setup: str, *, batch_size: int, device: str, seed: int) -> TrainConfig:
    method, _, fixed_batch, cap = SETUPS[setup]
    return TrainConfig(
        model="abmil", method=method, epochs=1, batch_size=fixed_batch or batch_size, max_instances=cap,
        lr=1e-4, optimizer="adamw", deterministic=False, device=device, seed=seed, patience=None,
        selection_metric="loss",
    )


def run_setup(
    setup: str, bags: list[Bag], val: list[Bag], *, args: argparse.Namespace, device: str
) -> dict[str, Any]:
    """Train one epoch of `setup` over `bags` (after a warm-up on a few bags) and time it."""
    method_name, method_kwargs, _, _ = SETUPS[setup]
    config = config_for(setup, batch_size=args.batch_size, device=device, seed=args.seed)

    def one_epoch(train: list[Bag]) -> EpochReport:
        reports: list[EpochReport] = []
        torch.manual_seed(args.seed)
        model = create_model(args.model, args.dim, 2)
        method = create_method(method_name, **method_kwargs)
        fit(model, method, train, val, config=config, num_classes=2, on_epoch_end=reports.append)
        return reports[-1]

    one_epoch(bags[: max(2, 2 * config.batch_size)])
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    report = one_epoch(bags)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    instances = int(sum(bag.features.shape[0] for bag in bags))
    row = {
        "setup": setup, "method": method_name, "method_kwargs": method_kwargs,
        "batch_size": config.batch_size, "max_instances": config.max_instances,
        "bags": len(bags), "steps": -(-len(bags) // config.batch_size),
        "epoch_seconds": seconds, "fit_epoch_seconds": report.seconds,
        "bags_per_second": len(bags) / seconds, "cohort_instances_per_second": instances / seconds,
        "train_loss": report.train_loss,
        "peak_gpu_memory_gb": torch.cuda.max_memory_allocated() / 1e9 if device.startswith("cuda") else None,
    }
    if "main_tokens" in report.train_terms:
        row["mean_main_tokens_per_step"] = report.train_terms["main_tokens"]
        row["mean_residual_tokens_per_step"] = report.train_terms.get("residual_tokens")
    return row


def markdown_table(rows: list[dict[str, Any]], *, cohort_bags: int) -> str:
    """The results as a Markdown table, ratios against the `one_bag` row of the same run."""
    base = next(r for r in rows if r["setup"] == "one_bag")
    extrapolated = rows[0]["bags"] != cohort_bags
    lines = [
        f"| setup | bags/step | bags/s | epoch of {cohort_bags:,} bags{' (extrapolated)' if extrapolated else ''} "
        "| cohort instances/s | × one-bag | peak GPU memory |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        epoch = r["epoch_seconds"] * cohort_bags / r["bags"]
        memory = f"{r['peak_gpu_memory_gb']:.1f} GB" if r["peak_gpu_memory_gb"] is not None else "–"
        lines.append(
            f"| {r['setup']} | {r['batch_size']} | {r['bags_per_second']:.1f} | {epoch:,.0f} s "
            f"| {r['cohort_instances_per_second']:,.0f} | {r['bags_per_second'] / base['bags_per_second']:.2f} | {memory} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bags", type=int, default=1000, help="bags trained per setup (the cohort is always --cohort-bags)")
    parser.add_argument("--cohort-bags", type=int, default=1000)
    parser.add_argument("--median", type=float, default=8000.0)
    parser.add_argument("--sigma", type=float, default=0.6)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--model", default="abmil")
    parser.add_argument("--batch-size", type=int, default=8, help="slides per step of the padded and PackMIL setups")
    parser.add_argument("--setups", default=",".join(SETUPS))
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="40 bags per setup (epoch time extrapolated)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "training_throughput.json")
    args = parser.parse_args()
    if args.quick:
        args.bags = 40
    if args.threads:
        torch.set_num_threads(args.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    sizes = lognormal_sizes(args.cohort_bags, median=args.median, sigma=args.sigma, seed=args.seed)
    cohort = synthetic_cohort(sizes, dim=args.dim, seed=args.seed)
    train = cohort[: args.bags]
    val = [Bag(cohort[0].features[:64], 0, "val_0"), Bag(cohort[1].features[:64], 1, "val_1")]
    print(f"cohort: {len(cohort)} bags, sizes median {np.median(sizes):.0f}, mean {sizes.mean():.0f}, "
          f"p5 {np.percentile(sizes, 5):.0f}, p95 {np.percentile(sizes, 95):.0f}, max {sizes.max()}; "
          f"training {len(train)} bags per setup on {device}", flush=True)
    rows = []
    for setup in filter(None, args.setups.split(",")):
        row = run_setup(setup, train, val, args=args, device=device)
        rows.append(row)
        print(f"{setup:20s} {row['bags_per_second']:7.2f} bags/s  epoch {row['epoch_seconds']:8.1f} s", flush=True)
    result = {
        "cohort": {"bags": args.cohort_bags, "median": args.median, "sigma": args.sigma, "dim": args.dim,
                   "size_median": float(np.median(sizes)), "size_mean": float(sizes.mean()),
                   "size_p95": float(np.percentile(sizes, 95)), "size_max": int(sizes.max())},
        "bags_per_setup": len(train), "model": args.model, "batch_size": args.batch_size, "device": device,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads(),
                    "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None},
        "rows": rows,
    }
    if any(r["setup"] == "one_bag" for r in rows):
        result["table"] = markdown_table(rows, cohort_bags=args.cohort_bags)
        print(result["table"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(args.out)
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
