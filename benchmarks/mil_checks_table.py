"""The algorithmic MIL checks for every registered model, as one markdown table.

    uv run --locked python benchmarks/mil_checks_table.py --doc docs/mil-checks.md \
        --json benchmarks/results/mil_checks.json

Every registered model (`list_models()`, after importing every module of `wsi_mil.models`) runs
`run_mil_check` on the three tests with the spec's setup (D = 8, 500 bags per split, 40 epochs,
Adam 1e-3, batches of 32, 5 seeds), a poison-free control for single-concept too, and
`compact=True` (every `*_dim` option capped at 64, Nyström landmarks at 16). Each model runs in
its own process with one torch thread and is stopped after `--time-limit` seconds.

The JSON is a store of rows keyed by model: a run replaces the rows of the models it checks and
keeps the others, so slow models can be re-run alone with fewer seeds
(`--models 'r2t_mil' --seeds 3 --no-single-concept-control`). It is rewritten after every model;
`--doc` then replaces the table between the markers `<!-- mil-checks-table:start -->` and
`<!-- mil-checks-table:end -->` of that file with every row of the store.
"""

from __future__ import annotations

import argparse
import importlib
import json
import multiprocessing as mp
import pkgutil
import platform
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch

import wsi_mil.models
from wsi_mil.checks.generators import CHECK_NAMES
from wsi_mil.checks.runner import SeedRun, judge, run_mil_check
from wsi_mil.models import list_models

START = "<!-- mil-checks-table:start -->"
END = "<!-- mil-checks-table:end -->"


def import_model_modules() -> list[str]:
    """Import every module of `wsi_mil.models` so that all families register; returns failures."""
    failures = []
    for module in pkgutil.iter_modules(wsi_mil.models.__path__):
        try:
            importlib.import_module(f"wsi_mil.models.{module.name}")
        except Exception as err:  # report a broken module and go on with the others
            failures.append(f"wsi_mil.models.{module.name}: {type(err).__name__}: {err}")
    return failures


def _check_in_child(name: str, options: dict[str, Any], pipe: Connection) -> None:
    torch.set_num_threads(1)
    import_model_modules()
    try:
        pipe.send(run_mil_check(name, **options).to_dict())
    except Exception as err:  # the table reports the error of this model and goes on
        pipe.send({"model": name, "error": f"{type(err).__name__}: {err}"})
    finally:
        pipe.close()


def check_model(name: str, options: dict[str, Any], *, time_limit: float) -> dict[str, Any]:
    """Run one model's checks in a fresh process; a result dict, or an error / timeout record."""
    receiver, sender = mp.Pipe(duplex=False)
    process = mp.get_context("fork").Process(target=_check_in_child, args=(name, options, sender))
    started = time.perf_counter()
    process.start()
    sender.close()
    result: dict[str, Any] = {"model": name, "error": f"stopped after the {time_limit:.0f} s limit"}
    if receiver.poll(time_limit):
        result = receiver.recv()
    process.join(timeout=5)
    if process.is_alive():
        process.terminate()
        process.join()
    result["wall_seconds"] = time.perf_counter() - started
    result["options"] = options
    return result


def _cell(row: dict[str, Any]) -> str:
    verdict, _ = judge(row["test"], [SeedRun(**run) for run in row["runs"]])
    row = {**row, "verdict": str(verdict)}  # stored rows are re-judged with the current rule
    text = f"{row['test_auc_mean']:.3f} ± {row['test_auc_sd']:.3f} **{row['verdict']}**"
    extra = [f"train {row['train_auc_mean']:.2f}"]
    if row["control_train_auc_mean"] is not None:
        extra.append(f"ctrl {row['control_train_auc_mean']:.2f}/{row['control_test_auc_mean']:.2f}")
    return f"{text} ({', '.join(extra)})"


def markdown_table(results: list[dict[str, Any]]) -> str:
    """One row per model, one cell per test: test AUC mean ± sd, verdict, train and control AUCs."""
    lines = [
        "| model | " + " | ".join(CHECK_NAMES) + " | seeds × epochs | time |",
        "|---|" + "---|" * len(CHECK_NAMES) + "---|---|",
    ]
    for result in results:
        if "error" in result:
            cells = [result["error"]] + [""] * (len(CHECK_NAMES) - 1)
        else:
            by_test = {row["test"]: row for row in result["results"]}
            cells = [_cell(by_test[t]) if t in by_test else "–" for t in CHECK_NAMES]
        budget = f"{result['options']['seeds']} × {result['options']['epochs']}"
        lines.append(
            f"| {result['model']} | " + " | ".join(cells) + f" | {budget} | {result['wall_seconds']:.0f} s |"
        )
    return "\n".join(lines)


def replace_table(doc: Path, table: str) -> None:
    """Put `table` between the START and END markers of `doc`."""
    text = doc.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{doc} lacks the markers {START} / {END}")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    doc.write_text(f"{head}{START}\n{table}\n{END}{tail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="*", help="fnmatch pattern over model names")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--dim", type=int, default=8)
    parser.add_argument("--time-limit", type=float, default=2400.0, help="seconds per model")
    parser.add_argument(
        "--no-single-concept-control",
        dest="single_concept_control",
        action="store_false",
        help="skip the poison-free control of single-concept (saves a fifth of the time)",
    )
    parser.add_argument("--json", type=Path, help="write all results here (rewritten after each model)")
    parser.add_argument("--doc", type=Path, help="markdown file whose table to replace")
    args = parser.parse_args()

    failures = import_model_modules()
    for failure in failures:
        print(f"import failed: {failure}")
    options = {
        "seeds": args.seeds,
        "epochs": args.epochs,
        "dim": args.dim,
        "single_concept_control": args.single_concept_control,
        "compact": True,
    }
    store: dict[str, Any] = {"results": {}}
    if args.json is not None and args.json.exists():
        store = json.loads(args.json.read_text())
    store.update(torch=torch.__version__, machine=platform.platform(), import_failures=failures)
    for name in list_models(args.models):
        print(f"checking {name} ...", flush=True)
        result = check_model(name, options, time_limit=args.time_limit)
        store["results"][name] = result
        print(markdown_table([result]).splitlines()[-1], flush=True)
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(store, indent=2) + "\n")
    table = markdown_table([store["results"][n] for n in sorted(store["results"])])
    print(table)
    if args.doc is not None:
        replace_table(args.doc, table)


if __name__ == "__main__":
    main()
