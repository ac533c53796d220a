"""The model card: the one feature-contract check, the flags its hints name, the typed preprocessing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import typer

from wsi_mil.cli import _register_commands, app
from wsi_mil.errors import FeatureContractError, RunFolderError
from wsi_mil.inference.card import (
    CONTRACT_FLAGS,
    PREPROCESS_FIELDS,
    FeatureContract,
    ModelCard,
    read_model_card,
    recorded_preprocessing,
)
from wsi_mil.preprocessing.feature_file import FeatureBag
from wsi_mil.preprocessing.pipeline import PreprocessConfig
from wsi_mil.preprocessing.tiling import TilingParams

CONTRACT = FeatureContract(encoder="test-encoder", feature_dim=32, target_mpp=0.5, tile_px=64)


def bag(dim: int = 32, **attrs: object) -> FeatureBag:
    return FeatureBag(np.zeros((3, dim), np.float32), None, None, dict(attrs), "wsi_mil", Path("s.h5"))


def card(**changes: object) -> ModelCard:
    values: dict[str, object] = {
        "model_name": "abmil",
        "model_kwargs": {},
        "num_classes": 2,
        "class_names": ["a", "b"],
        "feature_contract": CONTRACT,
        "training_method": "plain",
        "fold": 0,
        "best_epoch": 1,
        "epochs_run": 1,
        "selection_metric": "roc_auc_macro",
    }
    values.update(changes)
    return ModelCard.model_validate(values)


def test_matching_features_pass_and_unrecorded_fields_are_not_held_against_them() -> None:
    CONTRACT.check(bag(encoder="test-encoder", target_mpp=0.5002, tile_px=64), source="s.h5")
    CONTRACT.check(bag(), source="s.h5")  # CLAM-style files record none of them


@pytest.mark.parametrize(
    ("features", "message"),
    [
        (bag(dim=16), r"s.h5 has 16-d features, the model expects 32-d \(test-encoder\)"),
        (bag(encoder="uni"), r"encoder='uni', the model expects encoder='test-encoder'; re-extract with --encoder test-encoder"),
        (bag(extractor="uni"), r"encoder='uni'"),  # TRIDENT names it `extractor`
        (bag(target_mpp=0.25), r"target_mpp=0.25, the model expects target_mpp=0.5; re-extract with --mpp 0.5"),
        (bag(tile_px=224), r"tile_px=224, the model expects tile_px=64; re-extract with --tile-px 64"),
    ],
)
def test_a_mismatch_names_the_source_the_difference_and_the_flag(features: FeatureBag, message: str) -> None:
    with pytest.raises(FeatureContractError, match=message):
        CONTRACT.check(features, source="s.h5")


def test_the_hints_name_real_flags_of_wsi_mil_preprocess() -> None:
    _register_commands()
    preprocess = typer.main.get_command(app).commands["preprocess"]  # type: ignore[attr-defined]
    flags = {opt for param in preprocess.params for opt in param.opts}
    assert set(CONTRACT_FLAGS.values()) <= flags
    assert "--target-mpp" not in flags


def test_preprocessing_is_typed_and_the_card_keeps_only_what_decides_features(tmp_path: Path) -> None:
    config = PreprocessConfig(
        tiling=TilingParams(target_mpp=0.5, tile_px=64), encoder="test-encoder", batch_size=7, device="cuda:1", slide_mpp=0.3
    )
    path = tmp_path / "model_card.json"
    path.write_text(card(preprocessing=config).model_dump_json())
    saved = json.loads(path.read_text())["preprocessing"]
    assert set(saved) == set(PREPROCESS_FIELDS)
    loaded = read_model_card(path).preprocessing
    assert isinstance(loaded, PreprocessConfig) and loaded.tiling.tile_px == 64
    assert (loaded.batch_size, loaded.device, loaded.slide_mpp) == (64, None, None)  # runtime knobs: defaults


def test_a_card_written_before_the_typed_preprocessing_still_loads(tmp_path: Path) -> None:
    raw = json.loads(card().model_dump_json())
    raw["preprocessing"] = {"tissue": {}, "tiling": {"target_mpp": 0.5, "tile_px": 64}, "encoder": "test-encoder",
                            "weights": None, "precision": "auto"}
    (tmp_path / "old.json").write_text(json.dumps(raw))
    assert read_model_card(tmp_path / "old.json").preprocessing.tiling.target_mpp == 0.5
    raw["preprocessing"]["tiling"]["tile_px"] = -3
    (tmp_path / "bad.json").write_text(json.dumps(raw))
    with pytest.raises(RunFolderError, match=r"bad.json is malformed: preprocessing.tiling.tile_px: Input should be"):
        read_model_card(tmp_path / "bad.json")


def test_recorded_preprocessing_keeps_settings_and_drops_provenance() -> None:
    attrs = {
        "tissue": {"method": "classical", "mode": "brightfield", "seg_mpp": 4.0, "area_fraction": 0.3},
        "tiling": {"target_mpp": 0.5, "tile_px": 64, "overlap_px": 0, "min_tissue_fraction": 0.25},
        "encoder": "test-encoder",
        "encoder_weights": "hub:org/model",
        "precision": "fp32",
    }
    config = recorded_preprocessing(attrs)
    assert config is not None and config.tissue.seg_mpp == 4.0 and config.weights is None and config.precision == "fp32"
    assert recorded_preprocessing({**attrs, "encoder_weights": "/w/enc.safetensors"}).weights == "/w/enc.safetensors"
    assert recorded_preprocessing({"encoder": "uni"}) is None  # CLAM/TRIDENT/.pt record no settings


def test_slide_preprocessing_from_the_card_the_contract_or_neither() -> None:
    own = card(preprocessing=PreprocessConfig(tiling=TilingParams(target_mpp=0.5, tile_px=64), encoder="test-encoder"))
    assert own.slide_preprocessing().source == "card" and own.slide_preprocessing().problem is None
    derived = card().slide_preprocessing()
    assert derived.source == "feature_contract" and derived.config.tiling.tile_px == 64 and derived.problem is None
    bare = card(feature_contract=FeatureContract(feature_dim=32)).slide_preprocessing()
    assert bare.config is None and "only feature-file predictions" in bare.problem
    wrong = card(preprocessing=PreprocessConfig(tiling=TilingParams(target_mpp=0.5, tile_px=128), encoder="test-encoder"))
    assert "tile_px=128" in wrong.slide_preprocessing().problem


def test_validation_score_is_signed_so_higher_is_better() -> None:
    assert card(metrics={"val": {"roc_auc_macro": 0.8}}).validation_score() == 0.8
    assert card(selection_metric="loss", metrics={"val": {"loss": 0.3}}).validation_score() == -0.3
    assert card().validation_score() is None
