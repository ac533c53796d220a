"""ACMIL: reduction to gated ABMIL, STKIM properties, the diversity and branch losses."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from wsi_mil.errors import ModelConfigError
from wsi_mil.models import create_model
from wsi_mil.models.abmil import ABMIL
from wsi_mil.models.acmil import ACMIL, branch_diversity, stkim_drop_mask

IN_DIM = 20


def small_acmil(**options: object) -> ACMIL:
    torch.manual_seed(0)
    defaults: dict[str, object] = {"hidden_dim": 12, "attention_dim": 6}
    return ACMIL(IN_DIM, 3, **{**defaults, **options})  # type: ignore[arg-type]



def test_default_layers_follow_acmil_ga() -> None:
    model = create_model("acmil", 1024, 2)
    assert model.projection[0].out_features == 512 and model.projection[0].bias is None
    assert model.attention.gate is not None and model.attention.value[0].out_features == 128
    assert model.attention.score.out_features == 5 and len(model.branch_classifiers) == 5
    assert model.mask_top_k == 10 and model.mask_drop == 0.6
    assert create_model("acmil", 1536, 2).projection[0].out_features == 768


def test_one_branch_without_masking_equals_gated_abmil_with_the_same_weights(padded_batch) -> None:
    acmil = small_acmil(num_branches=1, mask_top_k=0)
    abmil = ABMIL(
        IN_DIM, 3, hidden_dim=12, attention_dim=6, gated=True, dropout=0.0, attention_dropout=0.0
    )
    with torch.no_grad():
        abmil.projection[0].weight.copy_(acmil.projection[0].weight)
        abmil.projection[0].bias.zero_()  # ACMIL's dimension reduction has no bias
        abmil.attention.load_state_dict(acmil.attention.state_dict())
        abmil.classifier.load_state_dict(acmil.classifier.state_dict())
    _, x, mask = padded_batch([9, 4], IN_DIM)
    for training in (False, True):  # no dropout and no masking: train and eval agree
        acmil.train(training)
        abmil.train(training)
        with torch.no_grad():
            a, b = acmil(x, mask), abmil(x, mask)
        torch.testing.assert_close(a.logits, b.logits)
        torch.testing.assert_close(a.attention, b.attention)
        torch.testing.assert_close(a.embedding, b.embedding)
    assert acmil.aux_losses(a, torch.tensor([0, 1])) == {}
    assert a.aux_losses["diversity"] == 0


def test_eval_applies_no_masking(padded_batch) -> None:
    model = small_acmil(num_branches=4, mask_top_k=5, mask_drop=0.8).eval()
    _, x, mask = padded_batch([12, 3], IN_DIM)
    with torch.no_grad():
        out = model(x, mask)
    expected = torch.softmax(
        out.maps["attention_logits"].masked_fill(~mask[:, None], -torch.inf), -1
    )
    torch.testing.assert_close(out.maps["branch_attention"], expected)


@pytest.mark.parametrize(("top_k", "drop"), [(10, 0.6), (4, 0.5), (3, 1.0), (6, 0.1)])
def test_stkim_drops_exactly_floor_k_p_of_the_top_k_and_never_padding(
    top_k: int, drop: float, padded_batch
) -> None:
    model = small_acmil(num_branches=3, mask_top_k=top_k, mask_drop=drop).train()
    lengths = [15, 6, 2, 1]
    torch.manual_seed(1)
    _, x, mask = padded_batch(lengths, IN_DIM)
    with torch.no_grad():
        out = model(x, mask)
    weights, scores = out.maps["branch_attention"], out.maps["attention_logits"]
    for b, n in enumerate(lengths):
        k_eff = min(top_k, n)
        n_drop = min(math.floor(k_eff * drop), n - 1)
        for branch in range(3):
            dropped = (weights[b, branch, :n] == 0).nonzero().flatten()
            assert len(dropped) == n_drop
            top = scores[b, branch, :n].topk(k_eff).indices
            assert set(dropped.tolist()) <= set(top.tolist())
            assert (weights[b, branch, n:] == 0).all()
            assert math.isclose(float(weights[b, branch].sum()), 1.0, abs_tol=1e-5)


def test_stkim_draws_independent_subsets_per_bag_and_branch() -> None:
    scores = torch.randn(1, 1, 30).expand(4, 3, 30).contiguous()  # identical rows
    mask = torch.ones(4, 30, dtype=torch.bool)
    torch.manual_seed(0)
    drop = stkim_drop_mask(scores, mask, top_k=10, drop_fraction=0.5)
    assert (drop.sum(-1) == 5).all()
    patterns = {tuple(row.nonzero().flatten().tolist()) for row in drop.view(12, 30)}
    assert len(patterns) > 1


def test_diversity_is_one_for_identical_branches_and_within_zero_one(padded_batch) -> None:
    model = small_acmil(num_branches=4, mask_top_k=0).eval()
    with torch.no_grad():
        model.attention.score.weight.copy_(model.attention.score.weight[:1].expand(4, -1))
        model.attention.score.bias.fill_(0.3)
        identical = model(*padded_batch([8, 5], IN_DIM)[1:]).aux_losses["diversity"]
    torch.testing.assert_close(identical, torch.tensor(1.0))
    random_attention = torch.softmax(torch.randn(6, 5, 40), dim=-1)
    value = branch_diversity(random_attention)
    assert 0.0 <= float(value) <= 1.0
    disjoint = torch.zeros(1, 2, 4)
    disjoint[0, 0, :2], disjoint[0, 1, 2:] = 0.5, 0.5
    assert branch_diversity(disjoint) == 0


def test_diversity_matches_the_official_pairwise_cosine_mean() -> None:
    model = small_acmil(num_branches=3, mask_top_k=0).eval()
    x = torch.randn(1, 14, 20)
    with torch.no_grad():
        out = model(x)
    attention = out.maps["branch_attention"][0]
    pairs = [(0, 1), (0, 2), (1, 2)]
    official = sum(F.cosine_similarity(attention[i], attention[j], dim=-1) for i, j in pairs) / 3
    torch.testing.assert_close(out.aux_losses["diversity"], official)


def test_bag_head_and_branch_loss() -> None:
    model = small_acmil(num_branches=3, mask_top_k=0).eval()
    x, labels = torch.randn(2, 10, 20), torch.tensor([2, 0])
    with torch.no_grad():
        out = model(x)
        h = model.projection(x)
        mean_attention = out.maps["branch_attention"].mean(dim=1)
        pooled = torch.einsum("bn,bnh->bh", mean_attention, h)
    torch.testing.assert_close(out.attention, mean_attention)
    torch.testing.assert_close(out.logits, model.classifier(pooled))
    branch_logits = out.extras["branch_logits"]
    assert branch_logits.shape == (2, 3, 3)
    expected = torch.stack([F.cross_entropy(branch_logits[:, i], labels) for i in range(3)]).mean()
    torch.testing.assert_close(model.aux_losses(out, labels)["branch"], expected)


@pytest.mark.parametrize("options", [{"num_branches": 0}, {"mask_drop": 1.5}, {"mask_top_k": -1}])
def test_invalid_options_raise_a_config_error(options: dict[str, object]) -> None:
    with pytest.raises(ModelConfigError, match="acmil"):
        create_model("acmil", 8, 2, **options)
