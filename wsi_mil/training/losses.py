"""Contrastive losses of the training methods: supervised contrast (SupCon, Khosla et al. 2020) over
a contrast set that may hold other views and a memory queue, and MoCo's InfoNCE (He et al. 2020).

Both compute in float32 (under bf16 autocast logits at τ = 0.07 reach ±14.3) and subtract each
row's maximum before the exponential, which changes nothing but the rounding.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

#: logit of an entry left out of a contrast row: exp() of it is exactly 0 next to any real entry
EXCLUDED = -1e9


def supervised_contrastive_loss(
    features: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_anchors: int,
    temperature: float,
    base_temperature: float | None = None,
    valid: torch.Tensor | None = None,
    keep_anchors_without_positives: bool = False,
) -> torch.Tensor:
    """SupCon loss of the first `num_anchors` rows of `features` against all of them.

    `features` `[K, d]` are L2-normalised, `labels` `[K]`; `valid` `[K]` (default all True) leaves
    entries out of every sum (empty queue slots). For anchor a: `A(a)` = the valid entries but a
    itself, `P(a)` = those with a's label, and
    `ℓ_a = −(τ/τ_b) · mean_{p∈P(a)} [s_ap − log Σ_{c∈A(a)} exp(s_ac)]` with `s = z·z/τ`.
    The loss is the mean over anchors that have a positive; `keep_anchors_without_positives=True`
    counts the others with loss 0 (SupContrast's own averaging). No anchor with a positive: 0.
    """
    features = features.float()
    count = features.shape[0]
    valid = torch.ones(count, dtype=torch.bool, device=features.device) if valid is None else valid
    scale = temperature / (base_temperature or temperature)
    others = valid.unsqueeze(0).expand(num_anchors, -1).clone()
    others[torch.arange(num_anchors), torch.arange(num_anchors)] = False
    logits = (features[:num_anchors] @ features.T / temperature).masked_fill(~others, EXCLUDED)  # [M, K]
    logits = logits - logits.amax(dim=1, keepdim=True).detach()
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positives = others & (labels[:num_anchors].unsqueeze(1) == labels.unsqueeze(0))
    num_positives = positives.sum(dim=1)
    log_prob = log_prob.masked_fill(~positives, 0.0)
    per_anchor = -scale * log_prob.sum(dim=1) / num_positives.clamp_min(1)
    has_positive = num_positives > 0
    if keep_anchors_without_positives:
        return per_anchor.masked_fill(~has_positive, 0.0).mean()
    if not has_positive.any():
        return per_anchor.sum() * 0.0
    return per_anchor[has_positive].mean()


def moco_infonce_loss(
    queries: torch.Tensor,
    keys: torch.Tensor,
    queue: torch.Tensor,
    *,
    temperature: float,
    queue_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """MoCo's InfoNCE: each query `[M, d]` must pick its own key `[M, d]` out of it and the valid
    queue entries `[K, d]`; cross-entropy with target 0 over `[q·k, q·queue…] / τ`, mean over queries."""
    queries = queries.float()
    if queue_valid is not None:
        queue = queue[queue_valid]
    positive = (queries * keys.float()).sum(dim=1, keepdim=True)
    logits = torch.cat([positive, queries @ queue.float().T], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(queries), dtype=torch.long, device=queries.device))
