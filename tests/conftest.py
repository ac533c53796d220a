"""Shared fixtures: the team's real test data in ../shared, skipped with a reason when absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("WSI_MIL_SHARED", REPO_ROOT.parent / "shared"))
SLIDES = SHARED / "data" / "slides"
MIL_BENCHMARKS = SHARED / "data" / "mil-benchmarks"


def require(path: Path) -> Path:
    """Return `path`, or skip the test with a reason naming it when it does not exist."""
    if not path.exists():
        pytest.skip(f"test data {path} is absent (it lives in the team's ../shared checkout)")
    return path


@pytest.fixture(scope="session")
def slides_dir() -> Path:
    return require(SLIDES)


@pytest.fixture(scope="session")
def mil_benchmarks_dir() -> Path:
    return require(MIL_BENCHMARKS)


@pytest.fixture(scope="session")
def demo_slides(tmp_path_factory: pytest.TempPathFactory) -> list:
    """Three small synthetic slides (two with a lesion), written once per test session."""
    from wsi_mil.demo import make_demo_cohort

    return make_demo_cohort(tmp_path_factory.mktemp("demo_slides"), num_slides=3, size=1280)
