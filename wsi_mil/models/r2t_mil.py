"""R²T-MIL: regional re-embedding transformer + ABMIL (Tang et al., CVPR 2024, arXiv 2402.17228).

Source: DearCaat/RRT-MIL (`modules/rrt.py`, `modules/rmsa.py`, `modules/datten.py`, README
commands); re-implemented, no code copied.

Architecture: Linear(D→512) + ReLU + Dropout(0.25) → R²T encoder → ABMIL pooling (Linear(512→128)
→ act → Linear(128→1), no biases, softmax over instances) → Linear(512→C). The R²T encoder folds
the bag in stored order row-major into a square grid (zero cells appended at the end), cuts it
into square regions and runs, each as a pre-norm residual layer: one R-MSA layer (multi-head
self-attention inside each region, with the EPEG positional generator: a per-head depthwise
convolution of kernel `epeg_kernel` along the query axis of the attention logits), then one
CR-MSA layer (each region is summarised into `crmsa_k` slots by a learnt projection, the slots
attend across regions, and the results are dispatched back to the tokens, weighted by a softmax
over slots times a per-slot min-max of the slot scores), then an optional shortcut from the
encoder input and a LayerNorm. The grid of R-MSA has `region_num` × `region_num` regions, or
regions of fixed side `region_size`; CR-MSA always uses 8 × 8 regions (the official encoder does
not forward `region_num` to it).

Instance order is part of the input (stored raster order); `permutation_invariant = False`.
Very small bags are an exception: with one token per region (N ≤ 64 at 8 × 8 regions) R-MSA and
CR-MSA see no neighbours and the model is permutation invariant in practice.

Deviations from the official code:
- masking (`mask_grid_padding=True`, default): the grid padding cells are masked as attention
  keys, zeroed as EPEG inputs, excluded from CR-MSA slot pooling and min-max statistics, and
  regions without a valid token are masked as cross-region keys. The official code attends to the
  zero padding (which for small bags is most of the grid). `mask_grid_padding=False` gives the
  official unmasked computation.
- padded batches: the encoder runs per bag on that bag's valid instances, with a grid computed
  from its own length, so a bag alone and in a padded batch give the same output; the pooling
  softmax is masked. The official code takes one bag at a time.
- large bags: bags with more than `large_bag_threshold` valid instances use regions of fixed side
  `large_bag_region_size` (official option `region_size`) instead of a fixed number of regions,
  so memory grows linearly (fixed 8 × 8 regions need ≈ 20 GB of logits at N = 200 000);
  R-MSA also runs over regions in chunks. `large_bag_threshold=0` disables the switch.
- EPEG is computed on the queries: a convolution along the query axis of `q kᵀ` equals
  `conv(q) kᵀ`, so `A + conv(A)` becomes attention with queries `q + conv(q)` and the fused
  `scaled_dot_product_attention` can be used. The EPEG conv bias is dropped: it adds a constant
  along every softmax row and cannot change the output.
- defaults: the ABMIL activation is tanh (`attention_activation`), as in every README command
  (the code default is relu).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from wsi_mil.errors import ModelConfigError
from wsi_mil.models.base import MILModel, MILOutput, attention_contributions, resolve_mask
from wsi_mil.models.layers import attention_pool, masked_softmax, xavier_init_
from wsi_mil.models.layers_sequence import pack_valid_first, restore_instance_order
from wsi_mil.models.registry import register_model

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}
#: regions per R-MSA chunk are chosen so one chunk's logits `[w, H, M, M]` stay below this size
_LOGITS_PER_CHUNK = 1 << 24
#: the number of regions per grid side CR-MSA uses (not configurable in the official encoder)
CRMSA_REGION_NUM = 8


@dataclass(frozen=True)
class GridLayout:
    """How a bag of `length` tokens folds into a `side × side` grid of square regions.

    Tokens fill the grid row-major; the last `side² − length` cells are padding. Regions are
    `region_side × region_side` windows, ordered row-major, flattened row-major inside.
    """

    length: int
    side: int
    region_side: int

    @property
    def regions_per_side(self) -> int:
        return self.side // self.region_side

    def to_regions(self, x: torch.Tensor) -> torch.Tensor:
        """`[L, C]` tokens -> `[R², r², C]` regions (padding cells are zeros)."""
        grid = F.pad(x, (0, 0, 0, self.side * self.side - self.length))
        n, r = self.regions_per_side, self.region_side
        regions = grid.view(n, r, n, r, -1).permute(0, 2, 1, 3, 4)
        return regions.reshape(n * n, r * r, -1)

    def from_regions(self, regions: torch.Tensor) -> torch.Tensor:
        """`[R², r², C]` regions -> `[L, C]` tokens (padding cells dropped)."""
        n, r = self.regions_per_side, self.region_side
        grid = regions.view(n, n, r, r, -1).permute(0, 2, 1, 3, 4).reshape(self.side**2, -1)
        return grid[: self.length]

    def valid_cells(self, device: torch.device) -> torch.Tensor:
        """`[R², r²]` bool: True on cells that hold a token."""
        tokens = torch.ones(self.length, 1, dtype=torch.uint8, device=device)
        return self.to_regions(tokens).squeeze(-1).bool()


def grid_layout(length: int, *, region_num: int, region_size: int) -> GridLayout:
    """The official padding rule: side = ceil(√L) rounded up to a multiple of `region_size`
    (fixed region side) or, when `region_size` is 0, of `region_num` (fixed region count)."""
    side = math.isqrt(length - 1) + 1 if length > 0 else 1  # ceil(sqrt(length))
    if region_size > 0:
        side = -(-side // region_size) * region_size
        return GridLayout(length, side, region_size)
    side = -(-side // region_num) * region_num
    return GridLayout(length, side, side // region_num)


class RegionAttention(nn.Module):
    """Multi-head self-attention inside each region, with optional EPEG (`epeg_kernel` > 0).

    `forward(regions [W, M, C], valid [W, M] | None) -> [W, M, C]`. With `valid`, padded cells
    are zeroed as queries (so EPEG sees them as its own zero padding) and masked as keys; a region
    without any valid cell attends to all of its cells (its outputs are discarded by the caller).
    """

    def __init__(self, dim: int, *, num_heads: int, epeg_kernel: int, dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.epeg = (
            nn.Conv2d(
                num_heads, num_heads, (epeg_kernel, 1), padding=(epeg_kernel // 2, 0),
                groups=num_heads, bias=False,
            )
            if epeg_kernel > 0
            else None
        )
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, regions: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        num_regions, tokens, _ = regions.shape
        per_chunk = max(1, _LOGITS_PER_CHUNK // (self.num_heads * tokens * tokens))
        outputs = [
            self._attend(
                regions[start : start + per_chunk],
                None if valid is None else valid[start : start + per_chunk],
            )
            for start in range(0, num_regions, per_chunk)
        ]
        return self.proj_drop(self.proj(torch.cat(outputs) if len(outputs) > 1 else outputs[0]))

    def _attend(self, regions: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        num_regions, tokens, dim = regions.shape
        qkv = self.qkv(regions).view(num_regions, tokens, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [W, H, M, d]
        key_mask = None
        if valid is not None:
            q = q * valid[:, None, :, None].to(q.dtype)
            keys = valid | ~valid.any(dim=1, keepdim=True)
            key_mask = None if keys.all() else keys[:, None, None, :]  # None: fused kernel
        if self.epeg is not None:
            q = q + self.epeg(q)  # conv along the query axis == conv of the logits q kᵀ
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)  # [W, H, M, d]
        return out.transpose(1, 2).reshape(num_regions, tokens, dim)


class CrossRegionAttention(nn.Module):
    """CR-MSA: summarise each region into `num_slots` tokens, attend across regions, dispatch back.

    `forward(regions [W, M, C], valid [W, M] | None) -> [W, M, C]`.
    """

    def __init__(
        self, dim: int, *, num_heads: int, num_slots: int, slot_mlp: bool, dropout: float
    ) -> None:
        super().__init__()
        if slot_mlp:
            self.slot_scores: nn.Module = nn.Sequential(
                nn.Linear(dim, dim // 4, bias=False), nn.Tanh(), nn.Linear(dim // 4, num_slots, bias=False)
            )
        else:
            self.phi = nn.Parameter(torch.empty(dim, num_slots))
            nn.init.kaiming_uniform_(self.phi, a=math.sqrt(5))
        self.slot_mlp = slot_mlp
        self.attention = RegionAttention(dim, num_heads=num_heads, epeg_kernel=0, dropout=dropout)

    def forward(self, regions: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        scores = self.slot_scores(regions) if self.slot_mlp else regions @ self.phi
        scores = scores.transpose(1, 2)  # [W, K, M]
        if valid is None:
            cells = torch.ones_like(scores, dtype=torch.bool)
            region_valid = None
        else:
            region_valid = valid.any(dim=1)  # [W]
            cells = (valid | ~region_valid[:, None]).unsqueeze(1).expand_as(scores)
        pooling = masked_softmax(scores, cells, dim=-1)  # each slot pools its region's tokens
        summaries = torch.bmm(pooling, regions)  # [W, K, C]
        finfo = torch.finfo(scores.dtype)
        low = scores.masked_fill(~cells, finfo.max).amin(dim=-1, keepdim=True)
        high = scores.masked_fill(~cells, finfo.min).amax(dim=-1, keepdim=True)
        scaled = (scores - low) / (high - low + 1e-8)  # per-slot min-max over the region's tokens
        dispatch = torch.softmax(scores, dim=1) * scaled  # [W, K, M]
        slot_valid = None if region_valid is None else region_valid.expand(scores.shape[1], -1)
        mixed = self.attention(summaries.transpose(0, 1), slot_valid).transpose(0, 1)  # [W, K, C]
        return torch.bmm(dispatch.transpose(1, 2), mixed)  # [W, M, C]


class GridResidualLayer(nn.Module):
    """Pre-norm residual layer `x + unfold(attention(fold(LayerNorm(x))))` on one bag `[L, C]`."""

    def __init__(self, dim: int, attention: nn.Module) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attention = attention

    def forward(self, x: torch.Tensor, layout: GridLayout, *, masked: bool) -> torch.Tensor:
        valid = layout.valid_cells(x.device) if masked else None
        regions = self.attention(layout.to_regions(self.norm(x)), valid)
        return x + layout.from_regions(regions)


class R2TEncoder(nn.Module):
    """The R²T re-embedding encoder for one bag: `[L, C] -> [L, C]` (R-MSA layers, CR-MSA, LN)."""

    def __init__(
        self,
        dim: int,
        *,
        num_rmsa_layers: int,
        num_heads: int,
        epeg_kernel: int,
        crmsa_k: int,
        crmsa_heads: int,
        crmsa_mlp: bool,
        dropout: float,
        all_shortcut: bool,
        region_num: int,
        region_size: int,
        large_bag_threshold: int,
        large_bag_region_size: int,
        mask_grid_padding: bool,
    ) -> None:
        super().__init__()
        self.rmsa_layers = nn.ModuleList(
            GridResidualLayer(
                dim, RegionAttention(dim, num_heads=num_heads, epeg_kernel=epeg_kernel, dropout=dropout)
            )
            for _ in range(num_rmsa_layers)
        )
        self.crmsa_layer = GridResidualLayer(
            dim,
            CrossRegionAttention(
                dim, num_heads=crmsa_heads, num_slots=crmsa_k, slot_mlp=crmsa_mlp, dropout=dropout
            ),
        )
        self.norm = nn.LayerNorm(dim)
        self.all_shortcut = all_shortcut
        self.region_num = region_num
        self.region_size = region_size
        self.large_bag_threshold = large_bag_threshold
        self.large_bag_region_size = large_bag_region_size
        self.mask_grid_padding = mask_grid_padding

    def rmsa_layout(self, length: int) -> GridLayout:
        """The R-MSA grid for a bag: fixed region side above `large_bag_threshold` instances."""
        region_size = self.region_size
        if 0 < self.large_bag_threshold < length and region_size == 0:
            region_size = self.large_bag_region_size
        return grid_layout(length, region_num=self.region_num, region_size=region_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        length = x.shape[0]
        shortcut = x
        layout = self.rmsa_layout(length)
        for layer in self.rmsa_layers:
            x = layer(x, layout, masked=self.mask_grid_padding)
        crmsa_layout = grid_layout(length, region_num=CRMSA_REGION_NUM, region_size=0)
        x = self.crmsa_layer(x, crmsa_layout, masked=self.mask_grid_padding)
        if self.all_shortcut:
            x = x + shortcut
        return self.norm(x)


class BiasFreeAttentionScorer(nn.Module):
    """R²T's ABMIL scorer `s = w2ᵀ act(W1 h)` without biases -> raw scores `[B, 1, N]`.

    (`layers.AttentionScorer` is tanh-only; R²T's code default activation is relu.)
    """

    def __init__(self, in_dim: int, hidden_dim: int, *, activation: str) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden_dim, bias=False),
            _ACTIVATIONS[activation](),
            nn.Linear(hidden_dim, 1, bias=False),
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h).transpose(1, 2)


class R2TMIL(MILModel):
    """R²T-MIL: projection → R²T re-embedding (per bag, stored order) → ABMIL pooling → classifier.

    `attention` holds the ABMIL softmax weights over each bag's valid instances (the official
    heatmap source, on the re-embedded features); `maps["attention_logits"]` `[B, 1, N]` the raw
    scores (the official `no_norm` heatmap); `embedding` the pooled feature `[B, hidden_dim]`.
    """

    permutation_invariant = False

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        *,
        hidden_dim: int = 512,
        attention_dim: int = 128,
        activation: str = "relu",
        attention_activation: str = "tanh",
        dropout: float = 0.25,
        transformer_dropout: float = 0.1,
        num_rmsa_layers: int = 1,
        num_heads: int = 8,
        epeg_kernel: int = 15,
        crmsa_k: int = 3,
        crmsa_heads: int = 8,
        crmsa_mlp: bool = False,
        all_shortcut: bool = False,
        region_num: int = 8,
        region_size: int = 0,
        large_bag_threshold: int = 20000,
        large_bag_region_size: int = 12,
        mask_grid_padding: bool = True,
    ) -> None:
        super().__init__(in_dim, num_classes)
        _check_options(
            hidden_dim=hidden_dim, activation=activation, attention_activation=attention_activation,
            num_heads=num_heads, crmsa_heads=crmsa_heads, epeg_kernel=epeg_kernel,
            crmsa_k=crmsa_k, region_num=region_num, region_size=region_size,
            large_bag_region_size=large_bag_region_size,
        )
        self.projection = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            _ACTIVATIONS[activation](),
            nn.Dropout(dropout) if dropout > 0 else nn.Identity(),
        )
        self.encoder = R2TEncoder(
            hidden_dim,
            num_rmsa_layers=num_rmsa_layers,
            num_heads=num_heads,
            epeg_kernel=epeg_kernel,
            crmsa_k=crmsa_k,
            crmsa_heads=crmsa_heads,
            crmsa_mlp=crmsa_mlp,
            dropout=transformer_dropout,
            all_shortcut=all_shortcut,
            region_num=region_num,
            region_size=region_size,
            large_bag_threshold=large_bag_threshold,
            large_bag_region_size=large_bag_region_size,
            mask_grid_padding=mask_grid_padding,
        )
        self.attention = BiasFreeAttentionScorer(hidden_dim, attention_dim, activation=attention_activation)
        self.classifier = nn.Linear(hidden_dim, num_classes)
        xavier_init_(self)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.xavier_normal_(module.weight)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> MILOutput:
        packed = pack_valid_first(x, resolve_mask(x, mask))
        h = self.projection(packed.x)  # [B, N, H]
        num_instances = h.shape[1]
        embedded = torch.stack(
            [
                F.pad(self.encoder(h[b, :length]), (0, 0, 0, num_instances - length))
                for b, length in enumerate(packed.lengths.tolist())
            ]
        )  # [B, N, H], zeros on padding
        valid = packed.mask.unsqueeze(1)  # [B, 1, N]
        scores = self.attention(embedded)  # [B, 1, N]
        weights = masked_softmax(scores, valid)
        embedding = attention_pool(embedded, weights).squeeze(1)  # [B, H]
        return MILOutput(
            logits=self.classifier(embedding),
            attention=restore_instance_order(weights.squeeze(1), packed),
            maps={"attention_logits": restore_instance_order(scores.masked_fill(~valid, 0.0), packed)},
            embedding=embedding,
            instance_contributions=restore_instance_order(
                attention_contributions(embedded, weights, self.classifier.weight).transpose(1, 2), packed
            ).transpose(1, 2),
        )


def _check_options(
    *, hidden_dim: int, activation: str, attention_activation: str, num_heads: int,
    crmsa_heads: int, epeg_kernel: int, crmsa_k: int, region_num: int, region_size: int,
    large_bag_region_size: int,
) -> None:
    for name, value in (("activation", activation), ("attention_activation", attention_activation)):
        if value not in _ACTIVATIONS:
            raise ModelConfigError(f"r2t_mil: {name}={value!r} is not one of {sorted(_ACTIVATIONS)}")
    for name, heads in (("num_heads", num_heads), ("crmsa_heads", crmsa_heads)):
        if heads < 1 or hidden_dim % heads:
            raise ModelConfigError(f"r2t_mil: {name}={heads} must divide hidden_dim={hidden_dim}")
    if epeg_kernel < 0 or (epeg_kernel > 0 and epeg_kernel % 2 == 0):
        raise ModelConfigError(f"r2t_mil: epeg_kernel must be odd (or 0 to disable EPEG), got {epeg_kernel}")
    if crmsa_k < 1 or region_num < 1 or region_size < 0 or large_bag_region_size < 1:
        raise ModelConfigError(
            "r2t_mil: crmsa_k, region_num and large_bag_region_size must be >= 1 and region_size >= 0"
        )


@register_model
def r2t_mil(in_dim: int, num_classes: int, **options: Any) -> R2TMIL:
    """R²T-MIL (R-MSA with EPEG + CR-MSA re-embedding, then ABMIL); order-dependent.

    Per-dataset README settings change `epeg_kernel`, `crmsa_k`, `crmsa_heads`, `all_shortcut`
    and `crmsa_mlp`; bags above `large_bag_threshold` use regions of side `large_bag_region_size`.
    """
    return R2TMIL(in_dim, num_classes, **options)
