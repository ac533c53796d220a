"""Small synthetic bags and cohorts of real feature files for the training tests."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from wsi_mil.training.bag import Bag
from wsi_mil.training.benchmarks_data import write_feature_cohort
from wsi_mil.training.config import TrainConfig

#: a small ABMIL, fast on CPU
SMALL_ABMIL = {"hidden_dim": 32, "attention_dim": 16, "dropout": 0.0, "attention_dropout": 0.0}


@pytest.fixture(autouse=True)
def training_on_one_thread(single_torch_thread: None) -> None:
    """Every training test runs small models, fastest on one intra-op thread (the root conftest's)."""


def make_bags(
    num_bags: int,
    *,
    dim: int = 8,
    num_classes: int = 2,
    seed: int = 0,
    min_size: int = 6,
    max_size: int = 20,
    prefix: str = "slide",
) -> list[Bag]:
    """Bags of Gaussian noise; a bag of class c > 0 holds 2–3 "key" instances shifted by +4 along axis c-1.

    Labels cycle 0, 1, ..., C-1 so every class is equally common. The task is easy for an
    attention model and impossible for a model that ignores the features.
    """
    generator = torch.Generator().manual_seed(seed)
    bags = []
    for i in range(num_bags):
        label = i % num_classes
        size = int(torch.randint(min_size, max_size + 1, (1,), generator=generator))
        features = torch.randn(size, dim, generator=generator)
        if label > 0:
            keys = int(torch.randint(2, 4, (1,), generator=generator))
            features[:keys, label - 1] += 4.0
            features = features[torch.randperm(size, generator=generator)]
        bags.append(Bag(features, label, f"{prefix}_{i:03d}"))
    return bags


@pytest.fixture(scope="session")
def bag_factory() -> Callable[..., list[Bag]]:
    """`make_bags` for tests (test modules cannot import conftest under importlib mode)."""
    return make_bags


@pytest.fixture(scope="session")
def small_abmil() -> dict[str, object]:
    """Keyword arguments of a small, dropout-free ABMIL."""
    return dict(SMALL_ABMIL)


@dataclass(frozen=True)
class CohortFiles:
    """Where a synthetic cohort was written."""

    features_dir: Path
    labels_csv: Path
    bags: list[Bag]

    def config(self, **overrides: object) -> TrainConfig:
        """A fast TrainConfig for this cohort (small ABMIL, few epochs, few bootstrap resamples)."""
        values: dict[str, object] = {
            "features_dir": self.features_dir,
            "labels_csv": self.labels_csv,
            "model": "abmil",
            "model_kwargs": SMALL_ABMIL,
            "folds": 2,
            "epochs": 4,
            "lr": 2e-3,
            "bootstrap_samples": 50,
            "top_k_tiles": 3,
            "device": "cpu",
        }
        values.update(overrides)
        return TrainConfig.model_validate(values)


@pytest.fixture
def write_cohort(tmp_path: Path) -> Callable[..., CohortFiles]:
    """Factory: write `make_bags(...)` as wsi_mil feature files + labels CSV under tmp_path/<name>."""

    def factory(
        name: str = "cohort",
        *,
        num_bags: int = 24,
        num_classes: int = 2,
        class_names: list[str] | None = None,
        patients: bool = True,
        encoder: str = "synthetic",
        dim: int = 8,
        seed: int = 0,
    ) -> CohortFiles:
        bags = make_bags(num_bags, dim=dim, num_classes=num_classes, seed=seed)
        names = class_names or [f"class{c}" for c in range(num_classes)]
        # two slides per patient: neighbours in the list share a patient
        case_ids = [f"patient_{i // 2:03d}" for i in range(num_bags)] if patients else None
        root = tmp_path / name
        write_feature_cohort(
            bags, root / "features", root / "labels.csv", class_names=names, case_ids=case_ids, encoder=encoder
        )
        return CohortFiles(root / "features", root / "labels.csv", bags)

    return factory
