"""The training loop: learning, determinism, resume, early stopping, schedule, options, errors."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from wsi_mil.errors import TrainingConfigError
from wsi_mil.models import create_model
from wsi_mil.training.bag import Bag
from wsi_mil.training.config import TrainConfig
from wsi_mil.training.methods import TrainingMethod, create_method
from wsi_mil.training.metrics import classification_metrics
from wsi_mil.training.trainer import fit, predict_bags, warmup_cosine_factor


class Interrupted(Exception):
    """Raised from the epoch callback to simulate a run killed after an epoch."""


def _config(**overrides: object) -> TrainConfig:
    values: dict[str, object] = {"epochs": 6, "lr": 2e-3, "device": "cpu", "patience": None}
    values.update(overrides)
    return TrainConfig.model_validate(values)


SMALL_ABMIL = {"hidden_dim": 32, "attention_dim": 16, "dropout": 0.0, "attention_dropout": 0.0}


def _fit(config: TrainConfig, train, val, *, method: str = "plain", model: str = "abmil", dropout: float = 0.0, **kwargs):
    torch.manual_seed(config.seed)
    model_kwargs = {**SMALL_ABMIL, "dropout": dropout} if model == "abmil" else {}
    net = create_model(model, train[0].features.shape[1], 2, **model_kwargs)
    return net, fit(net, create_method(method), train, val, config=config, num_classes=2, **kwargs)


@pytest.fixture(scope="module")
def data(bag_factory) -> tuple[list[Bag], list[Bag], list[Bag]]:
    bags = bag_factory(72, seed=5)
    return bags[:40], bags[40:56], bags[56:]


def test_learns_a_separable_task_and_selects_on_validation(data):
    train, val, test = data
    model, result = _fit(_config(epochs=8), train, val)
    history_scores = [(h["val_roc_auc_macro"], -h["val_loss"]) for h in result.history]
    assert result.best_epoch == 1 + history_scores.index(max(history_scores))
    assert result.best_score == result.best_val_metrics["roc_auc_macro"]
    model.load_state_dict(result.best_state)
    predictions = predict_bags(model, test)
    assert classification_metrics(predictions.labels, predictions.probs)["roc_auc_macro"] > 0.9
    assert [len(a) for a in predictions.attention] == [len(b.features) for b in test]


def test_same_seed_same_result_other_seed_other_result(data):
    train, val, _ = data
    config = _config(epochs=3, max_instances=8, batch_size=2)
    _, first = _fit(config, train, val)
    _, second = _fit(config, train, val)
    assert first.history == second.history
    for name, tensor in first.best_state.items():
        assert torch.equal(tensor, second.best_state[name]), name
    _, other = _fit(config.model_copy(update={"seed": 1}), train, val)
    assert other.history != first.history


@pytest.mark.parametrize(
    ("method", "batch_size"), [("plain", 1), ("aem", 1), ("plain", 4), ("packmil", 4), ("scmil", 4)]
)
def test_resume_after_a_kill_gives_the_uninterrupted_result(tmp_path, data, method, batch_size):
    train, val, _ = data
    config = _config(epochs=5, max_instances=10, warmup_epochs=1.0, batch_size=batch_size)
    _, reference = _fit(config, train, val, method=method, dropout=0.25)

    def kill_after_epoch_2(report):
        if report.epoch == 2:
            raise Interrupted

    checkpoint, best = tmp_path / "last.pt", tmp_path / "model.safetensors"
    with pytest.raises(Interrupted):
        _fit(config, train, val, method=method, dropout=0.25, checkpoint_path=checkpoint, best_model_path=best,
             on_epoch_end=kill_after_epoch_2)
    assert torch.load(checkpoint, weights_only=True)["epoch"] == 2
    epochs_seen = []
    _, resumed = _fit(config, train, val, method=method, dropout=0.25, checkpoint_path=checkpoint,
                      best_model_path=best, on_epoch_end=lambda r: epochs_seen.append(r.epoch))
    assert epochs_seen == [3, 4, 5]
    assert resumed.history == reference.history
    assert resumed.best_epoch == reference.best_epoch
    for name, tensor in reference.best_state.items():
        assert torch.equal(tensor, resumed.best_state[name]), name
    # a finished run resumes to the same result without training again
    _, again = _fit(config, train, val, method=method, dropout=0.25, checkpoint_path=checkpoint,
                    on_epoch_end=lambda r: epochs_seen.append(r.epoch))
    assert epochs_seen == [3, 4, 5] and again.history == reference.history


def test_per_bag_and_padded_steps_train_the_same_model(data):
    """Without dropout the two executions differ only by float rounding; per bag pads nothing.

    The attention score's bias is left out: softmax ignores it, so its gradient is pure rounding
    noise, which Adam scales up to full-size steps in both runs.
    """
    train, val, _ = data
    config = _config(epochs=2, batch_size=5, max_instances=12)
    _, per_bag = _fit(config.model_copy(update={"batch_execution": "per_bag"}), train, val)
    _, padded = _fit(config.model_copy(update={"batch_execution": "padded"}), train, val)
    for name, tensor in padded.best_state.items():
        if name != "attention.score.bias":
            torch.testing.assert_close(per_bag.best_state[name], tensor, atol=1e-5, rtol=1e-4)
    assert per_bag.history[-1]["train_loss"] == pytest.approx(padded.history[-1]["train_loss"], rel=1e-4)


@pytest.mark.parametrize("method", ["plain", "packmil", "scmil"])
def test_prefetching_and_the_cache_do_not_change_a_single_bit(data, method):
    train, val, _ = data
    config = _config(epochs=2, batch_size=4, max_instances=12)
    _, reference = _fit(config, train, val, method=method, dropout=0.25)
    _, plain = _fit(config.model_copy(update={"prefetch_batches": 0, "cache_features": False}), train, val,
                    method=method, dropout=0.25)
    assert plain.history == reference.history
    for name, tensor in reference.best_state.items():
        assert torch.equal(tensor, plain.best_state[name]), name


def test_early_stopping_waits_for_patience_and_min_epochs(data):
    train, val, _ = data
    _, result = _fit(_config(epochs=30, patience=1, selection_metric="loss", lr=5e-2), train, val)
    assert result.stopped_early
    assert result.epochs_run < 30
    assert result.epochs_run - result.best_epoch >= 1
    _, later = _fit(_config(epochs=30, patience=1, min_epochs=12, selection_metric="loss", lr=5e-2), train, val)
    assert later.epochs_run >= 12


def test_warmup_then_cosine_schedule():
    def factor(step: int) -> float:
        return warmup_cosine_factor(step, total_steps=100, warmup_steps=10, min_ratio=0.1)

    assert factor(0) == pytest.approx(0.1)
    assert factor(9) == pytest.approx(1.0)
    assert factor(10) == pytest.approx(1.0)
    assert factor(55) == pytest.approx(0.1 + 0.9 * 0.5)
    assert factor(100) == pytest.approx(0.1)
    steps = [factor(s) for s in range(10, 101)]
    assert all(a >= b for a, b in itertools.pairwise(steps))


def test_learning_rate_follows_the_schedule_during_fit(data):
    train, val, _ = data
    seen = []
    _fit(_config(epochs=4, warmup_epochs=1.0, min_lr=1e-4), train, val, on_epoch_end=lambda r: seen.append(r.lr))
    steps_per_epoch = len(train)
    expected = [
        2e-3 * warmup_cosine_factor(e * steps_per_epoch, total_steps=4 * steps_per_epoch, warmup_steps=steps_per_epoch, min_ratio=0.05)
        for e in range(1, 5)
    ]
    assert seen == pytest.approx(expected)
    assert seen[-1] == pytest.approx(1e-4)


@pytest.mark.parametrize(
    "options",
    [
        {"optimizer": "adam", "grad_clip_norm": 0.5},
        {"balance": "class_weights", "batch_size": 3},
        {"balance": "sampler", "amp": True},
    ],
)
def test_options_train(data, options):
    train, val, _ = data
    _, result = _fit(_config(epochs=2, **options), train, val)
    assert result.epochs_run == 2
    assert all(math.isfinite(h["train_loss"]) for h in result.history)


def test_balanced_batches_reach_the_method_class_balanced(data):
    """`balance: batches` on a 1:6 training set: every padded step the method sees holds both classes equally."""
    train, val, _ = data
    imbalanced = [bag for bag in train if bag.label == 0] + [bag for bag in train if bag.label == 1][:3]
    seen: list[list[int]] = []

    class Spy(TrainingMethod):
        def compute_loss(self, model, batch, *, progress):
            seen.append(batch.labels.tolist())
            return super().compute_loss(model, batch, progress=progress)

    config = _config(epochs=2, batch_size=6, balance="batches", batch_execution="padded")
    torch.manual_seed(0)
    fit(create_model("abmil", 8, 2, **SMALL_ABMIL), Spy(), imbalanced, val, config=config, num_classes=2)
    assert len(seen) == 2 * math.ceil(len(imbalanced) / 6)
    assert all(labels.count(0) == labels.count(1) for labels in seen if len(labels) % 2 == 0)


def test_acmil_trains_through_its_aux_losses(data):
    train, val, _ = data
    terms = []
    _fit(_config(epochs=1), train, val, method="acmil", model="acmil", on_epoch_end=lambda r: terms.append(r.train_terms))
    assert {"bag", "diversity", "branch"} <= set(terms[0])


def test_non_finite_loss_is_reported(data):
    train, val, _ = data
    broken = [Bag(torch.full_like(b.features, float("nan")), b.label, b.slide_id) for b in train]
    with pytest.raises(TrainingConfigError, match=r"non-finite training loss.*--lr"):
        _fit(_config(epochs=1), broken, val)


def test_single_class_validation_cannot_select_on_auc(data):
    train, val, _ = data
    one_class = [b for b in val if b.label == 0]
    with pytest.raises(TrainingConfigError, match=r"undefined.*selection_metric: loss"):
        _fit(_config(epochs=1), train, one_class)
    _, result = _fit(_config(epochs=1, selection_metric="loss"), train, one_class)
    assert result.best_epoch == 1


@pytest.mark.gpu
def test_bfloat16_autocast_training_on_cuda(data):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    train, val, test = data
    model, result = _fit(_config(epochs=4, device="cuda", amp=True), train, val)
    assert next(model.parameters()).is_cuda
    assert all(math.isfinite(h["train_loss"]) for h in result.history)
    assert all(t.device.type == "cpu" for t in result.best_state.values())
    model.load_state_dict(result.best_state)
    predictions = predict_bags(model, test, device="cuda", amp=True)
    assert classification_metrics(predictions.labels, predictions.probs)["roc_auc_macro"] > 0.8
