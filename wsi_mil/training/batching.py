"""Batching of bags: one bag per step (the official setting) or padded batches with masks, a
per-bag random cap on instances for training, class weights and a class-balanced sampler.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import overload

import torch

from wsi_mil.models.layers import pad_sequences
from wsi_mil.training.methods.base import Bag, Batch


def pad_bags(bags: Sequence[Bag]) -> Batch:
    """Stack bags into `features [B, N_max, D]` zero-padded, `mask [B, N_max]`, `labels [B]`."""
    if not bags:
        raise ValueError("cannot batch zero bags")
    if min(bag.features.shape[0] for bag in bags) < 1:
        raise ValueError("every bag needs at least one instance")
    features, mask = pad_sequences([bag.features for bag in bags])
    labels = torch.tensor([bag.label for bag in bags], dtype=torch.long)
    return Batch(features, mask, labels, [bag.slide_id for bag in bags])


def padded_batches(bags: Sequence[Bag], *, batch_size: int) -> Iterator[Batch]:
    """Consecutive groups of `batch_size` bags (the last may be smaller), padded with masks."""
    for start in range(0, len(bags), batch_size):
        yield pad_bags([bags[i] for i in range(start, min(start + batch_size, len(bags)))])


def random_instance_subset(num_instances: int, max_instances: int, generator: torch.Generator) -> torch.Tensor:
    """Indices of a uniform random subset of `max_instances` instances, in their original order."""
    chosen = torch.randperm(num_instances, generator=generator)[:max_instances]
    return chosen.sort().values


def class_counts(labels: Sequence[int], num_classes: int) -> torch.Tensor:
    """Number of bags per class `[C]`."""
    return torch.bincount(torch.as_tensor(list(labels), dtype=torch.long), minlength=num_classes)


def inverse_frequency_class_weights(labels: Sequence[int], num_classes: int) -> torch.Tensor:
    """Loss weights `[C]` = n / (C_present * n_c), so every class weighs the same in the loss;
    absent classes get 0."""
    counts = class_counts(labels, num_classes).double()
    present = int((counts > 0).sum())
    weights = len(labels) / (present * counts.clamp_min(1.0))
    return torch.where(counts > 0, weights, torch.zeros_like(weights)).float()


def balanced_sample_weights(labels: Sequence[int], num_classes: int) -> torch.Tensor:
    """Per-bag sampling weights `[M]` = 1 / n_(class of bag): each class is drawn equally often."""
    counts = class_counts(labels, num_classes).double()
    return (1.0 / counts[torch.as_tensor(list(labels), dtype=torch.long)]).float()


def epoch_order(
    num_bags: int,
    *,
    generator: torch.Generator,
    shuffle: bool = True,
    sample_weights: torch.Tensor | None = None,
) -> list[int]:
    """The bag indices of one epoch: a permutation, or `num_bags` weighted draws with replacement."""
    if sample_weights is not None:
        return torch.multinomial(sample_weights.double(), num_bags, replacement=True, generator=generator).tolist()
    if shuffle:
        return torch.randperm(num_bags, generator=generator).tolist()
    return list(range(num_bags))


class EpochBags(Sequence[Bag]):
    """One epoch's view of the training bags: its order, and a random instance cap per bag.

    Each position draws its subset from its own seed (taken from the epoch generator up front),
    so a bag's subset does not depend on which other bags were loaded or in what order.
    """

    def __init__(
        self,
        bags: Sequence[Bag],
        order: Sequence[int],
        *,
        max_instances: int | None,
        generator: torch.Generator,
    ) -> None:
        self.bags = bags
        self.order = list(order)
        self.max_instances = max_instances
        self.seeds = torch.randint(0, 2**62, (len(self.order),), generator=generator).tolist()

    def __len__(self) -> int:
        return len(self.order)

    @overload
    def __getitem__(self, index: int) -> Bag: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[Bag]: ...
    def __getitem__(self, index: int | slice) -> Bag | Sequence[Bag]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        bag = self.bags[self.order[index]]
        num_instances = bag.features.shape[0]
        if self.max_instances is None or num_instances <= self.max_instances:
            return bag
        generator = torch.Generator().manual_seed(self.seeds[index])
        keep = random_instance_subset(num_instances, self.max_instances, generator)
        return Bag(bag.features[keep], bag.label, bag.slide_id)
