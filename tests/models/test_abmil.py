"""ABMIL: layer layout of the CLAM-style and Ilse configurations, and the pooling formula."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from wsi_mil.models import create_model
from wsi_mil.models.abmil import ABMIL


def dropout_rates(model: nn.Module) -> list[float]:
    return [m.p for m in model.modules() if isinstance(m, nn.Dropout)]


def test_abmil_default_is_the_clam_style_gated_configuration() -> None:
    model = create_model("abmil", 1024, 3)
    assert isinstance(model, ABMIL)
    assert model.projection[0].in_features == 1024 and model.projection[0].out_features == 512
    assert model.attention.gate is not None
    assert model.attention.value[0].out_features == 256
    assert model.attention.score.out_features == 1
    assert model.classifier.in_features == 512 and model.classifier.out_features == 3
    assert dropout_rates(model) == [0.25, 0.25, 0.25]  # projection, tanh branch, sigmoid branch
    # CLAM_SB without instance classifiers: (1024·512 + 512) + 2·(512·256 + 256) + (256 + 1) + (512·3 + 3)
    assert sum(p.numel() for p in model.parameters()) == 524_800 + 262_656 + 257 + 1_539


def test_non_gated_variants() -> None:
    plain = create_model("abmil_plain", 64, 2)
    assert plain.attention.gate is None and plain.attention.value[0].out_features == 256
    ilse = create_model("abmil_ilse", 64, 2)
    assert ilse.attention.gate is None
    assert ilse.projection[0].out_features == 500 and ilse.attention.value[0].out_features == 128
    assert all(p == 0.0 for p in dropout_rates(ilse))
    assert create_model("abmil_ilse", 64, 2, gated=True).attention.gate is not None


@pytest.mark.parametrize("gated", [True, False])
def test_forward_matches_the_attention_pooling_formula(gated: bool) -> None:
    torch.manual_seed(0)
    model = ABMIL(12, 3, hidden_dim=10, attention_dim=6, gated=gated).eval()
    x = torch.randn(1, 7, 12)
    with torch.no_grad():
        out = model(x)
        h = torch.relu(x[0] @ model.projection[0].weight.T + model.projection[0].bias)  # [N, H]
        a = torch.tanh(h @ model.attention.value[0].weight.T + model.attention.value[0].bias)
        if gated:
            gate = model.attention.gate[0]
            a = a * torch.sigmoid(h @ gate.weight.T + gate.bias)
        scores = a @ model.attention.score.weight.T + model.attention.score.bias  # [N, 1]
        weights = torch.softmax(scores[:, 0], dim=0)  # softmax over the instance axis
        pooled = weights @ h
        logits = pooled @ model.classifier.weight.T + model.classifier.bias
    torch.testing.assert_close(out.attention[0], weights)
    torch.testing.assert_close(out.maps["attention_logits"][0, 0], scores[:, 0])
    torch.testing.assert_close(out.embedding[0], pooled)
    torch.testing.assert_close(out.logits[0], logits)


def test_dropout_is_active_in_training_only() -> None:
    torch.manual_seed(0)
    model = create_model("abmil", 16, 2, hidden_dim=32, attention_dim=8)
    x = torch.randn(2, 20, 16)
    model.train()
    assert not torch.equal(model(x).logits, model(x).logits)
    model.eval()
    assert torch.equal(model(x).logits, model(x).logits)
