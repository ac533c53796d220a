"""`/v1/models`: names, classes, feature contracts, preprocessing, and run-fold names with a slash."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from wsi_mil.service import create_app
from wsi_mil.training.config import TrainConfig, save_config


def test_list_and_get_models(make_settings, model_folder, tmp_path: Path) -> None:
    models = tmp_path / "models"
    model_folder(models / "tumor_abmil", weights=str(tmp_path / "private" / "encoder.safetensors"))
    (models / "run7").mkdir(parents=True)
    save_config(TrainConfig(), models / "run7" / "config.yaml")
    model_folder(models / "run7" / "fold_2", fold=2, preprocessing=False, encoder=None)
    with TestClient(create_app(make_settings(workers=0))) as client:
        listing = client.get("/v1/models").json()
        assert listing["count"] == 2 and [m["name"] for m in listing["data"]] == [
            "run7/fold_2",
            "tumor_abmil",
        ]
        model = client.get("/v1/models/tumor_abmil").json()
        assert model["class_names"] == ["normal", "tumor"] and model["num_classes"] == 2
        assert model["architecture"] == "abmil" and model["slide_jobs"] is True
        assert model["feature_contract"] == {
            "encoder": "test-encoder",
            "feature_dim": 32,
            "target_mpp": 1.0,
            "tile_px": 64,
            "tile_size_level0": None,
        }
        assert model["preprocessing"]["weights"] == "encoder.safetensors"  # never the server path
        assert str(tmp_path) not in client.get("/v1/models/tumor_abmil").text
        fold = client.get("/v1/models/run7/fold_2").json()
        assert (
            fold["fold"] == 2
            and fold["slide_jobs"] is False
            and "only feature-file" in fold["slide_job_problem"]
        )
        missing = client.get("/v1/models/none")
        assert missing.status_code == 404 and "run7/fold_2, tumor_abmil" in missing.json()["detail"]
