"""The synthetic bags of the MIL checks: class balance, the torchmil quirk fixes, bookkeeping."""

from __future__ import annotations

import pytest
import torch

from wsi_mil.checks.generators import (
    CHECK_NAMES,
    FALSE_FREQUENCY,
    FLOOD_RANGE,
    SINGLE_CONCEPT,
    THRESHOLD_POISONED,
    InstanceKind,
    make_bags,
    resolve_check_names,
)
from wsi_mil.errors import MilCheckError

A, B = int(InstanceKind.CONCEPT_A), int(InstanceKind.CONCEPT_B)
POISON, BACKGROUND = int(InstanceKind.POISON), int(InstanceKind.BACKGROUND)


def counts(kinds: torch.Tensor) -> dict[int, int]:
    return {k: int((kinds == k).sum()) for k in (POISON, BACKGROUND, A, B)}


@pytest.mark.parametrize("test", CHECK_NAMES)
@pytest.mark.parametrize("split", ["train", "test"])
@pytest.mark.parametrize("num_bags", [60, 61])
def test_exactly_half_the_bags_are_positive_and_shapes_match(test: str, split: str, num_bags: int) -> None:
    data = make_bags(test, split, num_bags=num_bags, dim=5)
    assert len(data) == num_bags
    assert int(data.labels.sum()) == num_bags // 2
    assert data.dim == 5
    for bag, kinds in zip(data.bags, data.instance_kinds, strict=True):
        assert bag.shape == (kinds.shape[0], 5) and bag.dtype == torch.float32


@pytest.mark.parametrize("test", CHECK_NAMES)
def test_same_seed_same_data_other_seed_or_split_other_data(test: str) -> None:
    first = make_bags(test, "train", seed=3, num_bags=20)
    again = make_bags(test, "train", seed=3, num_bags=20)
    other_seed = make_bags(test, "train", seed=4, num_bags=20)
    other_split = make_bags(test, "test", seed=3, num_bags=20)
    assert torch.equal(first.labels, again.labels)
    assert all(torch.equal(x, y) for x, y in zip(first.bags, again.bags, strict=True))
    for other in (other_seed, other_split):
        assert not all(
            x.shape == y.shape and torch.equal(x, y) for x, y in zip(first.bags, other.bags, strict=True)
        )


def test_seed_does_not_touch_the_global_torch_rng() -> None:
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    make_bags(SINGLE_CONCEPT, "train", num_bags=10)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("test", [SINGLE_CONCEPT, THRESHOLD_POISONED])
def test_poison_position_is_random(test: str) -> None:
    data = make_bags(test, "train", num_bags=80)
    positions = [int(torch.nonzero(k == POISON)[0]) for k in data.instance_kinds if (k == POISON).any()]
    assert len(positions) == 40  # one poison in every training negative
    assert len(set(positions)) > 3
    first_concepts = [int(k[0]) for k in data.instance_kinds]
    assert len(set(first_concepts)) > 1  # instances are shuffled, not concepts first


@pytest.mark.parametrize("split", ["train", "test"])
def test_false_frequency_negatives_hold_either_concept(split: str) -> None:
    data = make_bags(FALSE_FREQUENCY, split, num_bags=100)
    concepts = set()
    for label, kinds in zip(data.labels.tolist(), data.instance_kinds, strict=True):
        if label == 0:
            c = counts(kinds)
            assert (c[A] == 0) != (c[B] == 0), "a negative holds exactly one concept"
            concepts.add(A if c[A] else B)
    assert concepts == {A, B}


def test_single_concept_bookkeeping() -> None:
    for split in ("train", "test"):
        data = make_bags(SINGLE_CONCEPT, split, num_bags=40, background_size=7)
        for label, kinds in zip(data.labels.tolist(), data.instance_kinds, strict=True):
            c = counts(kinds)
            assert c[BACKGROUND] == 7 and c[B] == 0
            assert (1 <= c[A] <= 3) if label else c[A] == 0
            assert c[POISON] == int(bool(label) == (split == "test"))


def test_threshold_poisoned_bookkeeping() -> None:
    for split in ("train", "test"):
        data = make_bags(THRESHOLD_POISONED, split, num_bags=40)
        for label, kinds in zip(data.labels.tolist(), data.instance_kinds, strict=True):
            c = counts(kinds)
            assert 1 <= c[BACKGROUND] <= 9
            if label:
                assert c[A] == c[B] and 1 <= c[A] <= 3
            else:
                assert c[A] + c[B] == 1
            assert c[POISON] == int(bool(label) == (split == "test"))


def test_false_frequency_bookkeeping_and_flooding() -> None:
    low, high = FLOOD_RANGE
    for split, control in (("train", False), ("test", False), ("test", True)):
        data = make_bags(FALSE_FREQUENCY, split, num_bags=40, control=control)
        flooded = split == "test" and not control
        for label, kinds in zip(data.labels.tolist(), data.instance_kinds, strict=True):
            c = counts(kinds)
            assert c[POISON] == 0 and 1 <= c[BACKGROUND] <= 9
            if label:
                assert c[A] == 1 and c[B] == 1
            else:
                copies = c[A] + c[B]
                assert (low <= copies <= high) if flooded else copies == 1


@pytest.mark.parametrize("test", [SINGLE_CONCEPT, THRESHOLD_POISONED])
def test_controls_have_no_poison(test: str) -> None:
    for split in ("train", "test"):
        data = make_bags(test, split, num_bags=30, control=True)
        assert all((k != POISON).all() for k in data.instance_kinds)


def test_instance_kinds_match_the_instances() -> None:
    data = make_bags(THRESHOLD_POISONED, "test", num_bags=40, dim=6)
    x = torch.cat(data.bags)
    kinds = torch.cat(data.instance_kinds)
    assert torch.allclose(x[kinds == POISON].mean(dim=0), torch.full((6,), -10.0), atol=0.1)
    assert torch.allclose(x[kinds == A].mean(dim=0), torch.full((6,), 2.0), atol=0.1)
    assert torch.allclose(x[kinds == B].mean(dim=0), torch.full((6,), 3.0), atol=0.1)
    assert x[kinds == BACKGROUND].std() == pytest.approx(1.0, abs=0.1)


def test_test_names_resolve_and_unknown_names_name_the_flag() -> None:
    assert resolve_check_names("all") == CHECK_NAMES
    assert resolve_check_names("false_frequency, single-concept") == (SINGLE_CONCEPT, FALSE_FREQUENCY)
    with pytest.raises(MilCheckError, match="--tests"):
        resolve_check_names("single-concept,bogus")
