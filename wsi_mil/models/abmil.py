"""ABMIL: attention-based deep MIL (Ilse, Tomczak, Welling, ICML 2018) and its CLAM-style WSI form.

Sources: AMLab-Amsterdam/AttentionDeepMIL (`model.py`) for the attention and gated-attention
pooling; mahmoodlab/CLAM (`models/model_clam.py`, `CLAM_SB` with instance clustering off) for the
WSI configuration that `abmil` builds: Linear(D→512) + ReLU + Dropout(0.25), gated attention with
256 hidden units (Dropout(0.25) after tanh and after sigmoid), softmax over the instances,
attention pooling, Linear(512→C).

Deviations from the official code:
- padded batches: the softmax runs over the valid instances only (`mask`); the official code
  takes one bag at a time and has no mask;
- `abmil_ilse` replaces Ilse et al.'s MNIST conv feature extractor by Linear(D→500) + ReLU on
  precomputed features and their Bernoulli sigmoid head by Linear(500→C) for cross-entropy;
- Ilse et al.'s multi-branch option (`ATTENTION_BRANCHES`, unused in the paper) is not exposed;
  ACMIL (`wsi_mil.models.acmil`) is the multi-branch model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from wsi_mil.models.base import MILModel, MILOutput, attention_contributions, resolve_mask
from wsi_mil.models.layers import AttentionScorer, attention_pool, masked_softmax
from wsi_mil.models.registry import register_model


class ABMIL(MILModel):
    """Attention MIL pooling: project instances, score them, softmax over the bag, pool, classify.

    `attention` holds the softmax attention `a_n` over each bag's valid instances (the weights
    that pool the bag); `maps["attention_logits"]` `[B, 1, N]` holds the raw pre-softmax scores
    (CLAM's `A_raw`, what CLAM's heatmaps rank); `embedding` is the pooled feature `[B, H]`.
    """

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        *,
        hidden_dim: int = 512,
        attention_dim: int = 256,
        gated: bool = True,
        dropout: float = 0.25,
        attention_dropout: float = 0.25,
    ) -> None:
        super().__init__(in_dim, num_classes)
        self.projection = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout)
        )
        self.attention = AttentionScorer(
            hidden_dim, attention_dim, gated=gated, dropout=attention_dropout
        )
        self.classifier = nn.Linear(hidden_dim, num_classes)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> MILOutput:
        mask = resolve_mask(x, mask)
        h = self.projection(x)  # [B, N, H]
        scores = self.attention(h)  # [B, 1, N]
        valid = mask.unsqueeze(1)  # [B, 1, N]
        weights = masked_softmax(scores, valid)  # [B, 1, N]
        embedding = attention_pool(h, weights).squeeze(1)  # [B, H]
        return MILOutput(
            logits=self.classifier(embedding),
            attention=weights.squeeze(1),
            maps={"attention_logits": scores.masked_fill(~valid, 0.0)},
            embedding=embedding,
            instance_contributions=attention_contributions(h, weights, self.classifier.weight),
        )


@register_model
def abmil(in_dim: int, num_classes: int, **options: Any) -> ABMIL:
    """ABMIL, CLAM-style WSI configuration: D→512 FC, gated attention 256, dropout 0.25.

    `attention_dim=384` gives CLAM's "big" size; `gated=False` CLAM's plain `Attn_Net`.
    """
    return ABMIL(in_dim, num_classes, **options)


@register_model(gated=False)
def abmil_plain(in_dim: int, num_classes: int, **options: Any) -> ABMIL:
    """ABMIL, CLAM-style WSI configuration with plain (non-gated) tanh attention."""
    return ABMIL(in_dim, num_classes, **options)


@register_model(hidden_dim=500, attention_dim=128, gated=False, dropout=0.0, attention_dropout=0.0)
def abmil_ilse(in_dim: int, num_classes: int, **options: Any) -> ABMIL:
    """ABMIL as in Ilse et al. 2018: D→500 FC, attention 128, no dropout (`gated=True`: gated)."""
    return ABMIL(in_dim, num_classes, **options)
