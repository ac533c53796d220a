"""Run folders: `train_cohort` trains every fold into one, `evaluate_run` recomputes its metrics
from the saved checkpoints, `load_model_from_run` and `predict` serve its models.

Layout of a run folder::

    config.yaml               resolved TrainConfig
    splits/fold_<k>.csv       slide_id, case_id, label, split (train/val/test)
    fold_<k>/model.safetensors  best weights by the validation metric
    fold_<k>/model_card.json  model, classes, feature contract, method, metrics, version, time
    fold_<k>/last.pt          resumable state after the last finished epoch
    metrics.json              per fold (val/test, bootstrap 95% CIs), mean ± sd, pooled test
    predictions.csv           per slide: fold, split, label, probabilities, top-attention tiles
    roc.png, confusion.png    test ROC curves and the pooled test confusion matrix
    train.log                 the training log
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors.torch import load_model
from sklearn.metrics import roc_curve

from wsi_mil import __version__
from wsi_mil.errors import (
    FeatureContractError,
    FeatureFileError,
    RunFolderError,
    TrainingConfigError,
)
from wsi_mil.models import MILModel, create_model, model_entry
from wsi_mil.preprocessing.feature_file import read_feature_file
from wsi_mil.training.bag import Bag
from wsi_mil.training.cohort import Cohort, FeatureContract, load_cohort
from wsi_mil.training.config import TrainConfig, load_config, save_config
from wsi_mil.training.methods import create_method
from wsi_mil.training.metrics import (
    LOWER_IS_BETTER,
    classification_metrics,
    roc_auc_macro,
    summarize_folds,
)
from wsi_mil.training.splits import FoldSplit, load_split, make_splits, save_split
from wsi_mil.training.trainer import (
    BagPredictions,
    EpochReport,
    fit,
    predict_bags,
    resolve_device,
    seed_everything,
)

log = logging.getLogger(__name__)

CARD_VERSION = 1


@dataclass(frozen=True)
class RunLayout:
    """Paths inside a run folder."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"

    @property
    def predictions(self) -> Path:
        return self.root / "predictions.csv"

    @property
    def roc(self) -> Path:
        return self.root / "roc.png"

    @property
    def confusion(self) -> Path:
        return self.root / "confusion.png"

    @property
    def log(self) -> Path:
        return self.root / "train.log"

    def split(self, fold: int) -> Path:
        return self.root / "splits" / f"fold_{fold}.csv"

    def fold_dir(self, fold: int) -> Path:
        return self.root / f"fold_{fold}"

    def model(self, fold: int) -> Path:
        return self.fold_dir(fold) / "model.safetensors"

    def card(self, fold: int) -> Path:
        return self.fold_dir(fold) / "model_card.json"

    def last_checkpoint(self, fold: int) -> Path:
        return self.fold_dir(fold) / "last.pt"

    def folds(self) -> list[int]:
        """Folds with a model card (finished folds), ascending."""
        found = []
        for path in self.root.glob("fold_*/model_card.json"):
            suffix = path.parent.name.removeprefix("fold_")
            if suffix.isdigit():
                found.append(int(suffix))
        return sorted(found)


class ModelCard(BaseModel):
    """What the service needs to rebuild a fold's model and to refuse features it was not trained on."""

    model_config = ConfigDict(protected_namespaces=())

    card_version: int = CARD_VERSION
    model_name: str
    model_kwargs: dict[str, Any]
    num_classes: int
    class_names: list[str]
    feature_contract: FeatureContract
    #: `PreprocessConfig` fields that made the features, so a service can run slides the same way
    preprocessing: dict[str, Any] | None = None
    training_method: str
    method_kwargs: dict[str, Any] = Field(default_factory=dict)
    fold: int
    best_epoch: int
    epochs_run: int
    selection_metric: str
    metrics: dict[str, Any] = Field(default_factory=dict, description="val (and test) metrics of the best epoch")
    weights_file: str = "model.safetensors"
    wsi_mil_version: str = __version__
    created: str = Field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))


@dataclass
class Prediction:
    """A slide's prediction: class probabilities, the predicted class, attention per tile `[N]`."""

    slide_id: str
    probabilities: dict[str, float]
    predicted: str
    attention: np.ndarray
    coords: np.ndarray | None
    fold: int


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to a temporary name beside `path`, then rename it into place."""
    tmp = path.with_name(f"{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_model_card(path: Path) -> ModelCard:
    """Load and validate a `model_card.json`."""
    try:
        return ModelCard.model_validate_json(path.read_text())
    except OSError as err:
        raise RunFolderError(f"cannot read model card {path}: {err}; is this a finished training run?") from err
    except ValidationError as err:
        raise RunFolderError(f"model card {path} is malformed: {err}") from err


@contextlib.contextmanager
def _run_log(path: Path) -> Iterator[None]:
    """Send the `wsi_mil.training` loggers' INFO records to `path` (appending) inside the block."""
    logger = logging.getLogger("wsi_mil.training")
    handler = logging.FileHandler(path)
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    previous_level = logger.level
    logger.addHandler(handler)
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous_level)
        handler.close()


def cohort_for(config: TrainConfig) -> Cohort:
    """Load the cohort a config names (`features_dir`, `labels_csv` and the cohort options)."""
    if config.features_dir is None or config.labels_csv is None:
        raise TrainingConfigError("training needs features_dir and labels_csv (--features DIR --labels CSV)")
    return load_cohort(
        config.features_dir,
        config.labels_csv,
        class_names=config.class_names,
        drop_missing_features=config.drop_missing_features,
        ignore_unlabelled_features=config.ignore_unlabelled_features,
        cache_size=config.cache_bags,
    )


def _prepare_run_folder(config: TrainConfig, layout: RunLayout) -> None:
    """Create the run folder and save the config, or check that an existing run used the same config."""
    if layout.config.exists():
        saved = load_config(layout.config)
        changed = saved.differences(config)
        if changed:
            raise RunFolderError(
                f"{layout.root} holds a run with a different config (changed: {', '.join(changed)}); "
                "resume it with the same settings or choose a new --out"
            )
        return
    layout.root.mkdir(parents=True, exist_ok=True)
    save_config(config, layout.config)


def _prepare_splits(cohort: Cohort, config: TrainConfig, layout: RunLayout) -> list[FoldSplit]:
    """Make the splits; on resume they must equal the saved ones (else the cohort has changed)."""
    splits = make_splits(cohort, config)
    for split in splits:
        path = layout.split(split.fold)
        if path.exists():
            if load_split(path, fold=split.fold) != split:
                raise RunFolderError(
                    f"the cohort no longer gives the splits saved in {path}; the features or labels changed "
                    "since the run started: start a new run (--out)"
                )
        else:
            save_split(cohort, split, path)
    return splits


def resolved_model_kwargs(model_name: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """The registry defaults of `model_name` updated by the non-None `overrides` (what the card stores)."""
    kwargs = dict(model_entry(model_name).defaults)
    kwargs.update({k: v for k, v in overrides.items() if v is not None})
    return kwargs


def build_model(name: str, in_dim: int, num_classes: int, kwargs: dict[str, Any]) -> MILModel:
    """`create_model`, with bad options reported as a `TrainingConfigError` naming model_kwargs."""
    try:
        return create_model(name, in_dim, num_classes, **kwargs)
    except TypeError as err:
        raise TrainingConfigError(f"bad model_kwargs for model {name!r}: {err}") from err


def _train_fold(
    cohort: Cohort,
    split: FoldSplit,
    config: TrainConfig,
    layout: RunLayout,
    on_epoch_end: Callable[[EpochReport], None] | None,
) -> None:
    fold = split.fold
    layout.fold_dir(fold).mkdir(parents=True, exist_ok=True)
    log.info("fold %d: %d train, %d val, %d test slides", fold, len(split.train), len(split.val), len(split.test))
    seed_everything(config.seed + fold)
    model_kwargs = resolved_model_kwargs(config.model, config.model_kwargs)
    model = build_model(config.model, cohort.contract.feature_dim, cohort.num_classes, model_kwargs)
    # "{fold}" in a path option (e.g. MHIM's teacher_init) names this fold's own file
    method_kwargs = {
        k: v.format(fold=fold) if isinstance(v, str) and "{fold}" in v else v for k, v in config.method_kwargs.items()
    }
    method = create_method(config.method, **method_kwargs)
    result = fit(
        model,
        method,
        cohort.bags(split.train),
        cohort.bags(split.val),
        config=config,
        num_classes=cohort.num_classes,
        fold=fold,
        checkpoint_path=layout.last_checkpoint(fold),
        best_model_path=layout.model(fold),
        on_epoch_end=on_epoch_end,
    )
    served = method.inference_model(model)
    served.load_state_dict(result.best_state)
    metrics: dict[str, Any] = {"val": result.best_val_metrics}
    if split.test:
        test = predict_bags(served, cohort.bags(split.test), device=resolve_device(config.device))
        metrics["test"] = classification_metrics(test.labels, test.probs)
    served_name, served_kwargs = method.served_model_spec(config.model, model_kwargs)
    card = ModelCard(
        model_name=served_name,
        model_kwargs=served_kwargs,
        num_classes=cohort.num_classes,
        class_names=cohort.class_names,
        feature_contract=cohort.contract,
        preprocessing=cohort.preprocessing,
        training_method=config.method,
        method_kwargs=config.method_kwargs,
        fold=fold,
        best_epoch=result.best_epoch,
        epochs_run=result.epochs_run,
        selection_metric=config.selection_metric,
        metrics=metrics,
    )
    write_text_atomic(layout.card(fold), card.model_dump_json(indent=2))
    log.info("fold %d done: best epoch %d, val %s %.4f", fold, result.best_epoch, config.selection_metric, result.best_score)


def train_cohort(
    config: TrainConfig,
    run_dir: Path | str,
    *,
    on_epoch_end: Callable[[EpochReport], None] | None = None,
) -> dict[str, Any]:
    """Train every fold of `config` into `run_dir` and write its metrics, predictions and plots.

    Re-running on an existing run folder with the same config resumes it: finished folds are
    kept, an unfinished fold continues from its last checkpoint. Returns the `metrics.json` content.
    """
    layout = RunLayout(Path(run_dir))
    # check everything that can be wrong with the inputs before the run folder is written
    cohort = cohort_for(config)
    create_method(config.method, **config.method_kwargs)
    build_model(config.model, cohort.contract.feature_dim, cohort.num_classes,
                resolved_model_kwargs(config.model, config.model_kwargs))
    _prepare_run_folder(config, layout)
    with _run_log(layout.log):
        log.info(
            "run %s: model %s, method %s, seed %d; %d slides, classes %s, features %s",
            layout.root, config.model, config.method, config.seed, len(cohort.slides), cohort.class_names,
            cohort.contract.model_dump(),
        )
        splits = _prepare_splits(cohort, config, layout)
        for split in splits:
            if layout.card(split.fold).exists():
                log.info("fold %d: already finished, kept", split.fold)
                continue
            _train_fold(cohort, split, config, layout, on_epoch_end)
        return evaluate_run(layout.root, cohort=cohort)


def load_model_from_run(run_dir: Path | str, fold: int | None = None, *, device: str = "cpu") -> tuple[MILModel, ModelCard]:
    """Rebuild a fold's model (eval mode) and its card; `fold=None` picks the best fold by validation.

    The best fold is the one with the best validation value of the run's selection metric (the
    test part never decides).
    """
    layout = RunLayout(Path(run_dir))
    folds = layout.folds()
    if not folds:
        raise RunFolderError(f"{layout.root} has no finished fold (no fold_<k>/model_card.json); train it first")
    if fold is None:
        cards = [read_model_card(layout.card(k)) for k in folds]
        card = _best_card(cards)
    elif fold in folds:
        card = read_model_card(layout.card(fold))
    else:
        raise RunFolderError(f"{layout.root} has no finished fold {fold}; it has folds {folds} (--fold)")
    model = build_model(card.model_name, card.feature_contract.feature_dim, card.num_classes, card.model_kwargs)
    weights = layout.fold_dir(card.fold) / card.weights_file
    try:
        load_model(model, str(weights), strict=True)
    except (OSError, RuntimeError) as err:
        raise RunFolderError(f"cannot load weights {weights} into {card.model_name}: {err}") from err
    return model.to(device).eval(), card


def _best_card(cards: Sequence[ModelCard]) -> ModelCard:
    def key(card: ModelCard) -> float:
        value = card.metrics.get("val", {}).get(card.selection_metric)
        if value is None:
            return float("inf")
        return value if card.selection_metric in LOWER_IS_BETTER else -value

    return min(cards, key=lambda c: (key(c), c.fold))


def _top_tiles(attention: np.ndarray, coords: np.ndarray | None, k: int) -> tuple[list[int], list[list[int]]]:
    order = np.argsort(-attention, kind="stable")[:k]
    tile_coords = [] if coords is None else coords[order].astype(int).tolist()
    return order.tolist(), tile_coords


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
        model, card = load_model_from_run(layout.root, fold, device=str(device))
        split = load_split(layout.split(fold), fold=fold)
        entry: dict[str, Any] = {"fold": fold, "best_epoch": card.best_epoch, "epochs_run": card.epochs_run}
        for part in ("val", "test"):
            ids = split.part(part)
            if not ids:
                continue
            predictions = predict_bags(model, cohort.bags(ids), device=device)
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
        indices, coords = _top_tiles(predictions.attention[i], cohort.load(slide_id).coords, top_k)
        rows.append(
            {
                "slide_id": slide_id,
                "case_id": slide.case_id,
                "fold": fold,
                "split": part,
                "label": cohort.class_names[slide.label],
                "predicted": cohort.class_names[int(predictions.probs[i].argmax())],
                **{f"prob_{name}": float(p) for name, p in zip(cohort.class_names, predictions.probs[i], strict=True)},
                "top_tile_indices": json.dumps(indices),
                "top_tile_coords": json.dumps(coords),
            }
        )
    return rows


def _write_predictions_csv(path: Path, rows: list[dict[str, Any]], class_names: Sequence[str]) -> None:
    fields = ["slide_id", "case_id", "fold", "split", "label", "predicted",
              *[f"prob_{n}" for n in class_names], "top_tile_indices", "top_tile_coords"]
    tmp = path.with_name(f"{path.name}.tmp")
    with tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


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
    figure.tight_layout()
    figure.savefig(path, dpi=120)


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
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def check_feature_contract(contract: FeatureContract, attrs: dict[str, Any], *, feature_dim: int, source: str) -> None:
    """Raise `FeatureContractError` when features differ from what the model was trained on.

    Feature dimension must match; encoder, target mpp and tile px must match where both sides
    record them.
    """
    if feature_dim != contract.feature_dim:
        raise FeatureContractError(
            f"{source} has {feature_dim}-d features, the model expects {contract.feature_dim}-d "
            f"({contract.encoder or 'unknown encoder'}); extract features with the encoder the model was trained on"
        )
    for key, fix in (("encoder", "--encoder"), ("target_mpp", "--target-mpp"), ("tile_px", "--tile-px")):
        expected, found = getattr(contract, key), attrs.get(key)
        if expected is None or found is None:
            continue
        same = np.isclose(float(found), float(expected), rtol=1e-3) if key == "target_mpp" else found == expected
        if not same:
            raise FeatureContractError(
                f"{source} was extracted with {key}={found!r}, the model expects {key}={expected!r}; "
                f"re-extract with {fix} {expected}"
            )


def predict(
    run_dir: Path | str,
    feature_paths: Sequence[Path | str],
    *,
    fold: int | None = None,
    device: str = "cpu",
) -> list[Prediction]:
    """Predict slides from their feature files with a run's model (`fold=None`: the best fold by val).

    Each `Prediction` holds class probabilities and the attention of every tile (with coords when
    the file has them). Files whose features break the model's feature contract are refused.
    """
    model, card = load_model_from_run(run_dir, fold, device=device)
    predictions = []
    for path in map(Path, feature_paths):
        try:
            bag = read_feature_file(path)
        except FeatureFileError as err:
            raise FeatureContractError(f"cannot read features {path}: {err}") from err
        attrs = {**bag.attrs, "encoder": bag.encoder}
        check_feature_contract(card.feature_contract, attrs, feature_dim=bag.feature_dim, source=str(path))
        features = np.asarray(bag.features, dtype=np.float32)
        slide_id = bag.slide_id or path.stem
        result = predict_bags(model, [Bag(torch.from_numpy(features), -1, slide_id)], device=device)
        probs = result.probs[0]
        predictions.append(
            Prediction(
                slide_id=slide_id,
                probabilities={name: float(p) for name, p in zip(card.class_names, probs, strict=True)},
                predicted=card.class_names[int(probs.argmax())],
                attention=result.attention[0],
                coords=bag.coords,
                fold=card.fold,
            )
        )
    return predictions


def save_predictions(predictions: Sequence[Prediction], path: Path | str) -> None:
    """Write predictions as JSON (one object per slide, attention per tile) or CSV (one row per tile)."""
    path = Path(path)
    if path.suffix.lower() == ".json":
        payload = [
            {
                "slide_id": p.slide_id,
                "fold": p.fold,
                "predicted": p.predicted,
                "probabilities": p.probabilities,
                "attention": p.attention.tolist(),
                "coords": None if p.coords is None else p.coords.tolist(),
            }
            for p in predictions
        ]
        write_text_atomic(path, json.dumps(payload))
        return
    if path.suffix.lower() != ".csv":
        raise TrainingConfigError(f"predictions file {path} must end in .csv or .json (--out)")
    class_names = list(predictions[0].probabilities) if predictions else []
    tmp = path.with_name(f"{path.name}.tmp")
    with tmp.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["slide_id", "fold", "predicted", *[f"prob_{n}" for n in class_names], "tile_index", "x", "y", "attention"])
        for p in predictions:
            probs = [p.probabilities[n] for n in class_names]
            for i, weight in enumerate(p.attention):
                x, y = ("", "") if p.coords is None else (int(p.coords[i, 0]), int(p.coords[i, 1]))
                writer.writerow([p.slide_id, p.fold, p.predicted, *probs, i, x, y, float(weight)])
    os.replace(tmp, path)
