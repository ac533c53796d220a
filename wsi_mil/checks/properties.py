"""Cheap MIL property checks on any contract model: insertion monotonicity, count and permutation
invariance. Each returns a `PropertyResult` with the worst violation found.

* Insertion monotonicity (standard MIL): adding an instance never lowers the positive score.
  Inserted: a background draw N(0, I), a far outlier (the poison cluster at -10·1) and an
  instance taken from another bag, each at a random position.
* Count invariance (presence-based MIL): duplicating an instance of the bag leaves the positive
  score unchanged.
* Permutation invariance: shuffling the instances leaves every logit unchanged.

The model runs in eval mode without gradients; its training mode is restored afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from wsi_mil.checks.generators import POISON_MEAN, POISON_STD
from wsi_mil.checks.runner import forward_output, positive_score
from wsi_mil.errors import MilCheckError
from wsi_mil.models.layers import pad_sequences

DEFAULT_TOLERANCE = 1e-4


@dataclass(frozen=True)
class PropertyResult:
    """Outcome of one property check.

    Attributes:
        name: the property.
        passed: whether `worst_violation <= tolerance`.
        worst_violation: the largest violation over all trials (0 when none), in score units.
        tolerance: the allowed slack.
        trials: how many modified bags were scored.
        worst_by_case: the worst violation per kind of modification (e.g. per inserted instance).
    """

    name: str
    passed: bool
    worst_violation: float
    tolerance: float
    trials: int
    worst_by_case: dict[str, float] = field(default_factory=dict)

    def __str__(self) -> str:
        status = "ok" if self.passed else "VIOLATED"
        cases = ", ".join(f"{k}: {v:.3g}" for k, v in self.worst_by_case.items())
        return f"{self.name}: {status} (worst {self.worst_violation:.3g}; {cases})"


@torch.no_grad()
def _logits(model: nn.Module, bags: Sequence[torch.Tensor]) -> torch.Tensor:
    """Bag logits `[B, C]` of a padded batch (eval mode, float32 on the CPU)."""
    device = next(model.parameters(), torch.empty(0)).device
    x, mask = pad_sequences(bags)
    return forward_output(model, x.to(device), mask.to(device)).logits.float().cpu()


def _in_eval(fn: Callable[[], PropertyResult], model: nn.Module) -> PropertyResult:
    was_training = model.training
    model.eval()
    try:
        return fn()
    finally:
        model.train(was_training)


def _check_bags(bags: Sequence[torch.Tensor], *, need: int = 1) -> None:
    if len(bags) < need or any(b.dim() != 2 or b.shape[0] == 0 for b in bags):
        raise MilCheckError(
            f"property checks need at least {need} non-empty bag(s) of shape [N, D]; "
            "pass bags= e.g. make_bags(...).bags"
        )


def _insert(bag: torch.Tensor, instance: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """`bag` `[N, D]` with `instance` `[D]` inserted at a random position -> `[N + 1, D]`."""
    position = int(torch.randint(0, bag.shape[0] + 1, (1,), generator=generator))
    return torch.cat([bag[:position], instance.unsqueeze(0), bag[position:]])


def _result(name: str, worst: dict[str, float], tolerance: float, trials: int) -> PropertyResult:
    overall = max(worst.values(), default=0.0)
    return PropertyResult(name, overall <= tolerance, overall, tolerance, trials, worst)


def check_insertion_monotonicity(
    model: nn.Module,
    bags: Sequence[torch.Tensor],
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    seed: int = 0,
) -> PropertyResult:
    """Worst drop of the positive score when one instance is inserted into a bag `[N, D]`.

    Cases: `background` (N(0, I)), `far_outlier` (the poison cluster) and `other_bag` (an
    instance of the next bag in `bags`). Needs binary logits.
    """
    _check_bags(bags, need=2)
    generator = torch.Generator().manual_seed(seed)
    dim = bags[0].shape[1]

    def run() -> PropertyResult:
        base = positive_score(_logits(model, bags))
        worst: dict[str, float] = {}
        for case in ("background", "far_outlier", "other_bag"):
            grown = []
            for i, bag in enumerate(bags):
                if case == "background":
                    instance = torch.randn(dim, generator=generator)
                elif case == "far_outlier":
                    instance = torch.randn(dim, generator=generator) * POISON_STD + POISON_MEAN
                else:
                    donor = bags[(i + 1) % len(bags)]
                    instance = donor[int(torch.randint(0, donor.shape[0], (1,), generator=generator))]
                grown.append(_insert(bag, instance.to(bag.dtype), generator))
            drop = base - positive_score(_logits(model, grown))
            worst[case] = max(float(drop.max()), 0.0)
        return _result("insertion monotonicity", worst, tolerance, 3 * len(bags))

    return _in_eval(run, model)


def check_count_invariance(
    model: nn.Module,
    bags: Sequence[torch.Tensor],
    *,
    copies: Sequence[int] = (1, 10),
    tolerance: float = DEFAULT_TOLERANCE,
    seed: int = 0,
) -> PropertyResult:
    """Worst change of the positive score when a random instance of each bag gets `k` extra copies.

    One case per entry of `copies` (`copies_1`, `copies_10`); needs binary logits.
    """
    _check_bags(bags)
    generator = torch.Generator().manual_seed(seed)

    def run() -> PropertyResult:
        base = positive_score(_logits(model, bags))
        worst: dict[str, float] = {}
        for count in copies:
            grown = []
            for bag in bags:
                instance = bag[int(torch.randint(0, bag.shape[0], (1,), generator=generator))]
                for _ in range(count):
                    bag = _insert(bag, instance, generator)
                grown.append(bag)
            change = (positive_score(_logits(model, grown)) - base).abs()
            worst[f"copies_{count}"] = float(change.max())
        return _result("count invariance", worst, tolerance, len(copies) * len(bags))

    return _in_eval(run, model)


def check_permutation_invariance(
    model: nn.Module,
    bags: Sequence[torch.Tensor],
    *,
    permutations: int = 3,
    tolerance: float = DEFAULT_TOLERANCE,
    seed: int = 0,
) -> PropertyResult:
    """Worst absolute change of any logit `[B, C]` when each bag's instances are shuffled."""
    _check_bags(bags)
    generator = torch.Generator().manual_seed(seed)

    def run() -> PropertyResult:
        base = _logits(model, bags)
        worst = 0.0
        for _ in range(permutations):
            shuffled = [b[torch.randperm(b.shape[0], generator=generator)] for b in bags]
            worst = max(worst, float((_logits(model, shuffled) - base).abs().max()))
        return _result(
            "permutation invariance", {"shuffle": worst}, tolerance, permutations * len(bags)
        )

    return _in_eval(run, model)


def check_properties(
    model: nn.Module, bags: Sequence[torch.Tensor], *, tolerance: float = DEFAULT_TOLERANCE, seed: int = 0
) -> list[PropertyResult]:
    """All three property checks on the same bags."""
    return [
        check_insertion_monotonicity(model, bags, tolerance=tolerance, seed=seed),
        check_count_invariance(model, bags, tolerance=tolerance, seed=seed),
        check_permutation_invariance(model, bags, tolerance=tolerance, seed=seed),
    ]
