"""Cross-validation into a run folder: `train_cohort` trains every fold, writes each fold's weights and
model card, then the run's report (`wsi_mil.training.reporting`). Re-running resumes.

Folds run one after another in this process, or (`executor="ray"`) as Ray tasks at once, each fold in its
own worker with the same seed, writing into the same run folder (which must then be on storage every
Ray node sees at the same path).

The run-folder layout and loading its models live in `wsi_mil.inference.loading`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

from wsi_mil.atomic import write_text_atomic
from wsi_mil.errors import RunFolderError, TrainingConfigError, WsiMilError
from wsi_mil.inference.card import ModelCard
from wsi_mil.inference.loading import RunLayout
from wsi_mil.models import MILModel, create_model, model_options
from wsi_mil.ray_cluster import gpus_per_task, ray_session, task_exception
from wsi_mil.training.cohort import Cohort, cohort_for
from wsi_mil.training.config import TrainConfig, load_config, save_config
from wsi_mil.training.methods import create_method
from wsi_mil.training.metrics import classification_metrics
from wsi_mil.training.reporting import evaluate_run
from wsi_mil.training.splits import FoldSplit, load_split, make_splits, save_split
from wsi_mil.training.trainer import EpochReport, fit, predict_bags, resolve_device, seed_everything

log = logging.getLogger(__name__)

Executor = Literal["local", "ray"]


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


def _fold_task(cohort: Cohort, split: FoldSplit, config: TrainConfig, layout: RunLayout) -> int:
    """One fold in a Ray worker, logging into the run's `train.log` as a fold trained here does."""
    with _run_log(layout.log):
        _train_fold(cohort, split, config, layout, None)
    return split.fold


def _train_folds_on_ray(
    cohort: Cohort,
    splits: list[FoldSplit],
    config: TrainConfig,
    layout: RunLayout,
    *,
    address: str | None,
    cpus_per_fold: float,
    gpus_per_fold: float | None,
) -> None:
    """Train `splits` as Ray tasks at once; every fold runs to its end, then the first failure is raised."""
    if not splits:
        return
    with ray_session(address) as ray:
        gpus = 0.0 if config.device == "cpu" else gpus_per_task(gpus_per_fold)
        remote = ray.remote(num_cpus=cpus_per_fold, num_gpus=gpus, max_retries=0)(_fold_task)
        cohort_ref = ray.put(cohort)
        folds = {remote.remote(cohort_ref, split, config, layout): split.fold for split in splits}
        log.info("folds %s: Ray tasks of %s CPU and %s GPU each", sorted(folds.values()), cpus_per_fold, gpus)
        failures: list[BaseException] = []
        remaining = list(folds)
        while remaining:
            [ready], remaining = ray.wait(remaining, num_returns=1)
            try:
                ray.get(ready)
            except ray.exceptions.RayError as err:
                cause = task_exception(err)
                if cause is err:  # Ray lost the task (its worker or node died)
                    cause = WsiMilError(
                        f"fold {folds[ready]}: its Ray task ended without a result ({type(err).__name__}); "
                        "see the Ray logs, then re-run to resume"
                    )
                failures.append(cause)
        if failures:
            raise failures[0]


def train_cohort(
    config: TrainConfig,
    run_dir: Path | str,
    *,
    on_epoch_end: Callable[[EpochReport], None] | None = None,
    executor: Executor = "local",
    ray_address: str | None = None,
    ray_cpus_per_fold: float = 1.0,
    ray_gpus_per_fold: float | None = None,
) -> dict[str, Any]:
    """Train every fold of `config` into `run_dir` and write its metrics, predictions and plots.

    Re-running on an existing run folder with the same config resumes it: finished folds are
    kept, an unfinished fold continues from its last checkpoint. Returns the `metrics.json` content.
    With `executor="ray"` the unfinished folds are Ray tasks on the cluster at `ray_address` (None:
    this machine's Ray, else a new local one), each asking for `ray_cpus_per_fold` CPUs and
    `ray_gpus_per_fold` GPUs (default: 1 when the cluster has GPUs and `config.device` is not cpu);
    `on_epoch_end` is not called for them.
    A fold gives the same model on Ray as here for the same seed (bit-identical with the same number
    of torch threads, which Ray sets to the CPUs a task asks for).
    """
    if executor not in ("local", "ray"):
        raise TrainingConfigError(f"executor must be local or ray, got {executor!r}")
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
        pending = []
        for split in _prepare_splits(cohort, config, layout):
            if layout.card(split.fold).exists():
                log.info("fold %d: already finished, kept", split.fold)
            else:
                pending.append(split)
        if executor == "ray":
            _train_folds_on_ray(
                cohort, pending, config, layout,
                address=ray_address, cpus_per_fold=ray_cpus_per_fold, gpus_per_fold=ray_gpus_per_fold,
            )
        else:
            for split in pending:
                _train_fold(cohort, split, config, layout, on_epoch_end)
        return evaluate_run(layout.root, cohort=cohort)
