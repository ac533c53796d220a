"""Cross-validation into a run folder: `train_cohort` trains every fold, writes each fold's weights and
model card, then the run's report (`wsi_mil.training.reporting`). Re-running resumes.

The run-folder layout and loading its models live in `wsi_mil.inference.loading`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from wsi_mil.atomic import write_text_atomic
from wsi_mil.errors import RunFolderError, TrainingConfigError
from wsi_mil.inference.card import ModelCard
from wsi_mil.inference.loading import RunLayout
from wsi_mil.models import MILModel, create_model, model_options
from wsi_mil.training.cohort import Cohort, cohort_for
from wsi_mil.training.config import TrainConfig, load_config, save_config
from wsi_mil.training.methods import create_method
from wsi_mil.training.metrics import classification_metrics
from wsi_mil.training.reporting import evaluate_run
from wsi_mil.training.splits import FoldSplit, load_split, make_splits, save_split
from wsi_mil.training.trainer import EpochReport, fit, predict_bags, resolve_device, seed_everything

log = logging.getLogger(__name__)


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


def build_model(name: str, in_dim: int, num_classes: int, overrides: dict[str, Any]) -> tuple[MILModel, dict[str, Any]]:
    """The model to train and every option it was built with (what its card records); bad options
    raise a `TrainingConfigError` naming model_kwargs."""
    try:
        options = model_options(name, **overrides)
        return create_model(name, in_dim, num_classes, **options), options
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
    model, model_kwargs = build_model(config.model, cohort.contract.feature_dim, cohort.num_classes, config.model_kwargs)
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
    build_model(config.model, cohort.contract.feature_dim, cohort.num_classes, config.model_kwargs)
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
