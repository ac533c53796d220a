"""Bag-label conversions and bag losses shared by the models' training losses."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def class_indices(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Bag labels as class indices `[B]`, from indices `[B]` or one-hot / soft labels `[B, C]`."""
    if target.dim() == 2 and target.shape[1] == num_classes:
        return target.argmax(dim=1)
    if target.dim() != 1:
        raise ValueError(
            f"target must be class indices [B] or one-hot [B, {num_classes}], "
            f"got shape {tuple(target.shape)}"
        )
    return target.long()


def one_hot_targets(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Bag labels as float multi-hot `[B, C]` (for BCE losses), from indices `[B]` or `[B, C]`."""
    if target.dim() == 2 and target.shape[1] == num_classes:
        return target.float()
    return F.one_hot(class_indices(target, num_classes), num_classes).float()


def bag_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, class_weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Softmax cross-entropy of bag logits `[B, C]` against class indices `[B]` or soft labels `[B, C]`.

    With `class_weights` `[C]` the mean is weighted (each bag by its class weight, soft labels by
    their weighted mass), as `F.cross_entropy(weight=...)` does for hard labels.
    """
    logits = logits.float()
    if target.dim() == 1:
        return F.cross_entropy(logits, target, weight=class_weights)
    weighted = target.float() if class_weights is None else target.float() * class_weights
    log_probs = torch.log_softmax(logits, dim=-1)
    total = torch.sum(-weighted * log_probs)
    return total / (weighted.sum() if class_weights is not None else len(weighted))


def bag_binary_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, class_weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-class sigmoid BCE of bag logits `[B, C]` against one-hot (or soft) targets, mean over classes.

    Without `class_weights` this is `BCEWithLogitsLoss()(logits, one_hot)` (DSMIL's criterion);
    with them each bag weighs `Σ_c t_c w_c` in a weighted mean over the bags.
    """
    targets = one_hot_targets(target, logits.shape[-1]).to(logits.device)
    per_bag = F.binary_cross_entropy_with_logits(logits.float(), targets, reduction="none").mean(dim=1)
    if class_weights is None:
        return per_bag.mean()
    bag_weights = targets @ class_weights.float()
    return (per_bag * bag_weights).sum() / bag_weights.sum()
