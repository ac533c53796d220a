"""The service serving an `ins` model folder: a slide job stores each tile's `instance_score`, and the
heatmap (PNG and GeoJSON) drawn from that map lies on the lesion."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import torch
from fastapi.testclient import TestClient
from PIL import Image
from sklearn.linear_model import LogisticRegression

from wsi_mil.models import create_model
from wsi_mil.preprocessing.feature_file import read_feature_file
from wsi_mil.service import create_app

INS_OPTIONS = {"hidden_dim": 64, "dropout": 0.0}


def lesion_scoring_ins(features: np.ndarray, in_lesion: np.ndarray) -> torch.nn.Module:
    """An `ins` model whose positive margin `o_1 − o_0` is a logistic regression of lesion vs rest:
    the encoder `[I; −I]` + ReLU keeps x recoverable, the classifier reads `w·x + b` from it."""
    regression = LogisticRegression(C=10.0, max_iter=2000).fit(features, in_lesion)
    w = torch.tensor(regression.coef_[0], dtype=torch.float32)
    dim = features.shape[1]
    model = create_model("ins", dim, 2, **INS_OPTIONS)
    with torch.no_grad():
        model.encoder[0].weight.copy_(torch.cat([torch.eye(dim), -torch.eye(dim)]))
        model.encoder[0].bias.zero_()
        model.classifier.weight.zero_()
        model.classifier.weight[1] = torch.cat([w, -w])
        model.classifier.bias.copy_(torch.tensor([0.0, float(regression.intercept_[0])]))
    return model


def test_an_ins_job_serves_its_instance_scores_as_a_heatmap_on_the_lesion(
    make_settings, model_folder, lesion_slide, lesion_features: Path, encoder_weights: Path, tmp_path: Path,
    job_waiter,
) -> None:
    bag = read_feature_file(lesion_features)
    lesion = lesion_slide.lesion_tiles()
    in_lesion = np.array([(int(x), int(y)) in lesion for x, y in bag.coords])
    folder = tmp_path / "models" / "lesion_ins"
    model_folder(folder, model=lesion_scoring_ins(bag.features, in_lesion), model_name="ins",
                 model_kwargs=INS_OPTIONS, weights="encoder.safetensors")
    shutil.copy(encoder_weights, folder / "encoder.safetensors")
    shutil.copytree(lesion_slide.root, tmp_path / "slides", dirs_exist_ok=True)
    with TestClient(create_app(make_settings())) as client:
        response = client.post("/v1/jobs", json={"model": "lesion_ins", "slide_path": lesion_slide.path.name})
        assert response.status_code == 202, response.text
        job = job_waiter(client, response.json()["id"])
        assert job["state"] == "done", job
        assert job["result"]["predicted_class"] == "tumor"
        assert "instance_score" in job["result"]["maps"]
        collection = client.get(f"/v1/jobs/{job['id']}/heatmap.geojson", params={"map": "instance_score"}).json()
        hot = set()
        for feature in collection["features"]:
            score = feature["properties"]["measurements"]["instance_score"]
            assert 0.0 <= score <= 1.0
            if score > 0.5:
                hot.add(tuple(int(v) for v in feature["geometry"]["coordinates"][0][0]))
        assert len(hot & lesion) / len(hot | lesion) >= 0.8
        image = client.get(f"/v1/jobs/{job['id']}/heatmap.png",
                           params={"map": "instance_score", "background": "none", "max_size": 256})
        assert image.status_code == 200 and image.headers["content-type"] == "image/png"
        assert np.asarray(Image.open(io.BytesIO(image.content)))[..., 3].any()
