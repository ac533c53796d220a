"""`TrainConfig`: every training setting in one pydantic model, loaded from YAML and saved with a run.

Each CLI flag of `wsi-mil train` maps onto one field; flags given on the command line override
the YAML file, and the resolved config is written to `<run>/config.yaml`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from wsi_mil.atomic import write_text_atomic
from wsi_mil.errors import TrainingConfigError

SelectionMetric = Literal["roc_auc_macro", "balanced_accuracy", "f1_macro", "accuracy_micro", "loss"]


class TrainConfig(BaseModel):
    """All settings of a training run: data, splits, model, method, optimisation, selection, outputs."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    # data
    features_dir: Path | None = Field(default=None, description="folder of feature files (--features)")
    labels_csv: Path | None = Field(default=None, description="CSV with slide_id,label[,case_id][,split] (--labels)")
    class_names: list[str] | None = Field(default=None, description="fixed class order; default: sorted labels")
    drop_missing_features: bool = Field(default=False, description="drop labelled slides that have no feature file")
    ignore_unlabelled_features: bool = Field(default=False, description="ignore feature files absent from the CSV")
    cache_bags: int = Field(default=32, ge=0, description="bags kept in memory by the lazy loader")

    # splits
    split_mode: Literal["auto", "kfold", "column"] = Field(
        default="auto", description="auto: the CSV's split column when present, else k-fold"
    )
    folds: int = Field(default=5, ge=2, description="k of the patient-grouped stratified k-fold (--folds)")
    val_fraction: float = Field(default=0.2, gt=0.0, lt=0.5, description="validation part of each training fold")

    # model and method
    model: str = Field(default="abmil", description="registered model name (--model)")
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    method: str = Field(default="plain", description="training method: plain, aem, acmil, mhim, packmil, scmil, ins (--method)")
    method_kwargs: dict[str, Any] = Field(default_factory=dict)

    # optimisation
    epochs: int = Field(default=20, ge=1, description="(--epochs)")
    batch_size: int = Field(default=1, ge=1, description="bags per step; >1 pads with masks (--batch-size)")
    max_instances: int | None = Field(
        default=None, ge=1, description="random subset cap on instances per training bag (--max-instances)"
    )
    group_by_size: bool = Field(
        default=True,
        description="batch_size > 1: batches of bags of similar size (shuffled), so little is padded",
    )
    batch_execution: Literal["auto", "padded", "per_bag"] = Field(
        default="auto",
        description="a step of several bags: one padded tensor, or each bag through the model on its own; "
        "auto = per_bag on CPU (compute-bound: padding costs its full price), padded on CUDA",
    )
    cache_features: bool = Field(
        default=True, description="read the training and validation bags once, keep them in memory at their stored dtype"
    )
    prefetch_batches: int = Field(default=2, ge=0, description="steps built ahead by a background thread; 0 = off")
    optimizer: Literal["adamw", "adam"] = "adamw"
    lr: float = Field(default=1e-4, gt=0.0, description="peak learning rate (--lr)")
    weight_decay: float = Field(default=1e-5, ge=0.0)
    warmup_epochs: float = Field(default=0.0, ge=0.0, description="linear warm-up before the cosine decay")
    min_lr: float = Field(default=0.0, ge=0.0, description="learning rate at the end of the cosine decay")
    grad_clip_norm: float | None = Field(default=None, gt=0.0, description="max global gradient norm; None = off")
    balance: Literal["none", "class_weights", "sampler", "batches"] = Field(
        default="none",
        description="class-weighted loss, class-balanced sampling of training bags, or batches that each "
        "hold every class equally often (batches)",
    )
    amp: bool = Field(default=True, description="mixed precision (bfloat16 autocast) on CUDA; ignored on CPU")

    # model selection
    selection_metric: SelectionMetric = Field(
        default="roc_auc_macro", description="validation metric for early stopping and the best checkpoint"
    )
    patience: int | None = Field(default=10, ge=1, description="epochs without val improvement before stopping")
    min_epochs: int = Field(default=0, ge=0, description="no early stop before this many epochs")

    # reproducibility and device
    seed: int = Field(default=0, description="(--seed)")
    deterministic: bool = Field(default=True, description="torch deterministic algorithms while training")
    device: str = Field(default="auto", description="auto, cpu, cuda or cuda:N")

    # outputs
    bootstrap_samples: int = Field(default=1000, ge=0, description="resamples for the 95% intervals; 0 = none")
    top_k_tiles: int = Field(default=10, ge=0, description="top-attention tiles listed per slide in predictions.csv")

    @model_validator(mode="after")
    def _check_lr_range(self) -> TrainConfig:
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        if self.warmup_epochs >= self.epochs:
            raise ValueError(f"warmup_epochs ({self.warmup_epochs}) must be below epochs ({self.epochs})")
        return self

    def to_yaml(self) -> str:
        """The config as YAML text (paths as strings), in field order."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def differences(self, other: TrainConfig) -> list[str]:
        """Names of the fields whose values differ between `self` and `other`."""
        mine, theirs = self.model_dump(mode="json"), other.model_dump(mode="json")
        return [k for k in mine if mine[k] != theirs[k]]


def build_config(values: dict[str, Any], *, source: str = "config") -> TrainConfig:
    """Validate a dict into a `TrainConfig`, raising `TrainingConfigError` that names the bad keys."""
    try:
        return TrainConfig.model_validate(values)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg']}" for e in err.errors()
        )
        raise TrainingConfigError(f"invalid training settings in {source}: {problems}") from err


def load_config(path: Path | str | None = None, *, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Load a YAML config (or start from defaults when `path` is None) and apply non-None overrides."""
    values: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except OSError as err:
            raise TrainingConfigError(f"cannot read the config file {path} (--config): {err}") from err
        except yaml.YAMLError as err:
            raise TrainingConfigError(f"the config file {path} is not valid YAML (--config): {err}") from err
        if loaded is not None and not isinstance(loaded, dict):
            raise TrainingConfigError(f"the config file {path} must hold a mapping of settings (--config)")
        values.update(loaded or {})
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return build_config(values, source=source)


def save_config(config: TrainConfig, path: Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    write_text_atomic(path, config.to_yaml())
