"""INS (Qu et al., "Rethinking MIL for WSI classification: a good instance classifier is all you
need", IEEE TCSVT 2024): an instance classifier whose bag prediction pools instance predictions.

The model is only the part that is served: an instance encoder (`hidden_layers` × Linear + ReLU +
Dropout) and a linear instance classifier. The projection head, momentum key encoder, queue,
prototypes and pseudo-label confidences that train it belong to `--method ins`
(`wsi_mil.training.methods.ins`); `--method plain` trains it as a max-pooled instance classifier
(mi-Net-like), a useful baseline.

Bag prediction from instance probabilities `p_n = softmax(o_n)` over the valid instances, with
`r = negative_class`:

* binary (r = 0 or 1, positive class q = 1 − r): `max` (default) gives logits with
  `logits[q] − logits[r] = max_n (o_nq − o_nr)`, so `P(q) = max_n p_n[q]` exactly; `topk` and
  `mean` pool `s = topk-mean / mean of p_n[q]` and give `logits[q] − logits[r] = logit(s)`;
* C > 2 with a negative class: `s_c = pool_n p_n[c]` for c ≠ r, `s_r = max(1 − max_{c≠r} s_c,
  1e-6)`, logits `= log(s / Σ s)` (for C = 2 the same probabilities as the binary form);
* background mode (`background_class=True`, experimental; `negative_class` is then unused): one
  extra instance class, "background" (the last), `s_c = pool_n p_n[c]` for the C bag classes,
  logits `= log(s / Σ s)`.

`topk` averages the `min(k, N)` highest probabilities: it never falls when an instance joins a bag
of at least k instances, but can for smaller bags, so only `max` claims the MIL assumption.

Outputs: `instance_scores` `[B, N]` holds each instance's probability of the evidence class c*: the
positive class when binary, else the non-negative class with the highest bag score (C > 2; in
background mode the highest-scoring bag class); `attention` is the same normalised to sum 1 over
the bag; `instance_logits` `[B, N, C]` the classifier's logits (background mode: the C bag
classes, all C + 1 in `extras["instance_logits_full"]`). All are zero on padding. There is no bag
embedding (`embedding = None`).

Not from the official code (miccaiif/INS): its feature-input path ran ResNet-18 on features
reshaped into pseudo-images, or could not run; a Linear + ReLU encoder is what its commented-out
feature encoders suggest. Its test code scored bags by mean (its headline), max and logsumexp of
`p_n[1]`; ours defaults to max, the MIL-monotone rule.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from wsi_mil.models.base import MILModel, MILOutput, resolve_mask
from wsi_mil.models.layers import masked_max, masked_mean
from wsi_mil.models.reference import normalised_evidence
from wsi_mil.models.registry import register_model

Pooling = Literal["max", "topk", "mean"]
POOLINGS = ("max", "topk", "mean")
#: floor of pooled class scores before a log or logit (a bag score of exactly 0 or 1 has no logit)
SCORE_FLOOR = 1e-6


def pool_instances(values: torch.Tensor, mask: torch.Tensor, pooling: Pooling, topk: int) -> torch.Tensor:
    """Pool `[B, N, K]` per-instance values over the valid instances -> `[B, K]`.

    `max` and `mean` as usual; `topk` averages each bag's `min(topk, N_valid)` highest values.
    """
    if pooling == "max":
        return masked_max(values, mask)
    if pooling == "mean":
        return masked_mean(values, mask)
    count = min(topk, values.shape[1])
    lowest = torch.finfo(values.dtype).min
    top = values.masked_fill(~mask.unsqueeze(-1), lowest).topk(count, dim=1).values  # [B, k, K], descending
    sizes = mask.sum(dim=1, keepdim=True).clamp(max=topk)  # [B, 1]
    kept = torch.arange(count, device=values.device).view(1, -1, 1) < sizes.unsqueeze(-1)  # [B, k, 1]
    return top.masked_fill(~kept, 0.0).sum(dim=1) / sizes.to(values.dtype)


def class_score_logits(
    probs: torch.Tensor, mask: torch.Tensor, *, num_classes: int, negative_class: int | None, pooling: Pooling, topk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bag logits `[B, C]` from instance probabilities `[B, N, C_inst]` by the class-score rule, and
    the pooled scores `[B, K]` of the non-negative (scored) classes.

    With a negative class r: `s_c = pool p[c]` for c ≠ r, `s_r = max(1 − max s_c, 1e-6)`; in
    background mode (`negative_class=None`, `C_inst = C + 1`): `s_c = pool p[c]` for c < C.
    Logits are `log(s / Σ s)`.
    """
    scored = scored_classes(num_classes, negative_class)
    pooled = pool_instances(probs[..., scored], mask, pooling, topk)  # [B, K]
    if negative_class is None:
        scores = pooled
    else:
        negative = (1.0 - pooled.amax(dim=1, keepdim=True)).clamp_min(SCORE_FLOOR)
        scores = torch.cat([pooled[:, :negative_class], negative, pooled[:, negative_class:]], dim=1)
    scores = scores.clamp_min(SCORE_FLOOR)
    return torch.log(scores / scores.sum(dim=1, keepdim=True)), pooled


def scored_classes(num_classes: int, negative_class: int | None) -> list[int]:
    """The bag classes whose instance probabilities are pooled: every class but the negative one."""
    return [c for c in range(num_classes) if c != negative_class]


class INS(MILModel):
    """Instance encoder + instance classifier; bag logits pool the instance probabilities.

    See the module docstring for the pooling rules and what each output holds.
    """

    permutation_invariant = True
    softmax_attention = True

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        *,
        hidden_dim: int = 512,
        hidden_layers: int = 1,
        dropout: float = 0.0,
        pooling: str = "max",
        topk: int = 16,
        negative_class: int = 0,
        background_class: bool = False,
    ) -> None:
        super().__init__(in_dim, num_classes)
        if pooling not in POOLINGS:
            raise ValueError(f"ins pooling must be one of {', '.join(POOLINGS)}, got {pooling!r} (model_kwargs.pooling)")
        if not 0 <= negative_class < num_classes:
            raise ValueError(
                f"ins negative_class must be a class index 0..{num_classes - 1}, got {negative_class} "
                "(model_kwargs.negative_class; background_class: true for tasks without a negative class)"
            )
        if hidden_layers < 1 or topk < 1:
            raise ValueError("ins hidden_layers and topk must be >= 1 (model_kwargs.hidden_layers, topk)")
        self.pooling: Pooling = pooling  # type: ignore[assignment]
        self.topk = topk
        #: the class whose bags hold only negative instances; None in background mode
        self.negative_class: int | None = None if background_class else negative_class
        self.mil_assumption = pooling == "max"
        #: instance classes: the bag classes, plus "background" (the last) without a negative class
        self.num_instance_classes = num_classes + 1 if background_class else num_classes
        #: width of `instance_features`, what the method's projection head reads
        self.feature_dim = hidden_dim
        layers: list[nn.Module] = []
        width = in_dim
        for _ in range(hidden_layers):
            layers += [nn.Linear(width, hidden_dim), nn.ReLU(), nn.Dropout(dropout)]
            width = hidden_dim
        self.encoder = nn.Sequential(*layers)
        self.classifier = nn.Linear(hidden_dim, self.num_instance_classes)

    def instance_features(self, x: torch.Tensor) -> torch.Tensor:
        """Encoded instances `[..., D]` -> `[..., hidden_dim]`."""
        return self.encoder(x)

    def instance_logits_from(self, features: torch.Tensor) -> torch.Tensor:
        """Instance class logits `[..., C_inst]` from `instance_features`."""
        return self.classifier(features)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> MILOutput:
        mask = resolve_mask(x, mask)
        return self.output_from_instance_logits(self.instance_logits_from(self.instance_features(x)), mask)

    def output_from_instance_logits(self, logits: torch.Tensor, mask: torch.Tensor) -> MILOutput:
        """The bag output of instance logits `[B, N, C_inst]` (pooled over `mask`), as `forward` gives it."""
        logits = logits.float()
        probs = torch.softmax(logits, dim=-1)
        scored = scored_classes(self.num_classes, self.negative_class)
        if self.num_classes == 2 and self.negative_class is not None:
            bag_logits, evidence_class = self._binary_logits(logits, probs, mask), scored[0]
            evidence = probs[..., evidence_class]
        else:
            bag_logits, pooled = class_score_logits(
                probs, mask, num_classes=self.num_classes, negative_class=self.negative_class,
                pooling=self.pooling, topk=self.topk,
            )
            top = torch.tensor(scored, device=logits.device)[pooled.argmax(dim=1)]  # [B]
            evidence = probs.gather(2, top.view(-1, 1, 1).expand(-1, probs.shape[1], 1)).squeeze(-1)
        evidence = evidence * mask
        valid = mask.unsqueeze(-1)
        extras = {} if self.negative_class is not None else {"instance_logits_full": logits * valid}
        return MILOutput(
            logits=bag_logits,
            attention=normalised_evidence(evidence, mask),
            instance_scores=evidence,
            instance_logits=logits[..., : self.num_classes] * valid,
            extras=extras,
        )

    def _binary_logits(self, logits: torch.Tensor, probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Binary bag logits `[B, 2]`: 0 for the negative class, the pooled positive margin for the other."""
        negative = self.negative_class
        positive = 1 - negative  # type: ignore[operator]
        if self.pooling == "max":
            margin = masked_max((logits[..., positive] - logits[..., negative]).unsqueeze(-1), mask)[:, 0]
        else:
            score = pool_instances(probs[..., positive : positive + 1], mask, self.pooling, self.topk)[:, 0]
            score = score.clamp(SCORE_FLOOR, 1.0 - SCORE_FLOOR)
            margin = torch.log(score) - torch.log1p(-score)
        zero = torch.zeros_like(margin)
        return torch.stack([zero, margin] if positive == 1 else [margin, zero], dim=1)


@register_model
def ins(in_dim: int, num_classes: int, **options: Any) -> INS:
    """INS instance classifier: bag prediction pools instance probabilities (train with --method ins)."""
    return INS(in_dim, num_classes, **options)
