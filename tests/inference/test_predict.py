"""Predictions: per-tile scores from a model output, feature files checked once, whole slides from
Python (the docs' example included), and the errors that stop a slide."""

from __future__ import annotations

import contextlib
import io
import re
import tempfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from wsi_mil.demo.synthetic import write_pyramidal_tiff
from wsi_mil.errors import FeatureContractError, FeatureFileError, JobCancelledError, WsiMilError
from wsi_mil.inference import (
    load_model,
    predict_bag,
    predict_features,
    predict_slide,
    read_features,
)
from wsi_mil.inference.heatmaps import HeatmapOptions, TileScores, heatmap_geojson
from wsi_mil.inference.predict import INSTANCE_SCORE, TILE_PROBABILITY
from wsi_mil.training.bag import Bag
from wsi_mil.training.benchmarks_data import write_feature_cohort

DOCS = Path(__file__).resolve().parents[2] / "docs" / "inference.md"


@pytest.fixture(scope="module")
def lesion_model(lesion_models_dir: Path):
    return load_model(lesion_models_dir / "lesion_abmil")


def test_instance_logits_become_per_tile_class_probabilities(model_folder, tmp_path: Path) -> None:
    model = load_model(model_folder(tmp_path / "mi", model_name="mi_net"))
    features = np.random.default_rng(0).normal(size=(7, 32)).astype(np.float32)
    prediction = predict_bag(model, features)
    probabilities = prediction.maps[TILE_PROBABILITY]
    assert probabilities.shape == (2, 7)
    np.testing.assert_allclose(probabilities.sum(axis=0), 1.0, rtol=1e-6)
    columns = prediction.tile_columns()
    assert {"attention", "tile_probability_normal", "tile_probability_tumor"} <= set(columns)
    assert all(values.shape == (7,) for values in columns.values())
    assert prediction.predicted_class in ("normal", "tumor") and prediction.fold == 0


def test_instance_scores_become_the_instance_score_column_heatmap_and_geojson(model_folder, tmp_path: Path) -> None:
    loaded = load_model(model_folder(tmp_path / "ins", model_name="ins", model_kwargs={"hidden_dim": 16}))
    features = np.random.default_rng(1).normal(size=(6, 32)).astype(np.float32)
    prediction = predict_bag(loaded, features)
    with torch.no_grad():
        expected = loaded.model(torch.from_numpy(features)[None]).instance_scores[0].numpy()
    columns = prediction.tile_columns()
    np.testing.assert_allclose(columns[INSTANCE_SCORE], expected, rtol=1e-6)
    np.testing.assert_allclose(columns[INSTANCE_SCORE], columns["tile_probability_tumor"], rtol=1e-5)
    scores = TileScores(np.arange(12).reshape(6, 2) * 128, 128, prediction.attention, prediction.maps,
                        prediction.class_names, 2048, 2048)
    values, label = scores.select(map_name=INSTANCE_SCORE)
    np.testing.assert_allclose(values, expected, rtol=1e-6)
    assert label == f"{INSTANCE_SCORE}[0]"
    tile = heatmap_geojson(scores, name="s")["features"][0]["properties"]["measurements"]
    assert tile[INSTANCE_SCORE] == pytest.approx(float(expected[0]), rel=1e-6)
    plain = predict_bag(load_model(model_folder(tmp_path / "abmil")), features)
    assert INSTANCE_SCORE not in plain.tile_columns()  # only models that score instances have it


def test_a_feature_file_is_read_and_checked_in_one_place(model_folder, tmp_path: Path) -> None:
    model = load_model(model_folder(tmp_path / "model"))
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    with pytest.raises(FeatureFileError, match=r"junk\.h5 is not a usable feature file"):
        read_features(tmp_path / "junk.h5", model)
    bags = [Bag(torch.randn(5, 16, generator=torch.Generator().manual_seed(0)), 0, "wide")]
    write_feature_cohort(bags, tmp_path / "wide", tmp_path / "labels.csv", encoder="test-encoder")
    with pytest.raises(FeatureContractError, match=r"'upload\.h5' has 16-d features, the model expects 32-d"):
        predict_features(tmp_path / "wide" / "wide.h5", model, source="'upload.h5'")


def test_predict_slide_finds_the_lesion_and_equals_its_feature_file(lesion_model, lesion_slide, lesion_features, tmp_path: Path) -> None:
    result = predict_slide(lesion_slide.path, lesion_model, out_dir=tmp_path / "work")
    assert result.prediction.predicted_class == "tumor" and result.slide_size == (2048, 2048)
    lesion = lesion_slide.lesion_tiles()
    top = np.argsort(-result.prediction.attention)[: len(lesion)]
    assert {tuple(int(v) for v in result.coords[i]) for i in top} == lesion
    assert result.feature_path is not None and result.feature_path.is_file()
    assert result.preprocessing.mpp == pytest.approx(0.5) and result.tissue_mask is not None
    from_file = predict_features(lesion_features, lesion_model)
    np.testing.assert_allclose(result.prediction.probabilities, from_file.prediction.probabilities, atol=1e-6)
    np.testing.assert_allclose(result.prediction.attention, from_file.prediction.attention, atol=1e-6)
    heatmap = result.save_heatmap(tmp_path / "heatmap.png", HeatmapOptions(max_size=512))
    assert Image.open(heatmap).size == (512, 512)


def test_without_an_out_dir_nothing_is_left_behind(lesion_model, lesion_slide, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    result = predict_slide(lesion_slide.path, lesion_model, batch_size=16, num_workers=0)
    assert result.feature_path is None and result.prediction.predicted_class == "tumor"
    assert list(tmp_path.iterdir()) == []


def test_what_stops_a_slide_is_named(lesion_model, model_folder, tmp_path: Path) -> None:
    blank = tmp_path / "blank.tiff"
    write_pyramidal_tiff(blank, np.full((1024, 1024, 3), 245, np.uint8), mpp=0.5)
    with pytest.raises(WsiMilError, match="no tissue"):
        predict_slide(blank, lesion_model)
    (tmp_path / "not-a-slide.txt").write_text("hello")
    with pytest.raises(WsiMilError, match=r"not-a-slide\.txt"):
        predict_slide(tmp_path / "not-a-slide.txt", lesion_model)
    features_only = load_model(model_folder(tmp_path / "features_only", preprocessing=False, encoder=None))
    with pytest.raises(WsiMilError, match="cannot predict slides"):
        predict_slide(blank, features_only)


def test_on_tiles_can_stop_a_slide(lesion_model, lesion_slide) -> None:
    def stop(done: int, total: int) -> None:
        raise JobCancelledError("stopped after the first batch")

    with pytest.raises(WsiMilError, match="stopped after the first batch"):
        predict_slide(lesion_slide.path, lesion_model, on_tiles=stop)


def test_the_docs_python_example_predicts_a_demo_slide_and_saves_its_heatmap(
    lesion_models_dir: Path, demo_slides, tmp_path: Path
) -> None:
    text = DOCS.read_text()
    example = re.search(r"## Predict a slide from Python\n.*?```python\n(.*?)```", text, re.S).group(1)
    code_lines = [line for line in example.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert len(code_lines) == 5, example
    slide = next(s for s in demo_slides if s.lesion_box is not None)
    heatmap = tmp_path / "heatmap.png"
    runnable = (
        example.replace('"runs/abmil"', repr(str(lesion_models_dir / "lesion_abmil")))
        .replace('"slides/case_01.svs"', repr(slide.path))
        .replace('"case_01_heatmap.png"', repr(str(heatmap)))
    )
    assert runnable.count(str(tmp_path)) == 1 and slide.path in runnable
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(runnable, str(DOCS), "exec"), {})
    assert printed.getvalue().split()[0] in ("normal", "tumor")
    image = Image.open(heatmap)
    assert image.format == "PNG" and image.size == (2048, 2048)  # the whole (square) slide at the default size


def test_files_reaching_other_files_and_empty_bags_are_refused_for_the_cli_too(
    lesion_model, lesion_features: Path, tmp_path: Path
) -> None:
    linked = tmp_path / "linked.h5"
    with h5py.File(linked, "w") as handle:
        handle["features"] = h5py.ExternalLink(str(lesion_features), "features")
    with pytest.raises(FeatureFileError, match=r"`features` is an external link"):
        read_features(linked, lesion_model)
    empty = tmp_path / "empty.pt"
    torch.save({"features": torch.zeros(0, 32)}, empty)
    with pytest.raises(FeatureFileError, match=r"empty\.pt holds no tiles"):
        predict_features(empty, lesion_model)
