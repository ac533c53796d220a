"""Shared MIL building blocks: padding with masks, masked softmax, masked pooling, masked entropy,
attention pooling."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def pad_sequences(
    rows: Sequence[torch.Tensor], *, dtype: torch.dtype | None = None, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack bags `[n_i, D]` into zero-padded `features [R, max n_i, D]` and `mask [R, max n_i]`.

    The batch is built where `device` says (default: the first row's device) at `dtype` (default:
    the first row's dtype), so host rows can be copied once and padded on the GPU. Empty rows are
    allowed (all-False mask); the length is at least 1.
    """
    if not rows:
        raise ValueError("cannot pad zero rows")
    first = rows[0]
    device = first.device if device is None else torch.device(device)
    length = max(1, max(len(row) for row in rows))
    features = torch.zeros((len(rows), length, first.shape[-1]), dtype=dtype or first.dtype, device=device)
    mask = torch.zeros((len(rows), length), dtype=torch.bool, device=device)
    for i, row in enumerate(rows):
        features[i, : len(row)].copy_(row, non_blocking=True)
        mask[i, : len(row)] = True
    return features, mask


def _fill_value(dtype: torch.dtype) -> float:
    """The most negative finite value of a floating dtype (safe in fp16, unlike -1e9 or -inf)."""
    return torch.finfo(dtype).min


def masked_fill_logits(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Replace scores at padded positions (mask False) by the dtype's most negative finite value."""
    return scores.masked_fill(~mask, _fill_value(scores.dtype))


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor | None, dim: int = -1) -> torch.Tensor:
    """Softmax over `dim` that gives exactly zero weight to padded positions.

    `mask` broadcasts against `scores` (e.g. `[B, 1, N]` against `[B, K, N]`). A row with no valid
    position returns all zeros instead of NaN.
    """
    if mask is None:
        return torch.softmax(scores, dim=dim)
    mask = mask.expand_as(scores)
    probs = torch.softmax(masked_fill_logits(scores, mask), dim=dim) * mask
    total = probs.sum(dim=dim, keepdim=True)
    return probs / total.clamp_min(torch.finfo(probs.dtype).tiny)


def masked_log_softmax(scores: torch.Tensor, mask: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Log-softmax over valid positions; padded positions get 0 (so `p * log p` stays finite)."""
    mask = mask.expand_as(scores)
    logp = torch.log_softmax(masked_fill_logits(scores, mask), dim=dim)
    return logp.masked_fill(~mask, 0.0)


def masked_entropy(scores: torch.Tensor, mask: torch.Tensor | None, dim: int = -1) -> torch.Tensor:
    """Entropy of `softmax(scores)` over the valid positions along `dim` (natural log)."""
    if mask is None:
        mask = torch.ones_like(scores, dtype=torch.bool)
    mask = mask.expand_as(scores)
    logp = masked_log_softmax(scores, mask, dim=dim)
    return -(logp.exp() * logp * mask).sum(dim=dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of `[B, N, D]` over the valid instances -> `[B, D]`."""
    if mask is None:
        return x.mean(dim=1)
    weights = mask.to(x.dtype).unsqueeze(-1)
    return (x * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


def masked_max(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Max of `[B, N, D]` over the valid instances -> `[B, D]`."""
    if mask is None:
        return x.max(dim=1).values
    return x.masked_fill(~mask.unsqueeze(-1), _fill_value(x.dtype)).max(dim=1).values


def attention_pool(x: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    """Weighted sum of instances: `[B, N, D]` with `[B, K, N]` weights -> `[B, K, D]`."""
    return torch.bmm(attention.to(x.dtype), x)


class AttentionScorer(nn.Module):
    """Ilse et al.'s attention network: `s = w^T tanh(V h)`, or gated `w^T (tanh(V h) * sigm(U h))`.

    Returns raw scores `[B, K, N]` for K attention branches (K = 1 for plain ABMIL).
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int = 128,
        *,
        num_branches: int = 1,
        gated: bool = False,
        dropout: float = 0.0,
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.gated = gated
        self.value = nn.Sequential(nn.Linear(in_dim, hidden_dim, bias=bias), nn.Tanh(), nn.Dropout(dropout))
        self.gate = (
            nn.Sequential(nn.Linear(in_dim, hidden_dim, bias=bias), nn.Sigmoid(), nn.Dropout(dropout))
            if gated
            else None
        )
        self.score = nn.Linear(hidden_dim, num_branches, bias=bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        a = self.value(h)
        if self.gate is not None:
            a = a * self.gate(h)
        return self.score(a).transpose(1, 2)  # [B, N, K] -> [B, K, N]


def xavier_init_(module: nn.Module) -> None:
    """The init the official R²T/MambaMIL/PackMIL code applies: xavier-normal Linear, zero bias."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
