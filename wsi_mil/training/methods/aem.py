"""AEM, Attention Entropy Maximization (Zhang et al., MICCAI 2025): `L = CE + λ · Σ_n p_n log p_n`.

`p` is the attention that pools the bag. With `attention_map="auto"` (default) that is
`MILOutput.maps["branch_attention"]` `[B, K, N]` when the model returns per-branch attention
(ACMIL; the term is then averaged over branches, as the AEM authors combine AEM with ACMIL), else
`MILOutput.attention` `[B, N]`; `attention_map="<key>"` picks another map, `None` forces
`MILOutput.attention`. Per bag the term is
the official unnormalised sum over the valid instances (mean over branches/heads), optionally
divided by `log N` (`normalize="log_n"`), then averaged over the bags of the batch. Minimising
`Σ p log p = −H(p)` raises the attention entropy. λ is constant (official code) or decays with
a half cosine from `weight` to `weight_end` over training (`schedule="cosine"`, the paper's
cosine weight annealing; its exact form is not published, this one is our choice).
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from wsi_mil.errors import TrainingConfigError
from wsi_mil.models.base import MILModel, MILOutput
from wsi_mil.training.methods.base import Batch, StepResult, TrainingMethod
from wsi_mil.training.methods.registry import register_method

#: the `MILOutput.maps` key of per-branch pooling attention `[B, K, N]` (ACMIL's branches)
BRANCH_ATTENTION_KEY = "branch_attention"


def negative_entropy(attention: torch.Tensor, mask: torch.Tensor, *, normalize: Literal["none", "log_n"] = "none") -> torch.Tensor:
    """Per-bag `Σ_n p_n log p_n` over valid instances: `[B, N]` or `[B, K, N]` (mean over K) -> `[B]`.

    Zero-probability and padded instances contribute 0 with a finite gradient. With
    `normalize="log_n"` each bag's value is divided by `log N_valid` (bags with N = 1 give 0).
    """
    p = attention.float()
    valid = mask if p.dim() == 2 else mask.unsqueeze(1)  # [B, N] or [B, 1, N]
    valid = valid.expand_as(p)
    per_map = (p * torch.log(p.clamp_min(torch.finfo(p.dtype).tiny)) * valid).sum(dim=-1)
    per_bag = per_map if per_map.dim() == 1 else per_map.mean(dim=1)
    if normalize == "log_n":
        log_n = torch.log(mask.sum(dim=-1).to(per_bag.dtype))
        per_bag = torch.where(log_n > 0, per_bag / log_n.clamp_min(math.log(2.0)), torch.zeros_like(per_bag))
    return per_bag


class AEMMethod(TrainingMethod):
    """Bag cross-entropy + the model's aux losses + `λ_t · Σ p log p` on the pooling attention."""

    name = "aem"

    def __init__(
        self,
        *,
        weight: float = 0.1,
        schedule: Literal["constant", "cosine"] = "constant",
        weight_end: float = 0.0,
        normalize: Literal["none", "log_n"] = "none",
        attention_map: str | None = "auto",
        aux_weights: dict[str, float] | None = None,
    ) -> None:
        super().__init__(aux_weights=aux_weights)
        if schedule not in ("constant", "cosine"):
            raise TrainingConfigError(f"AEM schedule must be 'constant' or 'cosine', got {schedule!r} (method_kwargs.schedule)")
        if normalize not in ("none", "log_n"):
            raise TrainingConfigError(f"AEM normalize must be 'none' or 'log_n', got {normalize!r} (method_kwargs.normalize)")
        if weight < 0 or weight_end < 0:
            raise TrainingConfigError("AEM weights must be >= 0 (method_kwargs.weight, weight_end)")
        self.weight = weight
        self.schedule = schedule
        self.weight_end = weight_end
        self.normalize = normalize
        self.attention_map = attention_map

    def weight_at(self, progress: float) -> float:
        """λ at a training progress in [0, 1]: constant, or half cosine from `weight` to `weight_end`."""
        if self.schedule == "constant":
            return self.weight
        progress = min(max(progress, 0.0), 1.0)
        return self.weight_end + 0.5 * (self.weight - self.weight_end) * (1.0 + math.cos(math.pi * progress))

    def pooling_attention(self, output: MILOutput) -> torch.Tensor:
        """The attention AEM regularises: `output.attention [B, N]` or a `[B, K, N]` map (see module doc)."""
        if self.attention_map is None:
            return output.attention
        if self.attention_map == "auto":
            return output.maps.get(BRANCH_ATTENTION_KEY, output.attention)
        try:
            return output.maps[self.attention_map]
        except KeyError:
            raise TrainingConfigError(
                f"AEM attention_map {self.attention_map!r} is not among the model's maps "
                f"{sorted(output.maps)}; set method_kwargs.attention_map to one of them or to null"
            ) from None

    def compute_loss(self, model: MILModel, batch: Batch, *, progress: float) -> StepResult:
        output = model(batch.features, batch.mask)
        aem = negative_entropy(self.pooling_attention(output), batch.mask, normalize=self.normalize).mean()
        lam = self.weight_at(progress)
        result = self.supervised_loss(model, output, batch, extra={"aem": lam * aem})
        result.terms["aem_lambda"] = lam
        result.terms["attention_entropy"] = -float(aem.detach())
        return result


register_method("aem")(AEMMethod)
