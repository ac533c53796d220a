"""`/healthz`, `/readyz`, `/metrics`."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from wsi_mil.service import create_app


def test_ready_with_models_and_workers(make_settings, model_folder, tmp_path: Path) -> None:
    model_folder(tmp_path / "models" / "random_abmil")
    with TestClient(create_app(make_settings(workers=2))) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        ready = client.get("/readyz")
        assert ready.status_code == 200
        assert ready.json() == {
            "status": "ready",
            "models": 1,
            "workers": 2,
            "reasons": [],
            "model_problems": {},
        }
        assert client.get("/metrics").headers["content-type"].startswith("text/plain")


def test_not_ready_without_models_reports_why(make_settings, tmp_path: Path) -> None:
    broken = tmp_path / "models" / "broken"
    broken.mkdir(parents=True)
    (broken / "model_card.json").write_text("{not json")
    with TestClient(create_app(make_settings(workers=0))) as client:
        assert client.get("/healthz").status_code == 200
        ready = client.get("/readyz")
    assert ready.status_code == 503
    body = ready.json()
    assert body["status"] == "not ready" and "no model loaded" in body["reasons"][0]
    assert "broken" in body["model_problems"]
