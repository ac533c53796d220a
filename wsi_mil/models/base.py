"""The forward contract every MIL model follows: features [B, N, D] + mask [B, N] -> MILOutput."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from wsi_mil.models.layers_targets import bag_cross_entropy


@dataclass(frozen=True)
class MILOutput:
    """What a MIL model returns for a padded batch of bags.

    Attributes:
        logits: `[B, C]` bag logits.
        attention: `[B, N]` canonical per-instance attention, non-negative, zero on padding.
            For softmax-attention models it sums to 1 over each bag's valid instances; each model
            documents what it puts here (e.g. DSMIL: the bag-stream attention).
        maps: extra per-instance maps, each `[B, K, N]` or `[B, N]` (per branch, per head, per
            class, instance scores), zero on padding.
        aux_losses: auxiliary losses computed inside the forward pass (scalars); the trainer adds
            them to the bag loss. Losses that need the label come from `MILModel.aux_losses`.
        embedding: `[B, E]` bag embedding before the classifier, where the model has one.
        instance_logits: `[B, N, C]` per-instance class logits, where the model has them.
        instance_scores: `[B, N]` each instance's own probability, in [0, 1] and not normalised over
            the bag, of the class it is evidence for (binary: the positive class), where the model
            classifies instances (INS); zero on padding. `wsi-mil predict` writes it per tile as
            `instance_score`.
        instance_contributions: `[B, N, C]` each instance's class evidence from this same pass,
            where the model has it: the bag classifier's weights applied to the instance's
            attention-weighted feature (no classifier bias), so with attention pooling and a linear
            head `Σ_n` of it plus the bias is the logits; zero on padding. MHIM-v2's class-aware
            score reads it (the official `get_pseudo_score`).
        extras: other per-bag tensors a loss or a caller needs (e.g. ACMIL's branch logits
            `[B, K, C]`, DSMIL's max-instance logits `[B, C]`).
    """

    logits: torch.Tensor
    attention: torch.Tensor
    maps: dict[str, torch.Tensor] = field(default_factory=dict)
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    embedding: torch.Tensor | None = None
    instance_logits: torch.Tensor | None = None
    instance_scores: torch.Tensor | None = None
    instance_contributions: torch.Tensor | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


class MILModel(nn.Module):
    """Base class: subclasses implement `forward(x, mask=None) -> MILOutput`.

    `x` is `[B, N, D]`; `mask` is a `[B, N]` bool tensor, True for real instances (None = all
    valid). Every bag must hold at least one valid instance.
    """

    #: whether the output is invariant to the order of the instances in a bag
    permutation_invariant: bool = True
    #: whether the model respects the standard MIL assumption (adding instances can only raise the
    #: positive score); documented per model and checked by `wsi_mil.checks`
    mil_assumption: bool = False
    #: whether `attention` is a softmax over the valid instances (sums to 1 per bag)
    softmax_attention: bool = True

    def __init__(self, in_dim: int, num_classes: int) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> MILOutput:
        raise NotImplementedError

    def bag_loss(
        self, output: MILOutput, target: torch.Tensor, *, class_weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The bag loss the trainer minimises: cross-entropy of `output.logits` by default.

        `target` is class indices `[B]` or soft labels `[B, C]`; `class_weights` `[C]` weigh the
        classes. Models whose official loss differs (DSMIL: per-class BCE) override this.
        """
        return bag_cross_entropy(output.logits, target, class_weights)

    def aux_losses(self, output: MILOutput, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """Label-dependent auxiliary losses (e.g. CLAM's instance clustering). Default: none."""
        return {}


def resolve_mask(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Return a bool `[B, N]` mask for `x` (all True when `mask` is None), checking its shape."""
    if x.dim() != 3:
        raise ValueError(f"features must be [B, N, D], got shape {tuple(x.shape)}")
    if mask is None:
        return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    if mask.shape != x.shape[:2]:
        raise ValueError(f"mask must be [B, N] = {tuple(x.shape[:2])}, got {tuple(mask.shape)}")
    return mask.to(device=x.device, dtype=torch.bool)


def attention_contributions(
    features: torch.Tensor, attention: torch.Tensor, head_weight: torch.Tensor
) -> torch.Tensor:
    """`instance_contributions` `[B, N, C]` of attention pooling followed by a linear head.

    `features` `[B, N, H]` are what the attention pools, `attention` `[B, K, N]` its weights with
    K = 1 or K = C (one pooling per class, as CLAM-MB), `head_weight` `[C, H]`: `a_{k,n} · W_c h_n`.
    """
    return (features @ head_weight.T) * attention.transpose(1, 2).to(features.dtype)
