"""`/v1/jobs`: JSON and multipart submission, size limits, slide-path escapes, broken slides, cancel,
delete, and a job queued before a restart finishing after it."""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from wsi_mil.service import create_app

BROKEN = ("broken.svs", "kidney-48-5.tif", "small_dicom.dcm", "unopenable.tiff", "unreadable.svs")


@pytest.fixture()
def slide_settings(make_settings, model_folder, lesion_slide, tmp_path: Path):
    """Settings whose slide root holds a copy of the lesion slide, with a random ABMIL on the test encoder."""
    slides = tmp_path / "slides"
    slides.mkdir(exist_ok=True)
    shutil.copy(lesion_slide.path, slides / "lesion.tiff")
    model_folder(tmp_path / "models" / "random_abmil")
    model_folder(tmp_path / "models" / "features_only", preprocessing=False, encoder=None)
    return make_settings


@pytest.fixture()
def client(slide_settings) -> Iterator[TestClient]:
    with TestClient(create_app(slide_settings())) as test_client:
        yield test_client


def test_json_job_runs_to_done_with_result_and_links(client: TestClient, job_waiter) -> None:
    response = client.post("/v1/jobs", json={"model": "random_abmil", "slide_path": "lesion.tiff"})
    assert response.status_code == 202, response.text
    job = response.json()
    assert response.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["state"] in ("queued", "running") and job["source"] == "path"
    done = job_waiter(client, job["id"])
    assert done["state"] == "done", done
    assert done["progress"] == 1.0 and done["error"] is None
    result = done["result"]
    assert result["class_names"] == ["normal", "tumor"]
    assert abs(sum(result["probabilities"].values()) - 1) < 1e-5
    assert result["n_tiles"] > 50 and result["tile_size_level0"] == 128
    assert set(done["links"]) >= {"heatmap", "geojson", "scores", "top_tiles", "viewer", "dzi"}
    listed = client.get("/v1/jobs", params={"state": "done"}).json()
    assert [j["id"] for j in listed["data"]] == [job["id"]]


def test_multipart_upload_job_runs_and_delete_removes_its_files(
    client: TestClient, slide_settings, lesion_slide, job_waiter
) -> None:
    settings = client.app.state.settings
    with lesion_slide.path.open("rb") as handle:
        response = client.post(
            "/v1/jobs",
            data={"model": "random_abmil"},
            files={"file": ("my slide (1).tiff", handle, "image/tiff")},
        )
    assert response.status_code == 202, response.text
    job = job_waiter(client, response.json()["id"])
    assert job["state"] == "done", job
    assert job["slide_name"] == "my slide (1).tiff" and job["source"] == "upload"
    upload_dir = settings.data_dir / "uploads" / job["id"]
    assert [p.name for p in upload_dir.iterdir()] == ["my_slide_(1).tiff"]
    assert (settings.data_dir / "jobs" / job["id"] / "features.h5").is_file()
    assert client.delete(f"/v1/jobs/{job['id']}").status_code == 204
    assert not upload_dir.exists() and not (settings.data_dir / "jobs" / job["id"]).exists()
    assert client.get(f"/v1/jobs/{job['id']}").status_code == 404
    assert client.delete(f"/v1/jobs/{job['id']}").status_code == 404


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_oversized_upload_is_413_and_leaves_nothing(slide_settings, chunked: bool) -> None:
    settings = slide_settings(max_upload_mb=0.05)  # 51 KiB
    payload = os.urandom(200_000)
    with TestClient(create_app(settings)) as client:
        if chunked:
            boundary = "wsimilboundary"
            head = (
                f'--{boundary}\r\nContent-Disposition: form-data; name="model"\r\n\r\nrandom_abmil\r\n'
                f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.svs"\r\n\r\n'
            ).encode()

            def body() -> Iterator[bytes]:
                yield head
                for start in range(0, len(payload), 16_384):
                    yield payload[start : start + 16_384]
                yield f"\r\n--{boundary}--\r\n".encode()

            response = client.post(
                "/v1/jobs",
                content=body(),
                headers={"content-type": f"multipart/form-data; boundary={boundary}"},
            )
        else:
            response = client.post(
                "/v1/jobs", data={"model": "random_abmil"}, files={"file": ("big.svs", payload)}
            )
        assert response.status_code == 413, response.text
        assert "WSI_MIL_MAX_UPLOAD_MB" in response.json()["detail"]
        assert client.get("/v1/jobs").json()["count"] == 0
    uploads = settings.data_dir / "uploads"
    assert not uploads.exists() or not any(uploads.rglob("*"))


def test_slide_path_escapes_are_refused(client: TestClient, tmp_path: Path) -> None:
    outside = tmp_path / "outside.tiff"
    shutil.copy(tmp_path / "slides" / "lesion.tiff", outside)
    (tmp_path / "slides" / "link.tiff").symlink_to(outside)
    (tmp_path / "slides" / "sub").mkdir()
    (tmp_path / "slides" / "sub" / "dirlink").symlink_to(tmp_path)
    cases = {
        "../outside.tiff": "'..'",
        "sub/../../outside.tiff": "'..'",
        str(outside): "outside the slide root",
        "/etc/passwd": "outside the slide root",
        "link.tiff": "outside the slide root",
        "sub/dirlink/outside.tiff": "outside the slide root",
        "missing.svs": "no slide file",
        "sub": "no slide file",
    }
    for slide_path, reason in cases.items():
        response = client.post("/v1/jobs", json={"model": "random_abmil", "slide_path": slide_path})
        assert response.status_code == 400, (slide_path, response.text)
        assert reason in response.json()["detail"], (slide_path, response.json())
        form = client.post("/v1/jobs", data={"model": "random_abmil", "slide_path": slide_path})
        assert form.status_code == 400, (slide_path, form.text)
    inside_absolute = client.post(
        "/v1/jobs",
        json={"model": "random_abmil", "slide_path": str(tmp_path / "slides" / "lesion.tiff")},
    )
    assert inside_absolute.status_code == 202
    assert client.get("/v1/jobs").json()["count"] == 1


def test_slide_paths_need_a_slide_root(slide_settings) -> None:
    with TestClient(create_app(slide_settings(slide_root=None))) as client:
        response = client.post(
            "/v1/jobs", json={"model": "random_abmil", "slide_path": "lesion.tiff"}
        )
    assert response.status_code == 400
    assert "WSI_MIL_SLIDE_ROOT" in response.json()["detail"]


def test_bad_job_requests_get_4xx_with_reasons(client: TestClient) -> None:
    unknown = client.post("/v1/jobs", json={"model": "nope", "slide_path": "lesion.tiff"})
    assert (
        unknown.status_code == 422
        and "served models: features_only, random_abmil" in unknown.json()["detail"]
    )
    no_contract = client.post(
        "/v1/jobs", json={"model": "features_only", "slide_path": "lesion.tiff"}
    )
    assert (
        no_contract.status_code == 422 and "cannot run slide jobs" in no_contract.json()["detail"]
    )
    both = client.post(
        "/v1/jobs",
        data={"model": "random_abmil", "slide_path": "lesion.tiff"},
        files={"file": ("a.svs", b"x")},
    )
    assert both.status_code == 422 and "exactly one" in both.json()["detail"]
    empty = client.post("/v1/jobs", data={"model": "random_abmil"}, files={"file": ("a.svs", b"")})
    assert empty.status_code == 422 and "empty" in empty.json()["detail"]
    bad_mpp = client.post(
        "/v1/jobs",
        data={"model": "random_abmil", "slide_path": "lesion.tiff", "mpp_override": "-1"},
    )
    assert bad_mpp.status_code == 422 and "mpp_override" in bad_mpp.json()["detail"]
    extra = client.post(
        "/v1/jobs", json={"model": "random_abmil", "slide_path": "lesion.tiff", "rm": "-rf"}
    )
    assert extra.status_code == 422 and "rm" in extra.json()["detail"]
    not_json = client.post("/v1/jobs", content=b"{", headers={"content-type": "application/json"})
    assert not_json.status_code == 422
    text = client.post("/v1/jobs", content=b"model=x", headers={"content-type": "text/plain"})
    assert text.status_code == 415
    truncated = client.post(
        "/v1/jobs",
        content=b'--b\r\nContent-Disposition: form-data; name="model"\r\n\r\nrandom_abmil',
        headers={"content-type": "multipart/form-data; boundary=b"},
    )
    assert truncated.status_code == 400 and "closing boundary" in truncated.json()["detail"]
    assert client.get("/v1/jobs/" + "f" * 32).status_code == 404
    assert client.get("/v1/jobs/not-a-job-id").status_code == 422
    assert client.get("/v1/jobs").json()["count"] == 0


def test_broken_slides_fail_cleanly_with_reasons(
    make_settings, model_folder, slides_dir: Path, tmp_path: Path, job_waiter
) -> None:
    model_folder(tmp_path / "models" / "random_abmil")
    settings = make_settings(slide_root=slides_dir)
    with TestClient(create_app(settings)) as client:
        ids = {}
        for name in BROKEN:
            response = client.post(
                "/v1/jobs", json={"model": "random_abmil", "slide_path": f"broken/{name}"}
            )
            assert response.status_code == 202, (name, response.text)
            ids[name] = response.json()["id"]
        with (slides_dir / "broken" / "unreadable.svs").open("rb") as handle:
            uploaded = client.post(
                "/v1/jobs",
                data={"model": "random_abmil"},
                files={"file": ("unreadable.svs", handle)},
            )
        ids["upload:unreadable.svs"] = uploaded.json()["id"]
        missing_mpp = client.post(
            "/v1/jobs",
            json={"model": "random_abmil", "slide_path": "tissue/tcga-cr-7395-01a-01-ts1.svs"},
        )
        ids["tcga (no mpp)"] = missing_mpp.json()["id"]
        for name, job_id in ids.items():
            job = job_waiter(client, job_id)
            assert job["state"] == "failed", (name, job)
            assert job["error"] and "internal error" not in job["error"], (name, job["error"])
            assert client.get(f"/v1/jobs/{job_id}/heatmap.png").status_code == 409
        assert "mpp" in client.get(f"/v1/jobs/{ids['tcga (no mpp)']}").json()["error"]
        assert "corrupt" in client.get(f"/v1/jobs/{ids['upload:unreadable.svs']}").json()["error"]


def test_real_svs_slide_job_with_mpp_override(
    make_settings, model_folder, slides_dir: Path, tmp_path: Path, job_waiter
) -> None:
    model_folder(tmp_path / "models" / "random_abmil", tiling={"target_mpp": 2.0, "tile_px": 64})
    with TestClient(create_app(make_settings(slide_root=slides_dir))) as client:
        response = client.post(
            "/v1/jobs",
            json={
                "model": "random_abmil",
                "slide_path": "tissue/tcga-cr-7395-01a-01-ts1.svs",
                "mpp_override": 0.25,
            },
        )
        job = job_waiter(client, response.json()["id"])
    assert job["state"] == "done", job
    assert job["result"]["mpp"] == 0.25 and job["result"]["mpp_source"] == "override"
    assert job["result"]["tile_size_level0"] == 512


def test_cancel_and_restart(slide_settings, job_waiter) -> None:
    """A job queued on a service with no workers survives the restart and finishes on the next one."""
    submit_only = slide_settings(workers=0)
    with TestClient(create_app(submit_only)) as client:
        kept = client.post(
            "/v1/jobs", json={"model": "random_abmil", "slide_path": "lesion.tiff"}
        ).json()
        dropped = client.post(
            "/v1/jobs", json={"model": "random_abmil", "slide_path": "lesion.tiff"}
        ).json()
        cancelled = client.post(f"/v1/jobs/{dropped['id']}/cancel")
        assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
        assert client.post(f"/v1/jobs/{dropped['id']}/cancel").status_code == 409
        assert client.get(f"/v1/jobs/{kept['id']}").json()["state"] == "queued"
    with TestClient(create_app(slide_settings(workers=1))) as client:
        job = job_waiter(client, kept["id"])
        assert job["state"] == "done", job
        assert client.get(f"/v1/jobs/{dropped['id']}").json()["state"] == "cancelled"
        assert client.post(f"/v1/jobs/{kept['id']}/cancel").status_code == 409


def test_slide_paths_that_trip_the_file_system_are_400(client: TestClient, tmp_path: Path) -> None:
    """A symlink loop and names past NAME_MAX/PATH_MAX are refused like any bad path, without
    the server's folders in the answer."""
    slides = tmp_path / "slides"
    (slides / "loop.svs").symlink_to(slides / "loop.svs")
    (slides / "ping").symlink_to(slides / "pong")
    (slides / "pong").symlink_to(slides / "ping")
    for slide_path in ("loop.svs", "ping/slide.svs", "n" * 300 + ".svs", "d/" * 2040 + "s.svs"):
        for response in (
            client.post("/v1/jobs", json={"model": "random_abmil", "slide_path": slide_path}),
            client.post("/v1/jobs", data={"model": "random_abmil", "slide_path": slide_path}),
        ):
            assert response.status_code == 400, (slide_path[:20], response.text)
            assert str(tmp_path) not in response.text
    assert client.get("/v1/jobs").json()["count"] == 0


def _multipart_upload(filename: bytes, content: bytes, model: str = "random_abmil") -> tuple[bytes, str]:
    """A multipart body with the file name sent as raw bytes (clients percent-encode control
    characters; an attacker does not)."""
    boundary = b"wsimil-hostile-boundary"
    body = (
        b"--" + boundary + b'\r\nContent-Disposition: form-data; name="model"\r\n\r\n'
        + model.encode() + b"\r\n--" + boundary
        + b'\r\nContent-Disposition: form-data; name="file"; filename="' + filename + b'"\r\n'
        + b"Content-Type: image/tiff\r\n\r\n" + content + b"\r\n--" + boundary + b"--\r\n"
    )
    return body, f"multipart/form-data; boundary={boundary.decode()}"


def test_hostile_upload_names_become_safe_slide_ids(
    client: TestClient, lesion_slide, job_waiter, caplog: pytest.LogCaptureFixture
) -> None:
    """NUL, 300 characters, a newline forging a log line, path separators and non-ASCII letters in
    an upload's file name: every job still runs, under a safe slide id, and logs one line per event."""
    caplog.set_level(logging.INFO, logger="wsi_mil")
    names = {
        "nul": b"tumor\x00.tiff",
        "300 characters": b"n" * 300 + b".tiff",
        "newline": b"ok.tiff\n[wsi_mil] job 00000000000000000000000000000000: done",
        "separators": b"../../etc/a\\b.tiff",
        "unicode": "Gewebe-ß 腫瘍.tiff".encode(),
    }
    content = lesion_slide.path.read_bytes()
    ids = {}
    for label, filename in names.items():
        body, content_type = _multipart_upload(filename, content)
        response = client.post("/v1/jobs", content=body, headers={"content-type": content_type})
        assert response.status_code == 202, (label, response.text)
        ids[label] = response.json()["id"]
    for label, job_id in ids.items():
        job = job_waiter(client, job_id)
        assert job["state"] == "done", (label, job)
        assert re.fullmatch(r"[A-Za-z0-9._()+-]{1,128}", job["result"]["slide_id"]), (label, job["result"]["slide_id"])
        assert job["slide_name"].isprintable() and len(job["slide_name"]) <= 256, (label, job["slide_name"])
    assert not any("\n" in record.getMessage() for record in caplog.records if record.name.startswith("wsi_mil"))
    assert client.get(f"/v1/jobs/{ids['unicode']}").json()["slide_name"] == "Gewebe-ß 腫瘍.tiff"
