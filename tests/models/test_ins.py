"""The INS model: bag prediction from instance probabilities (max, top-k, mean; binary, multi-class,
background mode), MIL monotonicity, what its attention and instance scores hold, padding."""

from __future__ import annotations

import math

import pytest
import torch

from wsi_mil.models import create_model, list_models
from wsi_mil.models.ins import INS, class_score_logits

#: instance logits of one bag: p[1] = (0.5, 0.880797, 0.119203)
HAND_LOGITS = torch.tensor([[[0.0, 0.0], [0.0, 2.0], [1.0, -1.0]]])
HAND_P1 = [0.5, 1 / (1 + math.exp(-2)), 1 / (1 + math.exp(2))]


def _model(**options: object) -> INS:
    torch.manual_seed(0)
    model = create_model("ins", 8, options.pop("num_classes", 2), hidden_dim=16, **options)  # type: ignore[arg-type]
    assert isinstance(model, INS)
    return model.eval()


def _positive_probability(logits: torch.Tensor) -> float:
    return float(torch.softmax(logits, dim=-1)[0, 1])


@pytest.mark.parametrize(
    ("pooling", "options", "expected"),
    [
        ("max", {}, HAND_P1[1]),
        ("mean", {}, sum(HAND_P1) / 3),
        ("topk", {"topk": 2}, (HAND_P1[1] + HAND_P1[0]) / 2),
        ("topk", {"topk": 16}, sum(HAND_P1) / 3),  # fewer instances than k: all of them
    ],
)
def test_bag_probability_pools_the_instance_probabilities(pooling: str, options: dict, expected: float) -> None:
    model = _model(pooling=pooling, **options)
    mask = torch.ones(1, 3, dtype=torch.bool)
    out = model.output_from_instance_logits(HAND_LOGITS, mask)
    assert _positive_probability(out.logits) == pytest.approx(expected, abs=1e-6)
    assert out.logits[0, 0] == 0.0
    torch.testing.assert_close(out.instance_scores[0], torch.tensor(HAND_P1), atol=1e-6, rtol=0)
    # the same bag inside a padded batch, with noise in the padding
    padded = torch.cat([HAND_LOGITS, 50 * torch.randn(1, 4, 2)], dim=1)
    padded = torch.cat([padded, torch.randn(1, 7, 2)])
    padded_mask = torch.tensor([[True] * 3 + [False] * 4, [True] * 7])
    batched = model.output_from_instance_logits(padded, padded_mask)
    torch.testing.assert_close(batched.logits[0], out.logits[0], atol=1e-6, rtol=0)
    assert (batched.instance_scores[0, 3:] == 0).all() and (batched.attention[0, 3:] == 0).all()


def test_max_pooling_logits_are_exactly_the_largest_margin() -> None:
    out = _model().output_from_instance_logits(HAND_LOGITS, torch.ones(1, 3, dtype=torch.bool))
    assert out.logits.tolist() == [[0.0, 2.0]]
    flipped = _model(negative_class=1).output_from_instance_logits(HAND_LOGITS.flip(-1), torch.ones(1, 3, dtype=torch.bool))
    assert flipped.logits.tolist() == [[2.0, 0.0]]  # negative class 1: class 0 is the positive one
    torch.testing.assert_close(flipped.instance_scores, out.instance_scores)


@pytest.mark.parametrize("pooling", ["max", "topk", "mean"])
def test_the_class_score_formula_with_two_classes_equals_the_binary_form(pooling: str) -> None:
    model = _model(pooling=pooling, topk=3)
    logits = torch.randn(4, 9, 2, generator=torch.Generator().manual_seed(1)) * 3
    mask = torch.arange(9).expand(4, 9) < torch.tensor([[9], [1], [4], [7]])
    binary = model.output_from_instance_logits(logits, mask).logits
    general, _ = class_score_logits(torch.softmax(logits, -1), mask, num_classes=2, negative_class=0, pooling=pooling, topk=3)
    torch.testing.assert_close(torch.softmax(general, -1), torch.softmax(binary, -1), atol=1e-6, rtol=0)


def test_three_classes_with_a_negative_class_by_hand() -> None:
    model = _model(num_classes=3, negative_class=0)
    logits = torch.log(torch.tensor([[[0.7, 0.2, 0.1], [0.2, 0.1, 0.7], [0.1, 0.6, 0.3]]]))
    out = model.output_from_instance_logits(logits, torch.ones(1, 3, dtype=torch.bool))
    s1, s2 = 0.6, 0.7  # max over instances of p[1] and p[2]
    scores = torch.tensor([1 - s2, s1, s2])
    torch.testing.assert_close(torch.softmax(out.logits, -1)[0], scores / scores.sum(), atol=1e-6, rtol=0)
    # evidence = the probability of the best-scoring non-negative class (2) on every instance
    torch.testing.assert_close(out.instance_scores[0], torch.tensor([0.1, 0.7, 0.3]), atol=1e-6, rtol=0)
    assert out.instance_logits.shape == (1, 3, 3) and not out.extras


def test_background_mode_has_one_more_instance_class_and_pools_the_bag_classes() -> None:
    model = _model(num_classes=2, background_class=True)
    assert model.num_instance_classes == 3 and model.classifier.out_features == 3
    logits = torch.log(torch.tensor([[[0.1, 0.1, 0.8], [0.5, 0.2, 0.3], [0.2, 0.3, 0.5]]]))
    out = model.output_from_instance_logits(logits, torch.ones(1, 3, dtype=torch.bool))
    scores = torch.tensor([0.5, 0.3])  # max of p[0], max of p[1]; the background column is not pooled
    torch.testing.assert_close(torch.softmax(out.logits, -1)[0], scores / scores.sum(), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.instance_scores[0], torch.tensor([0.1, 0.5, 0.2]), atol=1e-6, rtol=0)
    assert out.instance_logits.shape == (1, 3, 2) and out.extras["instance_logits_full"].shape == (1, 3, 3)


def _positive_score(model: INS, bag: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(bag.unsqueeze(0)).logits
    return float(logits[0, 1] - logits[0, 0])


@pytest.mark.parametrize(("pooling", "min_size"), [("max", 1), ("topk", 4)])
def test_adding_an_instance_never_lowers_the_positive_score(pooling: str, min_size: int) -> None:
    model = _model(pooling=pooling, topk=4)
    generator = torch.Generator().manual_seed(2)
    for _ in range(200):
        size = int(torch.randint(min_size, 12, (1,), generator=generator))
        bag = torch.randn(size, 8, generator=generator) * 3
        extra = torch.randn(1, 8, generator=generator) * 3
        position = int(torch.randint(0, size + 1, (1,), generator=generator))
        grown = torch.cat([bag[:position], extra, bag[position:]])
        assert _positive_score(model, grown) >= _positive_score(model, bag) - 1e-5


@pytest.mark.parametrize(("pooling", "size"), [("mean", 5), ("topk", 2)])
def test_mean_pooling_and_top_k_under_k_instances_can_drop_when_an_instance_joins(pooling: str, size: int) -> None:
    model = _model(pooling=pooling, topk=4)
    assert not model.mil_assumption
    bag = torch.randn(64, 8, generator=torch.Generator().manual_seed(3)) * 3
    with torch.no_grad():
        scores = model.instance_logits_from(model.instance_features(bag)).diff(dim=-1)[:, 0]
    order = scores.argsort(descending=True)
    high, lowest = bag[order[:size]], bag[order[-1:]]
    assert _positive_score(model, torch.cat([high, lowest])) < _positive_score(model, high) - 1e-3


def test_only_max_pooling_claims_the_mil_assumption_and_the_model_is_registered() -> None:
    assert "ins" in list_models()
    assert _model().mil_assumption and _model().permutation_invariant and _model().softmax_attention
    assert not _model(pooling="topk").mil_assumption


def test_attention_is_the_normalised_instance_probability(padded_batch) -> None:
    model = _model(num_classes=3)
    _, x, mask = padded_batch([6, 2, 9], 8)
    with torch.no_grad():
        out = model(x, mask)
    torch.testing.assert_close(out.attention.sum(dim=1), torch.ones(3), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.attention, out.instance_scores / out.instance_scores.sum(dim=1, keepdim=True))
    assert out.embedding is None and (out.instance_logits[~mask] == 0).all()


@pytest.mark.parametrize(
    "options",
    [{"pooling": "median"}, {"negative_class": 2}, {"hidden_layers": 0}, {"topk": 0}],
)
def test_bad_options_are_refused_with_the_option_named(options: dict) -> None:
    with pytest.raises(ValueError, match="model_kwargs"):
        create_model("ins", 8, 2, **options)
