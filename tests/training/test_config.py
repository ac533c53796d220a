"""TrainConfig: YAML loading, overrides, saving, clear errors, and the example configs in the repo."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from wsi_mil.errors import TrainingConfigError
from wsi_mil.models import model_entry
from wsi_mil.training.config import TrainConfig, load_config, save_config
from wsi_mil.training.methods import create_method

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "train"


def test_defaults_without_a_file():
    config = load_config()
    assert config == TrainConfig()
    assert (config.model, config.method, config.batch_size, config.optimizer) == ("abmil", "plain", 1, "adamw")


def test_overrides_win_over_the_file_and_none_keeps_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 7\nlr: 0.01\nmethod_kwargs: {weight: 0.2}\nmethod: aem\n")
    config = load_config(path, overrides={"epochs": 3, "lr": None, "features_dir": tmp_path})
    assert (config.epochs, config.lr, config.method_kwargs, config.features_dir) == (3, 0.01, {"weight": 0.2}, tmp_path)


def test_save_and_reload_round_trip(tmp_path):
    config = TrainConfig(features_dir=tmp_path / "f", labels_csv=tmp_path / "l.csv", model_kwargs={"hidden_dim": 64},
                         max_instances=500, grad_clip_norm=1.0, class_names=["a", "b"])
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["features_dir"] == str(tmp_path / "f")
    assert config.differences(config.model_copy(update={"seed": 5, "lr": 0.1})) == ["lr", "seed"]


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("epoch: 3\n", r"epoch: Extra inputs are not permitted"),
        ("lr: -1\n", r"lr: Input should be greater than 0"),
        ("optimizer: sgd\n", r"optimizer: Input should be 'adamw' or 'adam'"),
        ("epochs: 5\nwarmup_epochs: 5\n", r"warmup_epochs \(5.0\) must be below epochs"),
        ("lr: 0.001\nmin_lr: 0.01\n", r"min_lr .* must not exceed lr"),
        ("- a\n- b\n", r"must hold a mapping.*--config"),
        ("epochs: [\n", r"not valid YAML.*--config"),
    ],
)
def test_bad_configs_name_the_setting(tmp_path, text, pattern):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(TrainingConfigError, match=pattern):
        load_config(path)


def test_missing_config_file(tmp_path):
    with pytest.raises(TrainingConfigError, match=r"cannot read the config file.*--config"):
        load_config(tmp_path / "absent.yaml")


@pytest.mark.parametrize("name", ["plain", "aem", "acmil"])
def test_example_configs_are_valid(name):
    config = load_config(CONFIGS / f"{name}.yaml")
    assert config.method == name
    create_method(config.method, **config.method_kwargs)
    assert set(config.model_kwargs) <= set(model_entry(config.model).defaults)
