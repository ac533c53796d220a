"""ACMIL: attention-challenging MIL (Zhang et al., ECCV 2024), the gated-attention form `ACMIL_GA`.

Source: dazhangyu123/ACMIL (`architecture/transformer.py` `ACMIL_GA`, `architecture/network.py`,
`Step3_WSI_classification_ACMIL.py` for the losses). Layers: Linear(D→D_inner, no bias) + ReLU
(D_inner = D/2 as the official script sets it per feature extractor) → gated attention with 128
hidden units and M outputs (`num_branches`, MBA) → in training, STKIM on the raw scores →
per-branch softmax over the instances → M branch classifiers Linear(D_inner→C) on the
branch-pooled features → the bag attention is the mean over branches of the branch softmaxes, the
bag classifier Linear(D_inner→C) classifies the feature it pools. No dropout, PyTorch default init.

STKIM (training only, per bag and per branch): of the `min(mask_top_k, N)` highest raw scores,
a uniformly random subset of exactly `floor(min(mask_top_k, N) · mask_drop)` is removed from the
softmax (the official code's `int(n_masked_patch * mask_drop)`). The masked scores are used
everywhere downstream in training: branch pooling, the bag attention, the diversity loss.

Losses (all weight 1 in the official code): `output.aux_losses["diversity"]` = mean over branch
pairs of the cosine similarity of the branch attentions (label-free; 0 when M = 1);
`aux_losses(output, target)["branch"]` = mean over branches of CE(branch logits, y) (only when
M > 1, as in the official code). The trainer's bag loss on `logits` is the official slide loss.

Deviations from the official code:
- padded batches: masked softmaxes, STKIM ranks only valid instances and clamps k per bag;
- STKIM never removes every valid instance of a bag (only possible with mask_drop = 1 and
  N ≤ mask_top_k): then one is kept, where the official code's softmax over all −1e9 is uniform;
- removed instances are excluded from the softmax exactly (the official code adds −1e9).

`mask_top_k` is the official `--n_masked_patch` with the README commands' value 10 (the script's
argparse default is 0, no STKIM). Scripts from before upstream commit 5eaa854 (2024-10-12) passed
`n_token` as `n_masked_patch`; the current script passes each option to its own parameter.
"""

from __future__ import annotations

from typing import Any

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


def stkim_drop_mask(
    scores: torch.Tensor, mask: torch.Tensor, *, top_k: int, drop_fraction: float
) -> torch.Tensor:
    """STKIM: which instances to remove, `[B, M, N]` bool, from raw scores `[B, M, N]`.

    Per bag and branch, a uniformly random `floor(min(top_k, N_b) · drop_fraction)` of the
    `min(top_k, N_b)` highest-scoring valid instances (at most N_b − 1); never padding.
    """
    batch, branches, num_instances = scores.shape
    k_max = min(top_k, num_instances)
    drop = torch.zeros_like(scores, dtype=torch.bool)
    if k_max == 0 or drop_fraction <= 0.0:
        return drop
    counts = mask.sum(dim=1)  # [B]
    k_eff = counts.clamp(max=top_k)  # [B]
    n_drop = torch.minimum((k_eff.double() * drop_fraction).floor().long(), counts - 1)  # [B]
    valid = mask.unsqueeze(1).expand_as(scores)
    top = masked_fill_logits(scores, valid).topk(k_max, dim=-1).indices  # [B, M, k_max]
    slots = torch.arange(k_max, device=scores.device)
    # Random ranks among the k_eff real top slots; slots past k_eff rank last and are never drawn.
    noise = torch.rand(batch, branches, k_max, device=scores.device)
    noise = noise.masked_fill(slots >= k_eff.view(-1, 1, 1), 2.0)
    rank = noise.argsort(dim=-1).argsort(dim=-1)  # [B, M, k_max]
    chosen = rank < n_drop.view(-1, 1, 1)
    return drop.scatter(-1, top, chosen)


def branch_diversity(branch_attention: torch.Tensor) -> torch.Tensor:
    """Mean pairwise cosine similarity of the branch attentions `[B, M, N]` (0 when M = 1)."""
    branches = branch_attention.shape[1]
    if branches < 2:
        return branch_attention.new_zeros(())
    attention = branch_attention.float()
    unit = attention / attention.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    cosine = torch.bmm(unit, unit.transpose(1, 2))  # [B, M, M]
    first, second = torch.triu_indices(branches, branches, offset=1, device=cosine.device)
    return cosine[:, first, second].mean()


class ACMIL(MILModel):
    """ACMIL (gated attention): M attention branches with classifiers, STKIM, diversity loss.

    `attention` holds the bag attention: the mean over branches of the branch softmax
    attentions (after STKIM in training), the weights that pool the bag for `logits`.
    `maps["branch_attention"]` `[B, M, N]` holds the branch attentions,
    `maps["attention_logits"]` `[B, M, N]` the raw scores before STKIM.
    `extras["branch_logits"]` `[B, M, C]` are the branch classifiers' logits, `embedding` the
    bag feature `[B, D_inner]`.
    """

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        *,
        hidden_dim: int | None = None,
        attention_dim: int = 128,
        num_branches: int = 5,
        mask_top_k: int = 10,
        mask_drop: float = 0.6,
    ) -> None:
        super().__init__(in_dim, num_classes)
        if num_branches < 1:
            raise ModelConfigError(f"acmil: num_branches must be ≥ 1, got {num_branches}")
        if mask_top_k < 0 or not 0.0 <= mask_drop <= 1.0:
            raise ModelConfigError(
                f"acmil: mask_top_k must be ≥ 0 and mask_drop in [0, 1], got {mask_top_k}, {mask_drop}"
            )
        if hidden_dim is None:
            hidden_dim = max(in_dim // 2, 1)
        self.num_branches = num_branches
        self.mask_top_k = mask_top_k
        self.mask_drop = mask_drop
        self.projection = nn.Sequential(nn.Linear(in_dim, hidden_dim, bias=False), nn.ReLU())
        self.attention = AttentionScorer(
            hidden_dim, attention_dim, num_branches=num_branches, gated=True
        )
        self.branch_classifiers = nn.ModuleList(
            nn.Linear(hidden_dim, num_classes) for _ in range(num_branches)
        )
        self.classifier = nn.Linear(hidden_dim, num_classes)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> MILOutput:
        mask = resolve_mask(x, mask)
        h = self.projection(x)  # [B, N, H]
        scores = self.attention(h)  # [B, M, N]
        keep = mask.unsqueeze(1).expand_as(scores)  # [B, M, N]
        if self.training and self.mask_top_k > 0:
            drop = stkim_drop_mask(
                scores, mask, top_k=self.mask_top_k, drop_fraction=self.mask_drop
            )
            keep = keep & ~drop
        branch_attention = masked_softmax(scores, keep)  # [B, M, N]
        branch_features = attention_pool(h, branch_attention)  # [B, M, H]
        branch_logits = torch.stack(
            [head(branch_features[:, i]) for i, head in enumerate(self.branch_classifiers)], dim=1
        )  # [B, M, C]
        bag_attention = branch_attention.mean(dim=1)  # [B, N]
        embedding = attention_pool(h, bag_attention.unsqueeze(1)).squeeze(1)  # [B, H]
        return MILOutput(
            logits=self.classifier(embedding),
            attention=bag_attention,
            maps={
                "branch_attention": branch_attention,
                "attention_logits": scores.masked_fill(~mask.unsqueeze(1), 0.0),
            },
            aux_losses={"diversity": branch_diversity(branch_attention)},
            embedding=embedding,
            instance_contributions=attention_contributions(
                h, bag_attention.unsqueeze(1), self.classifier.weight
            ),
            extras={"branch_logits": branch_logits},
        )

    def aux_losses(self, output: MILOutput, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """Mean CE of the branch classifiers (only with more than one branch, as officially)."""
        if self.num_branches < 2:
            return {}
        branch_logits = output.extras["branch_logits"].float()  # [B, M, C]
        labels = class_indices(target, self.num_classes).to(branch_logits.device)
        repeated = labels.unsqueeze(1).expand(-1, self.num_branches)  # [B, M]
        return {"branch": F.cross_entropy(branch_logits.flatten(0, 1), repeated.flatten())}


@register_model
def acmil(in_dim: int, num_classes: int, **options: Any) -> ACMIL:
    """ACMIL (gated attention): 5 branches, STKIM top-10 with drop 0.6; hidden_dim None = D/2."""
    return ACMIL(in_dim, num_classes, **options)
