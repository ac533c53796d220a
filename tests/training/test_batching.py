"""Batching: padding with masks, the per-bag instance cap, class weights and the balanced sampler."""

from __future__ import annotations

import pytest
import torch

from wsi_mil.models import create_model
from wsi_mil.training.bag import Bag
from wsi_mil.training.batching import (
    EpochBags,
    balanced_sample_weights,
    epoch_order,
    inverse_frequency_class_weights,
    pad_bags,
    padded_batches,
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
