"""Service fixtures: settings on fresh folders, and a live uvicorn server with one finished job (the
model folders and the lesion slide come from the root conftest)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from wsi_mil.service import ServiceSettings, create_app

JOB_TIMEOUT_S = 120.0


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
    tmp_path_factory: pytest.TempPathFactory, lesion_models_dir: Path, lesion_slide: Any
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
