"""Instance-level evidence for INS: how well each arm's per-instance scores find the witnesses of
bags whose instance labels are known.

    uv run --locked python benchmarks/bench_ins_instances.py [--seeds 5] [--arms abmil,ins:plain,ins:ins]

Cohorts (`wsi_mil.training.benchmarks_data`): digits witness bags (sklearn's 8×8 digits, mean bag
size 10, positive iff a 9 is in the bag, Ilse et al.'s unbalanced recipe; 200 training, 50
validation, 500 test bags) and Gaussian witness bags (100 instances of N(0, I_64) per bag, half the
bags positive with a share `w` of witnesses N(μ, I), |μ| = 3; 40 training, 20 validation, 100 test
bags) at w = 0.1 and 0.05. Arms: a model name with an optional `:method` (`ins:ins` = `--model ins
--method ins`, `ins:plain` = the same model as a max-pooled instance classifier, `abmil` = attention
as the instance score). Every arm trains with the same settings (AdamW lr 1e-3, batches of 8 bags,
30 epochs, the epoch with the best validation bag AUC kept), seeds 0..n-1.

Instance scores: `MILOutput.instance_scores` when the model gives them (INS: each instance's
positive probability), else its attention. Metrics on the test bags: instance AUC pooled over all
test instances (attention sums to 1 per bag, so this pooled figure handicaps attention models on
bags of different sizes), the mean instance AUC within positive bags (ranking inside a bag, fair to
attention), and the bag AUC. The table gives mean ± sd over seeds.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from wsi_mil.models import create_model
from wsi_mil.training.benchmarks_data import (
    WitnessBags,
    digits_witness_bag_sets,
    gaussian_witness_bags,
)
from wsi_mil.training.config import TrainConfig
from wsi_mil.training.methods import create_method
from wsi_mil.training.trainer import fit

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("instance_auc_pooled", "instance_auc_within_positive_bags", "bag_auc")


def cohort(name: str, seed: int) -> tuple[WitnessBags, WitnessBags, WitnessBags]:
    """Training, validation and test bags of a named cohort for one seed."""
    if name == "digits":
        train, test = digits_witness_bag_sets(num_train_bags=250, num_test_bags=500, seed=seed)
        split = WitnessBags(train.bags[:200], train.instance_labels[:200])
        val = WitnessBags(train.bags[200:], train.instance_labels[200:])
        return split, val, test
    rate = float(name.removeprefix("gaussian_w"))
    base = 1000 * seed
    return (
        gaussian_witness_bags(40, witness_rate=rate, seed=base, prefix="train"),
        gaussian_witness_bags(20, witness_rate=rate, seed=base + 1, prefix="val"),
        gaussian_witness_bags(100, witness_rate=rate, seed=base + 2, prefix="test"),
    )


def score(model: torch.nn.Module, test: WitnessBags) -> dict[str, float]:
    """The three metrics of a trained model on test bags with instance labels."""
    model.eval()
    instance_scores, bag_scores = [], []
    with torch.no_grad():
        for bag in test.bags:
            output = model(bag.features.unsqueeze(0).float(), None)
            scores = output.instance_scores if output.instance_scores is not None else output.attention
            instance_scores.append(scores[0].numpy())
            bag_scores.append(float(torch.softmax(output.logits.float(), dim=-1)[0, 1]))
    within = [
        roc_auc_score(labels, scores)
        for labels, scores in zip(test.instance_labels, instance_scores, strict=True)
        if labels.any() and not labels.all()
    ]
    return {
        "instance_auc_pooled": float(roc_auc_score(np.concatenate(test.instance_labels), np.concatenate(instance_scores))),
        "instance_auc_within_positive_bags": float(np.mean(within)),
        "bag_auc": float(roc_auc_score([b.label for b in test.bags], bag_scores)),
    }


def run(arm: str, cohort_name: str, seed: int, epochs: int) -> dict[str, Any]:
    """Train one arm on one cohort draw and score it."""
    train, val, test = cohort(cohort_name, seed)
    model_name, _, method = arm.partition(":")
    torch.manual_seed(seed)
    model = create_model(model_name, train.bags[0].features.shape[1], 2)
    config = TrainConfig(epochs=epochs, lr=1e-3, batch_size=8, patience=None, seed=seed, device="cpu",
                         selection_metric="roc_auc_macro")
    started = time.perf_counter()
    result = fit(model, create_method(method or "plain"), train.bags, val.bags, config=config, num_classes=2)
    model.load_state_dict(result.best_state)
    return {"arm": arm, "cohort": cohort_name, "seed": seed, "best_epoch": result.best_epoch,
            "seconds": time.perf_counter() - started, **score(model, test)}


def table(runs: list[dict[str, Any]], arms: list[str], cohorts: list[str]) -> str:
    """Markdown: one row per (cohort, arm), mean ± sd over seeds of each metric."""
    lines = ["| cohort | arm | " + " | ".join(METRICS) + " | seeds |", "|---|---|" + "---|" * (len(METRICS) + 1)]
    for cohort_name in cohorts:
        for arm in arms:
            cell = [r for r in runs if r["arm"] == arm and r["cohort"] == cohort_name]
            if not cell:
                continue
            values = []
            for metric in METRICS:
                column = [r[metric] for r in cell]
                sd = statistics.stdev(column) if len(column) > 1 else 0.0
                values.append(f"{statistics.mean(column):.3f} ± {sd:.3f}")
            lines.append(f"| {cohort_name} | `{arm}` | " + " | ".join(values) + f" | {len(cell)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arms", default="abmil,ins:plain,ins:ins")
    parser.add_argument("--cohorts", default="digits,gaussian_w0.1,gaussian_w0.05")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "ins_instances.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    arms, cohorts = args.arms.split(","), args.cohorts.split(",")
    report: dict[str, Any] = {"protocol": {k: str(v) for k, v in vars(args).items()},
                              "machine": {"platform": platform.platform(), "torch": torch.__version__}, "runs": []}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for seed in range(args.seeds):
        for cohort_name in cohorts:
            for arm in arms:
                result = run(arm, cohort_name, seed, args.epochs)
                report["runs"].append(result)
                print(f"{cohort_name:16s} {arm:10s} seed {seed}: " + ", ".join(f"{m} {result[m]:.3f}" for m in METRICS)
                      + f" ({result['seconds']:.0f} s)", flush=True)
                args.out.write_text(json.dumps(report, indent=2))
    print(table(report["runs"], arms, cohorts))
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
