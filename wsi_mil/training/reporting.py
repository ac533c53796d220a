"""A run's report: `evaluate_run` recomputes every metric from the saved best checkpoints and writes
`metrics.json`, `predictions.csv` (per slide, with its top-attention tiles), `roc.png` and
`confusion.png` into the run folder (layout: `wsi_mil.inference.loading`)."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from sklearn.metrics import roc_curve

from wsi_mil.atomic import atomic_open, atomic_path, write_text_atomic
from wsi_mil.errors import RunFolderError
from wsi_mil.inference.heatmaps import top_tiles
from wsi_mil.inference.loading import RunLayout, load_model
from wsi_mil.training.cohort import Cohort, cohort_for
from wsi_mil.training.config import load_config
from wsi_mil.training.metrics import classification_metrics, roc_auc_macro, summarize_folds
from wsi_mil.training.splits import load_split
from wsi_mil.training.trainer import BagPredictions, predict_bags, resolve_device

PREDICTION_FIELDS = ("slide_id", "case_id", "fold", "split", "label", "predicted")


def evaluate_run(
    run_dir: Path | str,
    *,
    cohort: Cohort | None = None,
    bootstrap_samples: int | None = None,
) -> dict[str, Any]:
    """Recompute all metrics of a run from its saved best checkpoints and rewrite its outputs.

    Writes `metrics.json`, `predictions.csv`, `roc.png` and `confusion.png`; returns the metrics.
    A run trained on CUDA is evaluated on CPU where no GPU is available.
    """
    layout = RunLayout(Path(run_dir))
    if not layout.config.exists():
        raise RunFolderError(f"{layout.root} is not a run folder (no config.yaml); check the RUN argument")
    config = load_config(layout.config)
    cohort = cohort if cohort is not None else cohort_for(config)
    samples = config.bootstrap_samples if bootstrap_samples is None else bootstrap_samples
    device = resolve_device("auto" if config.device.startswith("cuda") else config.device)
    folds_out: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    parts: dict[str, list[tuple[int, BagPredictions]]] = {"val": [], "test": []}
    for fold in layout.folds():
        loaded = load_model(layout.root, fold=fold, device=device)
        split = load_split(layout.split(fold), fold=fold)
        entry: dict[str, Any] = {"fold": fold, "best_epoch": loaded.card.best_epoch, "epochs_run": loaded.card.epochs_run}
        for part in ("val", "test"):
            ids = split.part(part)
            if not ids:
                continue
            predictions = predict_bags(loaded.model, cohort.bags(ids), device=device)
            parts[part].append((fold, predictions))
            entry[part] = classification_metrics(
                predictions.labels, predictions.probs, bootstrap_samples=samples, seed=config.seed + fold
            )
            rows.extend(_prediction_rows(cohort, predictions, fold=fold, part=part, top_k=config.top_k_tiles))
        folds_out.append(entry)
    if not folds_out:
        raise RunFolderError(f"{layout.root} has no finished fold to evaluate")
    metrics: dict[str, Any] = {
        "selection_metric": config.selection_metric,
        "class_names": cohort.class_names,
        "bootstrap_samples": samples,
        "folds": folds_out,
        "summary": {
            part: summarize_folds([f[part] for f in folds_out if part in f])
            for part in ("val", "test")
            if any(part in f for f in folds_out)
        },
    }
    if parts["test"]:
        labels = np.concatenate([p.labels for _, p in parts["test"]])
        probs = np.concatenate([p.probs for _, p in parts["test"]])
        metrics["pooled_test"] = classification_metrics(labels, probs, bootstrap_samples=samples, seed=config.seed)
    write_text_atomic(layout.metrics, json.dumps(metrics, indent=2))
    _write_predictions_csv(layout.predictions, rows, cohort.class_names)
    plotted = parts["test"] or parts["val"]
    plot_part = "test" if parts["test"] else "val"
    plot_roc(plotted, cohort.class_names, layout.roc, title=f"ROC, {plot_part} slides")
    plot_confusion(plotted, cohort.class_names, layout.confusion, title=f"Confusion matrix, {plot_part} slides (pooled)")
    return metrics


def _prediction_rows(
    cohort: Cohort, predictions: BagPredictions, *, fold: int, part: str, top_k: int
) -> list[dict[str, Any]]:
    rows = []
    for i, slide_id in enumerate(predictions.slide_ids):
        slide = cohort.slide(slide_id)
        indices = top_tiles(predictions.attention[i], top_k)
        coords = cohort.load(slide_id).coords
        rows.append(
            {
                "slide_id": slide_id,
                "case_id": slide.case_id,
                "fold": fold,
                "split": part,
                "label": cohort.class_names[slide.label],
                "predicted": cohort.class_names[int(predictions.probs[i].argmax())],
                **{f"prob_{name}": float(p) for name, p in zip(cohort.class_names, predictions.probs[i], strict=True)},
                "top_tile_indices": json.dumps(indices.tolist()),
                "top_tile_coords": json.dumps([] if coords is None else coords[indices].astype(int).tolist()),
            }
        )
    return rows


def _write_predictions_csv(path: Path, rows: list[dict[str, Any]], class_names: Sequence[str]) -> None:
    fields = [*PREDICTION_FIELDS, *[f"prob_{n}" for n in class_names], "top_tile_indices", "top_tile_coords"]
    with atomic_open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def _save_figure(figure: Figure, path: Path) -> None:
    """Save a figure as PNG, atomically."""
    figure.tight_layout()
    with atomic_path(path) as temp:
        figure.savefig(temp, dpi=120, format="png")


def plot_roc(
    folds: Sequence[tuple[int, BagPredictions]], class_names: Sequence[str], path: Path, *, title: str
) -> None:
    """ROC curves: binary, one per fold plus the pooled curve; more classes, pooled one-vs-rest per class."""
    figure = Figure(figsize=(5.5, 5))
    axes = figure.subplots()
    labels = np.concatenate([p.labels for _, p in folds])
    probs = np.concatenate([p.probs for _, p in folds])
    if len(class_names) == 2:
        curves = [(f"fold {k}", p.labels == 1, p.probs[:, 1]) for k, p in folds] if len(folds) > 1 else []
        curves.append(("pooled", labels == 1, probs[:, 1]))
    else:
        curves = [(f"{name} vs rest", labels == c, probs[:, c]) for c, name in enumerate(class_names)]
    for name, positive, score in curves:
        if positive.all() or not positive.any():
            continue
        fpr, tpr, _ = roc_curve(positive, score)
        auc = roc_auc_macro(positive.astype(np.int64), np.stack([1 - score, score], axis=1))
        axes.plot(fpr, tpr, lw=2 if name == "pooled" else 1, label=f"{name} (AUC {auc:.3f})")
    axes.plot([0, 1], [0, 1], ls="--", color="grey", lw=0.8)
    axes.set(xlabel="false positive rate", ylabel="true positive rate", title=title, xlim=(0, 1), ylim=(0, 1.01))
    axes.legend(loc="lower right", fontsize="small")
    _save_figure(figure, path)


def plot_confusion(
    folds: Sequence[tuple[int, BagPredictions]], class_names: Sequence[str], path: Path, *, title: str
) -> None:
    """The confusion matrix (counts) of the pooled predictions; rows = true, columns = predicted."""
    labels = np.concatenate([p.labels for _, p in folds])
    probs = np.concatenate([p.probs for _, p in folds])
    matrix = np.asarray(classification_metrics(labels, probs)["confusion_matrix"])
    size = 2.5 + 0.6 * len(class_names)
    figure = Figure(figsize=(size, size))
    axes = figure.subplots()
    axes.imshow(matrix, cmap="Blues")
    for (row, col), count in np.ndenumerate(matrix):
        colour = "white" if count > matrix.max() / 2 else "black"
        axes.text(col, row, str(count), ha="center", va="center", color=colour)
    ticks = range(len(class_names))
    axes.set_xticks(ticks, class_names, rotation=45, ha="right")
    axes.set_yticks(ticks, class_names)
    axes.set(xlabel="predicted", ylabel="true", title=title)
    _save_figure(figure, path)
