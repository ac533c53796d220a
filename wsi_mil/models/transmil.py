"""TransMIL: transformer MIL with Nyström attention and PPEG (Shao et al., NeurIPS 2021).

Source: szc19990412/TransMIL (`models/TransMIL.py`), which uses lucidrains' `nystrom-attention`
package. Layers: Linear(D→512) + ReLU → square fill: S = ceil(√N), the first S² − N instances are
appended again (wrap-around copies) → a learnable class token (randn init) is prepended →
TransLayer → PPEG → TransLayer → LayerNorm → class token → Linear(512→C). TransLayer:
`x + NystromAttention(LayerNorm(x))` with 8 heads of 64, 256 landmarks, 6 pseudo-inverse
iterations, a depthwise value convolution over the sequence (kernel 33) added to the output,
output dropout 0.1. PPEG: the S² tokens reshaped row-major to an S×S grid,
`x + DW7(x) + DW5(x) + DW3(x)` (depthwise, same padding, bias); the class token is left alone.

Nyström attention (Xiong et al., AAAI 2021): the sequence is left-padded to a multiple of the
landmark count m, split into m segments of l = ceil(n/m) tokens, landmarks are the segment means
of the (scaled) queries and keys, and `softmax(Q K̃ᵀ) · pinv(softmax(Q̃ K̃ᵀ)) · softmax(Q̃ Kᵀ) · V`
replaces `softmax(Q Kᵀ) V`, with the Moore-Penrose inverse from 6 Newton-Schulz iterations.

Why our own attention and not the `nystrom-attention` package: its mask path is not padding
invariant for a padded batch of bags. Its landmark segments depend on the batch's padded length;
the pseudo-inverse starts from a scale taken over the whole batch (so bags change each other's
output); and a landmark made only of padding gets a uniform row in the landmark kernel instead
of being removed, so the pseudo-inverse of a bag's block depends on how much padding it has.

Deviations from the official code:
- padded batches: each bag gets its own square grid and its own landmark segments (as if it were
  alone); padding of the batch and the Nyström left-padding are masked out of every softmax and
  every landmark mean (the official code has no mask: its zero left-padding takes part in the
  landmark means and in the softmaxes);
- empty landmarks (only padding) become identity rows of the landmark kernel, so the
  pseudo-inverse of the real block is the one the bag gets alone; the pseudo-inverse starts from
  a per-bag scale (maximum over heads, as the official code with one bag) and runs in fp32;
- wrap-around copies stay real tokens (as officially); the square fill uses each bag's own valid
  instances in their stored order.

`nystrom_padding="official"` reproduces the official computation instead, bag by bag: the
left-padding zeros count in the landmark means (each segment sum is divided by its full length
l), every landmark is a column and a row of the kernel (an all-padding landmark is a zero vector
whose kernel row is uniform), and the padding keys take part in the softmax over the keys with
score 0 (their values are zero). Weights trained with the official code then give the official
predictions; the default `"masked"` stays closer to exact softmax attention. Padding of the batch
stays masked in both modes, so both are padding invariant.

`attention` is not something TransMIL computes: it is an approximate map (Nyström attention has
no exact per-token weights). We take the exact softmax attention of the class-token query over
the keys of the last layer, `softmax(q_cls · Kᵀ / √d)` (the row the Nyström layer approximates),
drop the class token's weight on itself, add the weight of each wrap-around copy to its
instance, renormalise over the instances and average over heads; it sums to 1 over the valid
instances. `maps["head_attention"]` `[B, heads, N]` holds the per-head maps.

`instance_contributions` follow MHIM's TransMIL scoring (`get_pseudo_score_trans`): the first
layer's exact class-token attention times each instance's values (copies folded onto their
instance), through that layer's output projection (without its dropout) and the classifier weights.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from wsi_mil.errors import ModelConfigError
from wsi_mil.models.base import MILModel, MILOutput, resolve_mask
from wsi_mil.models.layers import masked_fill_logits, masked_softmax
from wsi_mil.models.registry import register_model

NystromPadding = Literal["masked", "official"]


def newton_schulz_pinv(matrix: torch.Tensor, iterations: int) -> torch.Tensor:
    """Iterative Moore-Penrose inverse of `[B, H, m, m]` with a per-bag initial scale.

    `Z ← ¼ Z (13I − AZ (15I − AZ (7I − AZ)))`, `Z₀ = Aᵀ / (max row sum · max column sum)`, the
    maxima taken over the heads and rows of each bag.
    """
    magnitude = matrix.abs()
    max_row = magnitude.sum(dim=-1).amax(dim=(1, 2))  # [B]
    max_col = magnitude.sum(dim=-2).amax(dim=(1, 2))  # [B]
    inverse = matrix.transpose(-1, -2) / (max_row * max_col).view(-1, 1, 1, 1)
    eye = torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)
    for _ in range(iterations):
        product = matrix @ inverse
        inverse = 0.25 * inverse @ (13 * eye - product @ (15 * eye - product @ (7 * eye - product)))
    return inverse


def softmax_with_zero_keys(
    scores: torch.Tensor, key_valid: torch.Tensor, zero_keys: torch.Tensor
) -> torch.Tensor:
    """Softmax over the valid keys of `scores` `[B, H, r, n]` as if each bag also had `zero_keys[b]`
    extra keys of score 0 (the official zero left-padding); returns the valid keys' weights."""
    filled = masked_fill_logits(scores, key_valid.expand_as(scores))
    pad_term = torch.log(zero_keys.to(scores.dtype)).view(-1, 1, 1, 1).expand(*scores.shape[:-1], 1)
    normaliser = torch.logsumexp(torch.cat([filled, pad_term], dim=-1), dim=-1, keepdim=True)
    return torch.exp(filled - normaliser) * key_valid


class MaskedNystromAttention(nn.Module):
    """Multi-head Nyström self-attention with a key-padding mask and per-bag landmarks.

    Each bag's landmarks come from its own valid tokens exactly as if it were alone (left-padded
    to a multiple of `num_landmarks`), so its output does not depend on the batch's padding.
    Valid tokens must form a prefix of each row (the depthwise value convolution sees positions).
    `padding="official"` lets the left-padding zeros take part as the official code does (module
    docstring).
    """

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int = 8,
        num_landmarks: int = 256,
        pinv_iterations: int = 6,
        residual_kernel: int = 33,
        dropout: float = 0.1,
        padding: NystromPadding = "masked",
    ) -> None:
        super().__init__()
        if padding not in ("masked", "official"):
            raise ModelConfigError(
                f"transmil: nystrom_padding must be 'masked' or 'official', got {padding!r}"
            )
        if dim % num_heads:
            raise ModelConfigError(
                f"transmil: hidden_dim ({dim}) must be divisible by num_heads ({num_heads})"
            )
        head_dim = dim // num_heads
        self.num_heads = num_heads
        self.official_padding = padding == "official"
        self.num_landmarks = num_landmarks
        self.pinv_iterations = pinv_iterations
        self.scale = head_dim**-0.5
        self.to_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(dropout))
        self.value_conv = nn.Conv2d(
            num_heads,
            num_heads,
            (residual_kernel, 1),
            padding=(residual_kernel // 2, 0),
            groups=num_heads,
            bias=False,
        )

    def _landmarks(
        self, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Segment means of the queries and keys `[B, H, m, d]`, which landmarks take part `[B, m]`,
        and the left-padding length of each bag `[B]`."""
        batch, heads, length, head_dim = q.shape
        m = self.num_landmarks
        counts = mask.sum(dim=1)  # [B]
        left_pad = (-counts) % m  # what the bag alone would be left-padded with
        segment_len = (counts + left_pad) // m  # [B], ≥ 1
        position = mask.long().cumsum(dim=1) - 1  # rank among the bag's valid tokens
        segment = ((position + left_pad[:, None]) // segment_len[:, None]).clamp(0, m - 1)
        weight = mask.float()  # [B, n]; landmark sums in fp32 (segments can be long)
        sizes = torch.zeros(batch, m, device=q.device).scatter_add_(1, segment, weight)  # [B, m]
        index = segment.view(batch, 1, length, 1).expand(batch, heads, length, head_dim)
        keep = weight.view(batch, 1, length, 1)
        empty = torch.zeros(batch, heads, m, head_dim, device=q.device)
        if self.official_padding:  # the zeros count in the mean; every landmark takes part
            denominator = segment_len.to(torch.float32).view(batch, 1, 1, 1)
            landmark_valid = torch.ones_like(sizes, dtype=torch.bool)
        else:
            denominator = sizes.clamp_min(1.0).view(batch, 1, m, 1)
            landmark_valid = sizes > 0
        q_landmarks = empty.scatter_add(2, index, q.float() * keep) / denominator
        k_landmarks = empty.scatter_add(2, index, k.float() * keep) / denominator
        return q_landmarks.to(q.dtype), k_landmarks.to(k.dtype), landmark_valid, left_pad

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`x` `[B, n, dim]`, `mask` `[B, n]` → output `[B, n, dim]`, the exact softmax attention
        of the first token's query over the valid keys `[B, heads, n]` and the values
        `[B, heads, n, dim / heads]` (zero on padding)."""
        batch, length, dim = x.shape
        heads = self.num_heads
        q, k, v = (
            t.view(batch, length, heads, dim // heads).transpose(1, 2)
            for t in self.to_qkv(x).chunk(3, dim=-1)
        )  # each [B, H, n, d]
        q = q * self.scale
        v = v * mask.view(batch, 1, length, 1).to(v.dtype)
        q_landmarks, k_landmarks, landmark_valid, left_pad = self._landmarks(q, k, mask)

        key_valid = mask.view(batch, 1, 1, length)
        landmark_cols = landmark_valid.view(batch, 1, 1, -1)
        to_landmarks = masked_softmax(q @ k_landmarks.transpose(-1, -2), landmark_cols)  # [B,H,n,m]
        kernel = masked_softmax(q_landmarks @ k_landmarks.transpose(-1, -2), landmark_cols)
        eye = torch.eye(self.num_landmarks, dtype=kernel.dtype, device=kernel.device)
        kernel = torch.where(landmark_valid.view(batch, 1, -1, 1), kernel, eye)  # [B,H,m,m]
        landmark_scores = q_landmarks @ k.transpose(-1, -2)  # [B, H, m, n]
        if self.official_padding:
            from_landmarks = softmax_with_zero_keys(landmark_scores, key_valid, left_pad)
        else:
            from_landmarks = masked_softmax(landmark_scores, key_valid)
        with torch.autocast(device_type=x.device.type, enabled=False):
            kernel_inverse = newton_schulz_pinv(kernel.float(), self.pinv_iterations)
        mixing = (to_landmarks @ kernel_inverse.to(to_landmarks.dtype)) @ (from_landmarks @ v)
        out = mixing + self.value_conv(v)  # [B, H, n, d]
        out = self.to_out(out.transpose(1, 2).reshape(batch, length, dim))

        first_scores = q[:, :, :1] @ k.transpose(-1, -2)  # [B, H, 1, n]
        return out, masked_softmax(first_scores, key_valid).squeeze(2), v


class TransLayer(nn.Module):
    """Pre-norm residual Nyström attention block: `x + attention(LayerNorm(x))`."""

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int,
        num_landmarks: int,
        pinv_iterations: int,
        residual_kernel: int,
        dropout: float,
        padding: NystromPadding,
    ) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attention = MaskedNystromAttention(
            dim,
            num_heads=num_heads,
            num_landmarks=num_landmarks,
            pinv_iterations=pinv_iterations,
            residual_kernel=residual_kernel,
            dropout=dropout,
            padding=padding,
        )

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Updated tokens `[B, n, dim]`, the first token's attention `[B, heads, n]` and the
        attention's values `[B, heads, n, dim / heads]`."""
        out, attention, values = self.attention(self.norm(x), mask)
        return x + out, attention, values


class PPEG(nn.Module):
    """Pyramid position encoding generator: depthwise 7/5/3 convolutions on each bag's grid.

    Each bag's S_b² grid tokens go row-major into the top-left S_b×S_b corner of a zero canvas
    of the batch's largest S, so the zero-padded convolutions see exactly the bag's own grid.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv7 = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.conv5 = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.conv3 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
        """`x` `[B, 1 + L, E]` (class token first), `mask` `[B, 1 + L]`, `side` `[B]` = S_b."""
        batch, length, dim = x.shape
        tokens, grid_valid = x[:, 1:], mask[:, 1:]  # [B, L, E], [B, L]
        canvas_side = int(side.max())
        cells = canvas_side * canvas_side
        position = torch.arange(length - 1, device=x.device)
        cell = (position // side[:, None]) * canvas_side + position % side[:, None]  # [B, L]
        cell = torch.where(grid_valid, cell, cells)  # padding goes to a spare cell, dropped below
        index = cell.unsqueeze(-1).expand(-1, -1, dim)
        canvas = torch.zeros(batch, cells + 1, dim, dtype=tokens.dtype, device=x.device)
        canvas = canvas.scatter(1, index, tokens)[:, :cells]
        grid = canvas.transpose(1, 2).reshape(batch, dim, canvas_side, canvas_side)
        grid = grid + self.conv7(grid) + self.conv5(grid) + self.conv3(grid)
        encoded = grid.flatten(2).transpose(1, 2)  # [B, cells, E]
        tokens = encoded.gather(1, index.clamp(max=cells - 1)) * grid_valid.unsqueeze(-1)
        return torch.cat([x[:, :1], tokens.to(x.dtype)], dim=1)


class TransMIL(MILModel):
    """TransMIL: class token + two Nyström transformer layers with PPEG between them.

    `attention` is an approximate map: the last layer's exact class-token softmax attention over
    the instances (copies folded onto their instance), averaged over heads; see the module
    docstring. `maps["head_attention"]` `[B, heads, N]` holds it per head; `embedding` is the
    normalised class token `[B, E]`. `nystrom_padding="official"` reproduces the official
    Nyström computation (zero left-padding inside the landmark means and the key softmax).
    """

    permutation_invariant = False

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        *,
        hidden_dim: int = 512,
        num_heads: int = 8,
        num_landmarks: int = 256,
        pinv_iterations: int = 6,
        residual_kernel: int = 33,
        dropout: float = 0.1,
        nystrom_padding: NystromPadding = "masked",
    ) -> None:
        super().__init__(in_dim, num_classes)
        self.projection = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU())
        self.cls_token = nn.Parameter(torch.randn(1, 1, hidden_dim))
        self.layer1, self.layer2 = (
            TransLayer(
                hidden_dim,
                num_heads=num_heads,
                num_landmarks=num_landmarks,
                pinv_iterations=pinv_iterations,
                residual_kernel=residual_kernel,
                dropout=dropout,
                padding=nystrom_padding,
            )
            for _ in range(2)
        )
        self.ppeg = PPEG(hidden_dim)
        self.norm = nn.LayerNorm(hidden_dim)
        self.classifier = nn.Linear(hidden_dim, num_classes)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> MILOutput:
        mask = resolve_mask(x, mask)
        h = self.projection(x)  # [B, N, E]
        batch, num_instances, dim = h.shape
        counts = mask.sum(dim=1)  # [B]
        side = torch.ceil(torch.sqrt(counts.double())).long()  # S_b
        grid_len = side * side  # [B]
        length = int(grid_len.max())
        # Source instance of every grid slot: the bag's valid instances in order, then copies of
        # its first S_b² − N_b instances (the official wrap-around square fill).
        valid_first = torch.argsort((~mask).to(torch.uint8), dim=1, stable=True)  # [B, N]
        slot = torch.arange(length, device=x.device).unsqueeze(0)  # [1, L]
        rank = torch.where(slot < counts[:, None], slot, slot - counts[:, None])
        source = valid_first.gather(1, rank.clamp(0, num_instances - 1))  # [B, L]
        grid_valid = slot < grid_len[:, None]  # [B, L]
        tokens = h.gather(1, source.unsqueeze(-1).expand(-1, -1, dim))
        tokens = tokens * grid_valid.unsqueeze(-1).to(tokens.dtype)

        sequence = torch.cat([self.cls_token.expand(batch, -1, -1).to(tokens.dtype), tokens], dim=1)
        sequence_mask = torch.cat([mask.new_ones(batch, 1), grid_valid], dim=1)  # [B, 1 + L]
        sequence, first_attention, first_values = self.layer1(sequence, sequence_mask)
        sequence = self.ppeg(sequence, sequence_mask, side)
        # cls_attention [B, H, 1 + L]: the class token's exact attention in the last layer.
        sequence, cls_attention, _ = self.layer2(sequence, sequence_mask)
        embedding = self.norm(sequence[:, 0])  # [B, E]

        slot_attention = cls_attention[:, :, 1:] * grid_valid.unsqueeze(1)  # [B, H, L]
        head_attention = torch.zeros(
            batch,
            slot_attention.shape[1],
            num_instances,
            dtype=slot_attention.dtype,
            device=x.device,
        ).scatter_add_(2, source.unsqueeze(1).expand_as(slot_attention), slot_attention)
        total = head_attention.sum(dim=-1, keepdim=True)
        head_attention = head_attention / total.clamp_min(torch.finfo(total.dtype).tiny)
        return MILOutput(
            logits=self.classifier(embedding),
            attention=head_attention.mean(dim=1),
            maps={"head_attention": head_attention},
            embedding=embedding,
            instance_contributions=self._first_layer_contributions(
                first_attention, first_values, source, grid_valid, mask
            ),
        )

    def _first_layer_contributions(
        self,
        attention: torch.Tensor,
        values: torch.Tensor,
        source: torch.Tensor,
        grid_valid: torch.Tensor,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        """Class evidence `[B, N, C]` of each instance, as MHIM's TransMIL scoring
        (`get_pseudo_score_trans`): the first layer's class-token attention times the instance's
        values, through that layer's output projection and the classifier weights (no bias).

        `attention` `[B, H, 1 + L]` and `values` `[B, H, 1 + L, d]` come from the first layer;
        wrap-around copies add their weighted values to their instance.
        """
        batch, heads, _, head_dim = values.shape
        num_instances = mask.shape[1]
        valid_slots = grid_valid[:, None, :, None].to(values.dtype)
        weighted = attention[:, :, 1:, None].to(values.dtype) * values[:, :, 1:] * valid_slots
        index = source[:, None, :, None].expand_as(weighted)
        folded = weighted.new_zeros(batch, heads, num_instances, head_dim).scatter_add_(
            2, index, weighted
        )  # [B, H, N, d]
        features = folded.transpose(1, 2).reshape(batch, num_instances, heads * head_dim)
        projection = self.layer1.attention.to_out[0]
        head = self.classifier.weight @ projection.weight  # [C, E]
        offset = self.classifier.weight @ projection.bias  # [C]
        return (features @ head.T + offset) * mask.unsqueeze(-1).to(features.dtype)


@register_model
def transmil(in_dim: int, num_classes: int, **options: Any) -> TransMIL:
    """TransMIL: Nyström transformer (2 layers, 8 heads, 256 landmarks) with PPEG; order-dependent."""
    return TransMIL(in_dim, num_classes, **options)
