"""`wsi-mil serve`: flags over environment, and a real server process answering /healthz."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from wsi_mil.cli.serve import serve_settings


def test_flags_override_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("WSI_MIL_PORT", "9001")
    monkeypatch.setenv("WSI_MIL_WORKERS", "4")
    monkeypatch.setenv("WSI_MIL_MODELS_DIR", str(tmp_path / "env_models"))
    settings = serve_settings(models_dir=tmp_path / "flag_models", port=None, workers=2, host=None)
    assert settings.models_dir == tmp_path / "flag_models"
    assert settings.workers == 2 and settings.port == 9001 and settings.host == "127.0.0.1"
    assert settings.executor == "local" and settings.ray_address is None


def test_executor_flags_over_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WSI_MIL_EXECUTOR", "ray")
    monkeypatch.setenv("WSI_MIL_RAY_ADDRESS", "auto")
    assert serve_settings().executor == "ray" and serve_settings().ray_address == "auto"
    assert serve_settings(ray_address="10.0.0.5:6379").ray_address == "10.0.0.5:6379"
    assert serve_settings(executor="local").executor == "local"
    with pytest.raises(ValidationError, match="executor"):
        serve_settings(executor="dask")


def test_serve_runs_uvicorn_with_request_ids_in_the_log(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [
        sys.executable,
        "-c",
        "import sys; from wsi_mil.cli import app; import wsi_mil.cli.preprocess, wsi_mil.cli.serve; app()",
        "serve",
        "--models",
        str(tmp_path / "models"),
        "--data-dir",
        str(tmp_path / "data"),
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    env = {**os.environ, "WSI_MIL_API_KEY": "k"}
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                health = httpx.get(
                    f"http://127.0.0.1:{port}/healthz",
                    headers={"X-Request-ID": "cli-test-1"},
                    timeout=2,
                )
                break
            except httpx.TransportError:
                assert process.poll() is None, process.stdout.read()
                assert time.monotonic() < deadline, "the server did not start"
                time.sleep(0.2)
        assert health.status_code == 200
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5).status_code == 401
        ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5)
        assert ready.status_code == 503 and "no model loaded" in ready.json()["reasons"][0]
        assert (tmp_path / "data" / "jobs.sqlite3").is_file()
    finally:
        process.terminate()
        output = process.communicate(timeout=30)[0]
    # uvicorn shuts down cleanly, then re-raises the SIGTERM it caught
    assert process.returncode in (0, -signal.SIGTERM), output
    assert "Application shutdown complete" in output
    assert "[cli-test-1] wsi_mil.service.access: GET /healthz 200" in output
