"""Serving every model folder and training-run fold under models_dir by name, and reporting bad folders."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from wsi_mil.errors import UnknownModelError
from wsi_mil.inference.predict import predict_bag
from wsi_mil.service.model_registry import ModelRegistry
from wsi_mil.training.config import TrainConfig, save_config


def test_model_folders_and_run_folds_are_served(model_folder, tmp_path: Path) -> None:
    root = tmp_path / "models"
    model_folder(root / "single")
    model_folder(root / "group" / "nested", class_names=("a", "b", "c"))
    run = root / "run1"
    run.mkdir(parents=True)
    save_config(TrainConfig(), run / "config.yaml")
    for fold in (0, 1):
        model_folder(run / f"fold_{fold}", fold=fold, seed=fold)
    registry = ModelRegistry.load(root, device="cpu")
    assert registry.names() == ["group/nested", "run1/fold_0", "run1/fold_1", "single"]
    assert registry.problems == {}
    assert registry.get("run1/fold_1").card.fold == 1
    assert registry.get("group/nested").card.class_names == ["a", "b", "c"]
    served = registry.get("single")
    assert not served.model.training
    assert served.preprocessing_source == "card" and served.slide_problem is None
    assert (
        served.preprocessing.encoder == "test-encoder" and served.preprocessing.tiling.tile_px == 64
    )
    output = predict_bag(served, np.random.default_rng(0).normal(size=(9, 32)).astype(np.float32))
    assert output.probabilities.shape == (2,) and output.attention.shape == (9,)
    saved = (root / "single" / "model.safetensors").read_bytes()
    assert served.weights_sha256 == hashlib.sha256(saved).hexdigest()
    reference = load_file(str(root / "single" / "model.safetensors"))
    for key, value in served.model.state_dict().items():
        assert torch.equal(value, reference[key]), key
    with pytest.raises(UnknownModelError, match="served models: group/nested, run1/fold_0"):
        registry.get("missing")


def test_bad_folders_are_reported_not_fatal(model_folder, tmp_path: Path) -> None:
    root = tmp_path / "models"
    model_folder(root / "good")
    (root / "not_json").mkdir()
    (root / "not_json" / "model_card.json").write_text("[1, 2")
    model_folder(root / "no_weights")
    (root / "no_weights" / "model.safetensors").unlink()
    wrong = model_folder(root / "wrong_shape")
    card = json.loads((wrong / "model_card.json").read_text())
    card["feature_contract"]["feature_dim"] = 64
    (wrong / "model_card.json").write_text(json.dumps(card))
    unknown = model_folder(root / "unknown_arch")
    card = json.loads((unknown / "model_card.json").read_text())
    card["model_name"] = "no_such_model"
    (unknown / "model_card.json").write_text(json.dumps(card))
    registry = ModelRegistry.load(root, device="cpu")
    assert registry.names() == ["good"]
    assert set(registry.problems) == {"not_json", "no_weights", "wrong_shape", "unknown_arch"}
    assert "no_such_model" in registry.problems["unknown_arch"]
    assert (
        "WSI_MIL_MODELS_DIR"
        in ModelRegistry.load(tmp_path / "absent").problems["models_dir"]
    )
