"""The SQLite job table: WAL mode, state changes, cancel rules, restart re-queueing, expiry."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from wsi_mil.errors import JobStateError
from wsi_mil.service.job_store import JobStore


def make(store: JobStore, name: str = "a.svs") -> str:
    return store.create(model="m", slide_path=f"/slides/{name}", slide_name=name, source="path").id


def test_lifecycle_and_persistence(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite3")
    assert store.journal_mode() == "wal"
    first, second = make(store, "a.svs"), make(store, "b.svs")
    job = store.claim_next()
    assert job is not None and job.id == first and job.state == "running" and job.attempts == 1
    store.update_progress(first, 0.5, stage="features")
    store.finish(first, "done", ttl_seconds=60, result={"predicted_class": "tumor"})
    store.close()
    reopened = JobStore(tmp_path / "jobs.sqlite3")
    done = reopened.get(first)
    assert (
        done.state == "done"
        and done.progress == 1.0
        and done.result == {"predicted_class": "tumor"}
    )
    assert done.expires == pytest.approx(done.finished + 60)
    assert reopened.get(second).state == "queued"
    assert reopened.counts() == {"queued": 1, "running": 0, "done": 1, "failed": 0, "cancelled": 0}
    assert [j.id for j in reopened.list_jobs()] == [second, first]
    assert [j.id for j in reopened.list_jobs(state="done")] == [first]


def test_running_jobs_are_requeued_after_a_restart(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite3")
    job_id = make(store)
    store.claim_next()
    store.update_progress(job_id, 0.7, stage="features")
    store.close()
    restarted = JobStore(tmp_path / "jobs.sqlite3")
    assert restarted.requeue_running() == 1
    job = restarted.get(job_id)
    assert job.state == "queued" and job.progress == 0.0
    assert restarted.claim_next().attempts == 2


def test_cancel_rules(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite3")
    running, queued = make(store), make(store)
    assert store.claim_next().id == running  # the oldest queued job runs first
    assert store.request_cancel(queued, ttl_seconds=10).state == "cancelled"
    flagged = store.request_cancel(running, ttl_seconds=10)
    assert (
        flagged.state == "running"
        and flagged.cancel_requested
        and store.is_cancel_requested(running)
    )
    store.finish(running, "cancelled", ttl_seconds=10)
    with pytest.raises(JobStateError, match="already cancelled"):
        store.request_cancel(running, ttl_seconds=10)
    with pytest.raises(KeyError):
        store.request_cancel("0" * 32, ttl_seconds=10)
    assert store.is_cancel_requested("0" * 32)  # a deleted job counts as cancelled


def test_each_job_is_claimed_once_under_concurrency(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite3")
    ids = {make(store, f"{i}.svs") for i in range(40)}
    claimed: list[str] = []
    lock = threading.Lock()

    def worker() -> None:
        while (job := store.claim_next()) is not None:
            with lock:
                claimed.append(job.id)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == sorted(ids)


def test_expired_and_delete(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite3")
    job_id = make(store)
    store.claim_next()
    store.finish(job_id, "failed", ttl_seconds=5, error="bad slide")
    assert store.expired() == []
    assert [j.id for j in store.expired(time.time() + 10)] == [job_id]
    assert store.delete(job_id) and not store.delete(job_id)
    assert store.get(job_id) is None
