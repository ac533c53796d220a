"""The trainer's input pipeline: the bags of a run read once into memory (`BagStore`), each epoch's
order (shuffled or class-balanced, optionally grouped by bag size), a per-bag random cap on
instances, the steps built on the training device (padded batches with masks, or the bags of a
step one by one), a background thread that builds the next steps while the model trains, and
class weights.

Two ways to run a step of several bags: *padded* (one `[B, N_max, D]` tensor, one forward; what a
GPU wants) or *per bag* (each bag through the model on its own, the losses combined as the padded
batch's mean; no padded position is ever computed, and on a CPU, where the step is compute-bound,
that is what makes a batch of bags as cheap as its bags).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator, Sequence
from typing import TypeVar, overload

import torch

from wsi_mil.models.layers import pad_sequences
from wsi_mil.training.bag import Bag
from wsi_mil.training.methods.base import Batch, StepResult

log = logging.getLogger(__name__)

T = TypeVar("T")

#: bags sorted together by size when batches are grouped by size: this many batches' worth
GROUP_BATCHES = 64


def pad_bags(
    bags: Sequence[Bag], *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> Batch:
    """Stack bags into `features [B, N_max, D]` zero-padded, `mask [B, N_max]`, `labels [B]` and
    `instance_index [B, N_max]` (each instance's position in its slide, -1 on padding).

    Built on `device` at `dtype` (default: where and as the bags are), so each bag is copied once
    and padded there.
    """
    if not bags:
        raise ValueError("cannot batch zero bags")
    if min(bag.features.shape[0] for bag in bags) < 1:
        raise ValueError("every bag needs at least one instance")
    features, mask = pad_sequences([bag.features for bag in bags], dtype=dtype, device=device)
    labels = torch.tensor([bag.label for bag in bags], dtype=torch.long, device=features.device)
    positions = torch.full(mask.shape, -1, dtype=torch.long, device=features.device)
    for i, bag in enumerate(bags):
        positions[i, : bag.features.shape[0]] = bag.positions().to(features.device)
    return Batch(features, mask, labels, [bag.slide_id for bag in bags], instance_index=positions)


def padded_batches(
    bags: Sequence[Bag], *, batch_size: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> Iterator[Batch]:
    """Consecutive groups of `batch_size` bags (the last may be smaller), padded with masks."""
    for start in range(0, len(bags), batch_size):
        yield pad_bags([bags[i] for i in range(start, min(start + batch_size, len(bags)))], device=device, dtype=dtype)


def single_bag_batch(bag: Bag, *, device: torch.device | str, dtype: torch.dtype = torch.float32) -> Batch:
    """One bag as a `[1, N, D]` batch without padding or mask (a view when it is already there)."""
    features = bag.features.to(device, dtype, non_blocking=True).unsqueeze(0)
    labels = torch.tensor([bag.label], dtype=torch.long, device=features.device)
    mask = torch.ones(features.shape[:2], dtype=torch.bool, device=features.device)
    positions = bag.positions().to(features.device).unsqueeze(0)
    return Batch(features, mask, labels, [bag.slide_id], instance_index=positions)


def bagwise_steps(
    bags: Sequence[Bag], *, batch_size: int, device: torch.device | str, dtype: torch.dtype = torch.float32
) -> Iterator[list[Batch]]:
    """Consecutive groups of `batch_size` bags, each bag its own unpadded one-bag batch."""
    for start in range(0, len(bags), batch_size):
        yield [single_bag_batch(bags[i], device=device, dtype=dtype) for i in range(start, min(start + batch_size, len(bags)))]


def unpadded_rows(batch: Batch) -> list[Batch]:
    """The rows of a padded batch as one-bag batches, cut to their valid length (views, no copy).

    Valid positions must come first in each row, as `pad_sequences` lays them out.
    """
    sizes = batch.mask.sum(dim=1).tolist()
    return [
        Batch(batch.features[b : b + 1, :n], batch.mask[b : b + 1, :n], batch.labels[b : b + 1],
              batch.slide_ids[b : b + 1], None if batch.soft_labels is None else batch.soft_labels[b : b + 1],
              None if batch.instance_index is None else batch.instance_index[b : b + 1, :n])
        for b, n in enumerate(sizes)
    ]


def bag_shares(labels: torch.Tensor, class_weights: torch.Tensor | None) -> list[float]:
    """Each bag's share of a batch's mean loss: 1/B, or its class weight over the batch's sum of
    class weights (what `cross_entropy(weight=...)` gives the padded batch)."""
    if class_weights is None:
        return [1.0 / len(labels)] * len(labels)
    weights = class_weights.to(labels.device)[labels].double()
    return (weights / weights.sum()).tolist()


def combine_results(results: Sequence[StepResult], shares: Sequence[float]) -> StepResult:
    """The per-bag results of one step as one: loss and every term weighted by the bag's share.

    The `output` is the first bag's (the trainer uses only the loss and the terms).
    """
    loss = torch.stack([share * result.loss.float() for result, share in zip(results, shares, strict=True)]).sum()
    names = dict.fromkeys(name for result in results for name in result.terms)
    terms = {
        name: sum(share * result.terms.get(name, 0.0) for result, share in zip(results, shares, strict=True))
        for name in names
    }
    return StepResult(loss, results[0].output, terms)


def size_grouped_order(
    order: Sequence[int], sizes: Sequence[int], *, batch_size: int, generator: torch.Generator,
    group_batches: int = GROUP_BATCHES,
) -> list[int]:
    """Reorder an epoch so that each batch holds bags of similar size, with little padding.

    The order is cut into groups of `group_batches · batch_size` bags; each group is sorted by
    bag size (ties keep their random order) and cut into batches; the full batches are shuffled
    and the one smaller batch, if any, stays last, so consecutive `batch_size` chunks are the batches.
    """
    batches: list[list[int]] = []
    span = batch_size * group_batches
    for start in range(0, len(order), span):
        group = sorted(order[start : start + span], key=lambda index: sizes[index])
        batches.extend(group[i : i + batch_size] for i in range(0, len(group), batch_size))
    last = [batches.pop()] if len(batches[-1]) < batch_size else []
    shuffled = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    return [index for batch in shuffled + last for index in batch]


class BagStore(Sequence[Bag]):
    """The bags of a run, each read once and kept in memory at its stored dtype (e.g. float16).

    Bags are read through `bags.stored_bag(i)` when the sequence has it (a cohort reads the file
    without converting it to float32), else `bags[i]`. On CUDA the features sit in pinned memory,
    so the copy of a step's bags to the GPU is asynchronous. `sizes` and `labels` are known
    without touching the features.
    """

    def __init__(self, bags: Sequence[Bag], *, pin_memory: bool = False) -> None:
        read = getattr(bags, "stored_bag", None) or bags.__getitem__
        self.bags: list[Bag] = []
        for index in range(len(bags)):
            bag = read(index)
            features = bag.features.contiguous()
            self.bags.append(Bag(features.pin_memory() if pin_memory else features, bag.label, bag.slide_id, bag.instance_index))
        self.sizes = [bag.features.shape[0] for bag in self.bags]
        self.labels = [bag.label for bag in self.bags]
        self.nbytes = sum(bag.features.nbytes for bag in self.bags)
        log.info("feature cache: %d bags, %.2f GB%s", len(self.bags), self.nbytes / 1e9, " (pinned)" if pin_memory else "")

    def __len__(self) -> int:
        return len(self.bags)

    @overload
    def __getitem__(self, index: int) -> Bag: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[Bag]: ...
    def __getitem__(self, index: int | slice) -> Bag | Sequence[Bag]:
        return self.bags[index]


class _Done:
    """End of a prefetched iterator (or the exception that ended it)."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.error = error


def prefetched(items: Iterator[T], *, depth: int) -> Iterator[T]:
    """Yield `items` while a background thread produces up to `depth` of them ahead.

    The items come in their order; an exception in the producer is raised here; leaving the loop
    early stops the producer. `depth` 0 yields `items` as they are, in this thread.
    """
    if depth < 1:
        yield from items
        return
    ready: queue.Queue[T | _Done] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        end = _Done()
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        ready.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        except BaseException as err:  # handed to the consumer, which raises it
            end = _Done(err)
        ready.put(end)

    worker = threading.Thread(target=produce, name="wsi-mil-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            item = ready.get()
            if isinstance(item, _Done):
                if item.error is not None:
                    raise item.error
                return
            yield item
    finally:
        stop.set()
        while worker.is_alive():
            try:
                ready.get(timeout=0.1)
            except queue.Empty:
                continue


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
    """One epoch's view of the training bags: its order, and a random instance cap per bag (a cut
    bag carries the kept instances' positions as `instance_index`).

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
        return Bag(bag.features[keep], bag.label, bag.slide_id, bag.positions()[keep])


def class_balanced_order(
    labels: Sequence[int],
    *,
    batch_size: int,
    generator: torch.Generator,
    sizes: Sequence[int] | None = None,
    group_batches: int = GROUP_BATCHES,
) -> list[int]:
    """One epoch of `len(labels)` bag indices whose consecutive `batch_size` chunks are class-balanced.

    Each batch holds `batch_size // C` bags of each of the C classes present, and one more of
    `batch_size % C` classes drawn at random per batch (the one smaller last batch likewise). Each
    class's bags come in a fresh random order, cycling when used up, so minority bags repeat within
    an epoch as evenly as possible. With `sizes`, each group of `group_batches` batches hands every
    class's bags out in order of size (batch k of the group gets the k-th smallest share of each
    class), and the full batches are shuffled with the smaller one last, as `size_grouped_order`.
    """
    present = sorted(set(labels))
    by_class = {c: [i for i, label in enumerate(labels) if label == c] for c in present}
    queues: dict[int, list[int]] = {c: [] for c in present}

    def draw(c: int, count: int) -> list[int]:
        while len(queues[c]) < count:
            queues[c] += [by_class[c][i] for i in torch.randperm(len(by_class[c]), generator=generator).tolist()]
        taken, queues[c] = queues[c][:count], queues[c][count:]
        return taken

    total = len(labels)
    lengths = [min(batch_size, total - start) for start in range(0, total, batch_size)]
    quotas = []  # per batch, how many bags of each class
    for length in lengths:
        extra = set(torch.randperm(len(present), generator=generator)[: length % len(present)].tolist())
        quotas.append({c: length // len(present) + (k in extra) for k, c in enumerate(present)})
    batches: list[list[int]] = []
    span = group_batches if sizes is not None else 1
    for start in range(0, len(quotas), span):
        group = quotas[start : start + span]
        members = {c: draw(c, sum(q[c] for q in group)) for c in present}
        if sizes is not None:
            members = {c: sorted(drawn, key=lambda index: sizes[index]) for c, drawn in members.items()}
        for quota in group:
            batch = []
            for c in present:
                batch += members[c][: quota[c]]
                members[c] = members[c][quota[c] :]
            batches.append(batch)
    if sizes is not None:
        last = [batches.pop()] if len(batches[-1]) < batch_size else []
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()] + last
    return [index for batch in batches for index in batch]
