"""A finished job's outputs on the live server: the heatmap lies on the lesion (PNG and GeoJSON),
scales, per-class requests, scores, top tiles."""

from __future__ import annotations

import io
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from wsi_mil.service import create_app

SLIDE_SIZE = 2048
TILE = 128
LESION = (768, 1024, 512, 512)


def lesion_tiles() -> set[tuple[int, int]]:
    x, y, w, h = LESION
    return {(tx, ty) for tx in range(x, x + w, TILE) for ty in range(y, y + h, TILE)}


def iou(a: set[Any], b: set[Any]) -> float:
    return len(a & b) / len(a | b)


def png(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    return np.asarray(Image.open(io.BytesIO(response.content)))


def test_heatmap_png_hot_region_lies_on_the_lesion(
    live_client: httpx.Client, finished_job: dict
) -> None:
    job_id = finished_job["id"]
    size = 1024
    image = png(
        live_client.get(
            f"/v1/jobs/{job_id}/heatmap.png",
            params={
                "scale": "minmax",
                "background": "none",
                "cmap": "gray",
                "alpha": 1,
                "max_size": size,
            },
        )
    )
    assert image.shape == (size, size, 4)
    assert (
        live_client.get(f"/v1/jobs/{job_id}/heatmap.png", params={"max_size": size}).headers[
            "x-level0-size"
        ]
        == "2048,2048"
    )
    value = image[..., 0].astype(float) / 255
    drawn = image[..., 3] > 0
    hot = drawn & (value > 0.5)
    per_px = SLIDE_SIZE / size
    # pixel level: the hot pixels against the lesion box drawn at the PNG's scale
    x, y, w, h = (round(v / per_px) for v in LESION)
    truth = np.zeros_like(hot)
    truth[y : y + h, x : x + w] = True
    assert (hot & truth).sum() / (hot | truth).sum() >= 0.8
    # tile level: a tile is hot when most of its pixels are
    scores = live_client.get(f"/v1/jobs/{job_id}/scores.json").json()
    hot_tiles = set()
    for tx, ty in zip(scores["x"], scores["y"], strict=True):
        cell = hot[
            round(ty / per_px) : round((ty + TILE) / per_px),
            round(tx / per_px) : round((tx + TILE) / per_px),
        ]
        if cell.mean() > 0.5:
            hot_tiles.add((tx, ty))
    assert iou(hot_tiles, lesion_tiles()) >= 0.8


def test_heatmap_geojson_hot_tiles_are_the_lesion_tiles(
    live_client: httpx.Client, finished_job: dict
) -> None:
    response = live_client.get(f"/v1/jobs/{finished_job['id']}/heatmap.geojson")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/geo+json")
    collection = response.json()
    assert collection["type"] == "FeatureCollection"
    assert len(collection["features"]) == finished_job["result"]["n_tiles"]
    hot = set()
    for feature in collection["features"]:
        ring = feature["geometry"]["coordinates"][0]
        assert feature["geometry"]["type"] == "Polygon" and ring[0] == ring[-1] and len(ring) == 5
        (x0, y0), (x1, _), (_, y2) = ring[0], ring[1], ring[2]
        assert (x1 - x0, y2 - y0) == (TILE, TILE)
        properties = feature["properties"]
        assert properties["objectType"] == "tile" and properties["isLocked"] is True
        measurements = properties["measurements"]
        assert {"attention", "attention_percentile", "attention_minmax"} <= set(measurements)
        if measurements["attention_minmax"] > 0.5:
            hot.add((x0, y0))
    assert iou(hot, lesion_tiles()) >= 0.8


def test_job_result_predicts_tumor_and_blended_png_is_red_on_the_lesion(
    live_client: httpx.Client, finished_job: dict
) -> None:
    result = finished_job["result"]
    assert result["predicted_class"] == "tumor"
    assert result["slide_width"] == result["slide_height"] == SLIDE_SIZE
    image = png(
        live_client.get(f"/v1/jobs/{finished_job['id']}/heatmap.png", params={"max_size": 512})
    ).astype(float)
    assert image.shape == (512, 512, 3)
    redness = image[..., 0] - image[..., 2]
    x, y, w, h = (v // 4 for v in LESION)
    inside = redness[y : y + h, x : x + w].mean()
    outside = np.delete(
        redness.ravel(), (np.arange(h)[:, None] + y) * 512 + np.arange(w) + x
    ).mean()
    assert inside > outside + 40


def test_scales_differ_as_documented(live_client: httpx.Client, finished_job: dict) -> None:
    job_id = finished_job["id"]
    params = {"background": "none", "cmap": "gray", "alpha": 1, "max_size": 256}
    values = {}
    for scale in ("raw", "percentile", "minmax", "relative"):
        image = png(
            live_client.get(f"/v1/jobs/{job_id}/heatmap.png", params={**params, "scale": scale})
        )
        values[scale] = image[..., 0][image[..., 3] > 0].astype(float) / 255
    assert (
        values["raw"].max() < 0.2
    )  # softmax attention over ~100+ tiles sits near 0 (a "cold" map)
    assert values["minmax"].max() > 0.95 and values["minmax"].min() < 0.05
    assert values["percentile"].max() > 0.95 and np.median(values["percentile"]) > 0.3
    # relative (the default): tiles at or below an even share of attention are left uncoloured
    default = png(live_client.get(f"/v1/jobs/{job_id}/heatmap.png", params=params))
    relative = png(live_client.get(f"/v1/jobs/{job_id}/heatmap.png", params={**params, "scale": "relative"}))
    np.testing.assert_array_equal(default, relative)
    coloured = relative[..., 3] > 25
    x, y, w, h = (v // 8 for v in LESION)
    assert coloured[y : y + h, x : x + w].mean() > 0.9 and coloured.sum() < 1.5 * w * h
    bad = live_client.get(f"/v1/jobs/{job_id}/heatmap.png", params={"scale": "softmax"})
    assert bad.status_code == 422


def test_class_index_without_per_class_map_is_refused_with_reason(
    live_client: httpx.Client, finished_job: dict
) -> None:
    response = live_client.get(
        f"/v1/jobs/{finished_job['id']}/heatmap.png", params={"class_index": 1}
    )
    assert response.status_code == 422
    assert "per-class map" in response.json()["detail"]
    named = live_client.get(
        f"/v1/jobs/{finished_job['id']}/heatmap.png",
        params={"map": "attention_logits", "max_size": 128, "scale": "minmax"},
    )
    assert named.status_code == 200
    logits = live_client.get(
        f"/v1/jobs/{finished_job['id']}/heatmap.png", params={"map": "attention_logits"}
    )
    assert logits.status_code == 422 and "scale=minmax" in logits.json()["detail"]
    unknown = live_client.get(f"/v1/jobs/{finished_job['id']}/heatmap.png", params={"map": "nope"})
    assert unknown.status_code == 422 and "available" in unknown.json()["detail"]


def test_top_tiles_are_lesion_tiles_and_their_images_come_from_the_slide(
    live_client: httpx.Client, finished_job: dict
) -> None:
    listing = live_client.get(f"/v1/jobs/{finished_job['id']}/top-tiles", params={"k": 4}).json()
    assert [t["rank"] for t in listing["data"]] == [1, 2, 3, 4]
    assert all((t["x"], t["y"]) in lesion_tiles() for t in listing["data"])
    scores = [t["score"] for t in listing["data"]]
    assert scores == sorted(scores, reverse=True)
    tile = png(live_client.get(listing["data"][0]["url"], params={"size": 64}))
    assert tile.shape == (64, 64, 3)
    assert tile.mean() < 200  # dense dark lesion nuclei, not white background
    assert live_client.get(f"/v1/jobs/{finished_job['id']}/top-tiles/100000.png").status_code == 422


def test_scores_json_columns(live_client: httpx.Client, finished_job: dict) -> None:
    scores = live_client.get(f"/v1/jobs/{finished_job['id']}/scores.json").json()
    n = finished_job["result"]["n_tiles"]
    assert len(scores["x"]) == len(scores["y"]) == n
    assert scores["tile_size_level0"] == TILE
    assert abs(sum(scores["scores"]["attention"]) - 1) < 1e-4
    assert all(len(v) == n for v in scores["scores"].values())


def test_the_legend_gives_the_colours_and_the_score_at_each_tick(
    live_client: httpx.Client, finished_job: dict
) -> None:
    base = f"/v1/jobs/{finished_job['id']}"
    attention = np.asarray(live_client.get(f"{base}/scores.json").json()["scores"]["attention"])
    default = live_client.get(f"{base}/heatmap-legend").json()
    assert (default["scale"], default["score"], default["cmap"]) == ("relative", "attention", "jet")
    assert [t["label"] for t in default["ticks"]] == ["×1", "×2", "×4", "×8", "×16"]
    assert default["ticks"][0]["value"] == pytest.approx(attention.mean())  # x1 = an even share, 1/N
    assert default["colors"][0].endswith("0.00)") and default["colors"][-1].endswith("1.00)")
    minmax = live_client.get(f"{base}/heatmap-legend", params={"scale": "minmax", "cmap": "gray"}).json()
    assert minmax["ticks"][0]["value"] == pytest.approx(attention.min())
    assert minmax["ticks"][-1]["value"] == pytest.approx(attention.max())
    assert minmax["colors"][0] == "rgba(0, 0, 0, 1.00)"
    assert live_client.get(f"{base}/heatmap-legend", params={"class_index": 1}).status_code == 422


def test_heatmap_work_is_capped_and_cached(live_service: Any, finished_job: dict) -> None:
    """`max_size=4096&smooth=10` is honoured only up to the settings' caps: the PNG is the capped
    size and equals the request at the caps; the second identical request comes from the cache."""
    capped = live_service.settings.model_copy(
        update={"workers": 0, "heatmap_max_size": 256, "heatmap_max_smooth": 2.0}
    )
    url = f"/v1/jobs/{finished_job['id']}/heatmap.png"
    with TestClient(create_app(capped)) as client:
        asked = client.get(url, params={"max_size": 4096, "smooth": 10})
        at_caps = client.get(url, params={"max_size": 256, "smooth": 2})
        unsmoothed = client.get(url, params={"max_size": 256})
        cache = client.app.state.heatmap_cache
        assert cache.hits == 1
    assert png(asked).shape[:2] == (256, 256)
    assert asked.content == at_caps.content != unsmoothed.content
