"""Service fixtures: model folders in the trainer's card format, a synthetic lesion slide, a model whose
attention follows the lesion, and a live uvicorn server with one finished job."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
import uvicorn
from safetensors.torch import save_file
from sklearn.linear_model import LogisticRegression

from wsi_mil.demo.synthetic import write_synthetic_slide
from wsi_mil.models import create_model
from wsi_mil.preprocessing.encoders import create_encoder_model, encoder_cfg
from wsi_mil.preprocessing.feature_file import read_feature_file
from wsi_mil.preprocessing.pipeline import PreprocessConfig, preprocess_slide
from wsi_mil.preprocessing.tiling import TilingParams
from wsi_mil.service import ServiceSettings, create_app
from wsi_mil.training.cohort import FeatureContract
from wsi_mil.training.run import ModelCard, resolved_model_kwargs

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
JOB_TIMEOUT_S = 120.0


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
    """A model folder as the trainer writes one per fold (`ModelCard` + safetensors), plus the
    `preprocessing` dict a slide job reproduces features with."""
    tiling = dict(TILING if tiling is None else tiling)
    kwargs = resolved_model_kwargs(model_name, model_kwargs or {})
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
        training_method="plain",
        fold=fold,
        best_epoch=1,
        epochs_run=1,
        selection_metric="auc",
    )
    raw = card.model_dump(mode="json")
    if preprocessing:
        raw["preprocessing"] = {
            "tissue": {},
            "tiling": tiling,
            "encoder": encoder,
            "weights": weights,
            "precision": "fp32",
            "features_dtype": "float32",
        }
    folder.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(folder / "model.safetensors"),
    )
    (folder / "model_card.json").write_text(json.dumps(raw, indent=2))
    return folder


@pytest.fixture(scope="session")
def model_folder() -> Callable[..., Path]:
    """`write_model_folder(folder, **options)`: a served-model folder (see its docstring)."""
    return write_model_folder


@pytest.fixture()
def make_settings(tmp_path: Path) -> Callable[..., ServiceSettings]:
    """Settings on fresh folders under tmp_path; keyword arguments override fields."""

    def make(**overrides: Any) -> ServiceSettings:
        values: dict[str, Any] = {
            "models_dir": tmp_path / "models",
            "data_dir": tmp_path / "data",
            "slide_root": tmp_path / "slides",
            "workers": 1,
            "device": "cpu",
            "purge_interval_s": 3600,
        }
        values.update(overrides)
        for key in ("models_dir", "slide_root"):
            if values.get(key) is not None:
                Path(values[key]).mkdir(parents=True, exist_ok=True)
        return ServiceSettings(**values)

    return make


def wait_for_job(
    client: httpx.Client, job_id: str, *, timeout: float = JOB_TIMEOUT_S
) -> dict[str, Any]:
    """Poll a job until it reaches a terminal state; returns its JSON."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["state"] in ("done", "failed", "cancelled"):
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not finish in {timeout} s: {job}")


@pytest.fixture(scope="session")
def job_waiter() -> Callable[..., dict[str, Any]]:
    return wait_for_job


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


def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class LiveService:
    base_url: str
    settings: ServiceSettings


@contextlib.contextmanager
def run_uvicorn(settings: ServiceSettings) -> Iterator[LiveService]:
    """A real uvicorn server of `create_app(settings)` on a free loopback port, in a thread."""
    port = free_port()
    config = uvicorn.Config(
        create_app(settings), host="127.0.0.1", port=port, log_level="warning", access_log=False
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="test-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield LiveService(f"http://127.0.0.1:{port}", settings)
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture(scope="session")
def uvicorn_server() -> Callable[[ServiceSettings], contextlib.AbstractContextManager[LiveService]]:
    """`run_uvicorn(settings)`: a context manager running a real server in a thread."""
    return run_uvicorn


@pytest.fixture(scope="session")
def live_service(
    tmp_path_factory: pytest.TempPathFactory, lesion_models_dir: Path, lesion_slide: LesionSlide
) -> Iterator[LiveService]:
    settings = ServiceSettings(
        models_dir=lesion_models_dir,
        data_dir=tmp_path_factory.mktemp("live_data"),
        slide_root=lesion_slide.root,
        workers=1,
        device="cpu",
    )
    with run_uvicorn(settings) as service:
        yield service


@pytest.fixture(scope="session")
def finished_job(live_service: LiveService) -> dict[str, Any]:
    """A done job of `lesion_abmil` on the lesion slide, run by the live server."""
    with httpx.Client(base_url=live_service.base_url, timeout=30) as client:
        response = client.post(
            "/v1/jobs", json={"model": "lesion_abmil", "slide_path": "lesion.tiff"}
        )
        assert response.status_code == 202, response.text
        job = wait_for_job(client, response.json()["id"])
    assert job["state"] == "done", job
    return job


@pytest.fixture()
def live_client(live_service: LiveService) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live_service.base_url, timeout=30) as client:
        yield client
