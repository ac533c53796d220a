"""`Bag`: one slide's instances as a cohort yields them to the trainer (before batching)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Bag:
    """One slide's instance features `[N, D]`, its class index and its slide id.

    `instance_index` `[N]` (long) holds each instance's position in the slide's full bag when the
    bag is a subset (the trainer's `max_instances` cap); None means the bag is whole, positions
    `0..N-1`. Methods that keep per-instance state (INS's confidence table) key it by these.
    """

    features: torch.Tensor
    label: int
    slide_id: str
    instance_index: torch.Tensor | None = None

    def positions(self) -> torch.Tensor:
        """Each instance's position in the slide's full bag, `[N]` long (on the features' device)."""
        if self.instance_index is not None:
            return self.instance_index
        return torch.arange(self.features.shape[0], device=self.features.device)
