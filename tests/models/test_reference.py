"""The reference models mi_net and multi_concept_mil: binary head, monotonicity, maps, padding."""

from __future__ import annotations

import pytest
import torch

from wsi_mil.models import MILModel, create_model, model_entry
from wsi_mil.models.reference import MultiConceptMIL

NAMES = ["mi_net", "multi_concept_mil"]
DIM = 6

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def build(name: str, num_classes: int = 2) -> MILModel:
    torch.manual_seed(0)
    return create_model(name, DIM, num_classes).eval()


@pytest.mark.parametrize("name", NAMES)
def test_registered_with_mil_assumption_and_keyword_defaults(name: str) -> None:
    entry = model_entry(name)
    assert entry.module == "wsi_mil.models.reference"
    assert entry.summary and entry.defaults["hidden_dim"] == 64
    model = build(name)
    assert model.mil_assumption and model.permutation_invariant


@pytest.mark.parametrize("name", NAMES)
def test_binary_logits_are_zero_then_positive_score(name: str, padded_batch) -> None:
    _, x, mask = padded_batch([5, 3], DIM)
    out = build(name)(x, mask)
    assert out.logits.shape == (2, 2)
    assert torch.equal(out.logits[:, 0], torch.zeros(2))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("num_classes", [2, 4])
def test_padded_batch_matches_bags_alone_and_padding_gets_nothing(
    name: str, num_classes: int, padded_batch
) -> None:
    model = build(name, num_classes)
    bags, x, mask = padded_batch([7, 1, 4], DIM)
    with torch.no_grad():
        batch = model(x, mask)
        for i, bag in enumerate(bags):
            alone = model(bag.unsqueeze(0))
            n = bag.shape[0]
            torch.testing.assert_close(batch.logits[i], alone.logits[0], atol=1e-5, rtol=0)
            torch.testing.assert_close(batch.attention[i, :n], alone.attention[0], atol=1e-5, rtol=0)
            torch.testing.assert_close(batch.instance_logits[i, :n], alone.instance_logits[0], atol=1e-5, rtol=0)
    assert (batch.attention[~mask] == 0).all() and (batch.attention >= 0).all()
    torch.testing.assert_close(batch.attention.sum(dim=1), torch.ones(3))
    assert (batch.instance_logits[~mask] == 0).all()
    for value in batch.maps.values():
        assert (value.transpose(-1, -2)[~mask] == 0).all() if value.dim() == 3 else (value[~mask] == 0).all()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("num_classes", [2, 3])
def test_adding_an_instance_never_lowers_a_class_logit(name: str, num_classes: int) -> None:
    model = build(name, num_classes)
    generator = torch.Generator().manual_seed(1)
    bag = torch.randn(1, 6, DIM, generator=generator)
    with torch.no_grad():
        base = model(bag).logits
        for _ in range(20):
            extra = 5 * torch.randn(1, 1, DIM, generator=generator)
            grown = model(torch.cat([bag, extra], dim=1)).logits
            assert (grown - base >= -1e-6).all()
            duplicated = model(torch.cat([bag, bag[:, :2]], dim=1)).logits
            torch.testing.assert_close(duplicated, base, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_a_single_instance_bag_scores_like_its_instance_logits(name: str) -> None:
    model = build(name, 3)
    x = torch.randn(2, 1, DIM)
    with torch.no_grad():
        out = model(x)
    torch.testing.assert_close(out.instance_logits[:, 0], out.logits)
    torch.testing.assert_close(out.attention, torch.ones(2, 1))


def test_mi_net_bag_score_is_the_max_instance_score_and_attention_follows_it(padded_batch) -> None:
    model = build("mi_net")
    _, x, mask = padded_batch([5, 3], DIM)
    with torch.no_grad():
        out = model(x, mask)
    z = out.instance_logits[..., 1].masked_fill(~mask, -torch.inf)
    torch.testing.assert_close(out.logits[:, 1], z.max(dim=1).values)
    prob = out.maps["instance_prob"]
    torch.testing.assert_close(prob[mask], torch.sigmoid(z[mask]))
    assert torch.equal(out.attention.argmax(dim=1), z.argmax(dim=1))


def test_multi_concept_weights_stay_non_negative_and_outputs_are_documented(padded_batch) -> None:
    model = build("multi_concept_mil")
    with torch.no_grad():
        model.raw_weights.fill_(-30.0)
    assert (model.combiner_weights() >= 0).all()
    _, x, mask = padded_batch([5, 2], DIM)
    out = model(x, mask)
    assert out.maps["concept_scores"].shape == (2, 16, 5)
    assert out.extras["concept_presence"].shape == (2, 16)
    assert (out.extras["concept_presence"].abs() <= 1).all()


def test_multi_concept_can_express_and() -> None:
    """Two concept heads that each fire on one axis, equal weights, negative bias -> 'A and B'."""
    model = MultiConceptMIL(2, 2, hidden_dim=4, num_concepts=2)
    with torch.no_grad():
        first, second = model.encoder[0], model.encoder[3]
        first.weight.copy_(torch.tensor([[1.0, 0], [0, 1], [0, 0], [0, 0]]))
        first.bias.zero_()
        second.weight.copy_(torch.eye(4))
        second.bias.zero_()
        model.concept_heads.weight.copy_(torch.tensor([[10.0, 0, 0, 0], [0, 10.0, 0, 0]]))
        model.concept_heads.bias.fill_(-5.0)
        model.raw_weights.fill_(5.0)
        model.bias.fill_(-5.0)
        a, b, none = [1.0, 0.0], [0.0, 1.0], [0.0, 0.0]
        bags = torch.tensor([[a, b], [a, a], [b, none], [none, none]])
        z = model(bags).logits[:, 1]
    assert z[0] > 0 > z[1] and z[0] > 0 > z[2] and z[3] < 0