"""DSMIL: critical instances, the two streams against the official formulas, the loss mix."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from wsi_mil.models import create_model
from wsi_mil.models.dsmil import DSMIL


def small_dsmil(**options: object) -> DSMIL:
    torch.manual_seed(0)
    return DSMIL(16, 3, query_dim=8, **options).eval()  # type: ignore[arg-type]


def test_critical_instance_is_the_argmax_instance_score_and_never_padding() -> None:
    model = small_dsmil()
    x = torch.randn(2, 10, 16)
    x[1, 6:] = 100.0 * torch.randn(4, 16)  # padding with extreme instance scores
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 6:] = False
    with torch.no_grad():
        out = model(x, mask)
        scores = model.instance_classifier(x)  # [B, N, C]
    assert torch.equal(out.extras["critical_index"][0], scores[0].argmax(dim=0))
    assert torch.equal(out.extras["critical_index"][1], scores[1, :6].argmax(dim=0))
    torch.testing.assert_close(
        out.extras["max_instance_logits"][1], scores[1, :6].max(dim=0).values
    )
    assert (out.instance_logits[1, 6:] == 0).all()


@pytest.mark.parametrize("passing_v", [False, True])
def test_bag_stream_matches_the_official_formula(passing_v: bool) -> None:
    model = small_dsmil(passing_v=passing_v)
    feats = torch.randn(11, 16)
    with torch.no_grad():
        out = model(feats.unsqueeze(0))
        classes = model.instance_classifier(feats)  # [N, C]
        values = model.value(feats)
        queries = model.query(feats)  # [N, Q]
        _, order = torch.sort(classes, 0, descending=True)
        critical_queries = model.query(feats[order[0]])  # [C, Q], recomputed as officially
        attention = torch.softmax(queries @ critical_queries.T / math.sqrt(8), dim=0)  # [N, C]
        bag = attention.T @ values  # [C, V]
        logits = model.bag_classifier(bag.unsqueeze(0)).view(1, -1)
    torch.testing.assert_close(out.logits, logits)
    torch.testing.assert_close(out.maps["class_attention"][0], attention.T)
    torch.testing.assert_close(out.attention[0], attention[:, logits[0].argmax()])
    torch.testing.assert_close(out.embedding[0], bag.flatten())


def test_default_layers_follow_the_current_official_code() -> None:
    model = create_model("dsmil", 512, 2)
    assert isinstance(model.query, torch.nn.Sequential)  # nonlinear: Linear-ReLU-Linear-Tanh
    assert [type(m).__name__ for m in model.query] == ["Linear", "ReLU", "Linear", "Tanh"]
    assert isinstance(model.value, torch.nn.Identity)
    assert model.bag_classifier.kernel_size == (512,)


def test_loss_mix_reproduces_the_official_half_and_half() -> None:
    model = small_dsmil()
    x, labels = torch.randn(2, 9, 16), torch.tensor([2, 0])
    with torch.no_grad():
        out = model(x)
        aux = model.aux_losses(out, labels)["max_instance"]
        one_hot = F.one_hot(labels, 3).float()
        bag_loss = F.binary_cross_entropy_with_logits(out.logits, one_hot)
        max_loss = F.binary_cross_entropy_with_logits(
            model.instance_classifier(x).max(dim=1).values, one_hot
        )
    official = 0.5 * bag_loss + 0.5 * max_loss
    torch.testing.assert_close((bag_loss + aux) * 0.5, official)  # trainer total = official / 0.5


def test_cross_entropy_max_instance_loss_option() -> None:
    model = small_dsmil(max_instance_loss="ce", bag_weight=0.25)
    x, labels = torch.randn(2, 9, 16), torch.tensor([1, 2])
    with torch.no_grad():
        out = model(x)
        aux = model.aux_losses(out, labels)["max_instance"]
    expected = 3.0 * F.cross_entropy(out.extras["max_instance_logits"], labels)
    torch.testing.assert_close(aux, expected)
