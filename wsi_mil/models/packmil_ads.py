"""PackMIL's attention-driven downsampler (ADS) in front of any MIL model: `packmil_ads`.

The ADS (Tang, Fang et al., 2025; `modules/pack/ads.py` of FangHeng/PackMIL) is a learned token
transform. Per bag part `X [T, D]`: attention `a = softmax_T(score(X))` (Linear(D→128), tanh,
Linear(128→1)); an attention-scaled shortcut `X' = X + a ⊙ X`; then either

* per token (evaluation, and parts too short to reduce): `down(GELU(embed(X')))`, or
* grouped (training, `T > min_len · r`): zero-pad `X'` to a multiple of r, shuffle the tokens,
  `E = GELU(embed(X'))`, view E as groups of r consecutive tokens, flatten each group to a D·r
  vector ordered (feature d, member j) → d·r + j, keep D of those positions (chosen at random once
  per call, the same for every group, in ascending order) and apply `down`: T/r mixed tokens.

Training with `--method packmil` and `downsample: ads` trains the ADS with the model (the method
calls `grouped`); the served model is this wrapper, which runs the per-token form before the base
model, so a run's card rebuilds it with `create_model("packmil_ads", base=..., base_kwargs=...)`.
The padding mask is respected everywhere (the official code pads parts before the softmax only
for whole slides, never across slides).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from wsi_mil.models.base import MILModel, MILOutput, resolve_mask
from wsi_mil.models.layers import masked_softmax
from wsi_mil.models.registry import create_model, register_model


class AttentionDownsampler(nn.Module):
    """The ADS parameters (score MLP, `embed`, `down`) and its two forms, per-token and grouped."""

    def __init__(self, dim: int, *, score_dim: int = 128) -> None:
        super().__init__()
        self.score = nn.Sequential(nn.Linear(dim, score_dim), nn.Tanh(), nn.Linear(score_dim, 1))
        self.embed = nn.Linear(dim, dim)
        self.down = nn.Linear(dim, dim)

    def shortcut(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """`X + a ⊙ X` with `a` the masked softmax of the scores over each bag's valid tokens."""
        attention = masked_softmax(self.score(x).squeeze(-1), mask)  # [B, N]
        return x + attention.unsqueeze(-1) * x

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Per-token form `[B, N, D] -> [B, N, D]`; padded rows come out as zeros."""
        mask = resolve_mask(x, mask)
        out = self.down(F.gelu(self.embed(self.shortcut(x, mask))))
        return out * mask.unsqueeze(-1)

    def grouped(self, tokens: torch.Tensor, ratio: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Grouped form of one part `[T, D] -> [ceil(T / r), D]`: shuffle, embed, mix r tokens into one."""
        count, dim = tokens.shape
        shifted = self.shortcut(tokens.unsqueeze(0), torch.ones(1, count, dtype=torch.bool, device=tokens.device))[0]
        padded_count = -(-count // ratio) * ratio
        shifted = F.pad(shifted, (0, 0, 0, padded_count - count))
        order = torch.randperm(padded_count, generator=generator).to(tokens.device)
        embedded = F.gelu(self.embed(shifted[order]))  # [T', D]
        groups = embedded.view(padded_count // ratio, ratio, dim).transpose(1, 2).reshape(padded_count // ratio, dim * ratio)
        keep = torch.randperm(dim * ratio, generator=generator)[:dim].sort().values.to(tokens.device)
        return self.down(groups[:, keep])


class PackMILDownsampled(MILModel):
    """Any registered MIL model with the ADS per-token transform in front of it."""

    def __init__(self, downsampler: AttentionDownsampler, base: MILModel) -> None:
        super().__init__(base.in_dim, base.num_classes)
        self.downsampler = downsampler
        self.base = base
        self.permutation_invariant = base.permutation_invariant
        self.mil_assumption = False  # the shortcut couples instances through a softmax
        self.softmax_attention = base.softmax_attention

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> MILOutput:
        return self.base(self.downsampler(x, mask), mask)

    def bag_loss(
        self, output: MILOutput, target: torch.Tensor, *, class_weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.base.bag_loss(output, target, class_weights=class_weights)

    def aux_losses(self, output: MILOutput, target: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.base.aux_losses(output, target)


@register_model
def packmil_ads(
    in_dim: int,
    num_classes: int,
    *,
    base: str = "abmil",
    base_kwargs: dict[str, Any] | None = None,
    score_dim: int = 128,
) -> PackMILDownsampled:
    """PackMIL's learned attention-driven downsampler (per-token form) in front of model `base`.

    Made by `--method packmil` with `downsample: ads`; `base_kwargs` are the base model's options.
    """
    if base == "packmil_ads":
        raise ValueError("packmil_ads cannot wrap itself; choose another base model")
    return PackMILDownsampled(
        AttentionDownsampler(in_dim, score_dim=score_dim), create_model(base, in_dim, num_classes, **(base_kwargs or {}))
    )
