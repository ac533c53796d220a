"""App-wide behaviour: API key, request ids, error bodies without stack traces, CORS, metrics, logs."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from wsi_mil.service import create_app
from wsi_mil.service.deps import get_registry
from wsi_mil.service.redaction import redact_paths

KEY = "s3cret-key"


@pytest.fixture()
def keyed(make_settings, model_folder, tmp_path: Path) -> Iterator[TestClient]:
    model_folder(tmp_path / "models" / "random_abmil")
    with TestClient(create_app(make_settings(api_key=KEY, workers=0))) as client:
        yield client


PROTECTED = [
    ("GET", "/v1/models"),
    ("GET", "/v1/models/random_abmil"),
    ("POST", "/v1/predictions"),
    ("POST", "/v1/jobs"),
    ("GET", "/v1/jobs"),
    ("GET", "/v1/jobs/" + "a" * 32),
    ("POST", "/v1/jobs/" + "a" * 32 + "/cancel"),
    ("DELETE", "/v1/jobs/" + "a" * 32),
    ("GET", "/v1/jobs/" + "a" * 32 + "/heatmap.png"),
    ("GET", "/v1/jobs/" + "a" * 32 + "/heatmap.geojson"),
    ("GET", "/v1/jobs/" + "a" * 32 + "/scores.json"),
    ("GET", "/v1/jobs/" + "a" * 32 + "/top-tiles"),
    ("GET", "/v1/jobs/" + "a" * 32 + "/top-tiles/1.png"),
    ("GET", "/v1/jobs/" + "a" * 32 + "/dzi.dzi"),
    ("GET", "/v1/jobs/" + "a" * 32 + "/dzi_files/0/0_0.jpeg"),
]


@pytest.mark.parametrize(("method", "path"), PROTECTED)
def test_api_key_is_required_on_v1(keyed: TestClient, method: str, path: str) -> None:
    missing = keyed.request(method, path)
    assert missing.status_code == 401, missing.text
    assert (
        "X-API-Key" in missing.json()["detail"] and missing.headers["www-authenticate"] == "ApiKey"
    )
    wrong = keyed.request(method, path, headers={"X-API-Key": "guess"})
    assert wrong.status_code == 403
    assert keyed.request(method, path, headers={"X-API-Key": KEY}).status_code not in (401, 403)


def test_open_endpoints_need_no_key(keyed: TestClient) -> None:
    for path in (
        "/healthz",
        "/readyz",
        "/metrics",
        "/docs",
        "/redoc",
        "/openapi.json",
        "/static/viewer.js",
    ):
        assert keyed.get(path).status_code == 200, path
    # the viewer page is an empty shell; it sends the key (from the URL fragment) with its own requests
    assert keyed.get("/v1/jobs/" + "a" * 32 + "/viewer").status_code == 200
    assert keyed.get("/v1/models", headers={"X-API-Key": KEY}).json()["count"] == 1


def test_request_ids_on_every_response_and_log_line(
    keyed: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="wsi_mil")
    fresh = keyed.get("/healthz")
    assert len(fresh.headers["x-request-id"]) == 32
    echoed = keyed.get("/v1/models", headers={"X-Request-ID": "client-id.42"})
    assert echoed.headers["x-request-id"] == "client-id.42"
    assert echoed.json()["request_id"] == "client-id.42"  # the 401 body names it too
    unsafe = keyed.get("/healthz", headers={"X-Request-ID": "bad id\n<script>"})
    assert (
        unsafe.headers["x-request-id"] != "bad id\n<script>"
        and len(unsafe.headers["x-request-id"]) == 32
    )
    access = [r for r in caplog.records if r.name == "wsi_mil.service.access"]
    assert any(
        r.request_id == "client-id.42" and "/v1/models 401" in r.getMessage() for r in access
    )
    assert all(hasattr(r, "request_id") for r in caplog.records)


def test_bugs_become_a_generic_500_without_stack_trace(
    keyed: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    def broken_registry() -> None:
        raise RuntimeError("secret internal detail /srv/models")

    keyed.app.dependency_overrides[get_registry] = broken_registry
    response = keyed.get("/v1/models", headers={"X-API-Key": KEY, "X-Request-ID": "trace-me"})
    assert response.status_code == 500
    body = response.json()
    assert body == {
        "detail": "internal server error; quote the request id when reporting it",
        "request_id": "trace-me",
    }
    assert response.headers["x-request-id"] == "trace-me"
    assert "secret" not in response.text and "Traceback" not in response.text
    logged = [r for r in caplog.records if r.name == "wsi_mil.service.errors"]
    assert logged and logged[0].exc_info is not None and logged[0].request_id == "trace-me"


def test_validation_errors_are_422_with_request_id(keyed: TestClient) -> None:
    response = keyed.get("/v1/jobs", params={"limit": 0}, headers={"X-API-Key": KEY})
    assert response.status_code == 422
    body = response.json()
    assert body["request_id"] == response.headers["x-request-id"]
    assert body["detail"][0]["loc"] == ["query", "limit"]


def test_cors_from_settings(make_settings) -> None:
    settings = make_settings(
        cors_origins="https://viewer.example.org, https://other.example.org", workers=0
    )
    assert settings.cors_origins == ["https://viewer.example.org", "https://other.example.org"]
    with TestClient(create_app(settings)) as client:
        allowed = client.options(
            "/v1/models",
            headers={
                "Origin": "https://viewer.example.org",
                "Access-Control-Request-Method": "GET",
            },
        )
        assert allowed.headers["access-control-allow-origin"] == "https://viewer.example.org"
        simple = client.get("/healthz", headers={"Origin": "https://viewer.example.org"})
        assert "X-Request-ID" in simple.headers["access-control-expose-headers"]
        denied = client.get("/healthz", headers={"Origin": "https://evil.example.com"})
        assert "access-control-allow-origin" not in denied.headers
    with TestClient(create_app(make_settings(workers=0))) as client:
        assert (
            "access-control-allow-origin"
            not in client.get("/healthz", headers={"Origin": "https://x.org"}).headers
        )


def test_metrics_count_requests_by_route_template(keyed: TestClient) -> None:
    for _ in range(3):
        keyed.get("/v1/jobs/" + "b" * 32, headers={"X-API-Key": KEY})
    text = keyed.get("/metrics").text
    assert (
        'wsi_mil_http_requests_total{method="GET",route="/v1/jobs/{job_id}",status="404"} 3.0'
        in text
    )
    assert 'wsi_mil_jobs{state="queued"} 0.0' in text
    assert "wsi_mil_http_request_seconds_bucket" in text


def test_importing_the_service_loads_no_training_module_nor_sklearn_nor_matplotlib() -> None:
    """The service stands on `wsi_mil.inference`: a fresh interpreter importing the app must not load
    the trainer (cohorts, splits, metrics), scikit-learn or matplotlib."""
    script = (
        "import json, sys; import wsi_mil.service.app; "
        "print(json.dumps(sorted(m for m in sys.modules "
        "if m.split('.')[0] in ('sklearn', 'matplotlib') or m.startswith('wsi_mil.training'))))"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert json.loads(result.stdout) == []
    assert "wsi_mil.inference" in subprocess.run(
        [sys.executable, "-c", "import sys, wsi_mil.service.app; print(sorted(sys.modules))"],
        capture_output=True, text=True, check=True,
    ).stdout


def test_no_server_path_in_any_response(
    make_settings, model_folder, lesion_slide, tmp_path: Path, job_waiter
) -> None:
    """Job errors, the 409 of a failed job's outputs and the 410s of a slide gone from the disk
    (Deep Zoom, top tiles) say what went wrong without the server's folders."""
    model_folder(tmp_path / "models" / "random_abmil")
    slides = tmp_path / "slides"
    slides.mkdir()
    for name in ("lesion.tiff", "gone.tiff"):
        shutil.copy(lesion_slide.path, slides / name)
    with TestClient(create_app(make_settings(workers=0))) as submit_only:
        failing = submit_only.post(
            "/v1/jobs", json={"model": "random_abmil", "slide_path": "gone.tiff"}
        ).json()["id"]
    (slides / "gone.tiff").unlink()
    responses = []
    with TestClient(create_app(make_settings())) as client:
        done = client.post("/v1/jobs", json={"model": "random_abmil", "slide_path": "lesion.tiff"})
        with lesion_slide.path.open("rb") as handle:
            uploaded = client.post(
                "/v1/jobs", data={"model": "random_abmil"}, files={"file": ("up.tiff", handle)}
            )
        jobs = [job_waiter(client, job_id) for job_id in (failing, done.json()["id"], uploaded.json()["id"])]
        assert [job["state"] for job in jobs] == ["failed", "done", "done"], jobs
        (slides / "lesion.tiff").unlink()
        for upload in (tmp_path / "data" / "uploads").rglob("*.tiff"):
            upload.unlink()
        responses.append(client.get(f"/v1/jobs/{failing}"))
        responses.append(client.get(f"/v1/jobs/{failing}/heatmap.png"))
        for job in jobs[1:]:
            responses.append(client.get(f"/v1/jobs/{job['id']}/dzi.dzi"))
            responses.append(client.get(f"/v1/jobs/{job['id']}/dzi_files/0/0_0.jpeg"))
            responses.append(client.get(f"/v1/jobs/{job['id']}/top-tiles/1.png"))
        responses.append(client.get("/v1/jobs"))
    assert [r.status_code for r in responses] == [200, 409] + [410, 410, 410] * 2 + [200]
    assert "not found" in responses[0].json()["error"]
    for response in responses:
        for folder in {str(tmp_path), str(tmp_path.resolve())}:
            assert folder not in response.text, (response.url, response.text)


def test_redact_paths_names_the_setting_instead_of_the_folder(make_settings, tmp_path: Path) -> None:
    settings = make_settings()
    text = (
        f"{tmp_path / 'slides' / 'a.svs'}: cannot open; [Errno 2] '{tmp_path / 'data' / 'x.h5'}'; "
        f"model card {tmp_path / 'models' / 'm' / 'model_card.json'}; /usr/lib/libopenslide.so.1 "
        f"failed; {Path.home() / '.cache' / 'w.bin'}; POST /v1/jobs/abc/cancel first; 0.5 µm/px"
    )
    assert redact_paths(text, settings) == (
        "<slide_root>/a.svs: cannot open; [Errno 2] '<data_dir>/x.h5'; model card "
        "<models_dir>/m/model_card.json; …/libopenslide.so.1 failed; ~/.cache/w.bin; "
        "POST /v1/jobs/abc/cancel first; 0.5 µm/px"
    )


def test_the_host_header_is_never_reflected(keyed: TestClient) -> None:
    """No redirect (or anything else) builds a URL from the client's `Host` header."""
    for path in ("/v1/jobs/", "/healthz/", "/v1/models/", "/docs/"):
        response = keyed.get(
            path, headers={"Host": "evil.example", "X-API-Key": KEY}, follow_redirects=False
        )
        assert response.status_code != 307, (path, response.headers)
        assert "evil.example" not in str(response.headers) + response.text, path
