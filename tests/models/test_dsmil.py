"""DSMIL: critical instances, the two streams against the official formulas, the official loss and init."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from wsi_mil.models import create_model
from wsi_mil.models.base import MILOutput
from wsi_mil.models.dsmil import DSMIL
from wsi_mil.models.registry import model_options
from wsi_mil.training.methods import create_method
from wsi_mil.training.methods.base import Batch, TrainingMethod


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


def _official_loss(bag_logits: torch.Tensor, max_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """`train_tcga.py`: 0.5 · BCEWithLogits(bag, one-hot) + 0.5 · BCEWithLogits(max instance, one-hot)."""
    one_hot = F.one_hot(labels, bag_logits.shape[-1]).float()
    bce = torch.nn.BCEWithLogitsLoss()
    return 0.5 * bce(bag_logits, one_hot) + 0.5 * bce(max_logits, one_hot)


def test_trainer_loss_is_the_official_loss_on_a_hand_computed_bag() -> None:
    model = small_dsmil()
    # One bag of class 1 (of 2): bag logits (0, ln 3), max-instance logits (ln 3, 0).
    output = MILOutput(
        logits=torch.tensor([[0.0, math.log(3.0)]]),
        attention=torch.ones(1, 1),
        extras={"max_instance_logits": torch.tensor([[math.log(3.0), 0.0]])},
    )
    batch = Batch(torch.zeros(1, 1, 16), torch.ones(1, 1, dtype=torch.bool), torch.tensor([1]))
    result = TrainingMethod().supervised_loss(model, output, batch)
    # BCE(z, 1) = ln(1 + e^-z), BCE(z, 0) = ln(1 + e^z), each stream averaged over its 2 classes:
    # bag (ln 2 + ln 4/3) / 2, max instance (ln 4 + ln 2) / 2; official = half of each = ln(64/3) / 4.
    official = math.log(64.0 / 3.0) / 4.0
    assert result.terms["bag"] == pytest.approx((math.log(2.0) + math.log(4.0 / 3.0)) / 2.0)
    assert result.terms["max_instance"] == pytest.approx((math.log(4.0) + math.log(2.0)) / 2.0)
    assert float(result.loss) * 0.5 == pytest.approx(official)  # the trainer's total = official / bag_weight


def test_trainer_loss_of_a_forward_pass_is_the_official_loss() -> None:
    model = small_dsmil()
    batch = Batch(torch.randn(2, 9, 16), torch.ones(2, 9, dtype=torch.bool), torch.tensor([2, 0]))
    with torch.no_grad():
        result = create_method("plain").compute_loss(model, batch, progress=0.0)
        classes = model.instance_classifier(batch.features)  # [B, N, C]
    official = _official_loss(result.output.logits, classes.max(dim=1).values, batch.labels)
    torch.testing.assert_close(result.loss * model.bag_weight, official)


def test_cross_entropy_bag_loss_option() -> None:
    model = small_dsmil(bag_loss="ce")
    batch = Batch(torch.randn(2, 9, 16), torch.ones(2, 9, dtype=torch.bool), torch.tensor([1, 2]))
    with torch.no_grad():
        result = create_method("plain").compute_loss(model, batch, progress=0.0)
    expected = F.cross_entropy(result.output.logits, batch.labels)
    assert result.terms["bag"] == pytest.approx(float(expected))


def test_bce_bag_loss_weights_each_bag_by_its_class_weight() -> None:
    model = small_dsmil()
    logits, labels = torch.randn(3, 3), torch.tensor([0, 2, 2])
    weights = torch.tensor([1.0, 5.0, 3.0])
    output = MILOutput(logits=logits, attention=torch.ones(3, 1))
    loss = model.bag_loss(output, labels, class_weights=weights)
    per_bag = F.binary_cross_entropy_with_logits(logits, F.one_hot(labels, 3).float(), reduction="none").mean(1)
    torch.testing.assert_close(loss, (per_bag * weights[labels]).sum() / weights[labels].sum())


def test_init_is_orthogonal_with_zero_biases() -> None:
    model = create_model("dsmil", 16, 3, query_dim=8, passing_v=True)
    layers = [m for m in model.modules() if isinstance(m, torch.nn.Linear | torch.nn.Conv1d)]
    assert len(layers) == 5  # instance classifier, 2 query layers, value layer, bag classifier
    for layer in layers:
        weight = layer.weight.detach().flatten(1)  # Conv1d [C, C, D] -> [C, C·D]
        gram = weight @ weight.T if weight.shape[0] <= weight.shape[1] else weight.T @ weight
        torch.testing.assert_close(gram, torch.eye(gram.shape[0]), atol=1e-5, rtol=0)
        assert layer.bias is not None and torch.equal(layer.bias, torch.zeros_like(layer.bias))


def test_the_run_records_the_loss_defaults() -> None:
    kwargs = model_options("dsmil")
    assert kwargs["bag_loss"] == "bce" and kwargs["max_instance_loss"] == "bce"


def test_cross_entropy_max_instance_loss_option() -> None:
    model = small_dsmil(max_instance_loss="ce", bag_weight=0.25)
    x, labels = torch.randn(2, 9, 16), torch.tensor([1, 2])
    with torch.no_grad():
        out = model(x)
        aux = model.aux_losses(out, labels)["max_instance"]
    expected = 3.0 * F.cross_entropy(out.extras["max_instance_logits"], labels)
    torch.testing.assert_close(aux, expected)
