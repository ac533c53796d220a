"""DSMIL: dual-stream MIL with a critical-instance attention (Li, Li, Eliceiri, CVPR 2021).

Source: binli123/dsmil-wsi (`dsmil.py`, current `BClassifier` with `nonlinear`/`passing_v`;
`train_tcga.py` for the loss). Instance stream: Linear(D→C) instance logits `c_n`, max-pooled per
class. Bag stream: queries `q_n` (Linear(D→128) + ReLU + Linear(128→128) + tanh by default),
values `v_n = h_n` (or Dropout + Linear(D→D) + ReLU with `passing_v`); the critical instance of
class k is `m_k = argmax_n c_{n,k}`; attention `A_{k,n} = softmax_n(⟨q_n, q_{m_k}⟩ / √128)`; bag
matrix `b_k = Σ_n A_{k,n} v_n` `[C, D]`; bag logits by Conv1d(C→C, kernel D) over it.

Loss (`train_tcga.py`): `0.5 · BCE(bag logits, one-hot) + 0.5 · BCE(max-instance logits, one-hot)`
with `BCEWithLogitsLoss` (mean over the classes). Here the trainer's bag term is the model's
`bag_loss` (per-class BCE on one-hot labels by default, `bag_loss="ce"` for softmax cross-entropy)
and `aux_losses` adds `{"max_instance": (1 − bag_weight) / bag_weight · L_max}`, so the total is
the official loss divided by `bag_weight` (CLAM's convention in this package; a constant factor
that Adam/AdamW steps ignore). `max_instance_loss="bce"` (default, official) or `"ce"`.

Init (`train_tcga.py`, `apply_sparse_init`): every Linear and Conv1d weight orthogonal, every bias
zero; applied at construction.

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
from torch import nn

from wsi_mil.errors import ModelConfigError
from wsi_mil.models.base import MILModel, MILOutput, resolve_mask
from wsi_mil.models.layers import masked_fill_logits, masked_max, masked_softmax
from wsi_mil.models.layers_targets import bag_binary_cross_entropy, bag_cross_entropy
from wsi_mil.models.registry import register_model

StreamLoss = Literal["bce", "ce"]


def orthogonal_init_(module: nn.Module) -> None:
    """DSMIL's official init: orthogonal weights and zero biases for every Linear and Conv1d."""
    for layer in module.modules():
        if isinstance(layer, (nn.Linear, nn.Conv1d)):
            nn.init.orthogonal_(layer.weight)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


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
        bag_loss: StreamLoss = "bce",
        max_instance_loss: StreamLoss = "bce",
    ) -> None:
        super().__init__(in_dim, num_classes)
        if not 0.0 < bag_weight <= 1.0:
            raise ModelConfigError(f"dsmil: bag_weight must be in (0, 1], got {bag_weight}")
        for option, value in (("bag_loss", bag_loss), ("max_instance_loss", max_instance_loss)):
            if value not in ("bce", "ce"):
                raise ModelConfigError(f"dsmil: {option} must be 'bce' or 'ce', got {value!r}")
        self.bag_weight = bag_weight
        self.bag_loss_kind = bag_loss
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
        orthogonal_init_(self)

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

    def bag_loss(
        self, output: MILOutput, target: torch.Tensor, *, class_weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The bag stream's loss: per-class BCE on one-hot labels (official) or cross-entropy."""
        return self._stream_loss(self.bag_loss_kind, output.logits, target, class_weights)

    def aux_losses(self, output: MILOutput, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """DSMIL's max-instance loss, scaled by (1 − bag_weight) / bag_weight."""
        max_logits = output.extras["max_instance_logits"]  # [B, C]
        loss = self._stream_loss(self.max_instance_loss, max_logits, target.to(max_logits.device))
        return {"max_instance": (1.0 - self.bag_weight) / self.bag_weight * loss}

    @staticmethod
    def _stream_loss(
        kind: StreamLoss,
        logits: torch.Tensor,
        target: torch.Tensor,
        class_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """BCE on one-hot (or soft) targets, or cross-entropy, of one stream's logits `[B, C]`."""
        if kind == "ce":
            return bag_cross_entropy(logits, target, class_weights)
        return bag_binary_cross_entropy(logits, target, class_weights)


@register_model
def dsmil(in_dim: int, num_classes: int, **options: Any) -> DSMIL:
    """DSMIL: max-instance stream + critical-instance attention bag stream (0.5/0.5 BCE loss mix)."""
    return DSMIL(in_dim, num_classes, **options)
