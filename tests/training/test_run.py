"""Run folders end to end: layout, model card, metrics, predictions, resume, no test leakage, and
loading a run's models for prediction."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from wsi_mil import __version__
from wsi_mil.errors import FeatureContractError, RunFolderError
from wsi_mil.inference import (
    RunLayout,
    load_model,
    predict_features,
    read_model_card,
    save_predictions,
)
from wsi_mil.models.dsmil import DSMIL
from wsi_mil.training import evaluate_run, train_cohort
from wsi_mil.training.benchmarks_data import write_feature_cohort
from wsi_mil.training.cohort import Cohort
from wsi_mil.training.config import TrainConfig, load_config
from wsi_mil.training.metrics import SCALAR_METRICS
from wsi_mil.training.splits import load_split


class Interrupted(Exception):
    """Raised from the epoch callback to simulate a run killed mid-fold."""


@pytest.fixture(scope="module")
def trained(tmp_path_factory, bag_factory, one_torch_thread):
    """One finished 2-fold run on a 40-slide cohort (shared by the read-only tests below)."""
    root = tmp_path_factory.mktemp("trained")
    bags = bag_factory(40, seed=11)
    write_feature_cohort(bags, root / "features", root / "labels.csv", class_names=["benign", "tumour"],
                         case_ids=[f"p{i // 2}" for i in range(40)])
    config = TrainConfig(
        features_dir=root / "features", labels_csv=root / "labels.csv", model="abmil",
        model_kwargs={"hidden_dim": 32, "attention_dim": 16, "dropout": 0.0}, folds=2, epochs=6, lr=5e-3,
        bootstrap_samples=50, top_k_tiles=3, device="cpu",
    )
    with one_torch_thread():
        metrics = train_cohort(config, root / "run")
    return root, config, metrics


def test_run_folder_layout(trained):
    root, config, _ = trained
    run = root / "run"
    for name in ("config.yaml", "metrics.json", "predictions.csv", "roc.png", "confusion.png", "train.log",
                 "splits/fold_0.csv", "splits/fold_1.csv"):
        assert (run / name).is_file(), name
    for fold in (0, 1):
        for name in ("model.safetensors", "model_card.json", "last.pt"):
            assert (run / f"fold_{fold}" / name).is_file()
    assert load_config(run / "config.yaml") == config
    for png in ("roc.png", "confusion.png"):
        assert (run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    log = (run / "train.log").read_text()
    assert "fold 0 epoch 1/6" in log and "fold 1 done" in log


def test_model_card_holds_the_feature_contract(trained):
    root, _, _ = trained
    card = read_model_card(root / "run" / "fold_0" / "model_card.json")
    assert card.model_name == "abmil"
    assert card.model_kwargs == {"hidden_dim": 32, "attention_dim": 16, "gated": True, "dropout": 0.0, "attention_dropout": 0.25}
    assert card.class_names == ["benign", "tumour"] and card.num_classes == 2
    contract = card.feature_contract
    assert (contract.encoder, contract.feature_dim, contract.target_mpp, contract.tile_px, contract.tile_size_level0) == (
        "synthetic", 8, 0.5, 224, 448)
    assert card.training_method == "plain"
    assert card.wsi_mil_version == __version__
    assert 1 <= card.best_epoch <= card.epochs_run <= 6
    assert set(card.metrics) == {"val", "test"}
    assert card.created.endswith("+00:00")


def test_metrics_json_names_and_values(trained):
    root, _, metrics = trained
    assert json.loads((root / "run" / "metrics.json").read_text()) == metrics
    assert metrics["class_names"] == ["benign", "tumour"]
    assert [f["fold"] for f in metrics["folds"]] == [0, 1]
    for fold in metrics["folds"]:
        for part in ("val", "test"):
            assert set(SCALAR_METRICS) <= set(fold[part])
            assert set(fold[part]["ci95"]) == set(SCALAR_METRICS)
            assert len(fold[part]["confusion_matrix"]) == 2
    for part in ("val", "test"):
        summary = metrics["summary"][part]
        values = [f[part]["accuracy_micro"] for f in metrics["folds"]]
        assert summary["accuracy_micro"]["mean"] == pytest.approx(np.mean(values))
        assert summary["accuracy_micro"]["sd"] == pytest.approx(np.std(values, ddof=1))
    assert metrics["pooled_test"]["n"] == 40
    assert metrics["summary"]["test"]["roc_auc_macro"]["mean"] > 0.8  # the task is easy


def test_predictions_csv_lists_val_and_test_slides_with_top_tiles(trained):
    root, _, _ = trained
    with (root / "run" / "predictions.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {r["split"] for r in rows} == {"val", "test"}
    test_rows = [r for r in rows if r["split"] == "test"]
    assert sorted(r["slide_id"] for r in test_rows) == [f"slide_{i:03d}" for i in range(40)]
    for row in rows:
        split = load_split(root / "run" / "splits" / f"fold_{row['fold']}.csv", fold=int(row["fold"]))
        assert row["slide_id"] in split.part(row["split"])
        assert float(row["prob_benign"]) + float(row["prob_tumour"]) == pytest.approx(1.0)
        assert row["predicted"] in ("benign", "tumour")
        coords = json.loads(row["top_tile_coords"])
        assert len(coords) == 3 and all(x % 448 == 0 and y % 448 == 0 for x, y in coords)
        assert len(json.loads(row["top_tile_indices"])) == 3


def test_evaluate_run_recomputes_the_same_metrics(trained):
    root, _, metrics = trained
    assert evaluate_run(root / "run") == metrics


def test_load_model_picks_the_best_validation_fold_and_predict_matches(trained):
    root, _, _ = trained
    cards = [read_model_card(root / "run" / f"fold_{k}" / "model_card.json") for k in (0, 1)]
    best = max(cards, key=lambda c: (c.metrics["val"]["roc_auc_macro"], -c.fold))
    loaded = load_model(root / "run")
    card = loaded.card
    assert card.fold == best.fold and not loaded.model.training
    split = load_split(root / "run" / "splits" / f"fold_{card.fold}.csv", fold=card.fold)
    slide_id = split.test[0]
    result = predict_features(root / "features" / f"{slide_id}.h5", loaded)
    prediction = result.prediction
    assert result.slide_id == slide_id and prediction.fold == card.fold
    assert sum(prediction.class_probabilities.values()) == pytest.approx(1.0)
    assert prediction.attention.shape == (len(result.coords),)
    assert prediction.attention.sum() == pytest.approx(1.0, abs=1e-5)
    with (root / "run" / "predictions.csv").open(newline="") as handle:
        row = next(r for r in csv.DictReader(handle) if r["slide_id"] == slide_id and r["split"] == "test")
    assert int(row["fold"]) == card.fold
    assert prediction.class_probabilities["tumour"] == pytest.approx(float(row["prob_tumour"]), abs=1e-6)
    with pytest.raises(RunFolderError, match=r"no finished fold 7.*\[0, 1\]"):
        load_model(root / "run", fold=7)
    fold_folder = load_model(root / "run" / f"fold_{card.fold}")
    assert fold_folder.card == card and fold_folder.weights_sha256 == loaded.weights_sha256
    with pytest.raises(RunFolderError, match="holds no model"):
        load_model(root / "features")


def test_predict_refuses_mismatched_features(trained, tmp_path, bag_factory):
    root, _, _ = trained
    write_feature_cohort(bag_factory(2, dim=12), tmp_path / "wide", tmp_path / "a.csv")
    loaded = load_model(root / "run")
    with pytest.raises(FeatureContractError, match="12-d features, the model expects 8-d"):
        predict_features(tmp_path / "wide" / "slide_000.h5", loaded)
    write_feature_cohort(bag_factory(2, dim=8), tmp_path / "uni", tmp_path / "b.csv", encoder="uni")
    with pytest.raises(FeatureContractError, match="encoder='uni', the model expects encoder='synthetic'; re-extract with --encoder synthetic"):
        predict_features(tmp_path / "uni" / "slide_000.h5", loaded)


def test_save_predictions_csv_and_json(trained, tmp_path):
    root, _, _ = trained
    loaded = load_model(root / "run", fold=0)
    predictions = [predict_features(root / "features" / f"slide_00{i}.h5", loaded) for i in (0, 1)]
    save_predictions(predictions, tmp_path / "p.json")
    payload = json.loads((tmp_path / "p.json").read_text())
    assert [p["slide_id"] for p in payload] == ["slide_000", "slide_001"]
    scores = payload[0]["tile_scores"]
    assert len(scores["attention"]) == len(payload[0]["coords"]) == predictions[0].prediction.num_tiles
    assert set(scores) == {"attention", "attention_logits"} and payload[0]["fold"] == 0
    save_predictions(predictions, tmp_path / "p.csv")
    with (tmp_path / "p.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == sum(p.prediction.num_tiles for p in predictions)
    assert {"slide_id", "prob_benign", "prob_tumour", "tile_index", "x", "y", "attention", "attention_logits"} <= set(rows[0])


def test_interrupted_run_resumes_to_the_same_metrics(write_cohort, tmp_path):
    files = write_cohort(num_bags=20)
    config = files.config(epochs=3, model_kwargs={"hidden_dim": 16, "attention_dim": 8, "dropout": 0.25})
    reference = train_cohort(config, tmp_path / "reference")

    def kill_in_fold_1(report):
        if report.fold == 1 and report.epoch == 2:
            raise Interrupted

    with pytest.raises(Interrupted):
        train_cohort(config, tmp_path / "resumed", on_epoch_end=kill_in_fold_1)
    layout = RunLayout(tmp_path / "resumed")
    assert layout.folds() == [0] and layout.last_checkpoint(1).exists()
    reports = []
    resumed = train_cohort(config, tmp_path / "resumed", on_epoch_end=reports.append)
    assert [(r.fold, r.epoch) for r in reports] == [(1, 3)]
    assert resumed == reference
    with pytest.raises(RunFolderError, match=r"different config \(changed: epochs\)"):
        train_cohort(config.model_copy(update={"epochs": 4}), tmp_path / "resumed")


def spy_on_reads(monkeypatch: pytest.MonkeyPatch, reader: str) -> list[str]:
    """The slide ids that `Cohort.<reader>` is called with from now on, in call order."""
    calls: list[str] = []
    original = getattr(Cohort, reader)

    def spying(self, slide_id):
        calls.append(slide_id)
        return original(self, slide_id)

    monkeypatch.setattr(Cohort, reader, spying)
    return calls


def test_the_test_split_is_never_read_while_training(write_cohort, tmp_path, monkeypatch):
    """Spy on feature loading (caches off): during training only train/val slides of the fold load."""
    files = write_cohort(num_bags=20)
    config = files.config(epochs=2, cache_bags=0, cache_features=False, bootstrap_samples=0)
    loaded = spy_on_reads(monkeypatch, "load")
    run = tmp_path / "run"
    checked = []

    def check(report):
        split = load_split(run / "splits" / f"fold_{report.fold}.csv", fold=report.fold)
        seen = set(loaded)
        loaded.clear()
        assert seen and not seen & set(split.test), f"fold {report.fold} read test slides while training"
        assert seen <= set(split.train) | set(split.val)
        checked.append(report.epoch)

    train_cohort(config, run, on_epoch_end=check)
    assert checked == [1, 2, 1, 2]
    assert loaded  # the test slides are read after training, for the test metrics


def test_the_feature_cache_reads_each_training_and_validation_slide_once(write_cohort, tmp_path, monkeypatch):
    """With `cache_features` each fold reads its train and val slides once, before its first epoch."""
    files = write_cohort(num_bags=12)
    config = files.config(epochs=3, folds=2, cache_bags=0, bootstrap_samples=0)
    stored = spy_on_reads(monkeypatch, "load_stored")
    run = tmp_path / "run"
    reads: dict[tuple[int, int], list[str]] = {}

    def record(report):
        reads[(report.fold, report.epoch)] = stored.copy()
        stored.clear()

    train_cohort(config, run, on_epoch_end=record)
    for fold in (0, 1):
        split = load_split(run / "splits" / f"fold_{fold}.csv", fold=fold)
        assert sorted(reads[(fold, 1)]) == sorted(split.train + split.val)
        assert reads[(fold, 2)] == reads[(fold, 3)] == []


def test_multiclass_with_a_split_column(write_cohort, tmp_path):
    files = write_cohort(num_bags=30, num_classes=3, patients=False)
    with files.labels_csv.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    for i, row in enumerate(rows):
        row["split"] = ("train", "train", "train", "val", "test")[(i // 3) % 5]
    with files.labels_csv.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    metrics = train_cohort(files.config(epochs=3, method="aem", method_kwargs={"weight": 0.01}), tmp_path / "run")
    assert len(metrics["folds"]) == 1
    assert len(metrics["folds"][0]["test"]["confusion_matrix"]) == 3
    assert metrics["folds"][0]["test"]["n"] == 6
    assert read_model_card(tmp_path / "run" / "fold_0" / "model_card.json").training_method == "aem"


def test_dsmil_run_trains_with_the_official_bce_loss_and_the_card_records_it(write_cohort, tmp_path, monkeypatch):
    original = DSMIL.bag_loss
    checked: list[bool] = []

    def spy(self, output, target, *, class_weights=None):
        loss = original(self, output, target, class_weights=class_weights)
        one_hot = torch.nn.functional.one_hot(target, self.num_classes).float()
        checked.append(torch.allclose(loss, torch.nn.functional.binary_cross_entropy_with_logits(output.logits, one_hot)))
        return loss

    monkeypatch.setattr(DSMIL, "bag_loss", spy)
    files = write_cohort(num_bags=12)
    config = files.config(model="dsmil", model_kwargs={"query_dim": 8}, epochs=1)
    reports = []
    train_cohort(config, tmp_path / "run", on_epoch_end=reports.append)
    card = read_model_card(RunLayout(tmp_path / "run").card(0))
    assert card.model_kwargs["bag_loss"] == "bce" and card.model_kwargs["max_instance_loss"] == "bce"
    assert checked and all(checked)  # every training step's bag term was DSMIL's per-class BCE
    assert {"bag", "max_instance"} <= set(reports[0].train_terms)
