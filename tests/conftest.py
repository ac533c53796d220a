"""Shared fixtures: the team's real test data in ../shared (skipped with a reason when absent), one
torch thread for small models, and padded batches of random bags."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from torch import Tensor

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


@contextmanager
def _one_torch_thread() -> Iterator[None]:
    """One intra-op torch thread inside the block: small models run fastest so, and the cores are shared."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def one_torch_thread() -> Callable[[], AbstractContextManager[None]]:
    """`with one_torch_thread(): ...` for fixtures wider than one test (module-scoped training runs)."""
    return _one_torch_thread


@pytest.fixture
def single_torch_thread() -> Iterator[None]:
    """One intra-op torch thread for the test (use it with `pytestmark = usefixtures(...)` or autouse)."""
    with _one_torch_thread():
        yield


def _padded_batch(
    lengths: list[int], dim: int, *, seed: int = 0, noise: float = 100.0
) -> tuple[list[Tensor], Tensor, Tensor]:
    """Bags `[N_i, dim]` and their right-padded batch `[B, N_max, dim]` + mask `[B, N_max]`.

    Padding holds large noise (`noise` × a standard normal), so any leak through the mask shows.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    bags = [torch.randn(n, dim, generator=generator) for n in lengths]
    x = noise * torch.randn(len(lengths), max(lengths), dim, generator=generator)
    mask = torch.zeros(len(lengths), max(lengths), dtype=torch.bool)
    for i, bag in enumerate(bags):
        x[i, : len(bag)] = bag
        mask[i, : len(bag)] = True
    return bags, x, mask


@pytest.fixture(scope="session")
def padded_batch() -> Callable[..., tuple[list[Tensor], Tensor, Tensor]]:
    """`padded_batch(lengths, dim, *, seed=0, noise=100.0)` -> (bags, x, mask); see `_padded_batch`."""
    return _padded_batch
