"""The viewer: Deep Zoom endpoints, the HTML page, and the page in a real browser (Debian Chromium)."""

from __future__ import annotations

import io
import re
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from pydantic import SecretStr

CHROMIUM = Path("/usr/bin/chromium")
OSD_BUILD = Path(__file__).resolve().parents[3] / "node_modules" / "openseadragon" / "build" / "openseadragon"
KEY = "viewer-key"
LESION = (768, 1024, 512, 512)
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def test_dzi_descriptor_and_tiles(live_client: httpx.Client, finished_job: dict) -> None:
    base = f"/v1/jobs/{finished_job['id']}"
    dzi = live_client.get(f"{base}/dzi.dzi")
    assert dzi.status_code == 200 and dzi.headers["content-type"].startswith("application/xml")
    assert 'TileSize="254"' in dzi.text and 'Overlap="1"' in dzi.text
    assert re.search(r'Width="2048"\s+Height="2048"', dzi.text)
    top_level = 11  # ceil(log2(2048)) levels above 1x1
    tile = live_client.get(f"{base}/dzi_files/{top_level}/0_0.jpeg")
    assert tile.status_code == 200 and tile.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(tile.content)).size == (255, 255)  # 254 + 1 px overlap at the edge
    assert live_client.get(f"{base}/dzi_files/{top_level}/99_0.jpeg").status_code == 404
    assert live_client.get(f"{base}/dzi_files/40/0_0.jpeg").status_code == 404
    # tile names are `<col>_<row>.jpeg` in decimal digits and nothing else
    assert live_client.get(f"{base}/dzi_files/{top_level}/0_0_0.jpeg").status_code == 404
    for name in ("1_2_3", "x_0", "0_x", "1__2", "+1_0", "0_-1", "0x1_0", "١_0", "0_0 "):
        assert live_client.get(f"{base}/dzi_files/{top_level}/{name}.jpeg").status_code == 404, name
    assert live_client.get(f"{base}/dzi_files/{top_level}/00_0.jpeg").status_code == 200


def test_viewer_page_uses_local_openseadragon_when_installed(
    live_client: httpx.Client, finished_job: dict
) -> None:
    page = live_client.get(f"/v1/jobs/{finished_job['id']}/viewer")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert f'data-job-id="{finished_job["id"]}"' in page.text
    if (
        Path(__file__).resolve().parents[3] / "node_modules/openseadragon/build/openseadragon"
    ).is_dir():
        assert 'src="/vendor/openseadragon/openseadragon.min.js"' in page.text
        assert live_client.get("/vendor/openseadragon/openseadragon.min.js").status_code == 200
    else:
        assert 'integrity="sha384-' in page.text
    assert live_client.get("/static/viewer.js").status_code == 200


def test_viewer_page_falls_back_to_pinned_cdn_with_sri(make_settings, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from wsi_mil.service import create_app

    with TestClient(create_app(make_settings(openseadragon_dir=tmp_path / "missing"))) as client:
        page = client.get("/v1/jobs/" + "0" * 32 + "/viewer").text
    assert (
        "https://cdn.jsdelivr.net/npm/openseadragon@6.1.1/build/openseadragon/openseadragon.min.js"
        in page
    )
    assert (
        'integrity="sha384-KKly+4vqqBHitr2XfNKWa3+0asIVpzYs2HijkM/zz0X6rgnyLuQEVERX9HqkM5/P"'
        in page
    )


@pytest.fixture(scope="module")
def keyed_live_service(live_service, finished_job: dict, uvicorn_server):
    """A second server on the same data folder with an API key (no workers: it only reads)."""
    settings = live_service.settings.model_copy(update={"api_key": SecretStr(KEY), "workers": 0})
    with uvicorn_server(settings) as service:
        yield service


def _screenshot(page) -> np.ndarray:
    page.wait_for_timeout(400)  # OpenSeadragon blends new tiles in
    return np.asarray(Image.open(io.BytesIO(page.locator("#slide-view").screenshot())).convert("RGB")).astype(int)


def _wait_loaded(page) -> None:
    page.wait_for_function(
        "() => { const s = window.wsiViewerState;"
        " return s && (s.error || (s.slideLoaded && s.overlayLoaded && s.legendLoaded && s.topTilesLoaded)); }",
        timeout=30_000,
    )
    state = page.evaluate("() => window.wsiViewerState")
    assert state["error"] is None, state


@pytest.mark.parametrize("with_key", [False, True], ids=["open", "api-key"])
def test_viewer_in_chromium_shows_slide_tiles_with_aligned_overlay(
    request: pytest.FixtureRequest, live_service, finished_job: dict, with_key: bool
) -> None:
    if not CHROMIUM.exists():
        pytest.skip("/usr/bin/chromium is missing (apt-get install -y chromium; scripts/setup-extras.sh)")
    if not OSD_BUILD.is_dir():
        pytest.skip("node_modules/openseadragon is missing (npm ci at the repository root); no CDN here")
    sync_api = pytest.importorskip("playwright.sync_api")
    service = request.getfixturevalue("keyed_live_service") if with_key else live_service
    url = f"{service.base_url}/v1/jobs/{finished_job['id']}/viewer" + (f"#api_key={KEY}" if with_key else "")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 700})
            errors: list[str] = []
            page.on("pageerror", lambda err: errors.append(str(err)))
            page.goto(url)
            _wait_loaded(page)
            assert errors == []
            assert page.inner_text("#predicted-class") == "tumor"
            assert page.locator("#top-tiles img").count() == 8
            assert page.input_value("#scale") == "relative"
            relative_ticks = _legend(page)
            page.fill("#opacity", "1")
            page.dispatch_event("#opacity", "input")
            relative = _screenshot(page)
            assert not page.locator("#class-choice").is_visible()  # the model has no per-class map
            page.select_option("#scale", "percentile")
            _wait_loaded(page)
            percentile = _screenshot(page)
            page.fill("#opacity", "0")
            page.dispatch_event("#opacity", "input")
            plain = _screenshot(page)
            page.fill("#opacity", "1")
            page.dispatch_event("#opacity", "input")
            page.select_option("#scale", "minmax")
            _wait_loaded(page)
            minmax = _screenshot(page)
            minmax_ticks = _legend(page)
        finally:
            browser.close()
    api = {"X-API-Key": KEY} if with_key else {}
    for scale, shown in (("relative", relative_ticks), ("minmax", minmax_ticks)):
        legend = httpx.get(f"{service.base_url}/v1/jobs/{finished_job['id']}/heatmap-legend", params={"scale": scale}, headers=api).json()
        assert [label for label, _ in shown] == [t["label"] for t in legend["ticks"]], scale
    assert [label for label, _ in relative_ticks] == ["×1", "×2", "×4", "×8", "×16"]
    assert all(value for _, value in relative_ticks)  # the score under each tick
    assert minmax_ticks[0][1] == "" and float(minmax_ticks[-1][0]) > float(minmax_ticks[0][0])
    backdrop = (percentile == [17, 17, 17]).all(axis=-1)  # the viewer's dark background
    assert (~backdrop).mean() > 0.3, "slide tiles should cover much of the view"
    # the square slide on screen, measured through its middle (away from the buttons and navigator)
    height = backdrop.shape[0]
    xs = np.nonzero(~backdrop[height // 2])[0]
    ys = np.nonzero(~backdrop[:, (xs.min() + xs.max()) // 2])[0]
    x0, y0, side = xs.min(), ys.min(), xs.max() + 1 - xs.min()
    assert abs((ys.max() + 1 - ys.min()) - side) <= 2
    on_slide = percentile[~backdrop]
    assert _blue(on_slide).mean() > 0.05 and _red(on_slide).mean() > 0.01, "the jet overlay shows"
    assert _blue(plain[~backdrop]).mean() < 0.01, "opacity 0 hides the overlay"
    assert _pink(plain[~backdrop]).mean() > 0.05, "the slide's tissue shows under the overlay"
    lesion = np.zeros(backdrop.shape, dtype=bool)
    lx, ly, lw, lh = (round(v * side / 2048) for v in LESION)
    lesion[y0 + ly : y0 + ly + lh, x0 + lx : x0 + lx + lw] = True
    hot = _hot(minmax)
    assert (hot & lesion).sum() / (hot | lesion).sum() >= 0.8, "the hot overlay lies on the lesion"
    # the default scale: the lesion is hot, the rest of the slide shows its own tissue, uncoloured
    away = ~backdrop & ~lesion
    assert (_hot(relative) & lesion).sum() / lesion.sum() > 0.8
    assert (_blue(relative) | _hot(relative))[away].mean() < 0.05, "no signal off the lesion: calm"
    assert (_blue(percentile) | _hot(percentile))[away].mean() > 0.3, "percentile paints it all"


def _legend(page) -> list[tuple[str, str]]:
    """The legend's ticks as shown: (label, score under it or "")."""
    assert page.locator("#legend").is_visible() and page.locator("#legend-bar").bounding_box()["width"] > 100
    items = page.locator("#legend-ticks li")
    return [
        (items.nth(i).locator(".tick-label").inner_text(),
         items.nth(i).locator(".tick-value").inner_text() if items.nth(i).locator(".tick-value").count() else "")
        for i in range(items.count())
    ]


def _red(pixels: np.ndarray) -> np.ndarray:
    return (pixels[..., 0] > 150) & (pixels[..., 1] < 90) & (pixels[..., 2] < 90)


def _hot(pixels: np.ndarray) -> np.ndarray:
    """Jet's upper half (yellow to dark red): strong red, little blue."""
    return (pixels[..., 0] > 100) & (pixels[..., 2] < 80)


def _blue(pixels: np.ndarray) -> np.ndarray:
    return (pixels[..., 2] > 150) & (pixels[..., 0] < 110)


def _pink(pixels: np.ndarray) -> np.ndarray:
    return (pixels[..., 0] > 180) & (pixels[..., 1] < 200) & (pixels[..., 2] > 150)
