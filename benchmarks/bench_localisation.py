"""Attention localisation on the demo cohort: instance-level AUC of each model's attention for the
tiles of the known lesion, every slide scored by the fold model that held it out.

    uv run --locked python benchmarks/bench_localisation.py [--slides 16] [--models abmil,dsmil,ins:ins,...]

The cohort is `wsi_mil.demo`'s synthetic slides (half carry a lesion box of dense, large nuclei),
preprocessed as `make demo` does (`preprocess_demo`: random encoder weights, recorded as such), then
trained per model with the demo's settings (k-fold, Adam-W lr 1e-3, 30 epochs, no early stop).
A tile is positive when half its area lies in the lesion box. "attention in lesion" is the share
of the attention mass on lesion tiles; chance is the lesion's share of the tiles. A model may name
its training method after a colon (`ins:ins` = `--model ins --method ins`; default `plain`).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

from wsi_mil.demo.run import preprocess_demo
from wsi_mil.training import TrainConfig, train_cohort
from wsi_mil.training.localisation import localise_run, summarise_localisation

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODELS = "abmil,abmil_plain,clam_sb,clam_mb,dsmil,acmil,transmil,r2t_mil,mamba_mil"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / ".cache" / "localisation")
    parser.add_argument("--slides", type=int, default=16)
    parser.add_argument("--encoder", default="resnet50-trunc")
    parser.add_argument("--models", default=DEFAULT_MODELS)
    parser.add_argument("--folds", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "localisation.json")
    args = parser.parse_args()

    started = time.perf_counter()
    cohort, results = preprocess_demo(args.work, slides=args.slides, encoder=args.encoder)
    failed = [r for r in results if r.status not in ("done", "skipped")]
    if failed:
        raise SystemExit(f"preprocessing failed: {[(r.slide_id, r.reason) for r in failed]}")
    print(f"cohort ready in {time.perf_counter() - started:.0f} s", flush=True)
    regions = {s.slide_id: s.lesion_box for s in cohort if s.lesion_box is not None}
    features_dir = args.work / "preprocessed" / "features"
    report: dict[str, Any] = {
        "cohort": {"slides": args.slides, "size": cohort[0].width, "encoder": args.encoder, "weights": "random",
                   "lesion_slides": len(regions)},
        "training": {"folds": args.folds, "epochs": args.epochs, "lr": 1e-3},
        "machine": {"platform": platform.platform(), "torch": torch.__version__},
        "models": {},
    }
    for name in filter(None, args.models.split(",")):
        model, _, method = name.partition(":")
        run_dir = args.work / f"run_{name.replace(':', '_')}"
        train_config = TrainConfig(
            features_dir=features_dir, labels_csv=args.work / "slides" / "labels.csv", model=model,
            method=method or "plain",
            folds=args.folds, epochs=args.epochs, lr=1e-3, patience=None, bootstrap_samples=0, seed=args.seed,
        )
        model_started = time.perf_counter()
        train_cohort(train_config, run_dir)
        slides = localise_run(run_dir, features_dir, regions)
        metrics = json.loads((run_dir / "metrics.json").read_text())
        summary = summarise_localisation(slides)
        summary["slide_test_roc_auc_macro_mean"] = metrics["summary"]["test"]["roc_auc_macro"]["mean"]
        summary["seconds"] = time.perf_counter() - model_started
        summary["per_slide"] = [vars(s) for s in slides]
        report["models"][name] = summary
        print(f"{name:12s} instance AUC {summary['instance_auc_mean']:.3f} (min {summary['instance_auc_min']:.3f}), "
              f"attention in lesion {summary['attention_in_region_mean']:.2f} vs chance "
              f"{summary['positive_tile_fraction_mean']:.2f}, slide test AUC {summary['slide_test_roc_auc_macro_mean']:.3f}",
              flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
