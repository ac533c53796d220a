"""The service's container image (docker/Dockerfile), run and checked from outside: the time to the first
200 on /healthz, the HEALTHCHECK, a non-root user without build tools, models from a read-only mounted
folder, a prediction on a feature file, and a slide job whose results land in the data volume.

Marked `container` (not in `make test`): `make docker-smoke` builds the image and runs this module.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from wsi_mil.inference import load_model, predict_features

pytestmark = pytest.mark.container

ENGINE = os.environ.get("WSI_MIL_CONTAINER_ENGINE", "podman")
IMAGE = os.environ.get("WSI_MIL_IMAGE", "wsi-mil:cpu")
#: "1" when the image was built with the lock's PyPI torch (the CUDA build) instead of the CPU index
CUDA_TORCH = os.environ.get("WSI_MIL_IMAGE_CUDA_TORCH", "0") == "1"
API_KEY = "smoke-key"
START_TIMEOUT_S = 300.0
JOB_TIMEOUT_S = 300.0


def engine(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([ENGINE, *args], capture_output=True, text=True, timeout=timeout, check=False)


def readable_copy(source: Path, target: Path) -> Path:
    """Copy a file or folder where the image's user (uid 10001) can read it (pytest's folders are 0700)."""
    if source.is_dir():
        shutil.copytree(source, target)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, target)
    for path in [target, *target.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return target


@dataclass(frozen=True)
class Container:
    name: str
    volume: str
    base_url: str
    start_seconds: float


@pytest.fixture(scope="module")
def container(tmp_path_factory, lesion_models_dir: Path, lesion_slide) -> Iterator[Container]:
    if shutil.which(ENGINE) is None:
        pytest.skip(f"{ENGINE} is not installed (make docker-smoke says how to get it)")
    if engine("image", "inspect", IMAGE).returncode != 0:
        pytest.fail(f"no image {IMAGE}: build it with `make docker-smoke`")
    root = tmp_path_factory.mktemp("container")
    models = readable_copy(lesion_models_dir / "lesion_abmil", root / "models" / "lesion_abmil").parent
    slides = readable_copy(lesion_slide.path, root / "slides" / "lesion.tiff").parent
    models.chmod(0o755)
    slides.chmod(0o755)
    suffix = uuid.uuid4().hex[:8]
    name, volume = f"wsi-mil-smoke-{suffix}", f"wsi-mil-smoke-data-{suffix}"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    started = time.monotonic()
    run = engine(
        "run", "-d", "--name", name, "-p", f"127.0.0.1:{port}:8000", "-e", f"WSI_MIL_API_KEY={API_KEY}",
        "-v", f"{models}:/models:ro", "-v", f"{slides}:/slides:ro", "-v", f"{volume}:/data", IMAGE,
    )
    assert run.returncode == 0, run.stderr
    try:
        base_url = f"http://127.0.0.1:{port}"
        while True:
            try:
                if httpx.get(f"{base_url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() - started < START_TIMEOUT_S, engine("logs", name).stdout[-3000:]
            time.sleep(0.1)
        start_seconds = time.monotonic() - started
        print(f"\n[docker-smoke] {IMAGE}: first 200 on /healthz {start_seconds:.1f} s after `{ENGINE} run`")
        yield Container(name, volume, base_url, start_seconds)
    finally:
        engine("rm", "-f", "-t", "10", name)
        engine("volume", "rm", "-f", volume)


@pytest.fixture()
def client(container: Container) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=container.base_url, headers={"X-API-Key": API_KEY}, timeout=60) as http:
        yield http


def test_the_image_is_lean_runs_as_a_user_and_has_a_health_check(container: Container) -> None:
    [image] = json.loads(engine("image", "inspect", IMAGE).stdout)
    health = image.get("Healthcheck") or image["Config"].get("Healthcheck")
    assert health and "/healthz" in " ".join(health["Test"])
    size_gb = image["Size"] / 1e9
    print(f"[docker-smoke] {IMAGE}: {size_gb:.2f} GB")
    assert engine("exec", container.name, "id", "-u").stdout.strip() == "10001"
    tools = engine("exec", container.name, "sh", "-c", "command -v uv npm node gcc cc make || true")
    assert tools.stdout.strip() == "", f"build tools in the image: {tools.stdout}"
    shipped = engine("exec", container.name, "sh", "-c", "ls /app /app/.venv/lib/*/site-packages").stdout.split()
    assert not {"tests", "pytest", "ruff", "schemathesis", "playwright"} & set(shipped), "dev files in the image"
    cuda = engine("exec", container.name, "python", "-c", "import torch; print(torch.version.cuda)").stdout.strip()
    assert (cuda != "None") == CUDA_TORCH, f"torch CUDA version {cuda}"
    if ENGINE == "podman":
        assert engine("healthcheck", "run", container.name).returncode == 0


def test_models_load_from_the_mounted_folder(container: Container, client: httpx.Client) -> None:
    assert httpx.get(f"{container.base_url}/v1/models", timeout=10).status_code == 401
    ready = httpx.get(f"{container.base_url}/readyz", timeout=10)
    assert ready.status_code == 200, ready.text
    assert [model["name"] for model in client.get("/v1/models").json()["data"]] == ["lesion_abmil"]


def test_a_prediction_on_a_feature_file(client: httpx.Client, lesion_features: Path, lesion_models_dir: Path) -> None:
    with lesion_features.open("rb") as handle:
        response = client.post("/v1/predictions", data={"model": "lesion_abmil"}, files={"file": ("lesion.h5", handle)})
    assert response.status_code == 200, response.text
    expected = predict_features(lesion_features, load_model(lesion_models_dir / "lesion_abmil")).prediction
    assert response.json()["predicted_class"] == expected.predicted_class == "tumor"
    assert response.json()["probabilities"] == pytest.approx(expected.class_probabilities, abs=1e-5)


def test_a_slide_job_writes_its_results_to_the_data_volume(container: Container, client: httpx.Client) -> None:
    response = client.post("/v1/jobs", json={"model": "lesion_abmil", "slide_path": "lesion.tiff"})
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while (job := client.get(f"/v1/jobs/{job_id}").json())["state"] in ("queued", "running"):
        assert time.monotonic() < deadline, job
        time.sleep(0.5)
    assert job["state"] == "done", job
    assert job["result"]["predicted_class"] == "tumor"
    heatmap = client.get(f"/v1/jobs/{job_id}/heatmap.png", params={"max_size": 256})
    assert heatmap.status_code == 200 and heatmap.content[:8] == b"\x89PNG\r\n\x1a\n"
    stored = engine("exec", container.name, "ls", f"/data/jobs/{job_id}").stdout.split()
    assert {"features.h5", "prediction.json", "scores.npz"} <= set(stored)
    assert engine("volume", "inspect", container.volume).returncode == 0
