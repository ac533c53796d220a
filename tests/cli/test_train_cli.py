"""`wsi-mil train / evaluate / predict` through typer's CliRunner on a small cohort of feature files."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from wsi_mil.cli import _register_commands, app
from wsi_mil.models import create_model
from wsi_mil.training.bag import Bag
from wsi_mil.training.benchmarks_data import write_feature_cohort

runner = CliRunner()

pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> tuple[Path, Path]:
    """16 bags of 8-d features; class 1 bags hold a few instances shifted along the first axis."""
    _register_commands()
    root = tmp_path_factory.mktemp("cli_cohort")
    generator = torch.Generator().manual_seed(0)
    bags = []
    for i in range(16):
        features = torch.randn(int(torch.randint(4, 12, (1,), generator=generator)), 8, generator=generator)
        features[:2, 0] += 4.0 * (i % 2)
        bags.append(Bag(features, i % 2, f"slide_{i:02d}"))
    write_feature_cohort(bags, root / "features", root / "labels.csv", class_names=["normal", "tumour"])
    return root / "features", root / "labels.csv"


def _train(cohort: tuple[Path, Path], out: Path, *extra: str):
    features, labels = cohort
    return runner.invoke(
        app,
        ["train", "--features", str(features), "--labels", str(labels), "--model", "abmil", "--out", str(out),
         "--folds", "2", "--epochs", "2", "--seed", "3", "--device", "cpu", *extra],
    )


def test_train_folds_on_ray(cohort, tmp_path, ray_instance):
    local = _train(cohort, tmp_path / "local")
    on_ray = _train(cohort, tmp_path / "ray", "--executor", "ray")
    assert local.exit_code == 0 and on_ray.exit_code == 0, local.output + on_ray.output
    assert "folds run as Ray tasks" in on_ray.output
    local_metrics = json.loads((tmp_path / "local" / "metrics.json").read_text())
    assert json.loads((tmp_path / "ray" / "metrics.json").read_text()) == local_metrics
    refused = _train(cohort, tmp_path / "dask", "--executor", "dask")
    assert refused.exit_code == 2 and "executor must be local or ray" in refused.output


def test_train_evaluate_predict(cohort, tmp_path):
    out = tmp_path / "run"
    result = _train(cohort, out, "--method", "aem", "--lr", "0.001", "--batch-size", "2", "--max-instances", "6")
    assert result.exit_code == 0, result.output
    assert "test (mean ± sd over folds)" in result.output and "roc_auc_macro" in result.output
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert (saved["method"], saved["folds"], saved["epochs"], saved["seed"]) == ("aem", 2, 2, 3)
    assert (saved["lr"], saved["batch_size"], saved["max_instances"]) == (0.001, 2, 6)
    assert (out / "fold_1" / "model_card.json").exists()

    result = runner.invoke(app, ["evaluate", str(out)])
    assert result.exit_code == 0, result.output
    assert "accuracy_micro" in result.output

    features = cohort[0]
    result = runner.invoke(app, ["predict", str(out), str(features / "slide_01.h5"), str(features / "slide_02.h5"),
                                 "--out", str(tmp_path / "p.json")])
    assert result.exit_code == 0, result.output
    assert "slide_01" in result.output
    payload = json.loads((tmp_path / "p.json").read_text())
    assert [p["slide_id"] for p in payload] == ["slide_01", "slide_02"]
    assert set(payload[0]["probabilities"]) == {"normal", "tumour"}
    result = runner.invoke(app, ["predict", str(out), str(features / "slide_01.h5"), "--fold", "1",
                                 "--out", str(tmp_path / "p.csv")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "p.csv").read_text().startswith("slide_id,fold,predicted,prob_normal,prob_tumour,tile_index")


def test_flags_override_the_yaml_config(cohort, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"epochs": 5, "lr": 0.01, "model_kwargs": {"hidden_dim": 16, "attention_dim": 8},
                                      "patience": 3, "bootstrap_samples": 20}))
    out = tmp_path / "run"
    result = _train(cohort, out, "--config", str(config), "--epochs", "1")
    assert result.exit_code == 0, result.output
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["epochs"] == 1  # the flag wins
    assert (saved["lr"], saved["patience"], saved["bootstrap_samples"]) == (0.01, 3, 20)  # from the YAML
    assert saved["model_kwargs"] == {"hidden_dim": 16, "attention_dim": 8}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "nope"], "unknown training method 'nope'"),
        (["--lr", "-1"], "lr: Input should be greater than 0"),
        (["--model", "abmil_typo"], "unknown model 'abmil_typo'"),
    ],
)
def test_errors_exit_with_a_message_not_a_traceback(cohort, tmp_path, args, message):
    result = _train(cohort, tmp_path / "run", *args)
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output


def test_drop_missing_flag(cohort, tmp_path):
    features, labels = cohort
    with_ghost = tmp_path / "labels.csv"
    with_ghost.write_text(labels.read_text() + "ghost,tumour,ghost\n")
    args = ["train", "--features", str(features), "--labels", str(with_ghost), "--out", str(tmp_path / "run"),
            "--folds", "2", "--epochs", "1", "--device", "cpu"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "ghost" in result.output and "--drop-missing" in result.output
    result = runner.invoke(app, [*args, "--drop-missing"])
    assert result.exit_code == 0, result.output
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["drop_missing_features"] is True


def test_missing_inputs_and_runs_are_reported(tmp_path):
    _register_commands()
    result = runner.invoke(app, ["train", "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "--features DIR --labels CSV" in result.output
    result = runner.invoke(app, ["evaluate", str(tmp_path / "nothing")])
    assert result.exit_code == 2 and "not a run folder" in result.output


def test_ins_trains_predicts_its_instance_scores_per_tile_and_evaluates(cohort, tmp_path):
    """`--model ins --method ins` from the example config (made small): the fold model holds only the
    ins model, `predict` writes each tile's `instance_score`, `evaluate` recomputes the metrics."""
    repo = Path(__file__).resolve().parents[2]
    config = yaml.safe_load((repo / "configs" / "train" / "ins.yaml").read_text())
    config["model_kwargs"]["hidden_dim"] = 16
    config["method_kwargs"]["queue_size"] = 64
    config.update(epochs=3, min_epochs=0, batch_size=4, bootstrap_samples=20)
    (tmp_path / "ins.yaml").write_text(yaml.safe_dump(config))
    features, labels = cohort
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "--features", str(features), "--labels", str(labels), "--config",
                                 str(tmp_path / "ins.yaml"), "--out", str(out), "--folds", "2", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    card = json.loads((out / "fold_0" / "model_card.json").read_text())
    assert (card["model_name"], card["training_method"]) == ("ins", "ins")
    served = load_file(str(out / "fold_0" / "model.safetensors"))
    assert set(served) == set(create_model("ins", 8, 2, **card["model_kwargs"]).state_dict())  # no head, no key encoder

    result = runner.invoke(app, ["predict", str(out), str(features / "slide_01.h5"), "--fold", "0",
                                 "--out", str(tmp_path / "p.csv")])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    assert rows and "instance_score" in rows[0]
    scores = [float(r["instance_score"]) for r in rows]
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert scores == pytest.approx([float(r["tile_probability_tumour"]) for r in rows], rel=1e-5)
    assert max(scores) == pytest.approx(float(rows[0]["prob_tumour"]), rel=1e-5)  # max pooling

    result = runner.invoke(app, ["evaluate", str(out)])
    assert result.exit_code == 0, result.output
    assert "roc_auc_macro" in result.output
