"""Slide jobs on a local Ray instance (`executor="ray"`): the same results as the worker thread, job state
in the service's store, and cancellation, shutdown, failures and a dead Ray worker reaching the record."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest

from wsi_mil.service import ray_jobs
from wsi_mil.service.job_files import JobPaths
from wsi_mil.service.job_store import JobRecord, JobStore
from wsi_mil.service.model_registry import ModelRegistry
from wsi_mil.service.workers import WorkerPool

pytestmark = pytest.mark.usefixtures("ray_instance")

#: small encoder batches, so a job has many checkpoints where it can be stopped
BATCH_SIZE = 4
#: tiles of 32 level-0 px on the lesion slide: about 2k tissue tiles, so a job is still extracting
#: features when a test stops it
FINE_GRID = {"target_mpp": 0.5, "tile_px": 32}


@pytest.fixture()
def parts(make_settings, model_folder, lesion_slide, tmp_path: Path):
    """Settings for a Ray pool and a local pool on one store, serving `fine_grid_abmil`."""
    ray_settings = make_settings(slide_root=lesion_slide.root, workers=0, executor="ray", batch_size=BATCH_SIZE)
    model_folder(ray_settings.models_dir / "fine_grid_abmil", tiling=FINE_GRID)
    local_settings = ray_settings.model_copy(update={"executor": "local"})
    store = JobStore(ray_settings.database_path)
    registry = ModelRegistry.load(ray_settings.models_dir, device="cpu")
    yield ray_settings, local_settings, store, registry
    store.close()


def submit(store: JobStore, slide: Path, model: str = "fine_grid_abmil") -> str:
    return store.create(model=model, slide_path=slide, slide_name=slide.name, source="path").id


def ray_pool(store: JobStore, registry: ModelRegistry, settings) -> WorkerPool:
    pool = WorkerPool(store, registry, settings=settings)
    pool.executor.start()
    return pool


def wait_until(condition, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def interrupt_a_running_job(parts, slide: Path, interrupt: Callable[[str], None]) -> JobRecord:
    """Run a job on Ray in a worker thread, call `interrupt(job_id)` once the task reports feature
    progress (relayed into the store), and return the job as it ended."""
    ray_settings, _, store, registry = parts
    job_id = submit(store, slide)
    pool = ray_pool(store, registry, ray_settings)
    try:
        thread = threading.Thread(target=pool.run_job, args=(store.claim_next(),), daemon=True)
        thread.start()
        wait_until(lambda: store.get(job_id).stage == "features")
        interrupt(job_id)
        thread.join(60)
    finally:
        pool.executor.stop()
    assert not JobPaths(ray_settings.data_dir, job_id).result_dir.exists()
    return store.get(job_id)


def test_the_service_runs_slide_jobs_on_ray_with_the_results_of_a_local_run(
    make_settings, lesion_models_dir: Path, lesion_slide, uvicorn_server, job_waiter, finished_job: dict, live_client
) -> None:
    """`executor="ray"` through the whole app: a job submitted over HTTP runs as a Ray task and stores what
    the worker thread stored for the same slide (`finished_job`, from a local-executor service)."""
    settings = make_settings(models_dir=lesion_models_dir, slide_root=lesion_slide.root, executor="ray")
    with uvicorn_server(settings) as service, httpx.Client(base_url=service.base_url, timeout=30) as client:
        response = client.post("/v1/jobs", json={"model": "lesion_abmil", "slide_path": "lesion.tiff"})
        assert response.status_code == 202, response.text
        job = job_waiter(client, response.json()["id"])
        assert job["state"] == "done", job
        scores = client.get(f"/v1/jobs/{job['id']}/scores.json").json()
    assert ray_jobs._model_in_this_worker.cache_info().currsize == 0, "the model was loaded in a Ray worker"
    local = finished_job["result"]
    assert job["result"]["predicted_class"] == local["predicted_class"] == "tumor"
    assert job["result"]["probabilities"] == pytest.approx(local["probabilities"], abs=1e-6)
    local_scores = live_client.get(f"/v1/jobs/{finished_job['id']}/scores.json").json()
    assert scores["x"] == local_scores["x"] and scores["y"] == local_scores["y"]
    assert scores["scores"].keys() == local_scores["scores"].keys()
    for name, values in local_scores["scores"].items():
        np.testing.assert_allclose(scores["scores"][name], values, atol=1e-6, err_msg=name)
    paths = JobPaths(settings.data_dir, job["id"])
    assert paths.features.is_file() and paths.thumbnail.is_file() and not paths.work_dir.exists()


def test_cancelling_a_running_ray_job(parts, lesion_slide) -> None:
    store = parts[2]
    job = interrupt_a_running_job(parts, lesion_slide.path, lambda job_id: store.request_cancel(job_id, ttl_seconds=60))
    assert job.state == "cancelled" and job.error == "cancelled while running"
    assert 0.1 <= job.progress < 1.0


def test_stopping_the_service_requeues_a_running_ray_job(parts, lesion_slide) -> None:
    ray_settings, _, store, registry = parts
    job_id = submit(store, lesion_slide.path)
    pool = WorkerPool(store, registry, settings=ray_settings.model_copy(update={"workers": 1}))
    pool.start()
    try:
        wait_until(lambda: store.get(job_id).stage == "features")
    finally:
        pool.stop()
    job = store.get(job_id)
    assert job.state == "queued" and job.attempts == 1
    assert not JobPaths(ray_settings.data_dir, job_id).result_dir.exists()


def test_failures_on_ray_carry_the_reason_a_local_run_gives(parts, tmp_path: Path) -> None:
    ray_settings, local_settings, store, registry = parts
    not_a_slide = tmp_path / "notes.tiff"
    not_a_slide.write_text("not a slide")
    pool = ray_pool(store, registry, ray_settings)
    local = WorkerPool(store, registry, settings=local_settings)
    try:
        errors = []
        for runner in (pool, local):
            job_id = submit(store, not_a_slide)
            runner.run_job(store.claim_next())
            job = store.get(job_id)
            assert job.state == "failed"
            errors.append(job.error)
    finally:
        pool.executor.stop()
    assert errors[0] == errors[1] and "notes.tiff" in errors[0]


def test_a_ray_worker_that_dies_fails_the_job(parts, lesion_slide) -> None:
    def kill_the_worker(job_id: str) -> None:
        [worker] = [
            p for p in psutil.process_iter(["cmdline"]) if "ray::run_job_task" in " ".join(p.info["cmdline"] or [])
        ]
        os.kill(worker.pid, signal.SIGKILL)

    job = interrupt_a_running_job(parts, lesion_slide.path, kill_the_worker)
    assert job.state == "failed"
    assert job.error.startswith("the Ray task running the job ended without a result"), job.error
