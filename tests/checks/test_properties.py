"""Property checks: the reference models are monotone, count- and permutation-invariant; a mean-
pooling model and a position-weighted model are caught."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from wsi_mil.checks.generators import SINGLE_CONCEPT, make_bags
from wsi_mil.checks.properties import (
    check_count_invariance,
    check_insertion_monotonicity,
    check_permutation_invariance,
    check_properties,
)
from wsi_mil.checks.runner import CheckSettings, train_model
from wsi_mil.errors import MilCheckError
from wsi_mil.models import MILModel, MILOutput
from wsi_mil.models.base import resolve_mask
from wsi_mil.models.layers import masked_mean
from wsi_mil.models.reference import mi_net, multi_concept_mil

pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def bags() -> list[torch.Tensor]:
    return make_bags(SINGLE_CONCEPT, "test", num_bags=24, seed=1).bags


class MeanPool(MILModel):
    """Mean of instance embeddings, then a linear head: not MIL-respecting."""

    def __init__(self) -> None:
        super().__init__(8, 2)
        self.encoder = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
        self.head = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> MILOutput:
        mask = resolve_mask(x, mask)
        return MILOutput(self.head(masked_mean(self.encoder(x), mask)), mask.float())


class PositionWeighted(MeanPool):
    """Weights instance scores by their position in the bag: order-dependent."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> MILOutput:
        mask = resolve_mask(x, mask)
        position = torch.arange(1, x.shape[1] + 1, dtype=x.dtype).view(1, -1, 1)
        return MILOutput(self.head(masked_mean(self.encoder(x) * position, mask)), mask.float())


@pytest.mark.parametrize("build", [mi_net, multi_concept_mil])
def test_reference_models_satisfy_every_property(build, bags: list[torch.Tensor]) -> None:
    torch.manual_seed(0)
    model = build(8, 2)
    train_model(model, make_bags(SINGLE_CONCEPT, "train", num_bags=64), CheckSettings(epochs=2), seed=0)
    model.train()
    results = check_properties(model, bags)
    assert [r.name for r in results] == [
        "insertion monotonicity",
        "count invariance",
        "permutation invariance",
    ]
    for result in results:
        assert result.passed, str(result)
    assert model.training, "the model's mode is restored"
    assert set(results[0].worst_by_case) == {"background", "far_outlier", "other_bag"}
    assert results[0].trials == 3 * len(bags)


def test_mean_pooling_violates_insertion_monotonicity_and_count_invariance(bags: list[torch.Tensor]) -> None:
    torch.manual_seed(0)
    model = MeanPool()
    monotone = check_insertion_monotonicity(model, bags)
    assert not monotone.passed
    assert monotone.worst_violation > 0.01
    assert monotone.worst_violation == max(monotone.worst_by_case.values())
    assert "VIOLATED" in str(monotone)
    assert not check_count_invariance(model, bags).passed
    assert check_permutation_invariance(model, bags).passed


def test_order_dependent_model_violates_permutation_invariance(bags: list[torch.Tensor]) -> None:
    torch.manual_seed(0)
    result = check_permutation_invariance(PositionWeighted(), bags)
    assert not result.passed and result.worst_violation > 1e-3


def test_property_checks_are_deterministic_for_a_seed(bags: list[torch.Tensor]) -> None:
    torch.manual_seed(0)
    model = MeanPool()
    assert check_insertion_monotonicity(model, bags, seed=5) == check_insertion_monotonicity(model, bags, seed=5)


def test_bad_bags_raise() -> None:
    with pytest.raises(MilCheckError, match="bags"):
        check_insertion_monotonicity(MeanPool(), [torch.randn(3, 8)])
    with pytest.raises(MilCheckError, match="num_classes=2"):
        check_count_invariance(mi_net(8, 3), [torch.randn(3, 8)])
