"""The worker pool: shutdown re-queues, cancellation, failures with reasons, expiry purge, and the
same prediction as `predict_slide` and `wsi-mil predict`."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from wsi_mil.cli import _register_commands, app
from wsi_mil.inference import load_model, predict_slide
from wsi_mil.service.job_files import JobPaths
from wsi_mil.service.job_store import JobStore
from wsi_mil.service.model_registry import ModelRegistry
from wsi_mil.service.workers import WorkerPool


@pytest.fixture()
def pool_parts(make_settings, model_folder, lesion_slide, tmp_path: Path):
    settings = make_settings(workers=0, result_ttl_hours=1)
    model_folder(tmp_path / "models" / "random_abmil")
    model_folder(
        tmp_path / "models" / "missing_weights", weights="/nonexistent/encoder.safetensors"
    )
    shutil.copy(lesion_slide.path, tmp_path / "slides" / "lesion.tiff")
    store = JobStore(settings.database_path)
    registry = ModelRegistry.load(settings.models_dir, device="cpu")
    return settings, store, registry, tmp_path / "slides" / "lesion.tiff"


def submit(store: JobStore, slide: Path, model: str = "random_abmil") -> str:
    return store.create(model=model, slide_path=slide, slide_name=slide.name, source="path").id


def test_a_job_interrupted_by_shutdown_is_requeued(pool_parts) -> None:
    settings, store, registry, slide = pool_parts
    job_id = submit(store, slide)
    pool = WorkerPool(store, registry, settings=settings)
    pool.stop()
    pool.run_job(store.claim_next())
    job = store.get(job_id)
    assert job.state == "queued" and job.attempts == 1
    assert not JobPaths(settings.data_dir, job_id).work_dir.exists()
    fresh = WorkerPool(store, registry, settings=settings)
    fresh.run_job(store.claim_next())
    assert store.get(job_id).state == "done"


def test_start_requeues_jobs_a_dead_process_left_running(pool_parts) -> None:
    settings, store, registry, slide = pool_parts
    job_id = submit(store, slide)
    store.claim_next()
    pool = WorkerPool(store, registry, settings=settings)
    pool.start()
    try:
        assert store.get(job_id).state == "queued"
    finally:
        pool.stop()


def test_cancelling_a_running_job(pool_parts) -> None:
    settings, store, registry, slide = pool_parts
    job_id = submit(store, slide)
    job = store.claim_next()
    store.request_cancel(job_id, ttl_seconds=60)
    WorkerPool(store, registry, settings=settings).run_job(job)
    cancelled = store.get(job_id)
    assert cancelled.state == "cancelled" and cancelled.error == "cancelled while running"
    assert not JobPaths(settings.data_dir, job_id).result_dir.exists()


def test_failures_carry_the_reason(pool_parts) -> None:
    settings, store, registry, slide = pool_parts
    pool = WorkerPool(store, registry, settings=settings)
    no_weights = submit(store, slide, model="missing_weights")
    pool.run_job(store.claim_next())
    error = store.get(no_weights).error  # the file is named, its server folder is not
    assert "encoder.safetensors does not exist" in error and "/nonexistent" not in error
    gone = submit(store, slide, model="removed_model")
    pool.run_job(store.claim_next())
    assert "no model named 'removed_model'" in store.get(gone).error
    assert store.get(gone).state == "failed"


def test_expired_jobs_are_purged_with_their_files(pool_parts) -> None:
    settings, store, registry, slide = pool_parts
    pool = WorkerPool(store, registry, settings=settings)
    job_id = submit(store, slide)
    pool.run_job(store.claim_next())
    paths = JobPaths(settings.data_dir, job_id)
    assert paths.scores.is_file() and paths.thumbnail.is_file() and paths.features.is_file()
    assert pool.purge_expired() == 0
    assert pool.purge_expired(time.time() + 2 * 3600) == 1
    assert store.get(job_id) is None and not paths.result_dir.exists()


def test_a_slide_job_predicts_what_predict_slide_and_the_cli_predict(
    live_client, finished_job: dict, lesion_models_dir: Path, lesion_slide, tmp_path: Path
) -> None:
    """One code path: the service's slide job, `predict_slide` from Python and `wsi-mil predict` on the
    same slide give the same probabilities and the same per-tile attention."""
    model = load_model(lesion_models_dir / "lesion_abmil")
    from_python = predict_slide(lesion_slide.path, model)
    runner = CliRunner()
    _register_commands()
    cli = runner.invoke(
        app, ["predict", str(lesion_models_dir / "lesion_abmil"), str(lesion_slide.path), "--out", str(tmp_path / "p.json")]
    )
    assert cli.exit_code == 0, cli.output
    [from_cli] = json.loads((tmp_path / "p.json").read_text())
    job = finished_job["result"]
    job_scores = live_client.get(f"/v1/jobs/{finished_job['id']}/scores.json").json()
    for probabilities in (job["probabilities"], from_cli["probabilities"]):
        assert probabilities == pytest.approx(from_python.prediction.class_probabilities, abs=1e-6)
    assert job["predicted_class"] == from_cli["predicted"] == from_python.prediction.predicted_class == "tumor"
    np.testing.assert_allclose(job_scores["scores"]["attention"], from_python.prediction.attention, atol=1e-6)
    np.testing.assert_allclose(from_cli["tile_scores"]["attention"], from_python.prediction.attention, atol=1e-6)
    assert job_scores["x"] == from_python.coords[:, 0].tolist() == [c[0] for c in from_cli["coords"]]


def test_a_job_running_at_every_crash_fails_after_the_attempt_cap(pool_parts) -> None:
    """A job left running by a dead process is re-queued until it has been started
    `max_job_attempts` times; then it fails with the reason instead of taking every start down."""
    settings, store, registry, slide = pool_parts
    crashing, unlucky = submit(store, slide), submit(store, slide)
    store.claim_next(), store.claim_next()  # crashing: 1, unlucky: 1
    store.requeue_running()  # the process died; the next start re-queues both
    store.claim_next()  # crashing: 2
    store.requeue_running()  # died again
    store.claim_next(), store.claim_next()  # crashing: 3, unlucky: 2; the process dies a third time
    pool = WorkerPool(store, registry, settings=settings.model_copy(update={"max_job_attempts": 3}))
    pool.start()
    try:
        failed, requeued = store.get(crashing), store.get(unlucky)
    finally:
        pool.stop()
    assert failed.state == "failed" and failed.attempts == 3 and failed.expires is not None
    assert "3 times" in failed.error
    assert requeued.state == "queued" and requeued.attempts == 2
