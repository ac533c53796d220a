"""PackMIL (Tang, Fang, Wu, Li, Cheng, 2025): sample and pack variable-length bags, plus a residual
branch that learns from the discarded instances through mixed-label "hyperslides".

Per training step (one mini-batch of `batch_size` slides), every slide is split at random into a
kept part (`main_fraction` of its instances) and a discarded part (the rest); each part is capped
at `pack_len · r` random instances (r = `downsample_ratio` with the downsampler on, else 1), and
slides with fewer than `min_len · r` instances go whole into both parts. The kept parts are
packed greedily in batch order into packs of at most `pack_len` tokens (doubled for a mini-batch
whose longest slide has more than `pack_len · downsample_ratio` instances in a part: the official
rule, which divides by the ratio even without a downsampler); the discarded parts are
packed the same way, and each of those packs is one hyperslide supervised by the mixture of its
slides' labels. Loss: `L_main + residual_weight · L_residual`.

How packs map onto our model contract (which has no per-token slide ids): a step is one
`PackedBatch` whose rows are the slides of the mini-batch, in batch order; row b holds slide b's
kept instances and `mask` marks them, so the model's masked softmax keeps slides apart exactly as
the official block-diagonal pack masks do, and gives one prediction per slide.
`PackedBatch.pack_index [B]` records which pack each slide was assigned to: every pack's rows
hold at most `pack_len` tokens in total, so the token budget of a step is the official one
(packs × `pack_len`). The official code concatenates a pack's slides into one row
(`[P, L_max, D]`); our padded tensor is `[B, max_b len_b, D]`, larger in memory but equal in
result for any mask-respecting model. The discarded parts travel per slide (`residual`, rows in
batch order, `hyperslide_index [B]`) and are concatenated into hyperslides (`[H, L, D]`, one bag
per hyperslide, soft labels in `Batch.soft_labels`) inside `compute_loss`, after the optional
downsampler. The parts are cut on the trainer's device; with `per_bag` (the trainer's CPU default)
each kept part and each hyperslide runs through the model on its own, unpadded, with the same
loss means.

Deviations from the official code (FangHeng/PackMIL):
- two downsamplers: `downsample="ads"` is the official learned ADS (`wsi_mil.models.packmil_ads`:
  score MLP, attention-scaled shortcut, random feature-wise mixing of r shuffled tokens while
  training, the per-token form at evaluation); it trains with the model and the served model is
  `packmil_ads` (the ADS in front of the model). `downsample="attention"` is our weight-free
  alternative: it keeps, of each part with more than `min_len · r` instances, the `ceil(T / r)`
  instances with the highest attention of the current model (one no-grad, eval-mode forward) and
  leaves the served model unchanged;
- kept and discarded instances keep their original order (the official parts are shuffled);
  order matters only for order-aware backbones;
- every slide keeps at least one instance; the last, smaller mini-batch of an epoch is used
  (the official loader drops it) so the trainer's step count and schedules stay exact;
- the trainer's `group_by_size` (default) gives mini-batches of slides of similar size (the
  official loader draws them at random), so fewer mini-batches double their pack length;
- residual targets for grading (ISUP) and survival are not implemented; `bce`/`focal` use the
  max-normalised multi-hot mixture, `ce`/`asl_single` the sum-normalised one.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from wsi_mil.errors import TrainingConfigError
from wsi_mil.models.base import MILModel
from wsi_mil.models.layers import pad_sequences
from wsi_mil.models.packmil_ads import AttentionDownsampler, PackMILDownsampled
from wsi_mil.training.bag import Bag
from wsi_mil.training.batching import bag_shares, combine_results, unpadded_rows
from wsi_mil.training.methods.base import Batch, StepResult, TrainingMethod
from wsi_mil.training.methods.registry import register_method

Downsample = Literal["none", "attention", "ads"]
AdaptiveRule = Literal["official", "applied_ratio"]
ResidualLoss = Literal["ce", "bce", "focal", "asl_single"]


@dataclass
class PackedBatch(Batch):
    """One PackMIL step: kept parts as rows (`features [B, L, D]`, `mask`, `labels`) plus packing data.

    `pack_index [B]`: the pack of each slide's kept part. `residual`: the discarded parts, one row
    per slide in the same order (None without residual branch). `hyperslide_index [B]`: the
    hyperslide of each discarded part (−1 = the slide has no discarded instance).
    """

    pack_index: torch.Tensor | None = None
    residual: Batch | None = None
    hyperslide_index: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> PackedBatch:
        main = super().to(device)
        return PackedBatch(
            main.features, main.mask, main.labels, main.slide_ids, main.soft_labels,
            pack_index=self.pack_index,
            residual=None if self.residual is None else self.residual.to(device),
            hyperslide_index=self.hyperslide_index,
        )


def downsampled_length(num_instances: int, *, ratio: int, min_len: int) -> int:
    """Length of a part after the downsampler: `ceil(T / r)` when `T > min_len · r`, else `T`."""
    if ratio <= 1 or num_instances <= min_len * ratio:
        return num_instances
    return math.ceil(num_instances / ratio)


def adaptive_pack_len(max_instances: int, *, main_fraction: float, ratio: int, pack_len: int) -> int:
    """The official adaptive budget: `2 · pack_len` when `floor(floor(N_max (1 − ρ)) / r) > pack_len`."""
    return 2 * pack_len if int(int(max_instances * (1.0 - main_fraction)) / ratio) > pack_len else pack_len


def split_slide(
    num_instances: int,
    *,
    main_fraction: float,
    min_len: int,
    ratio: int,
    pack_len: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept and discarded instance indices of one slide (each sorted, disjoint unless the slide is small).

    A random `max(1, floor(N · ρ))` instances are kept, the rest discarded; slides with fewer than
    `min_len · r` instances are used whole in both. Each part longer than `pack_len · r` keeps a
    random `pack_len · r` of its instances (the others sit out this step).
    """
    if num_instances < min_len * ratio:
        kept = discarded = torch.arange(num_instances)
    else:
        order = torch.randperm(num_instances, generator=generator)
        num_kept = max(1, int(num_instances * main_fraction))
        kept, discarded = order[:num_kept], order[num_kept:]
    cap = pack_len * ratio
    parts = []
    for part in (kept, discarded):
        if len(part) > cap:
            part = part[torch.randperm(len(part), generator=generator)[:cap]]
        parts.append(part.sort().values)
    return parts[0], parts[1]


def greedy_packs(lengths: Sequence[int], *, pack_len: int, min_len: int) -> list[int]:
    """Pack index of each part, packing in order: a part opens a new pack when it would overflow.

    A part's accounted length is its length clipped to `[min_len, pack_len]` when longer than
    `min_len`, as officially; parts of length 0 get −1 (they join no pack).
    """
    indices, pack, used = [], -1, pack_len
    for length in lengths:
        if length == 0:
            indices.append(-1)
            continue
        accounted = min(max(length, min_len), pack_len) if length > min_len else length
        if used + accounted > pack_len:
            pack, used = pack + 1, 0
        used += accounted
        indices.append(pack)
    return indices


def keep_top_attention(model: MILModel, parts: Batch, *, ratio: int, min_len: int, per_bag: bool = False) -> Batch:
    """The attention-driven downsampler: per row, keep the `downsampled_length` instances with the
    highest attention of `model` (one no-grad, eval-mode forward, or one per row with `per_bag`),
    in their original order."""
    sizes = parts.mask.sum(dim=1)
    targets = [downsampled_length(int(n), ratio=ratio, min_len=min_len) for n in sizes]
    if targets == sizes.tolist():
        return parts
    probe_mask = parts.mask.clone()
    probe_mask[sizes == 0, 0] = True  # the model needs one valid slot per bag; empty rows keep nothing
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if per_bag:
                rows = unpadded_rows(Batch(parts.features, probe_mask, parts.labels, parts.slide_ids))
                attention = pad_sequences([model(row.features, None).attention[0].float().unsqueeze(-1) for row in rows])[0][..., 0]
            else:
                attention = model(parts.features, probe_mask).attention.float()  # [B, N]
    finally:
        model.train(was_training)
    ranked = attention.masked_fill(~parts.mask, float("-inf")).argsort(dim=1, descending=True, stable=True)
    rows = [parts.features[b, ranked[b, :t].sort().values] for b, t in enumerate(targets)]
    features, mask = pad_sequences(rows)
    return Batch(features, mask, parts.labels, parts.slide_ids)


def hyperslide_targets(
    labels: torch.Tensor, weights: torch.Tensor, *, num_classes: int, normalize: Literal["sum", "max"]
) -> torch.Tensor:
    """Soft label `[C]` of one hyperslide: `t_c = Σ_i w_i [y_i = c]`, divided by its sum or its max."""
    mixture = (F.one_hot(labels, num_classes).float() * weights.float().unsqueeze(1)).sum(dim=0)  # [C]
    return mixture / (mixture.sum() if normalize == "sum" else mixture.max())


def pack_hyperslides(
    parts: Batch,
    hyperslide_index: torch.Tensor,
    *,
    num_classes: int,
    normalize: Literal["sum", "max"] = "sum",
    token_weighted: bool = False,
) -> Batch | None:
    """Concatenate the discarded parts of each hyperslide into one bag with a mixed label.

    Returns `features [H, L, D]`, `mask`, `soft_labels [H, C]` (`hyperslide_targets`, weighted by
    each slide's token count when `token_weighted`), `labels` = argmax of the mixture; None when
    no slide has a discarded part.
    """
    groups = sorted({int(h) for h in hyperslide_index.tolist() if h >= 0})
    if not groups:
        return None
    rows, targets, names = [], [], []
    for group in groups:
        members = [i for i, h in enumerate(hyperslide_index.tolist()) if h == group]
        tokens = [parts.features[i][parts.mask[i]] for i in members]
        counts = torch.tensor([len(t) for t in tokens], device=parts.labels.device)
        weights = counts if token_weighted else torch.ones_like(counts)
        rows.append(torch.cat(tokens))
        targets.append(hyperslide_targets(parts.labels[members], weights, num_classes=num_classes, normalize=normalize))
        names.append("+".join(parts.slide_ids[i] for i in members) if parts.slide_ids else str(group))
    features, mask = pad_sequences(rows)
    soft = torch.stack(targets)
    return Batch(features, mask, soft.argmax(dim=1), names, soft)


def residual_loss(logits: torch.Tensor, targets: torch.Tensor, kind: ResidualLoss) -> torch.Tensor:
    """Hyperslide loss on `logits [H, C]` against soft `targets [H, C]`.

    `ce`: soft cross-entropy; `bce`: BCE-with-logits; `focal`: `0.25 (1 − p_t)² BCE`, mean over
    hyperslides × classes; `asl_single`: `−(1 − p_y) log p_y` at `y = argmax targets` (timm's
    AsymmetricLossSingleLabel with γ+ = 1, ε = 0).
    """
    logits = logits.float()
    if kind == "ce":
        return torch.sum(-targets * torch.log_softmax(logits, dim=-1), dim=-1).mean()
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(logits, targets)
    if kind == "focal":
        bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
        return (0.25 * (1.0 - torch.exp(-bce)) ** 2 * bce).mean()
    log_probs = torch.log_softmax(logits, dim=-1).gather(1, targets.argmax(dim=1, keepdim=True)).squeeze(1)
    return (-(1.0 - log_probs.exp()) * log_probs).mean()


class PackMILMethod(TrainingMethod):
    """PackMIL around any mask-respecting model: packed sampling + residual hyperslide branch.

    Defaults follow the official argparse values (ρ 0.5, pack length 2400, min length 128);
    `residual_weight` (official `aux_alpha`) 0.2 as in the PANDA/BRCA configs. The served model
    is the model alone, or `packmil_ads` (the learned downsampler in front of it) with `downsample: ads`.
    """

    name = "packmil"

    def __init__(
        self,
        *,
        main_fraction: float = 0.5,
        pack_len: int = 2400,
        min_len: int = 128,
        adaptive_pack_len: bool = True,
        adaptive_rule: AdaptiveRule = "official",
        downsample: Downsample = "none",
        downsample_ratio: int = 4,
        residual: bool = True,
        residual_weight: float = 0.2,
        residual_loss: ResidualLoss = "ce",
        token_weighted_labels: bool = False,
        aux_weights: dict[str, float] | None = None,
    ) -> None:
        super().__init__(aux_weights=aux_weights)
        if not 0.0 < main_fraction < 1.0:
            raise TrainingConfigError(f"PackMIL main_fraction must be in (0, 1), got {main_fraction} (method_kwargs.main_fraction)")
        if pack_len < 1 or min_len < 0:
            raise TrainingConfigError("PackMIL pack_len must be ≥ 1 and min_len ≥ 0 (method_kwargs.pack_len, min_len)")
        if min_len > pack_len:
            raise TrainingConfigError(f"PackMIL min_len ({min_len}) must not exceed pack_len ({pack_len}) (method_kwargs.min_len)")
        if downsample not in ("none", "attention", "ads"):
            raise TrainingConfigError(
                f"PackMIL downsample must be 'none', 'attention' or 'ads', got {downsample!r} (method_kwargs.downsample)"
            )
        if adaptive_rule not in ("official", "applied_ratio"):
            raise TrainingConfigError(
                f"PackMIL adaptive_rule must be 'official' or 'applied_ratio', got {adaptive_rule!r} (method_kwargs.adaptive_rule)"
            )
        if downsample_ratio < 1:
            raise TrainingConfigError(f"PackMIL downsample_ratio must be ≥ 1, got {downsample_ratio} (method_kwargs.downsample_ratio)")
        if residual_loss not in ("ce", "bce", "focal", "asl_single"):
            raise TrainingConfigError(
                f"PackMIL residual_loss must be ce, bce, focal or asl_single, got {residual_loss!r} (method_kwargs.residual_loss)"
            )
        if residual_weight < 0:
            raise TrainingConfigError(f"PackMIL residual_weight must be ≥ 0, got {residual_weight} (method_kwargs.residual_weight)")
        self.main_fraction = main_fraction
        self.pack_len = pack_len
        self.min_len = min_len
        self.adaptive_pack_len = adaptive_pack_len
        self.adaptive_rule = adaptive_rule
        self.downsample_ratio = downsample_ratio
        self.downsample = downsample
        self.ratio = downsample_ratio if downsample != "none" else 1
        self.downsampler: AttentionDownsampler | None = None
        self.residual = residual
        self.residual_weight = residual_weight
        self.residual_loss = residual_loss
        self.token_weighted_labels = token_weighted_labels

    def step_pack_len(self, sizes: Sequence[int]) -> int:
        """The pack length of a mini-batch with these slide sizes (doubled for long slides when adaptive).

        `adaptive_rule: official` divides the longest part by `downsample_ratio` whether or not a
        downsampler runs (the official `residual_downsample_r`, default 4), so without one the length
        doubles from 19,208 instances at the defaults; `applied_ratio` divides by the ratio applied
        (1 without a downsampler: doubling from 4,802).
        """
        if not self.adaptive_pack_len:
            return self.pack_len
        ratio = self.downsample_ratio if self.adaptive_rule == "official" else self.ratio
        return adaptive_pack_len(max(sizes), main_fraction=self.main_fraction, ratio=ratio, pack_len=self.pack_len)

    def pack(self, bags: Sequence[Bag], *, generator: torch.Generator) -> PackedBatch:
        """Split, sample and pack one mini-batch of bags into a `PackedBatch`."""
        sizes = [bag.features.shape[0] for bag in bags]
        if min(sizes) < 1:
            raise TrainingConfigError("PackMIL got a bag with no instance; check the feature files")
        pack_len = self.step_pack_len(sizes)
        kept_rows, discarded_rows = [], []
        for bag in bags:
            kept, discarded = split_slide(
                bag.features.shape[0], main_fraction=self.main_fraction, min_len=self.min_len,
                ratio=self.ratio, pack_len=pack_len, generator=generator,
            )
            features = bag.features.to(self.device, non_blocking=True)  # once per bag; the parts are cut on the device
            kept_rows.append(features[kept.to(self.device)])
            discarded_rows.append(features[discarded.to(self.device)])
        labels = torch.tensor([bag.label for bag in bags], dtype=torch.long, device=self.device)
        slide_ids = [bag.slide_id for bag in bags]
        features, mask = pad_sequences(kept_rows, dtype=torch.float32)

        def packing(rows: list[torch.Tensor]) -> torch.Tensor:
            lengths = [downsampled_length(len(r), ratio=self.ratio, min_len=self.min_len) for r in rows]
            return torch.tensor(greedy_packs(lengths, pack_len=pack_len, min_len=self.min_len), dtype=torch.long)

        residual_parts, hyperslides = None, None
        if self.residual:
            residual_features, residual_mask = pad_sequences(discarded_rows, dtype=torch.float32)
            residual_parts = Batch(residual_features, residual_mask, labels, slide_ids)
            hyperslides = packing(discarded_rows)
        return PackedBatch(
            features, mask, labels, slide_ids,
            pack_index=packing(kept_rows), residual=residual_parts, hyperslide_index=hyperslides,
        )

    def make_batches(self, bags: Sequence[Bag], *, batch_size: int, generator: torch.Generator) -> Iterator[Batch]:
        """Consecutive groups of `batch_size` bags (in the given order), each packed into a `PackedBatch`."""
        for start in range(0, len(bags), batch_size):
            yield self.pack([bags[i] for i in range(start, min(start + batch_size, len(bags)))], generator=generator)

    def attach(self, model: MILModel, *, total_steps: int) -> None:
        """With `downsample: ads`, build the learned downsampler (trained with the model)."""
        if self.downsample == "ads":
            self.downsampler = AttentionDownsampler(model.in_dim)

    def extra_modules(self) -> list[nn.Module]:
        return [self.downsampler] if self.downsampler is not None else []

    def inference_model(self, model: MILModel) -> MILModel:
        """The model alone, or with `downsample: ads` the model behind the ADS per-token transform."""
        if self.downsampler is None:
            return model
        return PackMILDownsampled(self.downsampler, model)

    def served_model_spec(self, model_name: str, model_kwargs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        if self.downsample != "ads":
            return model_name, model_kwargs
        return "packmil_ads", {"base": model_name, "base_kwargs": model_kwargs, "score_dim": 128}

    def _downsampled(self, model: MILModel, parts: Batch) -> Batch:
        if self.downsample == "none":
            return parts
        if self.downsample == "attention":
            return keep_top_attention(model, parts, ratio=self.ratio, min_len=self.min_len, per_bag=self.per_bag)
        return self._ads(parts, training=model.training)

    def _ads(self, parts: Batch, *, training: bool) -> Batch:
        """The learned downsampler per row: grouped (T/r mixed tokens) for long parts while
        training, per token otherwise; empty rows stay empty."""
        if self.downsampler is None:
            raise TrainingConfigError("PackMIL with downsample: ads was not attached to a model")
        rows = []
        for b in range(parts.features.shape[0]):
            tokens = parts.features[b, parts.mask[b]]
            if len(tokens) == 0:
                rows.append(tokens)
            elif training and len(tokens) > self.min_len * self.ratio:
                rows.append(self.downsampler.grouped(tokens, self.ratio))
            else:
                rows.append(self.downsampler(tokens.unsqueeze(0))[0])
        features, mask = pad_sequences(rows)
        return Batch(features, mask, parts.labels, parts.slide_ids)

    def compute_loss(self, model: MILModel, batch: Batch, *, progress: float) -> StepResult:
        """Main branch on the kept parts (one prediction per slide) + the weighted hyperslide loss."""
        if not isinstance(batch, PackedBatch):
            return super().compute_loss(model, batch, progress=progress)
        main = self._downsampled(model, batch)
        extra: dict[str, torch.Tensor] = {}
        hyperslides = None
        if batch.residual is not None and batch.hyperslide_index is not None:
            hyperslides = pack_hyperslides(
                self._downsampled(model, batch.residual), batch.hyperslide_index,
                num_classes=model.num_classes,
                normalize="max" if self.residual_loss in ("bce", "focal") else "sum",
                token_weighted=self.token_weighted_labels,
            )
        if hyperslides is not None and hyperslides.soft_labels is not None:
            if self.per_bag:
                logits = torch.cat([model(row.features, None).logits for row in unpadded_rows(hyperslides)])
            else:
                logits = model(hyperslides.features, hyperslides.mask).logits
            extra["residual"] = self.residual_weight * residual_loss(logits, hyperslides.soft_labels, self.residual_loss)
        if self.per_bag:
            rows = unpadded_rows(main)
            result = combine_results(
                [self.supervised_loss(model, model(row.features, None), row) for row in rows],
                bag_shares(main.labels, self.class_weights),
            )
            for name, value in extra.items():
                result.loss = result.loss + self.aux_weights.get(name, 1.0) * value.float()
                result.terms[name] = float(value.detach())
        else:
            result = self.supervised_loss(model, model(main.features, main.mask), main, extra)
        result.terms["main_tokens"] = float(main.mask.sum())
        if hyperslides is not None:
            result.terms["residual_tokens"] = float(hyperslides.mask.sum())
            result.terms["hyperslides"] = float(len(hyperslides.labels))
        return result


register_method("packmil")(PackMILMethod)
