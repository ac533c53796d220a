"""The contrastive losses against hand-computed values and independent loops: SupCon (other views,
momentum keys and a queue as contrast-only entries, anchors without positives) and MoCo's InfoNCE."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from wsi_mil.training.losses import moco_infonce_loss, supervised_contrastive_loss

S1 = ([(1.0, 0.0), (0.0, 1.0), (-1.0, 0.0)], [0, 0, 1])
S2 = ([(1.0, 0.0), (0.6, 0.8), (0.0, 1.0), (-0.6, 0.8)], [0, 0, 1, 1])


def supcon(z, labels, **kwargs) -> float:
    result = supervised_contrastive_loss(torch.tensor(z), torch.tensor(labels), **kwargs)
    return float(result.loss.detach())


def numpy_supcon(z: np.ndarray, labels: np.ndarray, tau: float, *, extra=None, extra_labels=None, compat=False) -> float:
    """SupCon written out anchor by anchor, contrast entry by entry (O(M²) loops, float64)."""
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    entries, entry_labels = z, labels
    if extra is not None:
        entries = np.concatenate([z, extra / np.linalg.norm(extra, axis=1, keepdims=True)])
        entry_labels = np.concatenate([labels, extra_labels])
    losses = []
    for a in range(len(z)):
        others = [c for c in range(len(entries)) if c != a]
        denominator = sum(math.exp(z[a] @ entries[c] / tau) for c in others)
        positives = [c for c in others if entry_labels[c] == labels[a]]
        if not positives:
            if compat:
                losses.append(0.0)
            continue
        losses.append(-sum(z[a] @ entries[p] / tau - math.log(denominator) for p in positives) / len(positives))
    return float(np.mean(losses))


@pytest.mark.parametrize(
    ("tau", "expected", "expected_compat"),
    [
        # anchor 1: ln(1 + e^(-1/τ)); anchor 2: ln 2 (its two others are at cosine 0); anchor 3 has no positive
        (1.0, (math.log(1 + math.exp(-1.0)) + math.log(2)) / 2, (math.log(1 + math.exp(-1.0)) + math.log(2)) / 3),
        (0.5, (math.log(1 + math.exp(-2.0)) + math.log(2)) / 2, (math.log(1 + math.exp(-2.0)) + math.log(2)) / 3),
        (0.07, (math.log(1 + math.exp(-1 / 0.07)) + math.log(2)) / 2, (math.log(1 + math.exp(-1 / 0.07)) + math.log(2)) / 3),
    ],
)
def test_hand_computed_three_vector_batch(tau, expected, expected_compat):
    assert supcon(*S1, temperature=tau) == pytest.approx(expected, abs=1e-6)
    assert supcon(*S1, temperature=tau, official_compat=True) == pytest.approx(expected_compat, abs=1e-6)


def test_spec_reference_values():
    """The numbers of the spec (§1.1 S1, S2), computed there independently."""
    assert supcon(*S1, temperature=1.0) == pytest.approx(0.503204, abs=1e-6)
    assert supcon(*S1, temperature=0.5) == pytest.approx(0.410038, abs=1e-6)
    assert supcon(*S1, temperature=0.07) == pytest.approx(0.346574, abs=1e-6)
    assert supcon(*S1, temperature=1.0, official_compat=True) == pytest.approx(0.335470, abs=1e-6)
    assert supcon(*S1, temperature=0.5, official_compat=True) == pytest.approx(0.273358, abs=1e-6)
    assert supcon(*S1, temperature=0.07, official_compat=True) == pytest.approx(0.231049, abs=1e-6)
    assert supcon(*S2, temperature=0.5) == pytest.approx(0.642893, abs=1e-6)


@pytest.mark.parametrize("compat", [False, True])
def test_matches_an_independent_loop_on_random_inputs(compat):
    rng = np.random.default_rng(0)
    z, labels = rng.normal(size=(16, 8)), rng.integers(0, 3, size=16)
    extra, extra_labels = rng.normal(size=(5, 8)), rng.integers(0, 3, size=5)
    got = supervised_contrastive_loss(torch.tensor(z, dtype=torch.float32), torch.tensor(labels), temperature=0.3,
                                      official_compat=compat)
    assert float(got.loss) == pytest.approx(numpy_supcon(z, labels, 0.3, compat=compat), rel=1e-5)
    with_queue = supervised_contrastive_loss(
        torch.tensor(z, dtype=torch.float32), torch.tensor(labels), temperature=0.3, official_compat=compat,
        contrast=torch.tensor(extra, dtype=torch.float32), contrast_labels=torch.tensor(extra_labels),
    )
    expected = numpy_supcon(z, labels, 0.3, extra=extra, extra_labels=extra_labels, compat=compat)
    assert float(with_queue.loss) == pytest.approx(expected, rel=1e-5)


def test_invariances_and_base_temperature():
    generator = torch.Generator().manual_seed(1)
    z, labels = torch.randn(10, 4, generator=generator), torch.randint(0, 2, (10,), generator=generator)
    reference = float(supervised_contrastive_loss(z, labels, temperature=0.2).loss)
    permutation = torch.randperm(10, generator=generator)
    assert float(supervised_contrastive_loss(z[permutation], labels[permutation], temperature=0.2).loss) == pytest.approx(reference, rel=1e-6)
    scaled = z * torch.rand(10, 1, generator=generator).add(0.1).mul(7.0)
    assert float(supervised_contrastive_loss(scaled, labels, temperature=0.2).loss) == pytest.approx(reference, rel=1e-5)
    assert float(supervised_contrastive_loss(z, labels, temperature=0.2, base_temperature=0.2).loss) == reference
    halved = float(supervised_contrastive_loss(z, labels, temperature=0.2, base_temperature=0.4).loss)
    assert halved == pytest.approx(reference / 2, rel=1e-6)


def test_a_gradient_step_pulls_classes_together_and_apart():
    generator = torch.Generator().manual_seed(2)
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    z = torch.nn.Parameter(torch.randn(6, 4, generator=generator))

    def mean_cosines() -> tuple[float, float]:
        unit = torch.nn.functional.normalize(z.detach(), dim=1)
        cosine = unit @ unit.T
        same = (labels[:, None] == labels[None, :]) & ~torch.eye(6, dtype=torch.bool)
        different = labels[:, None] != labels[None, :]
        return float(cosine[same].mean()), float(cosine[different].mean())

    same_before, different_before = mean_cosines()
    optimizer = torch.optim.SGD([z], lr=0.1)
    supervised_contrastive_loss(z, labels, temperature=0.5).loss.backward()
    optimizer.step()
    same_after, different_after = mean_cosines()
    assert same_after > same_before and different_after < different_before


def test_no_positive_anywhere_gives_zero_with_finite_gradients():
    z = torch.nn.Parameter(torch.randn(3, 4))
    result = supervised_contrastive_loss(z, torch.tensor([0, 1, 2]), temperature=0.1)
    result.loss.backward()
    assert float(result.loss.detach()) == 0.0 and not result.has_positive.any()
    assert z.grad is not None and torch.isfinite(z.grad).all()
    single = supervised_contrastive_loss(torch.randn(1, 4, requires_grad=True), torch.tensor([0]), temperature=0.1)
    assert float(single.loss.detach()) == 0.0 and single.loss.requires_grad


def test_queue_entries_are_contrast_only_and_count_as_positives():
    anchors, labels = torch.tensor([[1.0, 0.0]]), torch.tensor([0])
    assert float(supervised_contrastive_loss(anchors, labels, temperature=0.5).loss) == 0.0
    queue, queue_labels = torch.tensor([[0.0, 1.0], [-1.0, 0.0]]), torch.tensor([0, 1])
    result = supervised_contrastive_loss(anchors, labels, temperature=0.5, contrast=queue, contrast_labels=queue_labels)
    # positive at cosine 0, the other entry at cosine −1: ln(1 + e^(−2))
    assert float(result.loss) == pytest.approx(math.log(1 + math.exp(-2.0)), abs=1e-6)
    assert result.has_positive.tolist() == [True]


def test_bfloat16_inputs_are_computed_in_float32():
    z = torch.tensor(S2[0], dtype=torch.bfloat16)
    result = supervised_contrastive_loss(z, torch.tensor(S2[1]), temperature=0.5)
    assert result.loss.dtype == torch.float32
    assert float(result.loss) == pytest.approx(0.642893, abs=1e-2)  # bf16 rounds the inputs themselves


def test_momentum_keys_and_a_queue_join_the_contrast_set_as_in_ins():
    """INS's main phase: query anchors against their own momentum keys and the queue's valid slots."""
    anchors, keys = [(1.0, 0.0), (0.0, 1.0)], [(0.8, 0.6), (-0.6, 0.8)]
    queue = [(0.6, -0.8), (-1.0, 0.0)]
    anchor_labels, contrast_labels = [1, 0], [1, 0, 1, 0]
    expected = numpy_supcon(
        np.array(anchors), np.array(anchor_labels), 0.5,
        extra=np.array(keys + queue), extra_labels=np.array(contrast_labels),
    )
    assert expected == pytest.approx(1.211060, abs=1e-6)  # per anchor 0.873123 and 1.548996, by hand
    result = supervised_contrastive_loss(
        torch.tensor(anchors), torch.tensor(anchor_labels), temperature=0.5,
        contrast=torch.tensor(keys + queue), contrast_labels=torch.tensor(contrast_labels),
    )
    assert float(result.loss) == pytest.approx(1.211060, abs=1e-6)
    # without a queue each anchor's own key is still its positive: never a division by zero
    keys_only = supervised_contrastive_loss(
        torch.tensor(anchors), torch.tensor(anchor_labels), temperature=0.5,
        contrast=torch.tensor(keys), contrast_labels=torch.tensor([1, 0]),
    )
    assert result.has_positive.all() and keys_only.has_positive.all()
    assert float(keys_only.loss) == pytest.approx(
        numpy_supcon(np.array(anchors), np.array(anchor_labels), 0.5, extra=np.array(keys), extra_labels=np.array([1, 0])),
        abs=1e-6,
    )


def test_moco_infonce_by_hand_and_with_an_empty_queue():
    q, k = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.6, 0.8]])
    queue = torch.tensor([[0.0, 1.0], [-1.0, 0.0], [0.7, 0.7]])
    logits = [0.6 / 0.5, 0.0 / 0.5, -1.0 / 0.5]
    expected = -logits[0] + math.log(sum(math.exp(v) for v in logits))
    assert expected == pytest.approx(0.294129, abs=1e-6)
    loss = moco_infonce_loss(q, k, queue, temperature=0.5, queue_valid=torch.tensor([True, True, False]))
    assert float(loss) == pytest.approx(0.294129, abs=1e-6)
    empty = moco_infonce_loss(q, k, queue, temperature=0.5, queue_valid=torch.zeros(3, dtype=torch.bool))
    assert float(empty) == 0.0
