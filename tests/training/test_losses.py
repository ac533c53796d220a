"""The contrastive losses on hand-computed examples: SupCon (with other views, a queue, empty
queue slots, anchors without positives) and MoCo's InfoNCE. Expected values come from plain-Python
loops over the definitions, and from the spec's printed numbers."""

from __future__ import annotations

import math

import pytest
import torch

from wsi_mil.training.losses import moco_infonce_loss, supervised_contrastive_loss


def reference_supcon(z: list[tuple[float, ...]], labels: list[int], num_anchors: int, tau: float) -> list[float | None]:
    """Per-anchor SupCon by the definition (None: the anchor has no positive)."""
    def dot(a, b):
        return sum(x * y for x, y in zip(a, b, strict=True)) / tau

    losses: list[float | None] = []
    for a in range(num_anchors):
        others = [c for c in range(len(z)) if c != a]
        positives = [p for p in others if labels[p] == labels[a]]
        if not positives:
            losses.append(None)
            continue
        log_denominator = math.log(sum(math.exp(dot(z[a], z[c])) for c in others))
        losses.append(-sum(dot(z[a], z[p]) - log_denominator for p in positives) / len(positives))
    return losses


def supcon(z, labels, num_anchors, tau, **options) -> float:
    return float(supervised_contrastive_loss(torch.tensor(z), torch.tensor(labels), num_anchors=num_anchors,
                                             temperature=tau, **options))


S1 = ([(1.0, 0.0), (0.0, 1.0), (-1.0, 0.0)], [0, 0, 1])


@pytest.mark.parametrize(("tau", "ours", "supcontrast"), [(1.0, 0.503204, 0.335470), (0.5, 0.410038, 0.273358),
                                                          (0.07, 0.346574, 0.231049)])
def test_supcon_leaves_out_anchors_without_positives_or_counts_them_as_supcontrast_does(tau, ours, supcontrast):
    z, labels = S1
    per_anchor = reference_supcon(z, labels, 3, tau)
    assert per_anchor[2] is None
    assert supcon(z, labels, 3, tau) == pytest.approx((per_anchor[0] + per_anchor[1]) / 2, abs=1e-6)
    assert supcon(z, labels, 3, tau) == pytest.approx(ours, abs=1e-6)
    assert supcon(z, labels, 3, tau, keep_anchors_without_positives=True) == pytest.approx(supcontrast, abs=1e-6)


def test_supcon_of_four_anchors_by_hand():
    z = [(1.0, 0.0), (0.6, 0.8), (0.0, 1.0), (-0.6, 0.8)]
    expected = reference_supcon(z, [0, 0, 1, 1], 4, 0.5)
    assert expected == pytest.approx([0.330678, 1.104964, 0.789319, 0.346610], abs=1e-6)
    assert supcon(z, [0, 0, 1, 1], 4, 0.5) == pytest.approx(0.642893, abs=1e-6)


def test_supcon_with_keys_and_a_queue_excludes_self_and_empty_slots():
    anchors, keys = [(1.0, 0.0), (0.0, 1.0)], [(0.8, 0.6), (-0.6, 0.8)]
    queue = [(0.6, -0.8), (-1.0, 0.0)]
    z, labels = anchors + keys + queue, [1, 0, 1, 0, 1, 0]
    per_anchor = reference_supcon(z, labels, 2, 0.5)
    assert per_anchor == pytest.approx([0.873123, 1.548996], abs=1e-6)
    assert supcon(z, labels, 2, 0.5) == pytest.approx(1.211060, abs=1e-6)
    # two empty queue slots (any values, any labels) change nothing
    junk = [(0.3, 0.95), (-0.2, -0.98)]
    valid = torch.tensor([True] * 6 + [False, False])
    assert supcon(z + junk, [*labels, 1, 0], 2, 0.5, valid=valid) == pytest.approx(1.211060, abs=1e-6)
    # each anchor's own key is its positive even without a queue: never a division by zero
    assert supcon(anchors + keys, [1, 0, 1, 0], 2, 0.5) == pytest.approx(
        sum(reference_supcon(anchors + keys, [1, 0, 1, 0], 2, 0.5)) / 2, abs=1e-6)


def test_supcon_is_finite_and_differentiable_when_nothing_has_a_positive():
    z = torch.nn.functional.normalize(torch.randn(3, 4), dim=1).requires_grad_()
    loss = supervised_contrastive_loss(z, torch.tensor([0, 1, 2]), num_anchors=1, temperature=0.07,
                                       valid=torch.tensor([True, False, False]))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(z.grad).all()


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
