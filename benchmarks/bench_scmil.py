"""SC-MIL against plain cross-entropy on synthetic label-imbalanced cohorts (spec §2.11).

    uv run --locked python benchmarks/bench_scmil.py [--quick] [--jobs 2] [--resume] [--out FILE]

Same ABMIL, same splits, same epochs, 5 seeds per imbalance ratio ρ = n_majority / n_minority.
The cohort (`wsi_mil.training.benchmarks_data.subtype_bags`) is a subtyping-like binary task: each
class has its own weak witness pattern in a small share of its instances, and every slide has
its own feature offset. Per seed, one training cohort per ρ (`--majority` bags of class 0,
`majority / ρ` of class 1) is split 80/20 (stratified, seeded) into training and validation
parts, the same for every arm; three test sets of the seed are shared by all ratios and arms:
`id` (balanced, same generator), `ood_shift` (the same with a per-slide affine feature shift,
like a scanner or stain change) and `ood_witness` (the witness rate halved).

Arms: `ce` (plain cross-entropy, shuffled batches), `ce_balanced` (plain, class-balanced
batches: the sampler SC-MIL uses, so that its share of any gain is visible), `scmil` (SC-MIL's
defaults, class-balanced batches). Every arm trains `--epochs` epochs without early stopping;
the epoch is selected on the validation part's macro ROC-AUC (never on a test set).

Metrics per test set (scikit-learn): balanced accuracy, macro-F1, minority-class recall, macro
ROC-AUC, and the 5-NN accuracy of the test bags' embeddings (5-fold, a check of the mechanism).
Intervals are 95% t-intervals across the seeds (mean ± t·sd/√n); SC-MIL's gain is also given as
the mean paired difference per seed with its t-interval. The JSON (`--out`) is rewritten after
every run; `--resume` keeps the runs it holds. `--table FILE` prints the Markdown tables of a
results file and exits.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import stats
from sklearn.metrics import balanced_accuracy_score, f1_score, recall_score, roc_auc_score
from sklearn.model_selection import cross_val_score, train_test_split
from sklearn.neighbors import KNeighborsClassifier

from wsi_mil.atomic import write_text_atomic
from wsi_mil.models import create_model
from wsi_mil.training.bag import Bag
from wsi_mil.training.benchmarks_data import subtype_bags
from wsi_mil.training.config import TrainConfig
from wsi_mil.training.methods import create_method
from wsi_mil.training.trainer import fit

ROOT = Path(__file__).resolve().parents[1]
#: arm -> (training method, balance)
ARMS: dict[str, tuple[str, str]] = {"ce": ("plain", "none"), "ce_balanced": ("plain", "batches"), "scmil": ("scmil", "batches")}
TEST_SETS = ("id", "ood_shift", "ood_witness")
METRICS = ("balanced_accuracy", "f1_macro", "minority_recall", "roc_auc", "knn5_accuracy")
MODEL_KWARGS = {"hidden_dim": 128, "attention_dim": 64, "dropout": 0.1, "attention_dropout": 0.1}
#: `subtype_bags` settings; witness rate, separation and slide offset can be changed from the command line
#: options that change what one run measures: a resumed file must share them
RUN_SETTINGS = ("majority", "test_per_class", "epochs", "lr", "batch_size")
COHORT = {"dim": 32, "witness_rate": 0.1, "separation": 2.5, "slide_offset_sd": 0.25, "min_size": 50, "max_size": 200}


def test_sets(seed: int, per_class: int, cohort: dict[str, Any]) -> dict[str, list[Bag]]:
    """The seed's three balanced test sets (their generator seeds never meet a training seed)."""
    witness = {**cohort, "witness_rate": cohort["witness_rate"] / 2}
    return {
        "id": subtype_bags([per_class, per_class], seed=10_000 + seed, prefix="id", **cohort),
        "ood_shift": subtype_bags([per_class, per_class], seed=20_000 + seed, prefix="shift", scanner_shift=True, **cohort),
        "ood_witness": subtype_bags([per_class, per_class], seed=30_000 + seed, prefix="witness", **witness),
    }


@torch.no_grad()
def predict(model: torch.nn.Module, bags: list[Bag]) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities `[M, C]` and bag embeddings `[M, E]` of the model (eval mode, one bag at a time)."""
    model.eval()
    probs, embeddings = [], []
    for bag in bags:
        output = model(bag.features.unsqueeze(0), None)
        probs.append(torch.softmax(output.logits, dim=-1)[0].numpy())
        embeddings.append(output.embedding.flatten(1)[0].numpy())
    return np.stack(probs), np.stack(embeddings)


def scores(labels: np.ndarray, probs: np.ndarray, embeddings: np.ndarray) -> dict[str, float]:
    """Balanced accuracy, macro-F1, recall of class 1 (the minority), ROC-AUC, 5-NN embedding accuracy."""
    predicted = probs.argmax(axis=1)
    knn = cross_val_score(KNeighborsClassifier(5), embeddings, labels, cv=5)
    return {
        "balanced_accuracy": float(balanced_accuracy_score(labels, predicted)),
        "f1_macro": float(f1_score(labels, predicted, average="macro")),
        "minority_recall": float(recall_score(labels, predicted, pos_label=1)),
        "roc_auc": float(roc_auc_score(labels, probs[:, 1])),
        "knn5_accuracy": float(knn.mean()),
    }


def run_one(task: dict[str, Any]) -> dict[str, Any]:
    """Train one arm on one (ratio, seed) cohort and score it on the seed's test sets."""
    torch.set_num_threads(1)
    ratio, seed, arm = task["ratio"], task["seed"], task["arm"]
    majority, cohort = task["majority"], task["cohort"]
    bags = subtype_bags([majority, max(1, round(majority / ratio))], seed=1000 * ratio + seed, prefix="train", **cohort)
    train_idx, val_idx = train_test_split(
        np.arange(len(bags)), test_size=0.2, stratify=[bag.label for bag in bags], random_state=seed
    )
    method_name, balance = ARMS[arm]
    config = TrainConfig(
        epochs=task["epochs"], lr=task["lr"], batch_size=task["batch_size"], balance=balance, patience=None,
        selection_metric="roc_auc_macro", seed=seed, device="cpu",
    )
    torch.manual_seed(seed)
    model = create_model("abmil", cohort["dim"], 2, **MODEL_KWARGS)
    started = time.perf_counter()
    terms: list[dict[str, float]] = []
    result = fit(model, create_method(method_name), [bags[i] for i in train_idx], [bags[i] for i in val_idx],
                 config=config, num_classes=2, on_epoch_end=lambda report: terms.append(report.train_terms))
    model.load_state_dict(result.best_state)
    measured = {}
    for name, test in test_sets(seed, task["test_per_class"], cohort).items():
        probs, embeddings = predict(model, test)
        measured[name] = scores(np.array([bag.label for bag in test]), probs, embeddings)
    return {**task, "best_epoch": result.best_epoch, "seconds": time.perf_counter() - started,
            "train_terms": terms, "test": measured}


def interval(values: list[float]) -> dict[str, float | None]:
    """Mean, sd and the 95% t-interval half-width across seeds."""
    if len(values) < 2:
        return {"mean": values[0] if values else None, "sd": None, "ci95": None, "n": len(values)}
    sd = statistics.stdev(values)
    half = float(stats.t.ppf(0.975, len(values) - 1)) * sd / len(values) ** 0.5
    return {"mean": statistics.mean(values), "sd": sd, "ci95": half, "n": len(values)}


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per ratio, test set, metric: each arm's interval, and SC-MIL minus each CE arm, paired by seed."""
    summary: dict[str, Any] = {}
    for ratio in sorted({r["ratio"] for r in runs}):
        by_arm = {arm: {r["seed"]: r for r in runs if r["ratio"] == ratio and r["arm"] == arm} for arm in ARMS}
        for test in TEST_SETS:
            for metric in METRICS:
                cell = summary.setdefault(str(ratio), {}).setdefault(test, {}).setdefault(metric, {})
                for arm, seeds in by_arm.items():
                    cell[arm] = interval([seeds[s]["test"][test][metric] for s in sorted(seeds)])
                for baseline in ("ce", "ce_balanced"):
                    paired = sorted(set(by_arm["scmil"]) & set(by_arm[baseline]))
                    cell[f"scmil_minus_{baseline}"] = interval(
                        [by_arm["scmil"][s]["test"][test][metric] - by_arm[baseline][s]["test"][test][metric] for s in paired]
                    )
    return summary


def fmt(cell: dict[str, float | None], signed: bool = False) -> str:
    if cell["mean"] is None:
        return "–"
    mean = f"{cell['mean']:+.3f}" if signed else f"{cell['mean']:.3f}"
    return mean if cell["ci95"] is None else f"{mean} ± {cell['ci95']:.3f}"


def tables(summary: dict[str, Any]) -> str:
    """Markdown: per test set, one row per (ratio, arm) for balanced accuracy, macro-F1, minority recall, AUC, 5-NN."""
    lines = []
    for test in TEST_SETS:
        lines += [f"**{test}**", "", "| ρ | arm | balanced accuracy | macro-F1 | minority recall | ROC-AUC | 5-NN emb. acc. |",
                  "|---|---|---|---|---|---|---|"]
        for ratio, by_test in summary.items():
            cells = by_test[test]
            for arm in (*ARMS, "scmil_minus_ce", "scmil_minus_ce_balanced"):
                signed = arm.startswith("scmil_minus")
                label = {"scmil_minus_ce": "SC-MIL − CE (paired)", "scmil_minus_ce_balanced": "SC-MIL − CE balanced (paired)"}.get(arm, f"`{arm}`")
                lines.append(f"| 1:{ratio} | {label} | " + " | ".join(fmt(cells[m][arm], signed) for m in METRICS) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    """Parse the options, run every (ratio, seed, arm) in a worker pool, write the JSON and print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "scmil.json")
    parser.add_argument("--ratios", default="1,5,10,20", help="imbalance ratios ρ = majority / minority")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--majority", type=int, default=400, help="bags of the majority class per training cohort")
    parser.add_argument("--test-per-class", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--witness-rate", type=float, default=COHORT["witness_rate"])
    parser.add_argument("--separation", type=float, default=COHORT["separation"])
    parser.add_argument("--slide-offset-sd", type=float, default=COHORT["slide_offset_sd"])
    parser.add_argument("--jobs", type=int, default=1, help="worker processes (one torch thread each)")
    parser.add_argument("--resume", action="store_true", help="keep the runs already in --out")
    parser.add_argument("--quick", action="store_true", help="ratio 10 only, 2 seeds, 120 majority bags, 10 epochs")
    parser.add_argument("--table", type=Path, help="print the tables of this results file and exit")
    args = parser.parse_args()
    if args.table:
        print(tables(summarise(json.loads(args.table.read_text())["runs"])))
        return
    if args.quick:
        args.ratios, args.seeds, args.majority, args.epochs, args.test_per_class = "10", 2, 120, 10, 100
    cohort = {**COHORT, "witness_rate": args.witness_rate, "separation": args.separation,
              "slide_offset_sd": args.slide_offset_sd}
    protocol = {k: str(v) for k, v in vars(args).items()} | {"model_kwargs": MODEL_KWARGS, "cohort": cohort}
    runs: list[dict[str, Any]] = []
    if args.resume and args.out.exists():
        saved = json.loads(args.out.read_text())
        changed = [key for key in (*RUN_SETTINGS, "cohort", "model_kwargs") if saved["protocol"][key] != protocol[key]]
        if changed:
            raise SystemExit(f"{args.out} was measured with other {', '.join(changed)}; choose another --out")
        runs = saved["runs"]
    done = {(r["ratio"], r["seed"], r["arm"]) for r in runs}
    common = {"majority": args.majority, "epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size,
              "test_per_class": args.test_per_class, "cohort": cohort}
    tasks = [
        {"ratio": int(ratio), "seed": seed, "arm": arm, **common}
        for seed in range(args.seeds) for ratio in args.ratios.split(",") for arm in args.arms.split(",")
        if (int(ratio), seed, arm) not in done
    ]
    print(f"{len(tasks)} runs to do, {len(runs)} kept", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__}

    def save() -> None:
        payload = {"protocol": protocol, "machine": machine, "runs": runs, "summary": summarise(runs)}
        write_text_atomic(args.out, json.dumps(payload, indent=2))

    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
        pending = {pool.submit(run_one, task) for task in tasks}
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                run = future.result()
                runs.append(run)
                test = run["test"]["id"]
                print(f"1:{run['ratio']:<3d} seed {run['seed']} {run['arm']:12s} id bal.acc {test['balanced_accuracy']:.3f} "
                      f"minority recall {test['minority_recall']:.3f} ({run['seconds']:.0f} s, best epoch {run['best_epoch']})",
                      flush=True)
                save()
    save()
    print(tables(summarise(runs)))
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
