"""Attention localisation: region labels of tiles, instance AUC, and a CI-sized run on demo slides
(real pipeline: synthetic pyramidal slides → OpenSlide → test encoder → ABMIL k-fold → attention)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from wsi_mil.cli import _register_commands, app
from wsi_mil.demo import make_demo_cohort
from wsi_mil.errors import FeatureContractError, RunFolderError
from wsi_mil.preprocessing.batch import find_slides, run_batch
from wsi_mil.preprocessing.pipeline import PreprocessConfig
from wsi_mil.preprocessing.tiling import TilingParams
from wsi_mil.training import TrainConfig, train_cohort
from wsi_mil.training.bag import Bag
from wsi_mil.training.benchmarks_data import write_feature_cohort
from wsi_mil.training.localisation import (
    instance_auc,
    localise_run,
    read_regions,
    summarise_localisation,
    tiles_in_region,
)
from wsi_mil.training.splits import load_split

_register_commands()


def test_tiles_in_region_counts_half_covered_tiles() -> None:
    coords = np.array([[0, 0], [100, 100], [150, 100], [151, 100], [400, 400]])
    inside = tiles_in_region(coords, 100, (100, 100, 100, 100))
    # [150,100] has exactly half its area in the box; [151,100] slightly less
    assert inside.tolist() == [False, True, True, False, False]
    assert tiles_in_region(coords, 100, (100, 100, 100, 100), min_overlap=0.4).tolist() == [False, True, True, True, False]


def test_instance_auc() -> None:
    positive = np.array([False, False, True, True])
    assert instance_auc(np.array([0.1, 0.2, 0.3, 0.4]), positive) == 1.0
    assert instance_auc(np.array([0.4, 0.3, 0.2, 0.1]), positive) == 0.0
    assert instance_auc(np.array([0.1, 0.2]), np.array([True, True])) is None


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, tuple[int, int, int, int]]]:
    """Eight 1536-px demo slides, test-encoder features at 128-px tiles, ABMIL trained 2-fold."""
    work = tmp_path_factory.mktemp("localisation")
    cohort = make_demo_cohort(work / "slides", num_slides=8, size=1536)
    config = PreprocessConfig(
        encoder="test-encoder", weights="random", tiling=TilingParams(tile_px=128),
        features_dtype="float32", num_workers=0, device="cpu",
    )
    results = run_batch(find_slides([str(work / "slides")]), work / "pre", config)
    assert all(r.status == "done" for r in results), [r.reason for r in results]
    features = work / "pre" / "features"
    train_cohort(
        TrainConfig(features_dir=features, labels_csv=work / "slides" / "labels.csv", model="abmil", folds=2,
                    epochs=30, lr=1e-3, patience=None, bootstrap_samples=0, device="cpu"),
        work / "run",
    )
    regions = {s.slide_id: s.lesion_box for s in cohort if s.lesion_box is not None}
    return work / "run", features, regions


def test_trained_abmil_attends_to_the_lesion(demo_run) -> None:
    run, features, regions = demo_run
    slides = localise_run(run, features, regions)
    assert sorted(s.slide_id for s in slides) == sorted(regions)
    for s in slides:  # each slide is scored by the fold that held it out
        assert s.slide_id in load_split(run / "splits" / f"fold_{s.fold}.csv", fold=s.fold).test
        assert s.positive_tiles >= 4
    summary = summarise_localisation(slides)
    # loose bounds: measured 0.995 mean; uniform or inverted attention gives 0.5 or below
    assert summary["instance_auc_mean"] >= 0.85
    assert summary["instance_auc_min"] >= 0.7
    assert summary["attention_in_region_mean"] >= 3 * summary["positive_tile_fraction_mean"]


def test_a_region_without_the_lesion_scores_low(demo_run) -> None:
    run, features, regions = demo_run
    size = 1536
    moved = {}
    for slide_id, (x, y, w, h) in regions.items():  # the same box moved diagonally off the lesion
        moved[slide_id] = (x + w if x + 2 * w <= size else x - w, y + h if y + 2 * h <= size else y - h, w, h)
    slides = localise_run(run, features, moved)
    aucs = [s.instance_auc for s in slides if s.instance_auc is not None]
    assert aucs and np.mean(aucs) < 0.6


def test_features_that_break_the_feature_contract_are_refused(demo_run, tmp_path) -> None:
    run, _, regions = demo_run
    slide_id = next(iter(regions))
    write_feature_cohort([Bag(torch.randn(5, 16), 1, slide_id)], tmp_path / "other", tmp_path / "labels.csv")
    with pytest.raises(FeatureContractError):
        localise_run(run, tmp_path / "other", {slide_id: regions[slide_id]})


def test_missing_feature_file_is_a_clear_error(demo_run) -> None:
    run, features, regions = demo_run
    with pytest.raises(RunFolderError, match=r"no feature file.*nope"):
        localise_run(run, features, {**regions, "nope": (0, 0, 10, 10)})


def test_localise_command_reads_the_demo_cohort_json(demo_run, tmp_path) -> None:
    run, features, regions = demo_run
    cohort_json = run.parent / "slides" / "cohort.json"
    assert read_regions(cohort_json) == regions
    out = tmp_path / "loc.json"
    result = CliRunner().invoke(app, ["localise", str(run), "--features", str(features), "--regions", str(cohort_json), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "mean instance AUC" in result.output
    assert json.loads(out.read_text())["summary"]["slides"] == len(regions)


@pytest.mark.parametrize(
    ("text", "message"),
    [("not json", "cannot read regions"), ('{"a": [1, 2, 3]}', "must be \\[x, y, width, height\\]"),
     ('{"a": [0, 0, -5, 5]}', "must be"), ("{}", "holds no region"), ("3", "must be a JSON object")],
)
def test_bad_regions_files_are_clear_errors(tmp_path, text, message) -> None:
    path = tmp_path / "regions.json"
    path.write_text(text)
    with pytest.raises(RunFolderError, match=message):
        read_regions(path)
    result = CliRunner().invoke(app, ["localise", str(tmp_path), "--features", str(tmp_path), "--regions", str(path)])
    assert result.exit_code == 2 and "error" in result.output and "Traceback" not in result.output
