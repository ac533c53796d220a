"""`POST /v1/predictions`: feature files in, predictions out; contract violations and non-feature files are 4xx."""

from __future__ import annotations

import dataclasses
import io
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from wsi_mil.preprocessing.feature_file import (
    FeatureProvenance,
    read_feature_file,
    write_feature_file,
)
from wsi_mil.service import create_app

LESION = (768, 1024, 512, 512)


@pytest.fixture()
def client(make_settings, lesion_models_dir: Path) -> Iterator[TestClient]:
    with TestClient(
        create_app(make_settings(models_dir=lesion_models_dir, workers=0))
    ) as test_client:
        yield test_client


def predict(
    client: TestClient,
    path: Path | None = None,
    *,
    model: str = "lesion_abmil",
    content: bytes | None = None,
    name: str = "f.h5",
    **fields: str,
):
    payload = content if content is not None else path.read_bytes()
    return client.post(
        "/v1/predictions", data={"model": model, **fields}, files={"file": (name, payload)}
    )


def variant(source: Path, target: Path, **changes: object) -> Path:
    """A copy of a wsi_mil feature file with changed provenance and, for `feature_dim`, wider features."""
    bag = read_feature_file(source)
    provenance = dataclasses.replace(FeatureProvenance.from_attrs(bag.attrs), **changes)
    features = bag.features
    if provenance.feature_dim != features.shape[1]:
        features = np.tile(features, (1, provenance.feature_dim // features.shape[1]))
    return write_feature_file(target, features, bag.coords, provenance, dtype="float32")


def test_prediction_from_a_feature_file(client: TestClient, lesion_features: Path) -> None:
    response = predict(client, lesion_features, top_k="4")
    assert response.status_code == 200, response.text
    body = response.json()
    bag = read_feature_file(lesion_features)
    assert body["model"] == "lesion_abmil" and body["predicted_class"] == "tumor"
    assert (
        body["n_tiles"]
        == bag.num_tiles
        == len(body["tiles"]["attention"])
        == len(body["tiles"]["x"])
    )
    assert (
        body["tiles"]["x"] == bag.coords[:, 0].tolist() and body["tiles"]["tile_size_level0"] == 128
    )
    assert abs(sum(body["tiles"]["attention"]) - 1) < 1e-4
    assert len(body["top_tiles"]) == 4
    x, y, w, h = LESION
    assert all(x <= t["x"] < x + w and y <= t["y"] < y + h for t in body["top_tiles"])
    assert body["maps"] == ["attention_logits"]
    metrics = client.get("/metrics").text
    assert 'wsi_mil_predictions_total{model="lesion_abmil"} 1.0' in metrics


def test_same_numbers_as_the_slide_job(
    client: TestClient, lesion_features: Path, finished_job: dict
) -> None:
    body = predict(client, lesion_features).json()
    for name, p in finished_job["result"]["probabilities"].items():
        assert body["probabilities"][name] == pytest.approx(p, abs=1e-5)


def test_wrong_feature_dimension_is_422_with_reason(
    client: TestClient, lesion_features: Path, tmp_path: Path
) -> None:
    wide = variant(lesion_features, tmp_path / "wide.h5", feature_dim=64)
    response = predict(client, wide)
    assert response.status_code == 422
    assert "64-d features, the model expects 32-d" in response.json()["detail"]


def test_wrong_encoder_is_422_with_reason(
    client: TestClient, lesion_features: Path, tmp_path: Path
) -> None:
    other = variant(lesion_features, tmp_path / "other.h5", encoder="resnet50-trunc")
    response = predict(client, other)
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert "encoder='resnet50-trunc'" in detail and "encoder='test-encoder'" in detail


def test_other_tile_geometry_is_422(
    client: TestClient, lesion_features: Path, tmp_path: Path
) -> None:
    response = predict(client, variant(lesion_features, tmp_path / "mpp.h5", target_mpp=0.5))
    assert response.status_code == 422 and "target_mpp" in response.json()["detail"]


def test_files_that_are_not_feature_files_are_422(client: TestClient, tmp_path: Path) -> None:
    no_features = tmp_path / "empty.h5"
    with h5py.File(no_features, "w") as handle:
        handle.create_dataset("coords", data=np.zeros((3, 2), dtype=np.int64))
    pickled = io.BytesIO()
    torch.save({"features": torch.zeros(3, 32), "evil": object()}, pickled)
    cases = {
        "random.h5": b"\x89HDF\r\n\x1a\n" + bytes(200),
        "slide.svs": b"II*\x00" + bytes(100),
        "empty.h5": no_features.read_bytes(),
        "pickle.pt": pickled.getvalue(),
        "nan.pt": _pt_bytes(torch.full((4, 32), float("nan"))),
    }
    for name, payload in cases.items():
        response = predict(client, content=payload, name=name)
        assert response.status_code == 422, (name, response.text)
        assert "not a usable feature file" in response.json()["detail"], name


def _pt_bytes(features: torch.Tensor, coords: torch.Tensor | None = None) -> bytes:
    buffer = io.BytesIO()
    torch.save(
        {"features": features} if coords is None else {"features": features, "coords": coords},
        buffer,
    )
    return buffer.getvalue()


def test_clam_h5_and_pt_bags_without_provenance_are_accepted(
    client: TestClient, tmp_path: Path
) -> None:
    clam = tmp_path / "clam.h5"
    rng = np.random.default_rng(0)
    with h5py.File(clam, "w") as handle:
        handle.create_dataset("features", data=rng.normal(size=(5, 32)).astype(np.float32))
        coords = handle.create_dataset(
            "coords", data=np.arange(10, dtype=np.int64).reshape(5, 2) * 256
        )
        coords.attrs["patch_size"] = 256
        coords.attrs["patch_level"] = 0
    response = predict(client, clam, name="clam.h5")
    assert response.status_code == 200, response.text
    assert response.json()["tiles"]["tile_size_level0"] == 256
    bag = predict(client, content=_pt_bytes(torch.randn(7, 32)), name="bag.pt")
    assert bag.status_code == 200, bag.text
    assert bag.json()["tiles"]["x"] is None and bag.json()["top_tiles"][0]["x"] is None


def test_bad_prediction_requests(
    client: TestClient, lesion_features: Path, make_settings, lesion_models_dir: Path
) -> None:
    unknown = predict(client, lesion_features, model="nope")
    assert unknown.status_code == 422 and "lesion_abmil" in unknown.json()["detail"]
    missing = client.post(
        "/v1/predictions", data={"model": "lesion_abmil"}, files={"other": ("f.h5", b"1")}
    )
    assert missing.status_code == 422 and "`file`" in missing.json()["detail"]
    assert predict(client, lesion_features, top_k="0").status_code == 422
    assert predict(client, lesion_features, top_k="many").status_code == 422
    assert client.post("/v1/predictions", json={"model": "lesion_abmil"}).status_code == 415
    with TestClient(
        create_app(make_settings(models_dir=lesion_models_dir, workers=0, max_upload_mb=0.001))
    ) as small:
        too_big = predict(small, lesion_features)
    assert too_big.status_code == 413


def test_hostile_feature_files_are_422_naming_the_problem(
    client: TestClient, hostile_files: dict, server_side_files: tuple[Path, Path]
) -> None:
    """Links and storage outside the upload, declared sizes past the limits, mistyped fields and
    empty bags: each a 422 that names the field, never a 200 from a server file nor a 500."""
    details = {}
    for name, hostile in hostile_files.items():
        response = predict(client, content=hostile.content, name="upload.h5")
        assert response.status_code == 422, (name, response.status_code, response.text)
        detail = response.json()["detail"]
        assert hostile.reason in detail, (name, detail)
        assert str(server_side_files[0].parent) not in detail, (name, detail)
        details[name] = detail
    # no existence oracle: a link to a file that exists reads the same as one to a missing file
    assert (
        details["external link to a server file"] == details["external link to a missing file"]
    )


def test_declared_sizes_are_refused_before_anything_is_read(
    lesion_models_dir: Path, tmp_path: Path
) -> None:
    """Few-KB files declaring 2e8 tiles, or 200k x 512 features (400 MiB) past a 64 MiB limit, are
    refused while the server's peak memory stays put (measured in a fresh process)."""
    files = []
    for rows, dim in ((2 * 10**8, 1), (200_000, 512)):
        path = tmp_path / f"declared_{rows}x{dim}.h5"
        with h5py.File(path, "w") as handle:
            handle.create_dataset(
                "features", shape=(rows, dim), dtype="f2", chunks=(4096, dim), compression="gzip"
            )
        assert path.stat().st_size < 64 * 1024
        files.append(str(path))
    script = """
import json, resource, sys
from pathlib import Path
from fastapi.testclient import TestClient
from wsi_mil.service import ServiceSettings, create_app

models, data, *files = sys.argv[1:]
settings = ServiceSettings(models_dir=models, data_dir=data, workers=0, device="cpu", max_feature_mb=64)
results = []
with TestClient(create_app(settings)) as client:
    for path in files:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        response = client.post(
            "/v1/predictions",
            data={"model": "lesion_abmil"},
            files={"file": ("big.h5", Path(path).read_bytes())},
        )
        growth_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
        results.append([response.status_code, response.json()["detail"], growth_mib])
print(json.dumps(results))
"""
    run = subprocess.run(
        [sys.executable, "-c", script, str(lesion_models_dir), str(tmp_path / "data"), *files],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    for status, detail, growth_mib in json.loads(run.stdout.strip().splitlines()[-1]):
        assert growth_mib < 64, f"peak RSS grew by {growth_mib:.0f} MiB: the file was read ({detail})"
        assert status == 422, detail
        assert "WSI_MIL_MAX_FEATURE_MB" in detail or "WSI_MIL_MAX_TILES" in detail, detail
