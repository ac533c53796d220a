"""MambaMIL: MIL with sequence-reordering Mamba blocks (Yang, Wang, Chen, MICCAI 2024, arXiv 2403.06800).

Source: isyangshu/MambaMIL (`models/MambaMIL.py`, `mamba/mamba_ssm/modules/srmamba.py`, the fused
path `mamba_inner_fn_no_out_proj`, `train_scripts/*.sh`); re-implemented, no code copied.

Architecture: Linear(D→512) + GELU (+ Dropout if p > 0) → 2 × [h ← h + SRMamba(LayerNorm(h))] →
LayerNorm → attention pooling (Linear(512→128) + tanh + Linear(128→1), softmax over instances)
→ Linear(512→C). SR-Mamba: a shared `in_proj` gives `x, z`; one scan branch reads `x` in the
stored order, a second branch (own conv, projections, A, D) reads `x` reordered with rate R
(positions viewed as rows of R, read column by column, after zero rows pad the bag to a multiple
of R); the second output is put back in stored order, the two are summed, gated by `silu(z)` and
projected by a shared `out_proj`. Each branch: causal depthwise Conv1d(k=4) → SiLU → Δ, B, C from
the input → selective scan (`wsi_mil.models.selective_scan`).

Instance order is part of the input (stored raster order); `permutation_invariant = False`.

Deviations from the official code:
- padded batches: each bag's valid instances are moved to the front, the stored-order branch
  runs right-padded (causal conv and scan: later padding cannot reach earlier positions), and the
  reordered branch gathers every bag with its own length (its own zero rows up to a multiple of
  R, as the official single-bag code does, then identity padding at the end). A bag alone and in
  a padded batch give the same output. The official code takes one bag at a time (`squeeze(0)`).
- the attention weights are returned (the official forward computes them and returns None);
- the selective scan and the causal convolution run in PyTorch on CPU (fused by torch.compile,
  `selective_scan.py`; the official code only works with the fused CUDA kernels; its non-fused
  fallback flips instead of reordering and does not run); with `mamba-ssm` installed, CUDA tensors
  use the fused scan kernel;
- Δ = softplus(dt_proj(·)) is computed in float32 even under autocast (Mamba users report NaN
  losses with AMP);
- `mamba_init=True` (off by default) keeps Mamba's Δ initialisation, which the official
  `initialize_weights` overwrites (xavier-normal dt_proj weight, zero dt bias, so Δ ≈ 0.69).
Defaults follow the shipped training scripts: R = 5 (the argparse default is 10), GELU, 2 layers,
dropout 0 (survival scripts: 0.25).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from wsi_mil.errors import ModelConfigError
from wsi_mil.models.base import MILModel, MILOutput, attention_contributions, resolve_mask
from wsi_mil.models.layers import AttentionScorer, attention_pool, masked_softmax, xavier_init_
from wsi_mil.models.layers_sequence import pack_valid_first, restore_instance_order
from wsi_mil.models.registry import register_model
from wsi_mil.models.selective_scan import causal_conv1d_silu, selective_scan

_ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU}


class ScanBranch(nn.Module):
    """One SR-Mamba branch: causal depthwise conv → SiLU → input-dependent Δ, B, C → selective scan.

    Maps `x` `[B, L, E]` to the ungated scan output `[B, L, E]` (the caller gates with `silu(z)`).
    """

    def __init__(self, inner_dim: int, *, state_dim: int, conv_kernel: int, dt_rank: int) -> None:
        super().__init__()
        self.state_dim = state_dim
        self.dt_rank = dt_rank
        self.conv1d = nn.Conv1d(
            inner_dim, inner_dim, conv_kernel, groups=inner_dim, padding=conv_kernel - 1
        )
        self.x_proj = nn.Linear(inner_dim, dt_rank + 2 * state_dim, bias=False)
        self.dt_proj = nn.Linear(dt_rank, inner_dim, bias=True)
        # S4D-real init: A[e, n] = -(n + 1), stored as log; D (skip) = 1
        self.A_log = nn.Parameter(
            torch.log(torch.arange(1, state_dim + 1, dtype=torch.float32)).repeat(inner_dim, 1)
        )
        self.D = nn.Parameter(torch.ones(inner_dim))

    def reset_dt_init_(self, *, dt_min: float = 1e-3, dt_max: float = 0.1, floor: float = 1e-4) -> None:
        """Mamba's Δ init: dt_proj weight U(±dt_rank^-½), bias = softplus⁻¹(dt), dt log-uniform
        in [dt_min, dt_max] (floored at `floor`)."""
        bound = self.dt_rank**-0.5
        with torch.no_grad():
            nn.init.uniform_(self.dt_proj.weight, -bound, bound)
            log_dt = torch.rand(self.D.shape[0]) * (math.log(dt_max) - math.log(dt_min))
            dt = torch.exp(log_dt + math.log(dt_min)).clamp_min(floor)
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = causal_conv1d_silu(x, self.conv1d.weight, self.conv1d.bias)  # [B, L, E]
        dt_low, b, c = torch.split(
            self.x_proj(u), [self.dt_rank, self.state_dim, self.state_dim], dim=-1
        )
        with torch.autocast(u.device.type, enabled=False):  # Δ = softplus(·) inside the scan, fp32
            dt = F.linear(dt_low.float(), self.dt_proj.weight.float(), self.dt_proj.bias.float())
            A = -torch.exp(self.A_log.float())
            return selective_scan(u, dt, A, b, c, self.D, delta_softplus=True)


def reorder_indices(
    lengths: torch.Tensor, num_positions: int, rate: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Index maps of the SR-Mamba reordering for bags of `lengths` `[B]` (valid instances first).

    Bag b is padded to `L2 = ceil(L_b / R) · R` and viewed as `K = L2 / R` rows of R columns;
    reordered position `j = w·K + k` reads stored position `k·R + w`. Returns `gather` `[B, J]`
    (J = max L2; entries that read the bag's zero padding hold `num_positions`) and `inverse`
    `[B, num_positions]` (where each stored position landed; 0 on padding)."""
    rows = torch.div(lengths + rate - 1, rate, rounding_mode="floor").clamp_min(1)  # K_b
    reordered = torch.arange(int(rows.max()) * rate, device=lengths.device)
    column = torch.div(reordered, rows[:, None], rounding_mode="floor")
    stored = (reordered % rows[:, None]) * rate + column
    inside = (column < rate) & (stored < lengths[:, None])
    gather = torch.where(inside, stored, torch.full_like(stored, num_positions))
    positions = torch.arange(num_positions, device=lengths.device)
    landed = (positions % rate) * rows[:, None] + torch.div(positions, rate, rounding_mode="floor")
    inverse = torch.where(positions < lengths[:, None], landed, torch.zeros_like(landed))
    return gather, inverse


class SRMamba(nn.Module):
    """Sequence-reordering Mamba mixer: stored-order scan + rate-R reordered scan, summed.

    `forward(h [B, L, d], lengths [B]) -> [B, L, d]`; bags hold their valid instances first.
    """

    def __init__(
        self, dim: int, *, rate: int, state_dim: int = 16, conv_kernel: int = 4, expand: int = 2
    ) -> None:
        super().__init__()
        inner_dim = expand * dim
        dt_rank = math.ceil(dim / 16)
        self.rate = rate
        self.in_proj = nn.Linear(dim, 2 * inner_dim, bias=False)
        branch = {"state_dim": state_dim, "conv_kernel": conv_kernel, "dt_rank": dt_rank}
        self.forward_branch = ScanBranch(inner_dim, **branch)
        self.reordered_branch = ScanBranch(inner_dim, **branch)
        self.out_proj = nn.Linear(inner_dim, dim, bias=False)

    def forward(self, h: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        length = h.shape[1]
        x, z = self.in_proj(h).chunk(2, dim=-1)  # [B, L, E] each
        y = self.forward_branch(x)
        gather, inverse = reorder_indices(lengths, length, self.rate)
        reads_padding = (gather == length).unsqueeze(-1)  # the bag's own zero rows
        x_reordered = torch.gather(
            x, 1, gather.clamp_max(length - 1).unsqueeze(-1).expand(-1, -1, x.shape[-1])
        ).masked_fill_(reads_padding, 0.0)
        y_reordered = self.reordered_branch(x_reordered)
        y = y.add_(torch.gather(y_reordered, 1, inverse.unsqueeze(-1).expand(-1, -1, y.shape[-1])))
        return self.out_proj(y * F.silu(z))


class MambaBlock(nn.Module):
    """Pre-norm residual block `h + SRMamba(LayerNorm(h))`."""

    def __init__(self, dim: int, **mixer_options: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mixer = SRMamba(dim, **mixer_options)

    def forward(self, h: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return h + self.mixer(self.norm(h), lengths)


class MambaMIL(MILModel):
    """MambaMIL: projection → SR-Mamba blocks → LayerNorm → attention pooling → classifier.

    `attention` holds the pooling softmax weights over each bag's valid instances (the official
    heatmap source, computed on the scanned, contextualised features); `maps["attention_logits"]`
    `[B, 1, N]` the raw pre-softmax scores; `embedding` the pooled feature `[B, hidden_dim]`.
    """

    permutation_invariant = False

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        *,
        hidden_dim: int = 512,
        attention_dim: int = 128,
        num_layers: int = 2,
        rate: int = 5,
        state_dim: int = 16,
        conv_kernel: int = 4,
        expand: int = 2,
        dropout: float = 0.0,
        activation: str = "gelu",
        mamba_init: bool = False,
    ) -> None:
        super().__init__(in_dim, num_classes)
        if activation not in _ACTIVATIONS:
            raise ModelConfigError(
                f"mamba_mil: activation={activation!r} is not one of {sorted(_ACTIVATIONS)}"
            )
        if rate < 1:
            raise ModelConfigError(f"mamba_mil: rate must be >= 1, got {rate}")
        projection: list[nn.Module] = [nn.Linear(in_dim, hidden_dim), _ACTIVATIONS[activation]()]
        if dropout > 0:
            projection.append(nn.Dropout(dropout))
        self.projection = nn.Sequential(*projection)
        self.blocks = nn.ModuleList(
            MambaBlock(
                hidden_dim, rate=rate, state_dim=state_dim, conv_kernel=conv_kernel, expand=expand
            )
            for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(hidden_dim)
        self.attention = AttentionScorer(hidden_dim, attention_dim)
        self.classifier = nn.Linear(hidden_dim, num_classes)
        xavier_init_(self)
        if mamba_init:
            for module in self.modules():
                if isinstance(module, ScanBranch):
                    module.reset_dt_init_()

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> MILOutput:
        packed = pack_valid_first(x, resolve_mask(x, mask))
        h = self.projection(packed.x)  # [B, N, H]
        for block in self.blocks:
            h = block(h, packed.lengths)
        h = self.norm(h)
        valid = packed.mask.unsqueeze(1)  # [B, 1, N]
        scores = self.attention(h)  # [B, 1, N]
        weights = masked_softmax(scores, valid)
        embedding = attention_pool(h, weights).squeeze(1)  # [B, H]
        return MILOutput(
            logits=self.classifier(embedding),
            attention=restore_instance_order(weights.squeeze(1), packed),
            maps={"attention_logits": restore_instance_order(scores.masked_fill(~valid, 0.0), packed)},
            embedding=embedding,
            instance_contributions=restore_instance_order(
                attention_contributions(h, weights, self.classifier.weight).transpose(1, 2), packed
            ).transpose(1, 2),
        )


@register_model
def mamba_mil(in_dim: int, num_classes: int, **options: Any) -> MambaMIL:
    """MambaMIL (SR-Mamba blocks + attention pooling); order-dependent, CPU selective scan.

    `rate` is the SR-Mamba reordering rate R (shipped scripts 5); `mamba_init=True` keeps
    Mamba's Δ initialisation instead of the official xavier re-init.
    """
    return MambaMIL(in_dim, num_classes, **options)
