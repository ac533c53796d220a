"""Synthetic bags for the algorithmic MIL unit tests of Raff & Holt (NeurIPS 2023).

Three tests, each with a train and a test split whose distributions differ on purpose:

* ``single-concept``: one positive concept that overlaps the background; a far "poison" cluster
  sits in negative bags at train time and in positive bags at test time.
* ``threshold-poisoned``: positive iff concepts A *and* B are present; same poison trap.
* ``false-frequency``: positive iff A and B are present; test negatives are flooded with 35-44
  instances of one concept.

Each also has a *control*: the same task without its trap (no poison; for false-frequency, test
negatives with a single concept instance), which tells whether a model can represent the concept.

Fixed with respect to torchmil's generators: every draw comes from an explicit `torch.Generator`
seeded from `(seed, test, split, control)`, the concept of a false-frequency negative is drawn
uniformly from {A, B}, and instances (and bags) are shuffled, so the poison has no fixed position.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Literal

import numpy as np
import torch

from wsi_mil.checks.names import CHECK_NAMES, FALSE_FREQUENCY, SINGLE_CONCEPT, THRESHOLD_POISONED
from wsi_mil.errors import MilCheckError

Split = Literal["train", "test"]

DEFAULT_DIM = 8
DEFAULT_NUM_BAGS = 500
DEFAULT_BACKGROUND_SIZE = 10

POISON_MEAN = -10.0
POISON_STD = 0.1
CONCEPT_A_MEAN = 2.0
CONCEPT_B_MEAN = 3.0
CONCEPT_STD = 0.1
FLOOD_RANGE = (35, 44)  # inclusive bounds of the number of concept copies in flooded test negatives


class InstanceKind(IntEnum):
    """What generated an instance; kept for analysis, never shown to a model."""

    POISON = -1
    BACKGROUND = 0
    CONCEPT_A = 1  # also the single concept P of the single-concept test
    CONCEPT_B = 2


@dataclass(frozen=True)
class MILBags:
    """A list of bags with bag labels and per-instance kinds.

    Attributes:
        bags: one `[N_i, D]` float tensor per bag.
        labels: `[num_bags]` long tensor, 1 = positive, 0 = negative.
        instance_kinds: one `[N_i]` long tensor per bag with `InstanceKind` codes
            (> 0 marks concept instances, -1 poison, 0 background).
    """

    bags: list[torch.Tensor]
    labels: torch.Tensor
    instance_kinds: list[torch.Tensor]

    def __len__(self) -> int:
        return len(self.bags)

    @property
    def dim(self) -> int:
        """The feature width D."""
        return int(self.bags[0].shape[1])


class _Sampler:
    """Gaussian and integer draws from one explicit `torch.Generator`."""

    def __init__(self, dim: int, generator: torch.Generator) -> None:
        self.dim = dim
        self.generator = generator

    def integer(self, low: int, high: int) -> int:
        """A uniform integer in `[low, high]` (both inclusive)."""
        return int(torch.randint(low, high + 1, (1,), generator=self.generator).item())

    def gaussian(self, count: int, mean: float, std: float) -> torch.Tensor:
        """`count` draws from N(mean·1, std²·I) -> `[count, D]`."""
        noise = torch.randn(count, self.dim, generator=self.generator)
        return noise * std + mean

    def background(self, count: int) -> torch.Tensor:
        return self.gaussian(count, 0.0, 1.0)

    def poison(self) -> torch.Tensor:
        return self.gaussian(1, POISON_MEAN, POISON_STD)

    def concept(self, kind: InstanceKind, count: int) -> torch.Tensor:
        mean = CONCEPT_A_MEAN if kind is InstanceKind.CONCEPT_A else CONCEPT_B_MEAN
        return self.gaussian(count, mean, CONCEPT_STD)

    def single_concept(self, count: int) -> torch.Tensor:
        """The single-concept positive P: an equal mixture of N(0, 3²I) and N(1, I), per instance."""
        wide = self.gaussian(count, 0.0, 3.0)
        narrow = self.gaussian(count, 1.0, 1.0)
        pick_wide = torch.rand(count, 1, generator=self.generator) < 0.5
        return torch.where(pick_wide, wide, narrow)


class _BagBuilder:
    """Collects the parts of one bag, then shuffles its instances."""

    def __init__(self) -> None:
        self.parts: list[torch.Tensor] = []
        self.kinds: list[torch.Tensor] = []

    def add(self, instances: torch.Tensor, kind: InstanceKind) -> None:
        self.parts.append(instances)
        self.kinds.append(torch.full((instances.shape[0],), int(kind), dtype=torch.long))

    def build(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """The bag `[N, D]` and its kinds `[N]`, in a random order."""
        bag = torch.cat(self.parts)
        kinds = torch.cat(self.kinds)
        order = torch.randperm(bag.shape[0], generator=generator)
        return bag[order], kinds[order]


def _single_concept_bag(
    sampler: _Sampler, positive: bool, *, train: bool, trap: bool, background_size: int
) -> _BagBuilder:
    builder = _BagBuilder()
    if positive:
        builder.add(sampler.single_concept(sampler.integer(1, 3)), InstanceKind.CONCEPT_A)
    builder.add(sampler.background(background_size), InstanceKind.BACKGROUND)
    if trap and positive != train:
        builder.add(sampler.poison(), InstanceKind.POISON)
    return builder


def _threshold_poisoned_bag(
    sampler: _Sampler, positive: bool, *, train: bool, trap: bool, background_size: int
) -> _BagBuilder:
    builder = _BagBuilder()
    if positive:
        copies = sampler.integer(1, 3)
        builder.add(sampler.concept(InstanceKind.CONCEPT_A, copies), InstanceKind.CONCEPT_A)
        builder.add(sampler.concept(InstanceKind.CONCEPT_B, copies), InstanceKind.CONCEPT_B)
    else:
        kind = InstanceKind.CONCEPT_A if sampler.integer(0, 1) == 0 else InstanceKind.CONCEPT_B
        builder.add(sampler.concept(kind, 1), kind)
    builder.add(sampler.background(sampler.integer(1, 9)), InstanceKind.BACKGROUND)
    if trap and positive != train:
        builder.add(sampler.poison(), InstanceKind.POISON)
    return builder


def _false_frequency_bag(
    sampler: _Sampler, positive: bool, *, train: bool, trap: bool, background_size: int
) -> _BagBuilder:
    builder = _BagBuilder()
    if positive:
        builder.add(sampler.concept(InstanceKind.CONCEPT_A, 1), InstanceKind.CONCEPT_A)
        builder.add(sampler.concept(InstanceKind.CONCEPT_B, 1), InstanceKind.CONCEPT_B)
    else:
        kind = InstanceKind.CONCEPT_A if sampler.integer(0, 1) == 0 else InstanceKind.CONCEPT_B
        flooded = trap and not train
        copies = sampler.integer(*FLOOD_RANGE) if flooded else 1
        builder.add(sampler.concept(kind, copies), kind)
    builder.add(sampler.background(sampler.integer(1, 9)), InstanceKind.BACKGROUND)
    return builder


_BagFn = Callable[..., _BagBuilder]
_BAG_FNS: dict[str, _BagFn] = {
    SINGLE_CONCEPT: _single_concept_bag,
    THRESHOLD_POISONED: _threshold_poisoned_bag,
    FALSE_FREQUENCY: _false_frequency_bag,
}


def resolve_check_names(tests: str | Sequence[str]) -> tuple[str, ...]:
    """Normalise `"all"`, a comma-separated string or a list of names to canonical test names.

    Underscores are accepted in place of hyphens (`single_concept`).
    """
    names = tests.split(",") if isinstance(tests, str) else list(tests)
    names = [n.strip().lower().replace("_", "-") for n in names if n.strip()]
    if not names or names == ["all"]:
        return CHECK_NAMES
    unknown = [n for n in names if n not in CHECK_NAMES]
    if unknown:
        raise MilCheckError(
            f"unknown MIL check(s) {unknown}; set --tests / tests= to 'all' or a comma-separated "
            f"subset of {', '.join(CHECK_NAMES)}"
        )
    return tuple(n for n in CHECK_NAMES if n in names)


def data_seed(test: str, split: Split, *, seed: int, control: bool) -> int:
    """The generator seed of one (test, split, control) dataset: independent streams per part."""
    parts = [seed, CHECK_NAMES.index(test), 0 if split == "train" else 1, int(control)]
    return int(np.random.SeedSequence(parts).generate_state(1, dtype=np.uint64)[0] >> 1)


def make_bags(
    test: str,
    split: Split,
    *,
    seed: int = 0,
    num_bags: int = DEFAULT_NUM_BAGS,
    dim: int = DEFAULT_DIM,
    background_size: int = DEFAULT_BACKGROUND_SIZE,
    control: bool = False,
) -> MILBags:
    """Generate one split of one MIL check: exactly `num_bags // 2` positive bags, shuffled.

    `control=True` removes the test's trap (the poison; for false-frequency the flooding of
    test negatives). `background_size` is the fixed background count B of `single-concept`;
    the other tests draw 1-9 background instances per bag.
    """
    (test,) = resolve_check_names([test])
    if split not in ("train", "test"):
        raise MilCheckError(f"split must be 'train' or 'test', got {split!r}")
    if num_bags < 2:
        raise MilCheckError(f"num_bags must be at least 2 (one bag per class), got {num_bags}")
    generator = torch.Generator().manual_seed(data_seed(test, split, seed=seed, control=control))
    sampler = _Sampler(dim, generator)
    bag_fn = _BAG_FNS[test]
    num_positive = num_bags // 2
    labels = torch.tensor([1] * num_positive + [0] * (num_bags - num_positive), dtype=torch.long)
    labels = labels[torch.randperm(num_bags, generator=generator)]
    bags: list[torch.Tensor] = []
    kinds: list[torch.Tensor] = []
    for label in labels.tolist():
        builder = bag_fn(
            sampler,
            bool(label),
            train=split == "train",
            trap=not control,
            background_size=background_size,
        )
        bag, bag_kinds = builder.build(generator)
        bags.append(bag)
        kinds.append(bag_kinds)
    return MILBags(bags=bags, labels=labels, instance_kinds=kinds)
