"""AEM: the negative-entropy term, its sign, padding, per-branch maps and the λ schedule."""

from __future__ import annotations

import math

import pytest
import torch

from wsi_mil.errors import TrainingConfigError
from wsi_mil.models import create_model
from wsi_mil.models.layers import masked_entropy
from wsi_mil.training.bag import Bag
from wsi_mil.training.batching import pad_bags
from wsi_mil.training.methods import create_method
from wsi_mil.training.methods.aem import AEMMethod, negative_entropy
from wsi_mil.training.methods.base import Batch


def test_uniform_attention_gives_minus_log_n():
    mask = torch.tensor([[True] * 8, [True] * 3 + [False] * 5])
    uniform = mask.float() / mask.sum(dim=1, keepdim=True)
    values = negative_entropy(uniform, mask)
    torch.testing.assert_close(values, torch.tensor([-math.log(8), -math.log(3)]))
    normalised = negative_entropy(uniform, mask, normalize="log_n")
    torch.testing.assert_close(normalised, torch.tensor([-1.0, -1.0]))
    single = negative_entropy(torch.tensor([[1.0, 0.0]]), torch.tensor([[True, False]]), normalize="log_n")
    assert single.item() == 0.0


def test_matches_masked_entropy_of_the_logits_and_ignores_padding():
    scores = torch.randn(2, 6)
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    probs = torch.softmax(scores.masked_fill(~mask, -1e9), dim=-1) * mask
    torch.testing.assert_close(negative_entropy(probs, mask), -masked_entropy(scores, mask))


def test_zero_probabilities_keep_gradients_finite():
    logits = torch.tensor([[0.0, 200.0, -200.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[True, True, True, False]])
    probs = torch.softmax(logits.masked_fill(~mask, -1e9), dim=-1) * mask  # underflows to exact 0
    negative_entropy(probs, mask).sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_per_branch_maps_are_averaged_over_branches():
    branch = torch.softmax(torch.randn(1, 3, 5), dim=-1)
    mask = torch.ones(1, 5, dtype=torch.bool)
    expected = torch.stack([negative_entropy(branch[:, k], mask) for k in range(3)]).mean(dim=0)
    torch.testing.assert_close(negative_entropy(branch, mask), expected)


def _batch(num_bags: int = 3, dim: int = 8, seed: int = 0) -> Batch:
    generator = torch.Generator().manual_seed(seed)
    bags = [Bag(torch.randn(5 + 3 * i, dim, generator=generator), i % 2, f"b{i}") for i in range(num_bags)]
    return pad_bags(bags)


def _entropy_after_one_step(sign: float) -> tuple[float, float]:
    """Attention entropy before and after one SGD step on `sign · λ · L_AEM` alone."""
    torch.manual_seed(0)
    model = create_model("abmil", 8, 2, dropout=0.0, attention_dropout=0.0)
    method = AEMMethod(weight=1.0)
    batch = _batch()
    with torch.no_grad():  # start from peaked attention so there is room to spread it
        model.attention.score.weight.mul_(20.0)

    def entropy() -> float:
        with torch.no_grad():
            output = model(batch.features, batch.mask)
        return float(-negative_entropy(output.attention, batch.mask).mean())

    before = entropy()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    output = model(batch.features, batch.mask)
    loss = sign * method.weight * negative_entropy(method.pooling_attention(output), batch.mask).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return before, entropy()


def test_a_gradient_step_on_the_aem_term_alone_raises_attention_entropy():
    before, after = _entropy_after_one_step(+1.0)
    assert after > before + 0.01
    before, after = _entropy_after_one_step(-1.0)  # the classic sign bug lowers it
    assert after < before - 0.01


def test_compute_loss_adds_lambda_times_the_term():
    torch.manual_seed(1)
    model = create_model("abmil", 8, 2, dropout=0.0, attention_dropout=0.0)
    batch = _batch()
    plain = create_method("plain").compute_loss(model, batch, progress=0.0)
    result = create_method("aem", weight=0.5).compute_loss(model, batch, progress=0.0)
    output = model(batch.features, batch.mask)
    term = negative_entropy(output.attention, batch.mask).mean().detach()
    assert result.terms["aem"] == pytest.approx(0.5 * float(term), rel=1e-5)
    assert result.terms["aem_lambda"] == 0.5
    assert result.terms["attention_entropy"] == pytest.approx(-float(term), rel=1e-5)
    assert result.loss.item() == pytest.approx(plain.loss.item() + 0.5 * term.item(), rel=1e-5)


def test_auto_uses_acmil_branch_attention():
    torch.manual_seed(2)
    model = create_model("acmil", 8, 2, num_branches=3).eval()
    batch = _batch()
    output = model(batch.features, batch.mask)
    auto = AEMMethod().pooling_attention(output)
    assert auto.shape == (3, 3, batch.mask.shape[1])
    torch.testing.assert_close(auto, output.maps["branch_attention"])
    assert AEMMethod(attention_map=None).pooling_attention(output) is output.attention
    with pytest.raises(TrainingConfigError, match=r"attention_map 'nope'.*branch_attention"):
        AEMMethod(attention_map="nope").pooling_attention(output)
    result = AEMMethod(weight=0.1).compute_loss(model.train(), batch, progress=0.3)
    assert {"bag", "diversity", "branch", "aem"} <= set(result.terms)


def test_cosine_schedule_goes_from_weight_to_weight_end():
    method = AEMMethod(weight=0.2, schedule="cosine", weight_end=0.02)
    assert method.weight_at(0.0) == pytest.approx(0.2)
    assert method.weight_at(0.5) == pytest.approx(0.11)
    assert method.weight_at(1.0) == pytest.approx(0.02)
    assert method.weight_at(0.25) > method.weight_at(0.75)
    assert AEMMethod(weight=0.2).weight_at(0.9) == 0.2


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [({"schedule": "linear"}, "schedule"), ({"normalize": "n"}, "normalize"), ({"weight": -1.0}, ">= 0")],
)
def test_bad_options_are_refused(kwargs, pattern):
    with pytest.raises(TrainingConfigError, match=pattern):
        AEMMethod(**kwargs)
