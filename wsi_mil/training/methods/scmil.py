"""SC-MIL, supervised contrastive MIL for label-imbalanced cohorts (Juyal et al., WACV 2024).

Joint training that moves from learning bag representations to learning the classifier: a
projection head `g` (owned by the method, trained, never served) maps the model's bag
`embedding` to a unit vector `z`, a supervised contrastive loss (SupCon, `wsi_mil.training.losses`)
pulls same-class bags together, and the loss weight moves from it to the classifier's loss:

    L = β(p) · L_SupCon + (1 − β(p)) · (L_bag + Σ_k w_k L_aux,k),   p = fraction of steps done.

The classifier reads the model's own embedding (not `z`), so the served model is the model alone.
Each bag contributes two views: view 1 is the bag as the trainer gave it (the classifier loss is
computed on it alone), view 2 a uniform random `view_keep_ratio` of its instances, hidden through
the mask. SupCon needs several bags per step: the method builds padded batches of `batch_size`
bags (a batch of one is refused unless `queue_size > 0`); `balance: batches` makes every batch
class-balanced. An optional FIFO queue of earlier steps' `z` adds contrast entries.

No official SC-MIL code was found and the paper's full text could not be read (spec
`mil-methods-scmil-ins.md` §2): the β schedule (default BBN/Hybrid-SC's parabolic `1 − p²`),
temperature (0.1), views, projection head size and queue are our choices, all configurable.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from wsi_mil.errors import TrainingConfigError
from wsi_mil.models import create_model, list_models
from wsi_mil.models.base import MILModel
from wsi_mil.training.bag import Bag
from wsi_mil.training.batching import bag_shares, combine_results, padded_batches, unpadded_rows
from wsi_mil.training.losses import supervised_contrastive_loss
from wsi_mil.training.methods.base import Batch, StepResult, TrainingMethod, probe_output
from wsi_mil.training.methods.mhim import ceil_count, random_subset
from wsi_mil.training.methods.registry import register_method

log = logging.getLogger(__name__)

Schedule = Literal["parabolic", "linear", "cosine", "step", "constant"]
SCHEDULES = ("parabolic", "linear", "cosine", "step", "constant")
#: below this many bags per step SupCon has few positives per anchor (a warning, not an error)
SMALL_BATCH = 8


class ProjectionHead(nn.Module):
    """SupContrast's "mlp" head: `Linear(E → E_h) → ReLU → Linear(E_h → d)` (normalised by the loss)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.layers(embedding)


def models_with_embedding(in_dim: int = 16) -> list[str]:
    """Registered models whose output carries a bag embedding (built small, probed once)."""
    names = []
    for name in list_models():
        try:
            model = create_model(name, in_dim, 2)
        except (TypeError, ValueError, RuntimeError):  # a model that cannot be built small is left out
            continue
        if probe_output(model).embedding is not None:
            names.append(name)
    return names


class SCMILMethod(TrainingMethod):
    """SupCon on projected bag embeddings (two instance-subset views per bag) → cross-entropy, by β(p)."""

    name = "scmil"

    def __init__(
        self,
        *,
        temperature: float = 0.1,
        base_temperature: float | None = None,
        projection_dim: int = 128,
        projection_hidden: int | None = None,
        schedule: Schedule = "parabolic",
        beta_start: float = 1.0,
        beta_end: float = 0.0,
        switch_at: float = 0.5,
        views: int = 2,
        view_keep_ratio: float = 0.7,
        queue_size: int = 0,
        official_compat: bool = False,
        aux_weights: dict[str, float] | None = None,
    ) -> None:
        super().__init__(aux_weights=aux_weights)
        if temperature <= 0 or (base_temperature is not None and base_temperature <= 0):
            raise TrainingConfigError(
                f"SC-MIL temperatures must be > 0, got {temperature} / {base_temperature} (method_kwargs.temperature, base_temperature)"
            )
        if schedule not in SCHEDULES:
            raise TrainingConfigError(f"SC-MIL schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r} (method_kwargs.schedule)")
        for option, value in (("beta_start", beta_start), ("beta_end", beta_end), ("switch_at", switch_at)):
            if not 0.0 <= value <= 1.0:
                raise TrainingConfigError(f"SC-MIL {option} must be in [0, 1], got {value} (method_kwargs.{option})")
        if views not in (1, 2):
            raise TrainingConfigError(f"SC-MIL views must be 1 or 2, got {views} (method_kwargs.views)")
        if not 0.0 < view_keep_ratio <= 1.0:
            raise TrainingConfigError(f"SC-MIL view_keep_ratio must be in (0, 1], got {view_keep_ratio} (method_kwargs.view_keep_ratio)")
        if queue_size < 0:
            raise TrainingConfigError(f"SC-MIL queue_size must be ≥ 0, got {queue_size} (method_kwargs.queue_size)")
        if projection_dim < 1 or (projection_hidden is not None and projection_hidden < 1):
            raise TrainingConfigError("SC-MIL projection sizes must be ≥ 1 (method_kwargs.projection_dim, projection_hidden)")
        self.temperature = temperature
        self.base_temperature = base_temperature
        self.projection_dim = projection_dim
        self.projection_hidden = projection_hidden
        self.schedule: Schedule = schedule
        self.beta_start = beta_start
        self.beta_end = beta_end
        self.switch_at = switch_at
        self.views = views
        self.view_keep_ratio = view_keep_ratio
        self.queue_size = queue_size
        self.official_compat = official_compat
        self.head: ProjectionHead | None = None
        self.queue = torch.zeros(queue_size, projection_dim)
        self.queue_labels = torch.zeros(queue_size, dtype=torch.long)
        self.queue_valid = torch.zeros(queue_size, dtype=torch.bool)
        self.queue_pointer = 0
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None

    # -- set-up ----------------------------------------------------------------------------------

    def attach(self, model: MILModel, *, total_steps: int) -> None:
        """Refuse models without a bag embedding; build the projection head on the model's device."""
        probe = probe_output(model)
        if probe.embedding is None:
            raise TrainingConfigError(
                f"SC-MIL contrasts bag embeddings, but {type(model).__name__} returns MILOutput.embedding = None; "
                f"choose a --model that returns one: {', '.join(models_with_embedding())}"
            )
        embedding_dim = probe.embedding.flatten(1).shape[1]
        device = next(model.parameters()).device
        self.head = ProjectionHead(embedding_dim, self.projection_hidden or embedding_dim, self.projection_dim).to(device)
        self.queue, self.queue_labels, self.queue_valid = (t.to(device) for t in (self.queue, self.queue_labels, self.queue_valid))

    def extra_modules(self) -> list[nn.Module]:
        return [self.head] if self.head is not None else []

    def make_batches(self, bags: Sequence[Bag], *, batch_size: int, generator: torch.Generator) -> Iterator[Batch]:
        """Padded batches of `batch_size` bags: SupCon needs the bags of a step together, also on CPU."""
        if batch_size == 1 and self.queue_size == 0:
            raise TrainingConfigError(
                "SC-MIL needs several bags per step (a single bag has no other bag to contrast with); "
                "set batch_size ≥ 8 (--batch-size), or method_kwargs.queue_size > 0"
            )
        if batch_size < SMALL_BATCH:
            log.warning("SC-MIL with batch_size %d: few same-class bags per step; %d or more is recommended", batch_size, SMALL_BATCH)
        return padded_batches(bags, batch_size=batch_size, device=self.device, dtype=torch.float32)

    # -- one step --------------------------------------------------------------------------------

    def beta_at(self, progress: float) -> float:
        """The SupCon weight β at a training progress in [0, 1] (the classifier loss gets 1 − β)."""
        p = min(max(progress, 0.0), 1.0)
        span = self.beta_start - self.beta_end
        if self.schedule == "parabolic":
            return self.beta_end + span * (1.0 - p * p)
        if self.schedule == "linear":
            return self.beta_end + span * (1.0 - p)
        if self.schedule == "cosine":
            return self.beta_end + span * 0.5 * (1.0 + math.cos(math.pi * p))
        if self.schedule == "step":
            return self.beta_start if p < self.switch_at else self.beta_end
        return self.beta_start

    def second_view(self, mask: torch.Tensor) -> torch.Tensor:
        """View 2's mask `[B, N]`: a uniform random `ceil(view_keep_ratio · N_valid)` valid instances per
        bag (at least one; never padding), drawn from torch's global generator."""
        return random_subset(mask, ceil_count(mask.sum(dim=1), self.view_keep_ratio).clamp_min(1))

    def compute_loss(self, model: MILModel, batch: Batch, *, progress: float) -> StepResult:
        head = self._head()
        kept = self.second_view(batch.mask) if self.views == 2 else None
        if self.per_bag:
            rows = unpadded_rows(batch)
            outputs = [model(row.features, None) for row in rows]
            result = combine_results(
                [self.supervised_loss(model, output, row) for output, row in zip(outputs, rows, strict=True)],
                bag_shares(batch.labels, self.class_weights),
            )
            if kept is not None:
                outputs += [model(batch.features[b, kept[b]].unsqueeze(0), None) for b in range(len(rows))]
        else:
            outputs = [model(batch.features, batch.mask)]
            result = self.supervised_loss(model, outputs[0], batch)
            if kept is not None:
                outputs.append(model(batch.features * kept.unsqueeze(-1).to(batch.features.dtype), kept))
        if any(output.embedding is None for output in outputs):
            raise TrainingConfigError(f"SC-MIL: {type(model).__name__} returned no embedding; choose another --model")
        embeddings = torch.cat([output.embedding.flatten(1) for output in outputs if output.embedding is not None])
        labels = batch.labels.repeat(self.views)
        with torch.autocast(embeddings.device.type, enabled=False):  # SupCon in fp32 (logits up to 1/τ)
            z = F.normalize(head(embeddings.float()), dim=1)
            valid = self.queue_valid
            supcon = supervised_contrastive_loss(
                z, labels, temperature=self.temperature, base_temperature=self.base_temperature,
                contrast=self.queue[valid], contrast_labels=self.queue_labels[valid], official_compat=self.official_compat,
            )
        self._pending = (z[: len(batch.labels)].detach(), batch.labels.detach())
        beta = self.beta_at(progress)
        loss = beta * supcon.loss + (1.0 - beta) * result.loss
        terms = {**result.terms, "supcon": float(supcon.loss.detach()), "scmil_beta": beta}
        terms.update(self.positive_rates(batch.labels, supcon.has_positive))
        return StepResult(loss, result.output, terms)

    def positive_rates(self, labels: torch.Tensor, has_positive: torch.Tensor) -> dict[str, float]:
        """`scmil_anchors_with_pos`: anchors with any positive (with two views, always); and, counting
        only positives from other bags (the batch or the queue), `scmil_cross_bag_pos` over all bags
        and `scmil_minority_pos` over the bags of the step's rarest class."""
        counts = torch.bincount(labels, minlength=int(labels.max()) + 1)
        queued = torch.bincount(self.queue_labels[self.queue_valid], minlength=len(counts))[: len(counts)]
        cross = ((counts[labels] >= 2) | (queued[labels] >= 1)).float()
        present = counts > 0
        rarest = int(torch.where(present, counts, counts.max() + 1).argmin())
        return {
            "scmil_anchors_with_pos": float(has_positive.float().mean()),
            "scmil_cross_bag_pos": float(cross.mean()),
            "scmil_minority_pos": float(cross[labels == rarest].mean()),
        }

    def after_optimizer_step(self, model: MILModel, *, progress: float) -> None:
        """Push the step's view-1 `z` and labels into the queue (oldest entries overwritten first)."""
        if self.queue_size == 0 or self._pending is None:
            return
        z, labels = self._pending
        self._pending = None
        z, labels = z[-self.queue_size :], labels[-self.queue_size :]
        slots = (self.queue_pointer + torch.arange(len(labels), device=self.queue.device)) % self.queue_size
        self.queue[slots] = z.to(self.queue.dtype)
        self.queue_labels[slots] = labels
        self.queue_valid[slots] = True
        self.queue_pointer = int((self.queue_pointer + len(labels)) % self.queue_size)

    def state_dict(self) -> dict[str, Any]:
        return {"queue": self.queue.cpu(), "queue_labels": self.queue_labels.cpu(), "queue_valid": self.queue_valid.cpu(),
                "queue_pointer": self.queue_pointer}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        device = self.queue.device
        self.queue, self.queue_labels, self.queue_valid = (state[k].to(device) for k in ("queue", "queue_labels", "queue_valid"))
        self.queue_pointer = int(state["queue_pointer"])

    def _head(self) -> ProjectionHead:
        if self.head is None:
            raise TrainingConfigError("SC-MIL: attach(model) must run before training (the trainer calls it)")
        return self.head


register_method("scmil")(SCMILMethod)
