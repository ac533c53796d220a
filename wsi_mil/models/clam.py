"""CLAM-SB and CLAM-MB: clustering-constrained attention MIL (Lu et al., Nat. Biomed. Eng. 2021).

Source: mahmoodlab/CLAM (`models/model_clam.py`, `utils/core_utils.py`). Layers ("small"):
Linear(D→512) + ReLU + Dropout(0.25) → gated attention with 256 hidden units (Dropout(0.25) after
tanh and sigmoid) and K outputs (K = 1 for SB, K = C for MB) → softmax over the instances →
SB: Linear(512→C) on the pooled feature; MB: one Linear(512→1) per class on that class's pooled
feature. Instance clustering: C instance classifiers Linear(512→2); for the true class y the
`k_sample` highest-attention instances are pseudo-labelled 1 and the `k_sample` lowest 0 under
classifier y; with `subtyping`, for every other class c the highest-attention instances are
labelled 0 under classifier c and the losses are averaged over the C classes. The official total
is `bag_weight · L_bag + (1 − bag_weight) · L_inst`.

How this maps to the trainer (bag loss + the sum of `aux_losses`): `aux_losses(output, target)`
returns `{"instance_clustering": (1 − bag_weight) / bag_weight · L_inst}`, i.e. the official total
divided by `bag_weight` (the same optimum; for SGD a learning rate scaled by 1 / bag_weight).
The forward pass does the label-free part: it ranks instances and keeps the instance-classifier
logits of the top and bottom instances of every class in `extras`.

Deviations from the official code (bugs fixed):
- k larger than the bag: the official `topk(A, k_sample)` raises when N < k_sample (CLAM issues
  #28, #48). Here k is clamped per bag: `k_top = min(k_sample, ceil(N/2))`,
  `k_bottom = min(k_sample, floor(N/2))`, so the positive and negative sets never overlap (the
  official code labels the same instance 1 and 0 when k_sample ≤ N < 2·k_sample) and N = 1 works
  (one positive, no negative). For N ≥ 2·k_sample this is exactly the official selection.
- padded batches: masked softmax, and top-k / bottom-k never select padding;
- the smooth top-1 SVM instance loss (`instance_loss="svm"`, the `smooth-topk` package in the
  official code) is computed in its smooth log-sum-exp form throughout; the package switches to
  the hard hinge when the top-2 score gap exceeds τ·log(1000), where the two differ by less than
  τ·log(1.001).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from wsi_mil.errors import ModelConfigError
from wsi_mil.models.base import MILModel, MILOutput, attention_contributions, resolve_mask
from wsi_mil.models.layers import (
    AttentionScorer,
    attention_pool,
    masked_fill_logits,
    masked_softmax,
)
from wsi_mil.models.layers_targets import class_indices
from wsi_mil.models.registry import register_model

InstanceLoss = Literal["ce", "svm"]


def smooth_top1_svm_loss(
    logits: torch.Tensor, target: torch.Tensor, *, alpha: float = 1.0, tau: float = 1.0
) -> torch.Tensor:
    """Per-sample smooth top-1 SVM loss (Berrada et al. 2018): `τ·logsumexp((s + α[j≠y])/τ) − s_y`.

    `logits` `[..., C]`, `target` `[...]` class indices; returns `[...]`.
    """
    margin = alpha * (1.0 - F.one_hot(target, logits.shape[-1]).to(logits.dtype))
    true_score = logits.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    return tau * torch.logsumexp((logits + margin) / tau, dim=-1) - true_score


class CLAM(MILModel):
    """CLAM: gated-attention MIL with an instance-clustering auxiliary loss (SB or MB).

    `attention` holds the softmax attention over the valid instances: SB its single branch; MB the
    branch of the predicted class (what CLAM's heatmaps show). `maps["attention_logits"]` holds the
    raw scores `[B, K, N]` (CLAM's `A_raw`), `maps["branch_attention"]` the softmax of every branch
    `[B, K, N]`. `extras` keeps, for every class c, the instance-classifier-c logits of the top and
    bottom instances (`instance_top_logits` `[B, C, k_top, 2]`, `instance_bottom_logits`
    `[B, C, k_bottom, 2]`) and which slots are real (`instance_top_valid` `[B, k_top]`,
    `instance_bottom_valid` `[B, k_bottom]`, per-bag k clamped to the bag size).
    """

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        *,
        multi_branch: bool = False,
        hidden_dim: int = 512,
        attention_dim: int = 256,
        gated: bool = True,
        dropout: float = 0.25,
        attention_dropout: float = 0.25,
        k_sample: int = 8,
        instance_loss: InstanceLoss = "ce",
        subtyping: bool = False,
        bag_weight: float = 0.7,
    ) -> None:
        super().__init__(in_dim, num_classes)
        if k_sample < 1:
            raise ModelConfigError(f"clam: k_sample must be ≥ 1, got {k_sample}")
        if not 0.0 < bag_weight <= 1.0:
            raise ModelConfigError(f"clam: bag_weight must be in (0, 1], got {bag_weight}")
        if instance_loss not in ("ce", "svm"):
            raise ModelConfigError(
                f"clam: instance_loss must be 'ce' or 'svm', got {instance_loss!r}"
            )
        self.multi_branch = multi_branch
        self.k_sample = k_sample
        self.instance_loss = instance_loss
        self.subtyping = subtyping
        self.bag_weight = bag_weight
        self.projection = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout)
        )
        self.attention = AttentionScorer(
            hidden_dim,
            attention_dim,
            num_branches=num_classes if multi_branch else 1,
            gated=gated,
            dropout=attention_dropout,
        )
        # SB: one Linear(H→C); MB: row c of the weight is class c's own Linear(H→1).
        self.classifier = nn.Linear(hidden_dim, num_classes)
        # Row block [2c, 2c+1] is instance classifier c: Linear(H→2).
        self.instance_classifiers = nn.Linear(hidden_dim, 2 * num_classes)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> MILOutput:
        mask = resolve_mask(x, mask)
        valid = mask.unsqueeze(1)  # [B, 1, N]
        h = self.projection(x)  # [B, N, H]
        scores = self.attention(h)  # [B, K, N]
        weights = masked_softmax(scores, valid)  # [B, K, N]
        pooled = attention_pool(h, weights)  # [B, K, H]
        if self.multi_branch:
            logits = (pooled * self.classifier.weight).sum(-1) + self.classifier.bias  # [B, C]
            rows = torch.arange(x.shape[0], device=x.device)
            attention = weights[rows, logits.argmax(dim=-1)]  # [B, N]
            embedding = pooled.flatten(1)  # [B, C·H]
        else:
            embedding = pooled.squeeze(1)  # [B, H]
            logits = self.classifier(embedding)
            attention = weights.squeeze(1)
        return MILOutput(
            logits=logits,
            attention=attention,
            maps={"attention_logits": scores.masked_fill(~valid, 0.0), "branch_attention": weights},
            embedding=embedding,
            instance_contributions=attention_contributions(h, weights, self.classifier.weight),
            extras=self._clustering_candidates(h, scores, mask),
        )

    def _clustering_candidates(
        self, h: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Instance-classifier logits of each class's top and bottom attended instances."""
        batch, num_instances, _ = h.shape
        num_classes = self.num_classes
        # Ranking scores per class c: branch c (MB) or the single branch (SB). [B, C, N]
        ranking = scores if self.multi_branch else scores.expand(batch, num_classes, num_instances)
        valid = mask.unsqueeze(1).expand_as(ranking)
        counts = mask.sum(dim=1)  # [B]
        k_top_max = min(self.k_sample, (num_instances + 1) // 2)
        k_bottom_max = min(self.k_sample, num_instances // 2)
        top = masked_fill_logits(ranking, valid).topk(k_top_max, dim=-1).indices  # [B, C, kt]
        bottom = masked_fill_logits(-ranking, valid).topk(k_bottom_max, dim=-1).indices
        k_top = ((counts + 1) // 2).clamp(max=self.k_sample)  # ceil(N_b / 2), at most k_sample
        k_bottom = (counts // 2).clamp(max=self.k_sample)
        device = h.device
        return {
            "instance_top_logits": self._instance_logits(h, top),
            "instance_bottom_logits": self._instance_logits(h, bottom),
            "instance_top_valid": torch.arange(k_top_max, device=device) < k_top.unsqueeze(1),
            "instance_bottom_valid": torch.arange(k_bottom_max, device=device)
            < k_bottom.unsqueeze(1),
        }

    def _instance_logits(self, h: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Logits of instance classifier c for the instances `index[:, c]`: `[B, C, k, 2]`."""
        batch, num_classes, k = index.shape
        hidden = h.shape[-1]
        picked = h.gather(1, index.reshape(batch, num_classes * k, 1).expand(-1, -1, hidden))
        picked = picked.reshape(batch, num_classes, k, hidden)
        weight = self.instance_classifiers.weight.reshape(num_classes, 2, hidden)
        bias = self.instance_classifiers.bias.reshape(num_classes, 2)
        return torch.einsum("bckh,cjh->bckj", picked, weight.to(picked.dtype)) + bias[:, None, :]

    def _per_instance_loss(self, logits: torch.Tensor, label: int) -> torch.Tensor:
        """Instance loss of every slot of `logits` `[..., 2]` against a constant pseudo-label."""
        target = torch.full(logits.shape[:-1], label, dtype=torch.long, device=logits.device)
        logits = logits.float()
        if self.instance_loss == "svm":
            return smooth_top1_svm_loss(logits, target)
        return F.cross_entropy(logits.flatten(0, -2), target.flatten(), reduction="none").view(
            target.shape
        )

    def aux_losses(self, output: MILOutput, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """CLAM's instance-clustering loss, scaled by (1 − bag_weight) / bag_weight."""
        top_logits = output.extras["instance_top_logits"]  # [B, C, kt, 2]
        bottom_logits = output.extras["instance_bottom_logits"]  # [B, C, kb, 2]
        top_valid = output.extras["instance_top_valid"].to(torch.float32)  # [B, kt]
        bottom_valid = output.extras["instance_bottom_valid"].to(torch.float32)  # [B, kb]
        batch, num_classes = top_logits.shape[:2]
        labels = class_indices(target, num_classes).to(top_logits.device)
        rows = torch.arange(batch, device=top_logits.device)

        # In-the-class: top instances are class y (1), bottom instances are not (0).
        positive = self._per_instance_loss(top_logits[rows, labels], 1) * top_valid  # [B, kt]
        negative = self._per_instance_loss(bottom_logits[rows, labels], 0) * bottom_valid
        in_class = (positive.sum(1) + negative.sum(1)) / (top_valid.sum(1) + bottom_valid.sum(1))
        per_bag = in_class
        if self.subtyping:
            # Out-of-the-class: the top instances of branch c are not class c (0).
            out_all = self._per_instance_loss(top_logits, 0) * top_valid.unsqueeze(1)  # [B, C, kt]
            out_class = out_all.sum(-1) / top_valid.sum(1, keepdim=True)  # [B, C]
            others = 1.0 - F.one_hot(labels, num_classes).to(out_class.dtype)
            per_bag = (in_class + (out_class * others).sum(1)) / num_classes
        scale = (1.0 - self.bag_weight) / self.bag_weight
        return {"instance_clustering": scale * per_bag.mean()}


@register_model(multi_branch=False)
def clam_sb(in_dim: int, num_classes: int, **options: Any) -> CLAM:
    """CLAM single-branch: gated attention + instance clustering (B = 8, bag weight 0.7)."""
    return CLAM(in_dim, num_classes, **options)


@register_model(multi_branch=True)
def clam_mb(in_dim: int, num_classes: int, **options: Any) -> CLAM:
    """CLAM multi-branch: one attention branch and one classifier per class + instance clustering."""
    return CLAM(in_dim, num_classes, **options)
