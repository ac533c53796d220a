"""`/healthz`, `/readyz`, `/metrics`."""

from __future__ import annotations

import json
import struct
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


def test_corrupt_model_folders_are_skipped_and_reported_without_paths(
    make_settings, model_folder, tmp_path: Path
) -> None:
    """Start-up survives corrupt, truncated and mismatched `model.safetensors` and a broken card;
    `/readyz` (open to anyone) names each folder and its problem but no server path."""
    models = tmp_path / "models"
    model_folder(models / "good")
    weights = (model_folder(models / "truncated") / "model.safetensors").read_bytes()
    (models / "truncated" / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    model_folder(models / "garbage")
    (models / "garbage" / "model.safetensors").write_bytes(b"\xff" * 4096)
    model_folder(models / "huge_header")
    (models / "huge_header" / "model.safetensors").write_bytes(struct.pack("<Q", 2**62) + b"{}")
    model_folder(models / "empty")
    (models / "empty" / "model.safetensors").write_bytes(b"")
    model_folder(models / "directory")
    (models / "directory" / "model.safetensors").unlink()
    (models / "directory" / "model.safetensors").mkdir()
    model_folder(models / "other_shapes", in_dim=64)
    card = json.loads((models / "other_shapes" / "model_card.json").read_text())
    card["feature_contract"]["feature_dim"] = 32
    (models / "other_shapes" / "model_card.json").write_text(json.dumps(card))
    (models / "bad_card").mkdir()
    (models / "bad_card" / "model_card.json").write_text('{"model_name": 3}')
    with TestClient(create_app(make_settings(workers=0))) as client:
        ready = client.get("/readyz")
        served = client.get("/v1/models").json()
    assert ready.status_code == 200, ready.text
    body = ready.json()
    assert body["models"] == 1 and [m["name"] for m in served["data"]] == ["good"]
    assert set(body["model_problems"]) == {
        "truncated",
        "garbage",
        "huge_header",
        "empty",
        "directory",
        "other_shapes",
        "bad_card",
    }
    assert all(body["model_problems"].values())
    assert str(tmp_path) not in ready.text and "/model_card.json" not in ready.text


def test_readyz_names_no_server_path_when_the_models_folder_is_missing(
    make_settings, tmp_path: Path
) -> None:
    with TestClient(create_app(make_settings(models_dir=tmp_path / "absent", workers=0))) as client:
        ready = client.get("/readyz")
    assert ready.status_code == 503
    assert "WSI_MIL_MODELS_DIR" in ready.text and str(tmp_path) not in ready.text
