"""The input pipeline: padding with masks, per-bag steps, size-grouped batches, the feature store,
prefetching, the per-bag instance cap, class weights, the balanced sampler and class-balanced batches."""

from __future__ import annotations

import threading

import pytest
import torch

from wsi_mil.models import create_model
from wsi_mil.training.bag import Bag
from wsi_mil.training.batching import (
    BagStore,
    EpochBags,
    bag_shares,
    bagwise_steps,
    balanced_sample_weights,
    class_balanced_order,
    combine_results,
    epoch_order,
    inverse_frequency_class_weights,
    pad_bags,
    padded_batches,
    prefetched,
    size_grouped_order,
    unpadded_rows,
)
from wsi_mil.training.methods import create_method


def _bags(sizes: list[int], labels: list[int] | None = None) -> list[Bag]:
    labels = labels or [i % 2 for i in range(len(sizes))]
    return [Bag(torch.arange(n * 3, dtype=torch.float32).reshape(n, 3) + 100 * i, labels[i], f"b{i}") for i, n in enumerate(sizes)]


def test_pad_bags_zero_pads_and_masks():
    batch = pad_bags(_bags([2, 4, 1]))
    assert batch.features.shape == (3, 4, 3)
    assert batch.mask.tolist() == [[True, True, False, False], [True] * 4, [True, False, False, False]]
    assert batch.features[0, 2:].abs().sum() == 0
    assert batch.labels.tolist() == [0, 1, 0]
    assert batch.slide_ids == ["b0", "b1", "b2"]
    torch.testing.assert_close(batch.features[1], _bags([2, 4])[1].features)


def test_padded_batches_give_the_same_model_output_as_single_bags():
    torch.manual_seed(0)
    model = create_model("abmil", 3, 2).eval()
    bags = _bags([5, 2, 7, 3, 1])
    batches = list(padded_batches(bags, batch_size=2))
    assert [len(b.slide_ids) for b in batches] == [2, 2, 1]
    batched = torch.cat([model(b.features, b.mask).logits for b in batches])
    single = torch.cat([model(bag.features.unsqueeze(0)).logits for bag in bags])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)


def test_instance_cap_draws_an_ordered_random_subset_per_bag():
    bags = _bags([50, 8, 50])
    epoch = EpochBags(bags, [0, 1, 2], max_instances=10, generator=torch.Generator().manual_seed(0))
    capped = [epoch[i] for i in range(3)]
    assert [len(b.features) for b in capped] == [10, 8, 10]
    rows = capped[0].features[:, 0] / 3  # row index of each kept instance
    assert torch.all(rows[1:] > rows[:-1])  # original order kept
    assert not torch.equal(capped[0].features, capped[2].features - 200)  # independent draws per bag
    torch.testing.assert_close(epoch[0].features, capped[0].features)  # same subset on re-access
    other_epoch = EpochBags(bags, [0, 1, 2], max_instances=10, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(other_epoch[0].features, capped[0].features)
    assert EpochBags(bags, [2, 0], max_instances=None, generator=torch.Generator())[0] is bags[2]


def test_epoch_order_permutes_or_samples_with_weights():
    generator = torch.Generator().manual_seed(0)
    order = epoch_order(10, generator=generator)
    assert sorted(order) == list(range(10)) and order != list(range(10))
    assert epoch_order(4, generator=generator, shuffle=False) == [0, 1, 2, 3]
    labels = [0] * 90 + [1] * 10
    weights = balanced_sample_weights(labels, 2)
    drawn = [labels[i] for _ in range(50) for i in epoch_order(100, generator=generator, sample_weights=weights)]
    assert sum(drawn) / len(drawn) == pytest.approx(0.5, abs=0.03)


@pytest.mark.parametrize(("batch_size", "grouped"), [(8, False), (8, True), (5, True), (3, False)])
def test_class_balanced_batches_hold_every_class_equally_often(batch_size, grouped):
    labels = [0] * 60 + [1] * 6 + [2] * 3  # 1 : 10 : 20 imbalance
    sizes = [(7 * i) % 23 + 1 for i in range(len(labels))]
    generator = torch.Generator().manual_seed(0)
    order = class_balanced_order(labels, batch_size=batch_size, generator=generator, sizes=sizes if grouped else None)
    assert len(order) == len(labels)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in batches:
        counts = [sum(labels[i] == c for i in batch) for c in range(3)]
        assert max(counts) - min(counts) <= 1, counts  # B // C of each, the remainder one more
    # each class fills about a third of the epoch; minority bags repeat as evenly as possible
    per_class = [sum(labels[i] == c for i in order) for c in range(3)]
    assert all(abs(n - len(labels) / 3) <= len(batches) / 2 for n in per_class), per_class
    for members in (range(60, 66), range(66, 69)):
        repeats = [order.count(i) for i in members]
        assert max(repeats) - min(repeats) <= 1 and min(repeats) >= 2, repeats
    assert all(order.count(i) in (0, 1) for i in range(60))  # majority bags: a part of them, none twice
    assert order != class_balanced_order(labels, batch_size=batch_size, generator=torch.Generator().manual_seed(1))


def test_class_balanced_batches_grouped_by_size_pad_less():
    labels = [i % 2 for i in range(64)]
    sizes = [int(s) for s in torch.randint(1, 200, (64,), generator=torch.Generator().manual_seed(3))]

    def padding(order: list[int]) -> int:
        batches = [order[i : i + 8] for i in range(0, 64, 8)]
        return sum(8 * max(sizes[i] for i in b) - sum(sizes[i] for i in b) for b in batches)

    generator = torch.Generator().manual_seed(0)
    assert padding(class_balanced_order(labels, batch_size=8, generator=generator, sizes=sizes)) < 0.5 * padding(
        class_balanced_order(labels, batch_size=8, generator=generator)
    )


def test_class_weights_balance_the_loss():
    labels = [0] * 6 + [1] * 2
    weights = inverse_frequency_class_weights(labels, 3)
    torch.testing.assert_close(weights, torch.tensor([8 / 12, 8 / 4, 0.0]))
    method = create_method("plain")
    method.class_weights = weights[:2]
    torch.manual_seed(0)
    model = create_model("abmil", 3, 2).eval()
    batch = pad_bags(_bags([3, 4, 2, 5], labels=[0, 0, 1, 1]))
    output = model(batch.features, batch.mask)
    expected = torch.nn.functional.cross_entropy(output.logits, batch.labels, weight=weights[:2])
    assert method.compute_loss(model, batch, progress=0.0).terms["bag"] == pytest.approx(expected.item(), rel=1e-5)
    soft = torch.nn.functional.one_hot(batch.labels, 2).float()
    batch.soft_labels = soft
    assert method.compute_loss(model, batch, progress=0.0).terms["bag"] == pytest.approx(expected.item(), rel=1e-5)


def _grads(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("class_weights", [None, torch.tensor([0.5, 2.0])])
def test_a_per_bag_step_gives_the_padded_batchs_loss_and_gradients(class_weights):
    torch.manual_seed(0)
    model = create_model("abmil", 3, 2, dropout=0.0, attention_dropout=0.0)
    method = create_method("plain")
    method.class_weights = class_weights
    bags = [Bag(torch.randn(n, 3), label, f"b{n}") for n, label in ((5, 0), (2, 1), (7, 1), (3, 0))]
    padded = method.compute_loss(model, pad_bags(bags), progress=0.0)
    padded.loss.backward()
    expected = _grads(model)
    model.zero_grad()
    (step,) = list(bagwise_steps(bags, batch_size=4, device="cpu"))
    assert [b.features.shape[1] for b in step] == [5, 2, 7, 3]  # nothing padded
    labels = torch.cat([b.labels for b in step])
    combined = combine_results([method.compute_loss(model, b, progress=0.0) for b in step], bag_shares(labels, class_weights))
    combined.loss.backward()
    torch.testing.assert_close(combined.loss, padded.loss)
    assert combined.terms["bag"] == pytest.approx(padded.terms["bag"], rel=1e-5)
    for got, want in zip(_grads(model), expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_unpadded_rows_are_views_cut_to_each_bags_length():
    batch = pad_bags(_bags([2, 4, 1]))
    rows = unpadded_rows(batch)
    assert [r.features.shape for r in rows] == [(1, 2, 3), (1, 4, 3), (1, 1, 3)]
    assert all(r.mask.all() for r in rows) and [r.slide_ids for r in rows] == [["b0"], ["b1"], ["b2"]]
    assert rows[1].features.data_ptr() == batch.features[1].data_ptr()


def test_size_grouped_batches_pad_less_and_keep_every_bag_once():
    sizes = torch.randint(10, 1000, (200,), generator=torch.Generator().manual_seed(0)).tolist()
    order = torch.randperm(200, generator=torch.Generator().manual_seed(1)).tolist()
    grouped = size_grouped_order(order, sizes, batch_size=8, generator=torch.Generator().manual_seed(2), group_batches=5)
    assert sorted(grouped) == list(range(200))

    def padded_cost(indices: list[int]) -> int:
        return sum(8 * max(sizes[i] for i in indices[s : s + 8]) for s in range(0, len(indices), 8))

    assert padded_cost(grouped) < 0.8 * padded_cost(order)
    again = size_grouped_order(order, sizes, batch_size=8, generator=torch.Generator().manual_seed(2), group_batches=5)
    other = size_grouped_order(order, sizes, batch_size=8, generator=torch.Generator().manual_seed(3), group_batches=5)
    assert grouped == again and grouped != other
    odd = size_grouped_order(order[:13], sizes, batch_size=4, generator=torch.Generator(), group_batches=2)
    assert sorted(odd) == sorted(order[:13]) and odd[-1] in order[8:13]  # the smaller batch stays last


def test_the_store_reads_each_bag_once_at_its_dtype_and_knows_sizes_and_labels():
    reads: list[int] = []

    class Counting(list):
        def __getitem__(self, index):
            reads.append(index)
            return super().__getitem__(index)

    source = Counting(Bag(torch.randn(n, 4).half(), n % 2, f"s{n}") for n in (3, 5, 2))
    store = BagStore(source)
    assert reads == [0, 1, 2] and store.sizes == [3, 5, 2] and store.labels == [1, 1, 0]
    assert store[1].features.dtype == torch.float16 and store.nbytes == 10 * 4 * 2
    epoch = EpochBags(store, [2, 0, 1, 0], max_instances=None, generator=torch.Generator())
    batch = pad_bags([epoch[i] for i in range(4)], dtype=torch.float32)
    assert batch.features.dtype == torch.float32 and reads == [0, 1, 2]
    torch.testing.assert_close(batch.features[0, :2], source[2].features.float())


def test_prefetched_keeps_the_order_raises_the_producers_error_and_stops_early():
    assert list(prefetched(iter(range(50)), depth=3)) == list(range(50))
    assert list(prefetched(iter(range(5)), depth=0)) == list(range(5))
    threads: list[str] = []

    def items():
        for i in range(100):
            threads.append(threading.current_thread().name)
            yield i

    for i in prefetched(items(), depth=2):
        if i == 3:
            break
    assert set(threads) == {"wsi-mil-prefetch"} and len(threads) <= 7  # built ahead, then stopped

    def broken():
        yield 1
        raise RuntimeError("bad bag")

    with pytest.raises(RuntimeError, match="bad bag"):
        list(prefetched(broken(), depth=2))


def test_instance_positions_survive_the_cap_padding_and_per_bag_steps():
    bags = _bags([100, 4])
    epoch = EpochBags(bags, [0, 1], max_instances=10, generator=torch.Generator().manual_seed(0))
    cut, whole = epoch[0], epoch[1]
    rows = (cut.features[:, 0] / 3).long()  # each kept row's position, read from its features
    assert torch.equal(cut.instance_index, rows) and whole.instance_index is None
    batch = pad_bags([cut, whole])
    assert batch.instance_index.tolist() == [rows.tolist(), [0, 1, 2, 3] + [-1] * 6]
    assert torch.equal(batch.to("cpu").instance_index, batch.instance_index)
    assert [r.instance_index.tolist() for r in unpadded_rows(batch)] == [[rows.tolist()], [[0, 1, 2, 3]]]
    (step,) = list(bagwise_steps([cut, whole], batch_size=2, device="cpu"))
    assert [b.instance_index.tolist() for b in step] == [[rows.tolist()], [[0, 1, 2, 3]]]
    again = EpochBags([cut], [0], max_instances=5, generator=torch.Generator().manual_seed(1))[0]
    assert set(again.instance_index.tolist()) <= set(rows.tolist())  # a cut of a cut keeps slide positions
    assert torch.equal(BagStore([cut]).bags[0].instance_index, rows)
