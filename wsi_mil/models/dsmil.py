"""DSMIL: dual-stream MIL with a critical-instance attention (Li, Li, Eliceiri, CVPR 2021).

Source: binli123/dsmil-wsi (`dsmil.py`, current `BClassifier` with `nonlinear`/`passing_v`;
`train_tcga.py` for the loss). Instance stream: Linear(D→C) instance logits `c_n`, max-pooled per
class. Bag stream: queries `q_n` (Linear(D→128) + ReLU + Linear(128→128) + tanh by default),
values `v_n = h_n` (or Dropout + Linear(D→D) + ReLU with `passing_v`); the critical instance of
class k is `m_k = argmax_n c_{n,k}`; attention `A_{k,n} = softmax_n(⟨q_n, q_{m_k}⟩ / √128)`; bag
matrix `b_k = Σ_n A_{k,n} v_n` `[C, D]`; bag logits by Conv1d(C→C, kernel D) over it.

Loss: the official total is `0.5 · BCE(bag logits) + 0.5 · BCE(max-instance logits)` on one-hot
labels. The trainer adds `aux_losses` to its own bag loss, so `aux_losses(output, target)` returns
`{"max_instance": (1 − bag_weight) / bag_weight · L_max}` (weight 1 with the official 0.5/0.5):
the official total times 1 / bag_weight. `max_instance_loss="bce"` (default, official) or `"ce"`.

Deviations from the official code:
- padded batches: instance logits of padding are excluded from the max / argmax and padding
  from the attention softmax; the official code takes one bag at a time;
- the critical instances' queries are taken from the query tensor of all instances instead of
  a second pass of the query network on the gathered features (same values);
- the older repository version selected the critical instance of every class after re-sorting
  the features by the previous class (a bug fixed upstream); this follows the fixed version.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from wsi_mil.errors import ModelConfigError
from wsi_mil.models.base import MILModel, MILOutput, resolve_mask
from wsi_mil.models.layers import masked_fill_logits, masked_max, masked_softmax
from wsi_mil.models.layers_targets import class_indices, one_hot_targets
from wsi_mil.models.registry import register_model

MaxInstanceLoss = Literal["bce", "ce"]


class DSMIL(MILModel):
    """Dual-stream MIL: a max-instance stream and a critical-instance attention bag stream.

    `attention` holds the bag-stream attention (softmax over the valid instances) of the
    predicted class; `maps["class_attention"]` `[B, C, N]` holds it for every class.
    `instance_logits` `[B, N, C]` are the instance-stream logits (zero on padding),
    `extras["max_instance_logits"]` `[B, C]` their max over the valid instances,
    `extras["critical_index"]` `[B, C]` the critical instance of every class. `embedding` is the
    flattened bag matrix `[B, C·D]` (D = value dimension).
    """

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        *,
        query_dim: int = 128,
        nonlinear_query: bool = True,
        passing_v: bool = False,
        value_dropout: float = 0.0,
        bag_weight: float = 0.5,
        max_instance_loss: MaxInstanceLoss = "bce",
    ) -> None:
        super().__init__(in_dim, num_classes)
        if not 0.0 < bag_weight <= 1.0:
            raise ModelConfigError(f"dsmil: bag_weight must be in (0, 1], got {bag_weight}")
        if max_instance_loss not in ("bce", "ce"):
            raise ModelConfigError(
                f"dsmil: max_instance_loss must be 'bce' or 'ce', got {max_instance_loss!r}"
            )
        self.bag_weight = bag_weight
        self.max_instance_loss = max_instance_loss
        self.query_scale = 1.0 / math.sqrt(query_dim)
        self.instance_classifier = nn.Linear(in_dim, num_classes)
        self.query = (
            nn.Sequential(
                nn.Linear(in_dim, query_dim), nn.ReLU(), nn.Linear(query_dim, query_dim), nn.Tanh()
            )
            if nonlinear_query
            else nn.Linear(in_dim, query_dim)
        )
        self.value = (
            nn.Sequential(nn.Dropout(value_dropout), nn.Linear(in_dim, in_dim), nn.ReLU())
            if passing_v
            else nn.Identity()
        )
        self.bag_classifier = nn.Conv1d(num_classes, num_classes, kernel_size=in_dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> MILOutput:
        mask = resolve_mask(x, mask)
        batch = x.shape[0]
        instance_logits = self.instance_classifier(x)  # [B, N, C]
        valid = mask.unsqueeze(-1)  # [B, N, 1]
        critical = masked_fill_logits(instance_logits, valid.expand_as(instance_logits)).argmax(1)
        queries = self.query(x)  # [B, N, Q]
        critical_queries = queries.gather(
            1, critical.unsqueeze(-1).expand(-1, -1, queries.shape[-1])
        )  # [B, C, Q]
        scores = torch.bmm(critical_queries, queries.transpose(1, 2))  # [B, C, N]
        scores = scores * self.query_scale
        class_attention = masked_softmax(scores, mask.unsqueeze(1))  # [B, C, N]
        values = self.value(x)  # [B, N, V]
        bag = torch.bmm(class_attention.to(values.dtype), values)  # [B, C, V]
        logits = self.bag_classifier(bag).squeeze(-1)  # [B, C]
        rows = torch.arange(batch, device=x.device)
        return MILOutput(
            logits=logits,
            attention=class_attention[rows, logits.argmax(dim=-1)],
            maps={"class_attention": class_attention},
            embedding=bag.flatten(1),
            instance_logits=instance_logits.masked_fill(~valid, 0.0),
            extras={
                "max_instance_logits": masked_max(instance_logits, mask),
                "critical_index": critical,
            },
        )

    def aux_losses(self, output: MILOutput, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """DSMIL's max-instance loss, scaled by (1 − bag_weight) / bag_weight."""
        max_logits = output.extras["max_instance_logits"].float()  # [B, C]
        if self.max_instance_loss == "bce":
            loss = F.binary_cross_entropy_with_logits(
                max_logits, one_hot_targets(target, self.num_classes).to(max_logits.device)
            )
        else:
            loss = F.cross_entropy(
                max_logits, class_indices(target, self.num_classes).to(max_logits.device)
            )
        return {"max_instance": (1.0 - self.bag_weight) / self.bag_weight * loss}


@register_model
def dsmil(in_dim: int, num_classes: int, **options: Any) -> DSMIL:
    """DSMIL: max-instance stream + critical-instance attention bag stream (0.5/0.5 loss mix)."""
    return DSMIL(in_dim, num_classes, **options)
