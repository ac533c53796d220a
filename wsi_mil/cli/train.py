"""`wsi-mil train`, `evaluate` and `localise`: thin shells over `wsi_mil.training`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from wsi_mil.cli._app import app, console
from wsi_mil.errors import WsiMilError

if TYPE_CHECKING:
    from wsi_mil.training.trainer import EpochReport


@app.command()
def train(
    out: Annotated[Path, typer.Option("--out", help="run folder (re-run with the same settings to resume)")],
    features: Annotated[Path | None, typer.Option("--features", help="folder of feature files")] = None,
    labels: Annotated[Path | None, typer.Option("--labels", help="CSV: slide_id,label[,case_id][,split]")] = None,
    model: Annotated[str | None, typer.Option(help="model name (wsi-mil list-models); default abmil")] = None,
    method: Annotated[str | None, typer.Option(help="plain | aem | acmil | mhim | packmil | scmil | ins (--model ins)")] = None,
    folds: Annotated[int | None, typer.Option(help="k of the patient-grouped stratified k-fold")] = None,
    epochs: Annotated[int | None, typer.Option(help="maximum epochs per fold")] = None,
    seed: Annotated[int | None, typer.Option(help="random seed")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="YAML TrainConfig; flags override it")] = None,
    lr: Annotated[float | None, typer.Option(help="peak learning rate")] = None,
    batch_size: Annotated[int | None, typer.Option(help="bags per step (>1 pads with masks)")] = None,
    max_instances: Annotated[int | None, typer.Option(help="random cap on instances per training bag")] = None,
    selection_metric: Annotated[str | None, typer.Option(help="roc_auc_macro | balanced_accuracy | f1_macro | accuracy_micro | loss")] = None,
    patience: Annotated[int | None, typer.Option(help="early-stopping patience in epochs")] = None,
    balance: Annotated[str | None, typer.Option(help="none | class_weights | sampler | batches")] = None,
    device: Annotated[str | None, typer.Option(help="auto | cpu | cuda[:N]")] = None,
    drop_missing: Annotated[bool | None, typer.Option("--drop-missing", help="drop labelled slides without features")] = None,
    ignore_unlabelled: Annotated[bool | None, typer.Option("--ignore-unlabelled", help="ignore feature files without a label")] = None,
    executor: Annotated[str, typer.Option(help="local (folds one after another) | ray (folds as Ray tasks at once)")] = "local",
    ray_address: Annotated[str | None, typer.Option(help="Ray cluster address, e.g. auto (default: this machine's Ray, else a new local one)")] = None,
    ray_cpus: Annotated[float, typer.Option(help="CPUs per fold task on Ray (its torch threads)")] = 1.0,
    ray_gpus: Annotated[float | None, typer.Option(help="GPUs per fold task on Ray (default: 1 if any, 0 with --device cpu)")] = None,
) -> None:
    """Train cross-validated MIL models on a cohort of feature files into a run folder."""
    from wsi_mil.training import load_config, train_cohort

    overrides: dict[str, Any] = {
        "features_dir": features, "labels_csv": labels, "model": model, "method": method, "folds": folds,
        "epochs": epochs, "seed": seed, "lr": lr, "batch_size": batch_size, "max_instances": max_instances,
        "selection_metric": selection_metric, "patience": patience, "balance": balance, "device": device,
        "drop_missing_features": drop_missing, "ignore_unlabelled_features": ignore_unlabelled,
    }
    try:
        settings = load_config(config, overrides=overrides)
        with Progress(
            TextColumn("[bold]fold {task.fields[fold]}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"), TimeElapsedColumn(), console=console,
        ) as progress:
            tasks: dict[int, TaskID] = {}

            def on_epoch_end(report: EpochReport) -> None:
                if report.fold not in tasks:
                    tasks[report.fold] = progress.add_task("", total=report.epochs, fold=report.fold, status="")
                value = report.val_metrics[settings.selection_metric]
                status = f"val {settings.selection_metric} {value:.3f}" + (" *" if report.is_best else "")
                progress.update(tasks[report.fold], completed=report.epoch, status=status)
                if report.stop:
                    progress.update(tasks[report.fold], total=report.epoch, status=status + " (early stop)")

            if executor == "ray":
                console.print("folds run as Ray tasks: per-epoch progress is in the run's train.log")
            metrics = train_cohort(
                settings, out, on_epoch_end=on_epoch_end, executor=executor,  # type: ignore[arg-type]
                ray_address=ray_address, ray_cpus_per_fold=ray_cpus, ray_gpus_per_fold=ray_gpus,
            )
    except WsiMilError as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from err
    print_metrics(metrics)
    console.print(f"run folder: {out}")


@app.command()
def evaluate(run: Annotated[Path, typer.Argument(help="a run folder made by wsi-mil train")]) -> None:
    """Recompute a run's metrics, predictions and plots from its saved checkpoints."""
    from wsi_mil.training import evaluate_run

    try:
        metrics = evaluate_run(run)
    except WsiMilError as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from err
    print_metrics(metrics)


@app.command()
def localise(
    run: Annotated[Path, typer.Argument(help="a run folder made by wsi-mil train")],
    features: Annotated[Path, typer.Option("--features", help="folder of the run's feature files")],
    regions: Annotated[Path, typer.Option("--regions", help='JSON {"slide_id": [x, y, w, h]} in level-0 pixels, or a demo cohort.json')],
    out: Annotated[Path | None, typer.Option("--out", help="write per-slide results and the summary as JSON")] = None,
    min_overlap: Annotated[float, typer.Option(help="share of a tile's area in the region that makes it positive")] = 0.5,
    device: Annotated[str, typer.Option(help="cpu | cuda[:N]")] = "cpu",
) -> None:
    """Instance-level AUC of attention for the tiles inside known regions, each slide scored by the
    fold model that held it out."""
    from wsi_mil.training.localisation import (
        localise_run,
        read_regions,
        save_localisation,
        summarise_localisation,
    )

    try:
        slides = localise_run(run, features, read_regions(regions), min_overlap=min_overlap, device=device)
    except WsiMilError as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from err
    table = Table("slide", "fold", "tiles", "in region", "instance AUC", "attention in region")
    for s in slides:
        auc = "n/a" if s.instance_auc is None else f"{s.instance_auc:.3f}"
        table.add_row(s.slide_id, str(s.fold), str(s.tiles), str(s.positive_tiles), auc, f"{s.attention_in_region:.3f}")
    console.print(table)
    summary = summarise_localisation(slides)
    if summary["instance_auc_mean"] is None:
        console.print("no held-out slide with a region has both region and non-region tiles")
    else:
        console.print(f"mean instance AUC {summary['instance_auc_mean']:.3f} over {summary['slides']} slides "
                      f"(min {summary['instance_auc_min']:.3f})")
    if out is not None:
        save_localisation(slides, out)
        console.print(f"written to {out}")


def print_metrics(metrics: dict[str, Any]) -> None:
    """One table per part (val, test): each scalar metric's mean ± sd over folds."""
    from wsi_mil.training.metrics import SCALAR_METRICS

    for part, summary in metrics.get("summary", {}).items():
        table = Table("metric", "mean", "sd", "folds", title=f"{part} (mean ± sd over folds)")
        for name in SCALAR_METRICS:
            entry = summary[name]
            if entry["mean"] is None:
                table.add_row(name, "n/a", "", "0")
            else:
                table.add_row(name, f"{entry['mean']:.4f}", f"{entry['sd']:.4f}", str(entry["n_folds"]))
        console.print(table)


def print_held_out_predictions(run: Path) -> None:
    """A table of every slide's prediction by the fold model that held it out (its test part)."""
    import csv

    from wsi_mil.inference.loading import RunLayout

    with RunLayout(run).predictions.open(newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row["split"] == "test"]
    if not rows:
        return
    classes = [key.removeprefix("prob_") for key in rows[0] if key.startswith("prob_")]
    table = Table("slide", "label", "predicted", *[f"p({name})" for name in classes], "fold",
                  title="held-out predictions (each slide by the fold that did not train on it)")
    for row in sorted(rows, key=lambda r: r["slide_id"]):
        style = "green" if row["predicted"] == row["label"] else "red"
        table.add_row(row["slide_id"], row["label"], f"[{style}]{row['predicted']}[/{style}]",
                      *[f"{float(row[f'prob_{name}']):.3f}" for name in classes], row["fold"])
    console.print(table)
