"""Cross-validation folds as Ray tasks on a local Ray instance: the same run, bit for bit, as the folds
trained one after another in this process, and a fold's error raised as the local run raises it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from wsi_mil.errors import TrainingConfigError
from wsi_mil.inference import RunLayout
from wsi_mil.training import train_cohort

pytestmark = pytest.mark.usefixtures("ray_instance")


def test_folds_on_ray_give_the_run_a_local_run_gives(write_cohort, tmp_path: Path) -> None:
    """Bit-identical, not just close: each fold is seeded with seed + fold wherever it runs, and both
    runs use one torch thread (the training tests' fixture here; Ray gives a 1-CPU task one thread)."""
    cohort = write_cohort(num_bags=24)
    config = cohort.config(folds=2, epochs=4, seed=5)
    local_metrics = train_cohort(config, tmp_path / "local")
    ray_metrics = train_cohort(config, tmp_path / "ray", executor="ray")
    local, on_ray = RunLayout(tmp_path / "local"), RunLayout(tmp_path / "ray")
    assert on_ray.folds() == local.folds() == [0, 1]
    for fold in (0, 1):
        local_weights, ray_weights = load_file(local.model(fold)), load_file(on_ray.model(fold))
        assert local_weights.keys() == ray_weights.keys()
        for name, tensor in local_weights.items():
            assert torch.equal(ray_weights[name], tensor), (fold, name)
        ray_card, local_card = json.loads(on_ray.card(fold).read_text()), json.loads(local.card(fold).read_text())
        assert ray_card.pop("created") and local_card.pop("created")
        assert ray_card == local_card
    assert ray_metrics == local_metrics
    assert on_ray.predictions.read_text() == local.predictions.read_text()
    log = on_ray.log.read_text()
    assert "fold 0 done" in log and "fold 1 done" in log and "Ray tasks of 1.0 CPU and 0.0 GPU each" in log


def test_a_failing_fold_on_ray_raises_what_the_local_run_raises(write_cohort, tmp_path: Path) -> None:
    cohort = write_cohort(num_bags=24)
    config = cohort.config(
        method="mhim", epochs=1, method_kwargs={"teacher_init": str(tmp_path / "baseline" / "fold_{fold}.safetensors")}
    )
    with pytest.raises(TrainingConfigError, match="does not exist") as local:
        train_cohort(config, tmp_path / "local")
    with pytest.raises(TrainingConfigError, match="does not exist") as on_ray:
        train_cohort(config, tmp_path / "ray", executor="ray")
    assert str(on_ray.value).replace("fold_1", "fold_0") == str(local.value)
    assert not RunLayout(tmp_path / "ray").folds()


def test_an_unknown_executor_is_refused_before_the_run_folder_is_written(write_cohort, tmp_path: Path) -> None:
    with pytest.raises(TrainingConfigError, match="executor must be local or ray"):
        train_cohort(write_cohort().config(), tmp_path / "run", executor="dask")  # type: ignore[arg-type]
    assert not (tmp_path / "run").exists()
