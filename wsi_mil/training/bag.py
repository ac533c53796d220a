"""`Bag`: one slide's instances as a cohort yields them to the trainer (before batching)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Bag:
    """One slide's instance features `[N, D]`, its class index and its slide id."""

    features: torch.Tensor
    label: int
    slide_id: str
