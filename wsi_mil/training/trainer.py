"""The generic MIL training loop: `fit` trains one model on training bags, selects on validation
bags, and can resume from its last checkpoint; `predict_bags` runs a model over bags.

Optimisation: AdamW or Adam, linear warm-up then half-cosine decay per step, optional gradient
clipping, bfloat16 autocast on CUDA only, class-weighted loss, class-balanced sampling or
class-balanced batches. Model selection and early stopping use a validation metric only; `fit`
never sees test bags. Anything method-specific (extra losses, teachers, packing) goes through the `TrainingMethod` hooks.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_model
from torch import nn

from wsi_mil.atomic import atomic_path
from wsi_mil.errors import TrainingConfigError
from wsi_mil.models.base import MILModel
from wsi_mil.training.bag import Bag
from wsi_mil.training.batching import (
    BagStore,
    EpochBags,
    bag_shares,
    bagwise_steps,
    balanced_sample_weights,
    class_balanced_order,
    combine_results,
    epoch_order,
    inverse_frequency_class_weights,
    padded_batches,
    prefetched,
    size_grouped_order,
)
from wsi_mil.training.config import TrainConfig
from wsi_mil.training.methods.base import Batch, StepResult, TrainingMethod
from wsi_mil.training.metrics import classification_metrics, is_improvement, selection_key

log = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1


@dataclass
class EpochReport:
    """What one finished epoch reports to the `on_epoch_end` callback (and the log)."""

    fold: int
    epoch: int
    epochs: int
    train_loss: float
    train_terms: dict[str, float]
    val_metrics: dict[str, Any]
    lr: float
    is_best: bool
    stop: bool
    seconds: float


@dataclass
class FitResult:
    """The outcome of `fit`: the best (by validation) weights of the inference model and its epoch."""

    best_state: dict[str, torch.Tensor]
    best_epoch: int
    best_score: float
    best_val_metrics: dict[str, Any]
    epochs_run: int
    stopped_early: bool
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class BagPredictions:
    """Predictions of a model over bags: `labels [M]`, `probs [M, C]`, per-bag attention `[N_i]`."""

    slide_ids: list[str]
    labels: np.ndarray
    probs: np.ndarray
    attention: list[np.ndarray]


def resolve_device(name: str) -> torch.device:
    """`auto` -> CUDA when available, else CPU; anything else is passed to `torch.device`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise TrainingConfigError(f"unknown device {name!r}; use auto, cpu or cuda[:N] (device)") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainingConfigError("device is cuda but no CUDA device is available; set device: cpu or auto")
    return device


def seed_everything(seed: int) -> None:
    """Seed torch's CPU and CUDA generators (the trainer draws all randomness from torch)."""
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


@contextlib.contextmanager
def deterministic_mode(enabled: bool) -> Iterator[None]:
    """Use torch's deterministic algorithms inside the block (restoring the previous setting)."""
    previous = torch.are_deterministic_algorithms_enabled()
    previous_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    previous_benchmark = torch.backends.cudnn.benchmark
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=previous_warn)
        torch.backends.cudnn.benchmark = previous_benchmark


def build_optimizer(params: Sequence[nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (decoupled weight decay) or Adam (L2 in the gradient), at the peak learning rate."""
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)


def warmup_cosine_factor(step: int, *, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """LR multiplier: linear warm-up to 1 over `warmup_steps`, then half cosine down to `min_ratio`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, *, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step warm-up + cosine schedule over `config.epochs` epochs."""
    total = config.epochs * steps_per_epoch
    warmup = round(config.warmup_epochs * steps_per_epoch)
    min_ratio = config.min_lr / config.lr

    def factor(step: int) -> float:
        return warmup_cosine_factor(step, total_steps=total, warmup_steps=warmup, min_ratio=min_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager[Any]:
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def predict_bags(
    model: MILModel, bags: Sequence[Bag], *, device: torch.device | str = "cpu", amp: bool = False
) -> BagPredictions:
    """Run `model` (eval mode, one bag at a time, no padding) over `bags`."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    probs, attention, labels, ids = [], [], [], []
    try:
        for bag in bags:
            with _autocast(device, amp):
                output = model(bag.features.unsqueeze(0).to(device, torch.float32), None)
            probs.append(torch.softmax(output.logits.float(), dim=-1)[0].cpu().numpy())
            attention.append(output.attention[0].float().cpu().numpy())
            labels.append(bag.label)
            ids.append(bag.slide_id)
    finally:
        model.train(was_training)
    return BagPredictions(ids, np.asarray(labels, dtype=np.int64), np.stack(probs).astype(np.float64), attention)


def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


class _Trainer:
    """State of one `fit` call (one fold): model, method, optimiser, schedule and bookkeeping."""

    def __init__(
        self,
        model: MILModel,
        method: TrainingMethod,
        train_bags: Sequence[Bag],
        *,
        config: TrainConfig,
        num_classes: int,
        fold: int,
    ) -> None:
        self.config = config
        self.fold = fold
        self.device = resolve_device(config.device)
        self.amp = config.amp and self.device.type == "cuda"
        self.model = model.to(self.device)
        self.method = method
        self.train_bags = cached_bags(train_bags, config=config, device=self.device)
        self.per_bag = config.batch_execution == "per_bag" or (
            config.batch_execution == "auto" and self.device.type == "cpu"
        )
        method.device, method.per_bag = self.device, self.per_bag
        self.steps_per_epoch = math.ceil(len(train_bags) / config.batch_size)
        self.total_steps = config.epochs * self.steps_per_epoch
        self.train_labels = [bag_label(train_bags, i) for i in range(len(train_bags))]
        if config.balance == "class_weights":
            method.class_weights = inverse_frequency_class_weights(self.train_labels, num_classes)
        self.sample_weights = (
            balanced_sample_weights(self.train_labels, num_classes) if config.balance == "sampler" else None
        )
        method.attach(self.model, total_steps=self.total_steps)
        for module in method.extra_modules():
            module.to(self.device)
        params = [p for p in self.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(params, config)
        self.scheduler = build_scheduler(self.optimizer, config, steps_per_epoch=self.steps_per_epoch)
        self.generator = torch.Generator().manual_seed(config.seed * 1_000_003 + fold)
        self.step = 0
        self.epoch = 0
        self.best_key: tuple[float, float] | None = None
        self.best_epoch = 0
        self.best_state: dict[str, torch.Tensor] = {}
        self.best_val_metrics: dict[str, Any] = {}
        self.stale_epochs = 0
        self.stopped_early = False
        self.history: list[dict[str, Any]] = []

    def parameters(self) -> Iterator[nn.Parameter]:
        yield from self.model.parameters()
        for module in self.method.extra_modules():
            yield from module.parameters()

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue bit-for-bit after the last finished epoch."""
        return {
            "version": CHECKPOINT_VERSION,
            "fold": self.fold,
            "epoch": self.epoch,
            "step": self.step,
            "model": self.model.state_dict(),
            "method_modules": [m.state_dict() for m in self.method.extra_modules()],
            "method": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "best_key": self.best_key,
            "best_epoch": self.best_epoch,
            "best_state": self.best_state,
            "best_val_metrics": self.best_val_metrics,
            "stale_epochs": self.stale_epochs,
            "stopped_early": self.stopped_early,
            "history": self.history,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != CHECKPOINT_VERSION or state.get("fold") != self.fold:
            raise TrainingConfigError("the last checkpoint belongs to another fold or version; start a new run (--out)")
        self.model.load_state_dict(state["model"])
        for module, module_state in zip(self.method.extra_modules(), state["method_modules"], strict=True):
            module.load_state_dict(module_state)
        self.method.load_state_dict(state["method"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        for key in ("epoch", "step", "best_key", "best_epoch", "best_state", "best_val_metrics",
                    "stale_epochs", "stopped_early", "history"):
            setattr(self, key, state[key])

    def batches(self) -> Iterator[Batch | list[Batch]]:
        """This epoch's steps, built on the device by a background thread a few steps ahead: padded
        batches, the bags of each step one by one (`per_bag`), or the method's own batches.

        All randomness comes from `self.generator`, drawn in a fixed order (the producer thread is
        its only user during the epoch), so steps are the same with or without prefetching.
        """
        config = self.config
        sizes = None
        if config.group_by_size and config.batch_size > 1:
            cap = config.max_instances or math.inf
            sizes = [min(bag_size(self.train_bags, i), cap) for i in range(len(self.train_bags))]
        if config.balance == "batches":
            order = class_balanced_order(self.train_labels, batch_size=config.batch_size, generator=self.generator, sizes=sizes)
        else:
            order = epoch_order(len(self.train_bags), generator=self.generator, sample_weights=self.sample_weights)
            if sizes is not None:
                order = size_grouped_order(order, sizes, batch_size=config.batch_size, generator=self.generator)
        epoch_bags = EpochBags(self.train_bags, order, max_instances=config.max_instances, generator=self.generator)
        steps = self.method.make_batches(epoch_bags, batch_size=config.batch_size, generator=self.generator)
        if steps is None and self.per_bag:
            steps = bagwise_steps(epoch_bags, batch_size=config.batch_size, device=self.device)
        elif steps is None:
            steps = padded_batches(epoch_bags, batch_size=config.batch_size, device=self.device, dtype=torch.float32)
        return prefetched(steps, depth=config.prefetch_batches)

    def forward_backward(self, step: Batch | list[Batch], progress: float) -> StepResult:
        """Forward and backward of one step (gradients accumulate; the caller zeroes them first).

        The bags of a `per_bag` step go one at a time, each loss weighted by the bag's share of the
        padded batch's (class-weighted) mean, so only one bag's activations are alive at once.
        Returns the step's (detached) loss and terms.
        """
        batches = [step.to(self.device)] if isinstance(step, Batch) else step
        shares = [1.0] if isinstance(step, Batch) else bag_shares(
            torch.cat([batch.labels for batch in step]), self.method.class_weights
        )
        results = []
        for batch, share in zip(batches, shares, strict=True):
            with _autocast(self.device, self.amp):
                result = self.method.compute_loss(self.model, batch, progress=progress)
            if not torch.isfinite(result.loss):
                raise TrainingConfigError(
                    f"non-finite training loss in fold {self.fold}, epoch {self.epoch + 1} "
                    f"(terms {result.terms}); lower --lr or set grad_clip_norm"
                )
            (share * result.loss).backward()
            results.append(StepResult(result.loss.detach(), result.output, result.terms))
        return combine_results(results, shares)

    def train_epoch(self) -> tuple[float, dict[str, float]]:
        """One pass over the training bags; returns the mean loss and mean loss terms."""
        self.model.train()
        losses: list[float] = []
        terms: dict[str, list[float]] = {}
        for step in self.batches():
            self.optimizer.zero_grad(set_to_none=True)
            result = self.forward_backward(step, min(1.0, self.step / self.total_steps))
            if self.config.grad_clip_norm is not None:
                nn.utils.clip_grad_norm_(list(self.parameters()), self.config.grad_clip_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.step += 1
            self.method.after_optimizer_step(self.model, progress=min(1.0, self.step / self.total_steps))
            losses.append(float(result.loss))
            for name, value in result.terms.items():
                terms.setdefault(name, []).append(value)
        return float(np.mean(losses)), {k: float(np.mean(v)) for k, v in terms.items()}

    def validate(self, val_bags: Sequence[Bag]) -> dict[str, Any]:
        predictions = predict_bags(self.method.inference_model(self.model), val_bags, device=self.device, amp=self.amp)
        metrics = classification_metrics(predictions.labels, predictions.probs)
        if metrics[self.config.selection_metric] is None:
            raise TrainingConfigError(
                f"validation metric {self.config.selection_metric} is undefined on fold {self.fold}'s validation "
                "part (one class only); raise val_fraction, or set selection_metric: loss"
            )
        return metrics


def bag_label(bags: Sequence[Bag], index: int) -> int:
    """The label of `bags[index]`, without loading features when the sequence knows its labels."""
    labels = getattr(bags, "labels", None)
    return int(labels[index]) if labels is not None else int(bags[index].label)


def bag_size(bags: Sequence[Bag], index: int) -> int:
    """The instance count of `bags[index]`, without loading features when the sequence knows its sizes."""
    sizes = getattr(bags, "sizes", None)
    return int(sizes[index]) if sizes is not None else int(bags[index].features.shape[0])


def cached_bags(bags: Sequence[Bag], *, config: TrainConfig, device: torch.device) -> Sequence[Bag]:
    """`bags` read once into a `BagStore` (pinned for CUDA) when `config.cache_features`, else as given."""
    if not config.cache_features or isinstance(bags, BagStore):
        return bags
    return BagStore(bags, pin_memory=device.type == "cuda")


def fit(
    model: MILModel,
    method: TrainingMethod,
    train_bags: Sequence[Bag],
    val_bags: Sequence[Bag],
    *,
    config: TrainConfig,
    num_classes: int,
    fold: int = 0,
    checkpoint_path: Path | None = None,
    best_model_path: Path | None = None,
    on_epoch_end: Callable[[EpochReport], None] | None = None,
) -> FitResult:
    """Train `model` with `method` on `train_bags`, selecting by `config.selection_metric` on `val_bags`.

    With `checkpoint_path`, a resumable checkpoint is written atomically after every epoch and a
    run killed at any point continues from the last finished epoch, giving the same result as an
    uninterrupted run. With `best_model_path`, the inference model's best weights are saved there
    as safetensors whenever validation improves. `on_epoch_end` receives an `EpochReport` after
    each epoch (and after its checkpoint is written).
    """
    if len(train_bags) == 0 or len(val_bags) == 0:
        raise TrainingConfigError(f"fold {fold} needs training and validation bags; check the splits")
    with deterministic_mode(config.deterministic):
        trainer = _Trainer(model, method, train_bags, config=config, num_classes=num_classes, fold=fold)
        val_bags = cached_bags(val_bags, config=config, device=trainer.device)
        if checkpoint_path is not None and checkpoint_path.exists():
            trainer.load_state_dict(torch.load(checkpoint_path, map_location="cpu", weights_only=True))
            log.info("fold %d: resumed from %s after epoch %d", fold, checkpoint_path, trainer.epoch)
        while trainer.epoch < config.epochs and not trainer.stopped_early:
            started = time.perf_counter()
            train_loss, terms = trainer.train_epoch()
            val_metrics = trainer.validate(val_bags)
            trainer.epoch += 1
            score = val_metrics[config.selection_metric]
            key = selection_key(val_metrics, config.selection_metric)
            is_best = is_improvement(key, trainer.best_key)
            if is_best:
                trainer.best_key, trainer.best_epoch = key, trainer.epoch
                trainer.best_val_metrics = val_metrics
                trainer.best_state = _cpu_state(method.inference_model(trainer.model))
                trainer.stale_epochs = 0
                if best_model_path is not None:
                    with atomic_path(best_model_path) as temp:
                        save_model(method.inference_model(trainer.model), str(temp), metadata={"epoch": str(trainer.epoch)})
            else:
                trainer.stale_epochs += 1
            trainer.stopped_early = (
                config.patience is not None
                and trainer.stale_epochs >= config.patience
                and trainer.epoch >= config.min_epochs
                and trainer.epoch < config.epochs
            )
            lr = trainer.optimizer.param_groups[0]["lr"]
            trainer.history.append(
                {"epoch": trainer.epoch, "train_loss": train_loss, "lr": lr,
                 **{f"val_{k}": v for k, v in val_metrics.items() if k != "confusion_matrix"}}
            )
            if checkpoint_path is not None:
                with atomic_path(checkpoint_path) as temp:
                    torch.save(trainer.state_dict(), temp)
            report = EpochReport(fold, trainer.epoch, config.epochs, train_loss, terms, val_metrics, lr,
                                 is_best, trainer.stopped_early, time.perf_counter() - started)
            log.info(
                "fold %d epoch %d/%d: train loss %.4f, val %s %.4f%s (%.1fs)",
                fold, trainer.epoch, config.epochs, train_loss, config.selection_metric, score,
                " (best)" if is_best else "", report.seconds,
            )
            if on_epoch_end is not None:
                on_epoch_end(report)
        if trainer.stopped_early:
            log.info("fold %d: early stop after epoch %d (best epoch %d)", fold, trainer.epoch, trainer.best_epoch)
        return FitResult(
            trainer.best_state, trainer.best_epoch, trainer.best_val_metrics[config.selection_metric],
            trainer.best_val_metrics,
            trainer.epoch, trainer.stopped_early, trainer.history,
        )
