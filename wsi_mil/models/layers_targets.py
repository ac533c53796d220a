"""Bag-label conversions shared by the models' label-dependent auxiliary losses."""

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
