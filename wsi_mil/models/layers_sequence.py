"""Helpers for order-dependent MIL models (R²T-MIL, MambaMIL): pack each bag's valid instances first.

Sequence models fold or scan the instances in their stored order, so padding must never sit
between valid instances. `pack_valid_first` moves every bag's valid instances to the front
(keeping their relative order) and zeroes the padding; `restore_instance_order` puts
per-instance outputs back where the caller's mask had them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PackedBags:
    """A padded batch whose valid instances come first in every bag.

    Attributes:
        x: `[B, N, D]` features, valid instances first (stored order kept), zeros after them.
        lengths: `[B]` number of valid instances per bag.
        mask: `[B, N]` bool, True on the first `lengths[b]` positions of bag b.
        order: `[B, N]` source position of every packed position, or None when the input was
            already packed (then no reordering is needed to restore outputs).
    """

    x: torch.Tensor
    lengths: torch.Tensor
    mask: torch.Tensor
    order: torch.Tensor | None


def pack_valid_first(x: torch.Tensor, mask: torch.Tensor) -> PackedBags:
    """Move the valid instances of every bag of `x` `[B, N, D]` to the front and zero the padding.

    `mask` `[B, N]` is True on valid instances; their relative (stored) order is preserved, which
    is what order-dependent models need. Padding content never reaches the result.
    """
    lengths = mask.sum(dim=1)
    positions = torch.arange(mask.shape[1], device=mask.device)
    packed_mask = positions < lengths.unsqueeze(1)
    if torch.equal(mask, packed_mask):
        return PackedBags(x.masked_fill(~mask.unsqueeze(-1), 0.0), lengths, mask, None)
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)  # valid positions first
    gathered = torch.gather(x, 1, order.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    return PackedBags(gathered.masked_fill(~packed_mask.unsqueeze(-1), 0.0), lengths, packed_mask, order)


def restore_instance_order(values: torch.Tensor, packed: PackedBags) -> torch.Tensor:
    """Put per-instance values computed on packed bags back at the caller's positions.

    `values` has the instance axis last (`[B, N]` or `[B, K, N]`) and must be zero on padding.
    """
    if packed.order is None:
        return values
    order = packed.order.view(packed.order.shape[0], *([1] * (values.dim() - 2)), -1)
    return torch.zeros_like(values).scatter(-1, order.expand_as(values), values)
