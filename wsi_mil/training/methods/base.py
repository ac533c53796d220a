"""How a training-time method (AEM, ACMIL losses, MHIM-MIL, PackMIL) plugs into the trainer.

A method composes with any model that follows the forward contract: it may wrap the forward pass
(e.g. run a teacher, mask instances through the padding mask, pack bags) and add loss terms, but
it never edits the model's architecture. The model served after training is `inference_model()`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from wsi_mil.models.base import MILModel, MILOutput
from wsi_mil.training.bag import Bag


@dataclass
class Batch:
    """A padded batch of bags: `features [B, N, D]`, `mask [B, N]` (True = real), `labels [B]`."""

    features: torch.Tensor
    mask: torch.Tensor
    labels: torch.Tensor
    slide_ids: list[str] = field(default_factory=list)
    #: soft targets `[B, C]` when a method mixes labels (PackMIL hyperslides); None = hard labels
    soft_labels: torch.Tensor | None = None
    #: `[B, N]` long: each instance's position in its slide's full bag (kept through the
    #: `max_instances` cap), -1 on padding; None when the batch was built without it
    instance_index: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> Batch:
        soft = None if self.soft_labels is None else self.soft_labels.to(device)
        index = None if self.instance_index is None else self.instance_index.to(device)
        return Batch(self.features.to(device), self.mask.to(device), self.labels.to(device), self.slide_ids, soft, index)


@dataclass
class StepResult:
    """The loss to back-propagate, the (student) output, and each loss term for logging."""

    loss: torch.Tensor
    output: MILOutput
    terms: dict[str, float]


def probe_output(model: MILModel) -> MILOutput:
    """One eval-mode, no-grad forward of a 2-instance bag of zeros, to check what the model returns."""
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    try:
        with torch.no_grad():
            return model(torch.zeros(1, 2, model.in_dim, device=device), torch.ones(1, 2, dtype=torch.bool, device=device))
    finally:
        model.train(was_training)


class TrainingMethod:
    """Base method = plain supervised MIL: the model's bag loss (`MILModel.bag_loss`, cross-entropy
    unless the model overrides it) + the model's own auxiliary losses.

    Subclasses override the hooks they need. `weights` scales named auxiliary loss terms
    (e.g. `{"diversity": 1.0}`); terms without a weight count with weight 1.
    """

    name = "plain"
    #: per-class loss weights `[C]` the trainer sets for `balance: class_weights`; None = unweighted
    class_weights: torch.Tensor | None = None
    #: where the trainer runs the model: custom batches (`make_batches`) are built there
    device: torch.device = torch.device("cpu")
    #: the trainer's `batch_execution`: True = run the bags of a step through the model one by one
    #: (no padding) and combine their losses; custom batches honour it in `compute_loss`
    per_bag: bool = False

    def __init__(self, *, aux_weights: dict[str, float] | None = None) -> None:
        self.aux_weights = dict(aux_weights or {})

    def attach(self, model: MILModel, *, total_steps: int) -> None:
        """Called once before training (e.g. build a teacher); `total_steps` drives schedules."""

    def extra_modules(self) -> list[nn.Module]:
        """Trainable modules the method owns (optimised with the model, saved in checkpoints)."""
        return []

    def make_batches(self, bags: Sequence[Bag], *, batch_size: int, generator: torch.Generator) -> Iterator[Batch] | None:
        """Custom batching (PackMIL packs); None = the trainer's own padded batching."""
        return None

    def compute_loss(self, model: MILModel, batch: Batch, *, progress: float) -> StepResult:
        """Forward + loss for one training step; `progress` in [0, 1] is the fraction of training done."""
        output = model(batch.features, batch.mask)
        return self.supervised_loss(model, output, batch)

    def after_optimizer_step(self, model: MILModel, *, progress: float) -> None:
        """Called after each optimiser step (e.g. the MHIM EMA teacher update)."""

    def inference_model(self, model: MILModel) -> MILModel:
        """The model to evaluate and serve (MHIM: the student alone, i.e. `model`)."""
        return model

    def served_model_spec(self, model_name: str, model_kwargs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """Registry name and kwargs that rebuild `inference_model` (what the model card stores)."""
        return model_name, model_kwargs

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned (resume)."""

    # shared helper for subclasses
    def supervised_loss(self, model: MILModel, output: MILOutput, batch: Batch, extra: dict[str, torch.Tensor] | None = None) -> StepResult:
        """The model's bag loss (soft targets when given) + its aux losses + `extra` terms, each weighted."""
        weight = None if self.class_weights is None else self.class_weights.to(output.logits.device)
        target = batch.labels if batch.soft_labels is None else batch.soft_labels
        bag_loss = model.bag_loss(output, target, class_weights=weight)
        terms: dict[str, torch.Tensor] = {"bag": bag_loss}
        terms.update(output.aux_losses)
        label_losses = getattr(model, "aux_losses", None)  # a plain nn.Module following the contract has none
        if label_losses is not None:
            terms.update(label_losses(output, batch.labels))
        terms.update(extra or {})
        loss = sum((self.aux_weights.get(k, 1.0) * v.float() for k, v in terms.items()), torch.zeros((), device=bag_loss.device))
        return StepResult(loss, output, {k: float(v.detach()) for k, v in terms.items()})
