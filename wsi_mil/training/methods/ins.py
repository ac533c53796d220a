"""INS training (Qu et al., IEEE TCSVT 2024; official code miccaiif/INS, built on PiCO): instance-level
weakly supervised contrast and prototype pseudo-labels for the `ins` model (`--model ins --method ins`).

Every valid instance of a step is an example with a *candidate label set* from its bag label and the
MIL constraint: an instance of a negative bag (class `negative_class` r) can only be r; an instance
of a bag of class y ≠ r is r or y. Per step, on the step's instances (query view `x_q`, key view
`x_k`: the features themselves by default, or feature dropout 0.2 / 0.4 with `view_aug: dropout`):

1. query pass `h = e(x_q)`, classifier logits `o = c(h)`, projection `q = normalise(g(h))` (`g`,
   the projection head, is trained here and not served);
2. classifier pseudo-label `ŷ_cls = argmax(softmax(o) ⊙ Y)`, prototype label
   `ŷ_proto = argmax(softmax(q Pᵀ) ⊙ Y)` with the prototypes P *before* this step's update;
3. prototype update from `q` and `ŷ_cls` (EMA, m = 0.9; rows L2-normalised);
4. main phase: confidence update `conf ← φ conf + (1 − φ) onehot(ŷ_proto)`, φ from 0.95 to 0.8 over
   training, then negative-bag rows reset to `e_r` (the candidate mask already keeps them there);
5. classifier loss: soft-target cross-entropy of `o` against the targets (bag-label warm start:
   the bag label; warm-up: the initial `Y/|Y|`; main: `conf`);
6. contrast on up to `contrastive_anchors_per_step` random instances: keys from the momentum key
   encoder (an EMA copy of encoder + head, no gradient) on `x_k`; warm-up: MoCo InfoNCE against the
   queue; main: SupCon over `[q; k; queue]` with positives = equal `ŷ_cls`; keys and their `ŷ_cls`
   then enter the queue (a ring of `queue_size`, empty slots masked);
7. `loss = L_cls + contrastive_weight · L_cont + bag_loss_weight · L_bag`, where `L_bag` is the
   model's bag loss on the bag prediction pooled from this same pass (0 by default).

The confidence table holds one row per training instance, keyed by slide id and the instance's
position in its slide (`Batch.instance_index`, kept through the `max_instances` cap), so each
instance keeps its own pseudo-label across epochs. Prototypes, queue, table and key encoder are
checkpointed and resume bit for bit; the model served is the `ins` model alone.

Deviations from the official code, all deliberate (see docs/training.md, "INS"): candidate sets come
from bag labels only (the official CAMELYON16 loaders leak patch labels); `view_aug: dropout` makes the
feature views really differ (the official feature-path "dropout" runs with training=False, so its
views are identical, which is also our default: dropout views lowered instance AUC on witness
bags, see docs/training.md); the queue starts empty with
a validity mask and stores integer labels; steps are bags, not 64 instances drawn across slides,
so the prototype EMA defaults to one update with the batch mean per class
(`proto_update: sequential` gives the official per-instance order); phases are fractions of
training; warm-up uses every instance (`warmup_instances: positive_bags` is the official choice);
the separate bag head and its optimiser step are replaced by the optional pooled bag loss.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch
from torch import nn
from torch.nn import functional as F

from wsi_mil.errors import TrainingConfigError
from wsi_mil.models.base import MILModel
from wsi_mil.models.layers_targets import bag_cross_entropy
from wsi_mil.training.bag import Bag
from wsi_mil.training.losses import moco_infonce_loss, supervised_contrastive_loss
from wsi_mil.training.methods.base import Batch, StepResult, TrainingMethod
from wsi_mil.training.methods.registry import register_method

log = logging.getLogger(__name__)

Phase = Literal["warmstart", "warmup", "main"]
PHASES: tuple[Phase, ...] = ("warmstart", "warmup", "main")
ProtoUpdate = Literal["batch_mean", "sequential"]
#: what an `ins` model must offer the method (duck-typed, so wrappers work too)
INS_MODEL_API = ("encoder", "instance_features", "instance_logits_from", "output_from_instance_logits",
                 "num_instance_classes", "negative_class", "feature_dim")


def candidate_sets(labels: torch.Tensor, num_instance_classes: int, negative_class: int | None) -> torch.Tensor:
    """Candidate label sets `Y` `[B, C_inst]` (0/1 floats) of the instances of bags with `labels` `[B]`.

    Negative bag (label r): `{r}`; bag of class y ≠ r: `{r, y}`; background mode
    (`negative_class=None`): `{background, y}`, background being the last instance class.
    """
    rows = F.one_hot(labels, num_instance_classes).float()
    other = num_instance_classes - 1 if negative_class is None else negative_class
    rows[:, other] = 1.0
    return rows


def pseudo_labels(
    logits: torch.Tensor, queries: torch.Tensor, prototypes: torch.Tensor, candidates: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two pseudo-labels `[M]` of instances, each the best class inside the candidate set:
    the classifier's `argmax(softmax(o) ⊙ Y)` and the prototypes' `argmax(softmax(q Pᵀ) ⊙ Y)`."""
    classifier = (torch.softmax(logits.float(), dim=1) * candidates).argmax(dim=1)
    prototype = (torch.softmax(queries.float() @ prototypes.T, dim=1) * candidates).argmax(dim=1)
    return classifier, prototype


def update_prototypes(
    prototypes: torch.Tensor, embeddings: torch.Tensor, labels: torch.Tensor, *, momentum: float, mode: ProtoUpdate
) -> torch.Tensor:
    """Prototypes `[C, d]` after an EMA step with embeddings `[M, d]` of classes `labels` `[M]`.

    `sequential` (official): `P[y_i] ← m P[y_i] + (1 − m) z_i` for i in order, then every row
    L2-normalised; `batch_mean`: `P_c ← normalise(m P_c + (1 − m) mean_{y_i = c} z_i)` for the
    classes present. Rows of absent classes keep their (normalised) value.
    """
    one_hot = F.one_hot(labels, prototypes.shape[0]).to(embeddings.dtype)  # [M, C]
    counts = one_hot.sum(dim=0)  # [C]
    present = counts > 0
    if mode == "sequential":
        rank = (one_hot.cumsum(dim=0) * one_hot).sum(dim=1)  # 1-based position of i among its class
        weight = (1.0 - momentum) * momentum ** (counts[labels] - rank)  # [M]
        updated = momentum**counts.unsqueeze(1) * prototypes + (one_hot * weight.unsqueeze(1)).T @ embeddings
        return F.normalize(updated, dim=1)
    means = (one_hot.T @ embeddings) / counts.clamp_min(1.0).unsqueeze(1)
    updated = F.normalize(momentum * prototypes + (1.0 - momentum) * means, dim=1)
    return torch.where(present.unsqueeze(1), updated, prototypes)


def update_confidence(
    confidence: torch.Tensor, prototype_labels: torch.Tensor, negative: torch.Tensor, *, momentum: float,
    negative_class: int | None,
) -> torch.Tensor:
    """`conf ← φ conf + (1 − φ) onehot(ŷ_proto)`, then rows of negative-bag instances set to `e_r`."""
    updated = momentum * confidence + (1.0 - momentum) * F.one_hot(prototype_labels, confidence.shape[1]).to(confidence.dtype)
    if negative_class is not None and negative.any():
        updated[negative] = F.one_hot(torch.tensor(negative_class), confidence.shape[1]).to(updated)
    return updated


class KeyEncoder(nn.Module):
    """The momentum key encoder: EMA copies of the model's instance encoder and the projection head."""

    def __init__(self, encoder: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.encoder = copy.deepcopy(encoder)
        self.head = copy.deepcopy(head)
        self.requires_grad_(False)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.encoder(x)).float(), dim=1)


class INSMethod(TrainingMethod):
    """INS: prototype pseudo-labels + instance contrast for the `ins` model (see the module docstring)."""

    name = "ins"

    def __init__(
        self,
        *,
        contrastive_weight: float = 0.5,
        temperature: float = 0.07,
        queue_size: int = 8192,
        key_momentum: float = 0.999,
        proto_momentum: float = 0.9,
        proto_update: ProtoUpdate = "batch_mean",
        conf_momentum: Sequence[float] = (0.95, 0.8),
        warmup_fraction: float = 0.2,
        warmup_instances: Literal["all", "positive_bags"] = "all",
        bag_label_warmstart_fraction: float = 0.0,
        projection_dim: int = 128,
        contrastive_anchors_per_step: int = 512,
        view_aug: Literal["dropout", "none"] = "none",
        view_dropout: Sequence[float] = (0.2, 0.4),
        bag_loss_weight: float = 0.0,
    ) -> None:
        super().__init__()
        checks = [
            (contrastive_weight >= 0 and bag_loss_weight >= 0, "contrastive_weight and bag_loss_weight must be >= 0"),
            (temperature > 0, "temperature must be > 0"),
            (queue_size >= 0 and projection_dim >= 1 and contrastive_anchors_per_step >= 1,
             "queue_size must be >= 0, projection_dim and contrastive_anchors_per_step >= 1"),
            (all(0.0 <= m <= 1.0 for m in (key_momentum, proto_momentum, *conf_momentum)) and len(conf_momentum) == 2,
             "key_momentum and proto_momentum must be in [0, 1], conf_momentum two values in [0, 1] (start, end)"),
            (proto_update in ("batch_mean", "sequential"), "proto_update must be 'batch_mean' or 'sequential'"),
            (warmup_instances in ("all", "positive_bags"), "warmup_instances must be 'all' or 'positive_bags'"),
            (view_aug in ("dropout", "none"), "view_aug must be 'dropout' or 'none'"),
            (len(view_dropout) == 2 and all(0.0 <= p < 1.0 for p in view_dropout), "view_dropout must be two rates in [0, 1)"),
            (0.0 <= bag_label_warmstart_fraction <= warmup_fraction <= 1.0,
             "phases must satisfy 0 <= bag_label_warmstart_fraction <= warmup_fraction <= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise TrainingConfigError(f"INS: {message} (method_kwargs)")
        self.contrastive_weight = contrastive_weight
        self.temperature = temperature
        self.queue_size = queue_size
        self.key_momentum = key_momentum
        self.proto_momentum = proto_momentum
        self.proto_update: ProtoUpdate = proto_update
        self.conf_momentum = (float(conf_momentum[0]), float(conf_momentum[1]))
        self.warmup_fraction = warmup_fraction
        self.warmup_instances = warmup_instances
        self.bag_label_warmstart_fraction = bag_label_warmstart_fraction
        self.projection_dim = projection_dim
        self.contrastive_anchors_per_step = contrastive_anchors_per_step
        self.view_aug = view_aug
        self.view_dropout = (float(view_dropout[0]), float(view_dropout[1]))
        self.bag_loss_weight = bag_loss_weight
        self.head: nn.Module | None = None
        self.key_encoder: KeyEncoder | None = None
        self.negative_class: int | None = None
        self.num_instance_classes = 0
        self.prototypes = torch.zeros(0)
        self.queue = torch.zeros(0)
        self.queue_labels = torch.zeros(0, dtype=torch.long)
        self.queue_valid = torch.zeros(0, dtype=torch.bool)
        self.queue_pointer = 0
        #: slide id -> `[n, C_inst]` confidence rows by position in the slide (grown on demand)
        self.confidence: dict[str, torch.Tensor] = {}
        self._warned_batch_size = False

    # -- set-up ----------------------------------------------------------------------------------

    def attach(self, model: MILModel, *, total_steps: int) -> None:
        """Check the model is an `ins` model; build the projection head, key encoder, queue, prototypes."""
        missing = [name for name in INS_MODEL_API if not hasattr(model, name)]
        if missing:
            raise TrainingConfigError(
                f"--method ins trains the instance classifier of the ins model; {type(model).__name__} lacks "
                f"{', '.join(missing)}. Use --model ins"
            )
        self.negative_class = model.negative_class  # type: ignore[assignment]
        self.num_instance_classes = int(model.num_instance_classes)  # type: ignore[arg-type]
        if self.negative_class is None:
            log.warning("INS background mode (no negative class) is experimental: no bag gives certain instance "
                        "labels; evaluate it before use")
        device = next(model.parameters()).device
        width = int(model.feature_dim)  # type: ignore[arg-type]
        self.head = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, self.projection_dim)).to(device)
        self.key_encoder = KeyEncoder(model.encoder, self.head)  # type: ignore[arg-type]
        self.prototypes = torch.zeros(self.num_instance_classes, self.projection_dim, device=device)
        self.queue = torch.zeros(self.queue_size, self.projection_dim, device=device)
        self.queue_labels = torch.zeros(self.queue_size, dtype=torch.long, device=device)
        self.queue_valid = torch.zeros(self.queue_size, dtype=torch.bool, device=device)
        self.queue_pointer = 0
        self.confidence = {}

    def extra_modules(self) -> list[nn.Module]:
        """The projection head (trained) and the key encoder (EMA only: no parameter requires grad)."""
        return [self._head(), self._key_encoder()]

    def make_batches(self, bags: Sequence[Bag], *, batch_size: int, generator: torch.Generator) -> Iterator[Batch]:
        """Every step as one padded batch, on CPU too: the step gathers the valid instances itself,
        so no padded position is computed, and the contrast and the prototypes see all its bags."""
        from wsi_mil.training.batching import padded_batches  # the pipeline imports the methods

        if batch_size == 1 and not self._warned_batch_size:
            log.warning("INS with batch_size 1: each step holds one bag, so its contrast mixes classes only "
                        "through the queue; batch_size >= 4 is recommended")
            self._warned_batch_size = True
        return padded_batches(bags, batch_size=batch_size, device=self.device, dtype=torch.float32)

    # -- schedules -------------------------------------------------------------------------------

    def phase_at(self, progress: float) -> Phase:
        """Bag-label warm start, then warm-up (MoCo, initial targets), then the main phase."""
        if progress < self.bag_label_warmstart_fraction:
            return "warmstart"
        return "warmup" if progress < self.warmup_fraction else "main"

    def conf_momentum_at(self, progress: float) -> float:
        """φ(p): linear from the first to the second `conf_momentum` value over training."""
        start, end = self.conf_momentum
        return start + (end - start) * min(max(progress, 0.0), 1.0)

    # -- one step --------------------------------------------------------------------------------

    def views(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Query (weak) and key (strong) views of instance features `[M, D]`."""
        if self.view_aug == "none":
            return x, x
        weak, strong = self.view_dropout
        return F.dropout(x, weak, training=True), F.dropout(x, strong, training=True)

    def confidence_rows(self, batch: Batch, positions: torch.Tensor) -> torch.Tensor:
        """The confidence rows `[M, C_inst]` of a batch's valid instances (bag by bag, in mask order),
        creating missing rows at the initial target `Y/|Y|` of their slide's label."""
        rows = []
        for b, slide_id in enumerate(batch.slide_ids):
            index = positions[b][batch.mask[b]]
            table = self._table(slide_id, int(batch.labels[b]), int(index.max()) + 1)
            rows.append(table[index])
        return torch.cat(rows)

    def store_confidence(self, batch: Batch, positions: torch.Tensor, rows: torch.Tensor) -> None:
        """Write updated rows `[M, C_inst]` (in `confidence_rows` order) back into the table."""
        start = 0
        for b, slide_id in enumerate(batch.slide_ids):
            index = positions[b][batch.mask[b]]
            self.confidence[slide_id][index] = rows[start : start + len(index)]
            start += len(index)

    def _table(self, slide_id: str, label: int, size: int) -> torch.Tensor:
        table = self.confidence.get(slide_id)
        if table is None or table.shape[0] < size:
            initial = self._initial_targets(torch.tensor([label], device=self.prototypes.device))
            grown = initial.expand(size, -1).clone()
            if table is not None:
                grown[: table.shape[0]] = table
            self.confidence[slide_id] = table = grown
        return table

    def _initial_targets(self, labels: torch.Tensor) -> torch.Tensor:
        candidates = candidate_sets(labels, self.num_instance_classes, self.negative_class)
        return candidates / candidates.sum(dim=1, keepdim=True)

    def compute_loss(self, model: MILModel, batch: Batch, *, progress: float) -> StepResult:
        head, key_encoder = self._head(), self._key_encoder()
        if len(batch.slide_ids) != batch.features.shape[0]:
            raise TrainingConfigError("INS keys its confidence table by slide: every bag of a batch needs its slide id")
        phase = self.phase_at(progress)
        mask = batch.mask
        positions = batch.instance_index
        if positions is None:
            positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
        bag_of = torch.arange(mask.shape[0], device=mask.device).unsqueeze(1).expand_as(mask)[mask]  # [M]
        bag_labels = batch.labels[bag_of]
        candidates = candidate_sets(bag_labels, self.num_instance_classes, self.negative_class)  # [M, C]
        negative = (bag_labels == self.negative_class) if self.negative_class is not None else torch.zeros_like(bag_labels, dtype=torch.bool)

        x_q, x_k = self.views(batch.features[mask])
        h = model.instance_features(x_q)  # type: ignore[operator]
        logits = model.instance_logits_from(h)  # [M, C]  # type: ignore[operator]
        queries = F.normalize(head(h).float(), dim=1)
        padded = logits.new_zeros(*mask.shape, logits.shape[-1])
        padded[mask] = logits
        output = model.output_from_instance_logits(padded, mask)  # type: ignore[operator]

        selected = ~negative if phase == "warmup" and self.warmup_instances == "positive_bags" else torch.ones_like(negative)
        with torch.no_grad():
            classifier_labels, prototype_labels = pseudo_labels(logits.detach(), queries.detach(), self.prototypes, candidates)
            self.prototypes = update_prototypes(
                self.prototypes, queries.detach()[selected], classifier_labels[selected],
                momentum=self.proto_momentum, mode=self.proto_update,
            )
            terms: dict[str, float] = {"ins_phase": float(PHASES.index(phase))}
            if phase == "warmstart":
                targets = F.one_hot(bag_labels, self.num_instance_classes).float()
            elif phase == "warmup":
                targets = candidates / candidates.sum(dim=1, keepdim=True)
            else:
                targets = update_confidence(
                    self.confidence_rows(batch, positions), prototype_labels, negative,
                    momentum=self.conf_momentum_at(progress), negative_class=self.negative_class,
                )
                self.store_confidence(batch, positions, targets)
                terms.update(self._confidence_terms(targets, negative))

        if selected.any():
            classifier_loss = bag_cross_entropy(logits[selected], targets[selected])
        else:
            classifier_loss = logits.sum() * 0.0
        contrastive_loss = self._contrast(queries, x_k, classifier_labels, selected, phase, key_encoder)
        loss = classifier_loss + self.contrastive_weight * contrastive_loss
        terms.update(ins_cls=float(classifier_loss.detach()), ins_cont=float(contrastive_loss.detach()),
                     ins_queue_fill=float(self.queue_valid.float().mean()) if self.queue_size else 0.0)
        if self.bag_loss_weight > 0:
            weights = None if self.class_weights is None else self.class_weights.to(output.logits.device)
            bag_loss = model.bag_loss(output, batch.labels, class_weights=weights)
            loss = loss + self.bag_loss_weight * bag_loss
            terms["ins_bag"] = float(bag_loss.detach())
        return StepResult(loss, output, terms)

    def _contrast(
        self, queries: torch.Tensor, key_input: torch.Tensor, labels: torch.Tensor, selected: torch.Tensor,
        phase: Phase, key_encoder: KeyEncoder,
    ) -> torch.Tensor:
        """The contrastive term on a random subset of the selected instances; enqueues their keys."""
        candidates = torch.nonzero(selected).squeeze(1)
        if len(candidates) == 0:
            return queries.sum() * 0.0
        pick = torch.randperm(len(candidates))[: self.contrastive_anchors_per_step].to(candidates.device)
        anchors = candidates[pick]
        key_encoder.eval()
        with torch.no_grad():
            keys = key_encoder(key_input[anchors])
        anchor_labels = labels[anchors]
        if phase == "main":
            loss = supervised_contrastive_loss(
                queries[anchors], anchor_labels, temperature=self.temperature,
                contrast=torch.cat([keys, self.queue[self.queue_valid]]),
                contrast_labels=torch.cat([anchor_labels, self.queue_labels[self.queue_valid]]),
            ).loss
        else:
            loss = moco_infonce_loss(queries[anchors], keys, self.queue, temperature=self.temperature, queue_valid=self.queue_valid)
        self.enqueue(keys, anchor_labels)
        return loss

    def enqueue(self, keys: torch.Tensor, labels: torch.Tensor) -> None:
        """Write keys `[m, d]` and labels `[m]` into the ring at the pointer (oldest entries first), wrapping."""
        if self.queue_size == 0:
            return
        keys, labels = keys[-self.queue_size :], labels[-self.queue_size :]
        slots = (self.queue_pointer + torch.arange(len(keys), device=keys.device)) % self.queue_size
        self.queue[slots] = keys.to(self.queue.dtype)
        self.queue_labels[slots] = labels
        self.queue_valid[slots] = True
        self.queue_pointer = (self.queue_pointer + len(keys)) % self.queue_size

    def _confidence_terms(self, confidence: torch.Tensor, negative: torch.Tensor) -> dict[str, float]:
        """`ins_mmc` (mean max confidence of the updated rows) and `ins_pos_rate` (the share of
        non-negative-bag instances whose pseudo-label is not the negative / background class)."""
        terms = {"ins_mmc": float(confidence.max(dim=1).values.mean())}
        other = self.num_instance_classes - 1 if self.negative_class is None else self.negative_class
        if (~negative).any():
            terms["ins_pos_rate"] = float((confidence[~negative].argmax(dim=1) != other).float().mean())
        return terms

    def after_optimizer_step(self, model: MILModel, *, progress: float) -> None:
        """Key encoder EMA towards the query side: `θ_k ← m θ_k + (1 − m) θ_q` (encoder and head)."""
        key_encoder = self._key_encoder()
        query_side = [*model.encoder.parameters(), *self._head().parameters()]  # type: ignore[union-attr]
        key_side = [*key_encoder.encoder.parameters(), *key_encoder.head.parameters()]
        with torch.no_grad():
            for key_param, query_param in zip(key_side, query_side, strict=True):
                key_param.mul_(self.key_momentum).add_(query_param.detach(), alpha=1.0 - self.key_momentum)

    # -- checkpoint ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Prototypes, queue (entries, labels, validity, pointer) and the confidence table."""
        return {
            "prototypes": self.prototypes, "queue": self.queue, "queue_labels": self.queue_labels,
            "queue_valid": self.queue_valid, "queue_pointer": self.queue_pointer, "confidence": dict(self.confidence),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        device = self.prototypes.device
        self.prototypes = state["prototypes"].to(device)
        self.queue = state["queue"].to(device)
        self.queue_labels = state["queue_labels"].to(device)
        self.queue_valid = state["queue_valid"].to(device)
        self.queue_pointer = int(state["queue_pointer"])
        self.confidence = {slide: rows.to(device) for slide, rows in state["confidence"].items()}

    def _head(self) -> nn.Module:
        if self.head is None:
            raise TrainingConfigError("INS: attach(model) must run before training (the trainer calls it)")
        return self.head

    def _key_encoder(self) -> KeyEncoder:
        if self.key_encoder is None:
            raise TrainingConfigError("INS: attach(model) must run before training (the trainer calls it)")
        return self.key_encoder


register_method("ins")(INSMethod)
