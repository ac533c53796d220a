"""Reference models that respect the standard MIL assumption by construction.

* `mi_net` (Wang et al. 2018, "Revisiting multiple instance neural networks", the instance-space
  mi-Net): an instance MLP scores every instance, the bag score is the max over valid instances.
* `multi_concept_mil`: K instance-level concept heads, each max-pooled over the bag, bounded with
  tanh and combined with non-negative weights. It can express "A and B present" (threshold MIL)
  and stays monotone and count-invariant. This is the remedy model of our MIL-checks spec
  (§1.6, "K-max monotone"); it has no official code.

Both give a bag a positive score that can only rise when an instance is added, so they are the
known-pass baselines of `wsi_mil.checks`. Binary logits are `[0, z]` with z the positive score, so
`logits[:, 1] - logits[:, 0] = z` and `softmax(logits)[:, 1] = sigmoid(z)`: a second free logit
for the negative class would let the negative class's own max lower the positive score.

Deviations from the published mi-Net: ReLU MLP instead of its exact layer sizes and dropout
placement, no deep supervision, and a two-logit binary head built from a single score.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from wsi_mil.models.base import MILModel, MILOutput, resolve_mask
from wsi_mil.models.layers import masked_max
from wsi_mil.models.registry import register_model


def instance_mlp(in_dim: int, hidden_dim: int, *, dropout: float) -> nn.Sequential:
    """Two-layer ReLU MLP applied to each instance: `[..., D]` -> `[..., H]`."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(hidden_dim, hidden_dim),
        nn.ReLU(),
        nn.Dropout(dropout),
    )


def class_scores_to_logits(scores: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-class bag scores `[B, S]` -> logits `[B, C]`; binary (S = 1) becomes `[0, z]`."""
    if num_classes == 2:
        return torch.cat([torch.zeros_like(scores), scores], dim=-1)
    return scores


def normalised_evidence(evidence: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Non-negative per-instance evidence `[B, N]` -> weights that sum to 1 over valid instances."""
    evidence = evidence * mask
    return evidence / evidence.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(evidence.dtype).tiny)


def _pick_class(per_class: torch.Tensor, logits: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Select, per bag, the `[B, N]` map of the positive class (binary) or the top class."""
    if num_classes == 2:
        return per_class[:, 0]
    top = logits.argmax(dim=-1)  # [B]
    index = top.view(-1, 1, 1).expand(-1, 1, per_class.shape[-1])
    return per_class.gather(1, index).squeeze(1)


class MiNet(MILModel):
    """mi-Net: instance scores max-pooled over the bag (standard MIL assumption by construction).

    One score per class per instance (a single positive score when binary); the bag logit of a
    class is the max of its instance scores over valid instances.

    `attention` holds each instance's probability `sigmoid(score)` for the positive class (binary)
    or for the bag's top class, normalised to sum to 1 over the valid instances; zero on padding.
    `maps["instance_prob"]` `[B, N]` holds the same probabilities before normalisation.
    `instance_logits` `[B, N, C]` holds each instance scored as if it were a bag on its own.
    """

    permutation_invariant = True
    mil_assumption = True

    def __init__(
        self, in_dim: int, num_classes: int, *, hidden_dim: int = 64, dropout: float = 0.0
    ) -> None:
        super().__init__(in_dim, num_classes)
        self.num_scores = 1 if num_classes == 2 else num_classes
        self.encoder = instance_mlp(in_dim, hidden_dim, dropout=dropout)
        self.scorer = nn.Linear(hidden_dim, self.num_scores)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> MILOutput:
        mask = resolve_mask(x, mask)
        scores = self.scorer(self.encoder(x))  # [B, N, S]
        logits = class_scores_to_logits(masked_max(scores, mask), self.num_classes)  # [B, C]
        instance_prob = _pick_class(torch.sigmoid(scores).transpose(1, 2), logits, self.num_classes)
        instance_prob = instance_prob * mask  # [B, N]
        instance_logits = class_scores_to_logits(scores, self.num_classes)  # [B, N, C]
        return MILOutput(
            logits=logits,
            attention=normalised_evidence(instance_prob, mask),
            maps={"instance_prob": instance_prob},
            instance_logits=instance_logits * mask.unsqueeze(-1),
        )


class MultiConceptMIL(MILModel):
    """K concept heads, each max-pooled and bounded, combined monotonically per class.

    For concept k: `m_k = tanh(max_j s_jk)`; class c's logit is `sum_k softplus(w_ck) m_k + b_c`.
    Non-negative weights keep every logit non-decreasing in each instance, and the max makes it
    independent of how often an instance repeats. Binary: one combiner, logits `[0, z]`.

    `attention` holds each instance's weighted concept evidence
    `sum_k softplus(w_ck) (1 + tanh(s_jk)) / 2` for the positive class (binary) or the bag's top
    class, normalised to sum to 1 over valid instances; zero on padding.
    `maps["concept_scores"]` `[B, K, N]` holds `tanh(s_jk)` (zero on padding);
    `extras["concept_presence"]` `[B, K]` holds `m_k`; `instance_logits` `[B, N, C]` holds each
    instance scored as if it were a bag on its own.
    """

    permutation_invariant = True
    mil_assumption = True

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        *,
        hidden_dim: int = 64,
        num_concepts: int = 16,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(in_dim, num_classes)
        num_combiners = 1 if num_classes == 2 else num_classes
        self.encoder = instance_mlp(in_dim, hidden_dim, dropout=dropout)
        self.concept_heads = nn.Linear(hidden_dim, num_concepts)
        self.raw_weights = nn.Parameter(torch.zeros(num_combiners, num_concepts))
        self.bias = nn.Parameter(torch.zeros(num_combiners))

    def combiner_weights(self) -> torch.Tensor:
        """Non-negative combination weights `[S, K]` (S = 1 when binary)."""
        return F.softplus(self.raw_weights)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> MILOutput:
        mask = resolve_mask(x, mask)
        concept_scores = torch.tanh(self.concept_heads(self.encoder(x)))  # [B, N, K]
        presence = masked_max(concept_scores, mask)  # [B, K]; tanh∘max = max∘tanh
        weights = self.combiner_weights().to(presence.dtype)  # [S, K]
        scores = presence @ weights.t() + self.bias.to(presence.dtype)  # [B, S]
        logits = class_scores_to_logits(scores, self.num_classes)  # [B, C]
        evidence = ((1 + concept_scores) / 2) @ weights.t()  # [B, N, S]
        evidence = _pick_class(evidence.transpose(1, 2), logits, self.num_classes)  # [B, N]
        concept_map = (concept_scores * mask.unsqueeze(-1)).transpose(1, 2)  # [B, K, N]
        alone = concept_scores @ weights.t() + self.bias.to(presence.dtype)  # [B, N, S]
        instance_logits = class_scores_to_logits(alone, self.num_classes) * mask.unsqueeze(-1)
        return MILOutput(
            logits=logits,
            attention=normalised_evidence(evidence, mask),
            maps={"concept_scores": concept_map},
            instance_logits=instance_logits,
            extras={"concept_presence": presence},
        )


@register_model
def mi_net(in_dim: int, num_classes: int, **options: Any) -> MiNet:
    """mi-Net reference: instance MLP scores, max over instances; respects the MIL assumption."""
    return MiNet(in_dim, num_classes, **options)


@register_model
def multi_concept_mil(in_dim: int, num_classes: int, **options: Any) -> MultiConceptMIL:
    """Monotone multi-concept reference: K max-pooled concepts, non-negative combiner."""
    return MultiConceptMIL(in_dim, num_classes, **options)
