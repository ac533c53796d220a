"""Contrastive losses shared by training methods: supervised contrast (SupCon) and MoCo's InfoNCE.

SupCon (Khosla et al. 2020) as in the reference implementation (HobbitLong/SupContrast
`losses.py`), with a contrast set that can hold entries beyond the anchors (other views, momentum
keys, a memory queue): SC-MIL uses it on bag embeddings, INS on instance embeddings. InfoNCE
(He et al. 2020) is INS's warm-up term. Both compute in float32 (under bf16 autocast the logits at
τ = 0.07 reach ±14.3) with a numerically stable log-sum-exp.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class SupConResult:
    """The loss (fp32 scalar), and per anchor `[M]` whether it had a positive in the contrast set."""

    loss: torch.Tensor
    has_positive: torch.Tensor


def supervised_contrastive_loss(
    anchors: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float,
    base_temperature: float | None = None,
    contrast: torch.Tensor | None = None,
    contrast_labels: torch.Tensor | None = None,
    official_compat: bool = False,
) -> SupConResult:
    """SupCon over `anchors [M, d]` with `labels [M]`; `contrast [K, d]` (+ `contrast_labels [K]`) are
    extra entries that join every anchor's contrast set but are never anchors themselves.

    Per anchor a: `ℓ_a = −(τ/τ_b) · mean_{p∈P(a)} [s_ap − log Σ_{c∈A(a)} exp(s_ac)]`, where `A(a)` is
    every entry but a itself, `P(a)` those with a's label, `s = z_a·z_c / τ` on L2-normalised
    vectors. The loss is the mean of `ℓ_a` over anchors with at least one positive (zero, still
    attached to the graph, when none has one); `official_compat=True` averages over all anchors with
    0 for those without a positive, as SupContrast does. Computed in fp32 whatever the input dtype.
    """
    if temperature <= 0:
        raise ValueError(f"SupCon temperature must be > 0, got {temperature}")
    if anchors.dim() != 2 or labels.shape != anchors.shape[:1]:
        raise ValueError(f"SupCon needs anchors [M, d] and labels [M], got {tuple(anchors.shape)} and {tuple(labels.shape)}")
    anchors = F.normalize(anchors.float(), dim=1)
    entries, entry_labels = anchors, labels
    if contrast is not None and contrast.shape[0] > 0:
        if contrast_labels is None or contrast_labels.shape != contrast.shape[:1]:
            raise ValueError("SupCon contrast entries need one label each (contrast_labels [K])")
        entries = torch.cat([anchors, F.normalize(contrast.float(), dim=1)])
        entry_labels = torch.cat([labels, contrast_labels.to(labels.device)])
    num_anchors = anchors.shape[0]
    logits = anchors @ entries.T / temperature  # [M, M + K]
    if logits.shape[1] < 2:  # one anchor and nothing to contrast it with
        return SupConResult(0.0 * logits.sum(), torch.zeros(num_anchors, dtype=torch.bool, device=logits.device))
    logits = logits - logits.detach().amax(dim=1, keepdim=True)  # exact: shifts numerator and denominator alike
    is_self = torch.zeros_like(logits, dtype=torch.bool)
    is_self[:, :num_anchors] = torch.eye(num_anchors, dtype=torch.bool, device=logits.device)
    positive = (labels.unsqueeze(1) == entry_labels.unsqueeze(0)) & ~is_self
    log_denominator = torch.logsumexp(logits.masked_fill(is_self, float("-inf")), dim=1, keepdim=True)
    log_prob = torch.where(positive, logits - log_denominator, torch.zeros_like(logits))
    num_positive = positive.sum(dim=1)
    has_positive = num_positive > 0
    scale = temperature / (temperature if base_temperature is None else base_temperature)
    per_anchor = -scale * log_prob.sum(dim=1) / num_positive.clamp_min(1)
    if official_compat:
        loss = per_anchor.mean()
    elif has_positive.any():
        loss = per_anchor[has_positive].mean()
    else:
        loss = 0.0 * logits.sum()
    return SupConResult(loss, has_positive)


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
