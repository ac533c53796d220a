"""`load_model`: model folders, run folds and run folders (best fold), the preprocessing slides get, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from wsi_mil.errors import RunFolderError, WsiMilError
from wsi_mil.inference.loading import RunLayout, load_model


def set_card(folder: Path, **changes: object) -> None:
    card = json.loads((folder / "model_card.json").read_text())
    card.update(changes)
    (folder / "model_card.json").write_text(json.dumps(card))


def test_preprocessing_slides_get(model_folder, tmp_path: Path) -> None:
    derived = load_model(model_folder(tmp_path / "derived", preprocessing=False))
    assert derived.preprocessing_source == "feature_contract" and derived.slide_problem is None
    assert derived.preprocessing.encoder == "test-encoder" and derived.preprocessing.weights is None
    features_only = load_model(model_folder(tmp_path / "features_only", preprocessing=False, encoder=None))
    assert "only feature-file predictions" in features_only.slide_problem
    with pytest.raises(WsiMilError, match="cannot predict slides: the model card has no `preprocessing`"):
        features_only.slide_config()
    mismatch = model_folder(tmp_path / "mismatch", tiling={"target_mpp": 1.0, "tile_px": 64})
    card = json.loads((mismatch / "model_card.json").read_text())
    card["preprocessing"]["tiling"]["tile_px"] = 128
    (mismatch / "model_card.json").write_text(json.dumps(card))
    assert "tile_px=128" in load_model(mismatch).slide_problem
    assert "no-such-encoder" in load_model(model_folder(tmp_path / "bad_encoder", encoder="no-such-encoder")).slide_problem
    relative = model_folder(tmp_path / "relative_weights", weights="enc.safetensors")
    (relative / "enc.safetensors").write_bytes(b"")
    loaded = load_model(relative)
    assert loaded.preprocessing.weights == str(relative / "enc.safetensors")
    runtime = loaded.slide_config(batch_size=5, num_workers=None, device="cpu")
    assert (runtime.batch_size, runtime.num_workers, runtime.device) == (5, loaded.preprocessing.num_workers, "cpu")


@pytest.mark.parametrize(("metric", "values", "best"), [("roc_auc_macro", (0.9, 0.8), 0), ("loss", (0.3, 0.2), 1)])
def test_a_run_folder_gives_its_best_validation_fold(model_folder, tmp_path: Path, metric: str, values, best: int) -> None:
    run = tmp_path / "run"
    for fold, value in enumerate(values):
        set_card(model_folder(run / f"fold_{fold}", fold=fold, seed=fold), selection_metric=metric,
                 metrics={"val": {metric: value}, "test": {metric: 1.0 - value}})
    assert RunLayout(run).folds() == [0, 1]
    assert load_model(run).card.fold == best
    assert load_model(run, fold=1 - best).card.fold == 1 - best
    assert load_model(run / "fold_1").folder == run / "fold_1"
    with pytest.raises(RunFolderError, match=r"no finished fold 4; it has folds \[0, 1\]"):
        load_model(run, fold=4)
    with pytest.raises(RunFolderError, match="--fold applies to training run folders"):
        load_model(run / "fold_0", fold=0)


def test_broken_folders_name_the_problem(model_folder, tmp_path: Path) -> None:
    with pytest.raises(RunFolderError, match="holds no model"):
        load_model(tmp_path)
    set_card(model_folder(tmp_path / "names"), class_names=["only_one"])
    with pytest.raises(RunFolderError, match="1 class names for 2 classes"):
        load_model(tmp_path / "names")
    set_card(model_folder(tmp_path / "kwargs"), model_kwargs={"hidden_size": 3})
    with pytest.raises(RunFolderError, match=r"cannot build model 'abmil'.*hidden_size"):
        load_model(tmp_path / "kwargs")
    (model_folder(tmp_path / "weights") / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(RunFolderError, match="cannot load weights"):
        load_model(tmp_path / "weights")
