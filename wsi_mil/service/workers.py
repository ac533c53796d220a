"""The slide-job worker pool: threads that take queued jobs, run `predict_slide` and keep job state.

Threads, not processes: the heavy parts (OpenSlide decoding, the encoder and the MIL model in
torch, HDF5 I/O) release the GIL, so threads run them in parallel while sharing one copy of every
loaded model and encoder; progress and cancellation are plain shared state, and nothing has to
be pickled. The slide's steps (preprocess, predict, tile scores) are `wsi_mil.inference`'s; a job's
files are `job_files`'. Jobs left `running` by a stopped service are re-queued at start-up, and
expired jobs are purged with their files.

Where a job's work runs is the executor's choice (`settings.executor`): `slide_jobs.LocalExecutor` runs
it in the worker thread; `ray_jobs.RayExecutor` runs the same `run_slide_job` as a Ray task while the
thread relays progress and stop requests. Job state stays in this process's store either way.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from typing import Any

from wsi_mil.errors import JobCancelledError, WsiMilError
from wsi_mil.service.deepzoom import DeepZoomCache
from wsi_mil.service.job_files import JobPaths
from wsi_mil.service.job_store import JobRecord, JobStore
from wsi_mil.service.model_registry import ModelRegistry
from wsi_mil.service.observability import request_id_var
from wsi_mil.service.redaction import redact_paths
from wsi_mil.service.settings import ServiceSettings
from wsi_mil.service.slide_jobs import EncoderCache, JobExecutor, LocalExecutor

log = logging.getLogger(__name__)


def executor_for(settings: ServiceSettings, encoders: EncoderCache) -> JobExecutor:
    """The executor `settings.executor` names (Ray is imported only when it is chosen)."""
    if settings.executor == "ray":
        from wsi_mil.service.ray_jobs import RayExecutor

        return RayExecutor(settings)
    return LocalExecutor(settings, encoders)


class _PoolControl:
    """A job's progress goes to the store; it stops when cancelled, deleted or the pool stops."""

    def __init__(self, pool: WorkerPool, job_id: str) -> None:
        self.pool = pool
        self.job_id = job_id

    def report(self, progress: float, stage: str) -> None:
        self.pool.store.update_progress(self.job_id, progress, stage=stage)

    def check(self) -> None:
        if self.pool.stopping:
            raise JobCancelledError("the service is shutting down")
        if self.pool.store.is_cancel_requested(self.job_id):
            raise JobCancelledError("the job was cancelled")


class WorkerPool:
    """`settings.workers` threads that take queued jobs from the store and run them.

    `start()` re-queues jobs a previous process left running; `stop()` interrupts running jobs at
    their next batch and puts them back in the queue, so a restart continues them.
    """

    def __init__(
        self,
        store: JobStore,
        registry: ModelRegistry,
        *,
        settings: ServiceSettings,
        deepzoom: DeepZoomCache | None = None,
        encoders: EncoderCache | None = None,
        executor: JobExecutor | None = None,
    ) -> None:
        self.store = store
        self.registry = registry
        self.settings = settings
        self.deepzoom = deepzoom
        self.encoders = encoders or EncoderCache()
        self.executor = executor or executor_for(settings, self.encoders)
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Fail orphaned jobs past the attempt cap, re-queue the others, purge expired ones, start
        the executor, the worker and purge threads."""
        failed = self.store.fail_running(
            max_attempts=self.settings.max_job_attempts,
            ttl_seconds=self.settings.result_ttl_hours * 3600,
        )
        if failed:
            log.warning(
                "%d job(s) were running each of the last %d times the service stopped; failed, not re-queued",
                failed,
                self.settings.max_job_attempts,
            )
        self.executor.start()
        requeued = self.store.requeue_running()
        if requeued:
            log.info("re-queued %d job(s) left running by a previous service process", requeued)
        self.purge_expired()
        for index in range(self.settings.workers):
            thread = threading.Thread(
                target=self._work_loop, name=f"wsi-mil-job-{index}", daemon=True
            )
            thread.start()
            self._threads.append(thread)
        purger = threading.Thread(target=self._purge_loop, name="wsi-mil-purge", daemon=True)
        purger.start()
        self._threads.append(purger)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop taking jobs, interrupt running ones (they are re-queued) and join the threads."""
        self._stopping.set()
        self._wake.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._threads.clear()
        self.executor.stop()

    def wake(self) -> None:
        """Tell idle workers a job was queued."""
        self._wake.set()

    @property
    def stopping(self) -> bool:
        """True once `stop()` was called: running jobs stop at their next check."""
        return self._stopping.is_set()

    @property
    def alive_workers(self) -> int:
        """Job worker threads that are running."""
        return sum(t.is_alive() and t.name.startswith("wsi-mil-job-") for t in self._threads)

    # -- loops -----------------------------------------------------------------------------------

    def _work_loop(self) -> None:
        while not self._stopping.is_set():
            job = self.store.claim_next()
            if job is None:
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                continue
            token = request_id_var.set(job.request_id or f"job-{job.id[:8]}")
            try:
                self.run_job(job)
            finally:
                request_id_var.reset(token)

    def _purge_loop(self) -> None:
        while not self._stopping.wait(self.settings.purge_interval_s):
            self.purge_expired()

    def purge_expired(self, now: float | None = None) -> int:
        """Delete finished jobs past their expiry, with their uploads and results; returns how many."""
        purged = 0
        for job in self.store.expired(now):
            paths = JobPaths(self.settings.data_dir, job.id)
            if self.deepzoom is not None and job.source == "upload":
                self.deepzoom.forget(job.slide_path)
            paths.remove_all()
            purged += self.store.delete(job.id)
        if purged:
            log.info("purged %d expired job(s)", purged)
        return purged

    # -- one job ---------------------------------------------------------------------------------

    def run_job(self, job: JobRecord) -> None:
        """Run one claimed job to a terminal state (or back to the queue when the pool stops)."""
        paths = JobPaths(self.settings.data_dir, job.id)
        ttl = self.settings.result_ttl_hours * 3600
        started = time.perf_counter()
        log.info("job %s: started (model %s, slide %s)", job.id, job.model, job.slide_name)
        try:
            result = self._process(job, paths)
        except JobCancelledError:
            shutil.rmtree(paths.work_dir, ignore_errors=True)
            if (
                self._stopping.is_set()
                and self.store.get(job.id) is not None
                and not self.store.is_cancel_requested(job.id)
            ):
                self.store.requeue(job.id)
                log.info("job %s: interrupted by shutdown, re-queued", job.id)
                return
            self._finish_cancelled(job, paths, ttl)
            return
        except WsiMilError as err:
            shutil.rmtree(paths.work_dir, ignore_errors=True)
            self.store.finish(
                job.id, "failed", ttl_seconds=ttl, error=redact_paths(str(err), self.settings)
            )
            log.info("job %s: failed: %s", job.id, err)
            return
        except Exception:
            shutil.rmtree(paths.work_dir, ignore_errors=True)
            log.exception("job %s: unexpected error", job.id)
            self.store.finish(
                job.id,
                "failed",
                ttl_seconds=ttl,
                error="internal error while running the job (logged on the server)",
            )
            return
        if self.store.get(job.id) is None:  # deleted while it ran
            paths.remove_all()
            return
        self.store.finish(job.id, "done", ttl_seconds=ttl, result=result)
        log.info(
            "job %s: done in %.1f s (%s)",
            job.id,
            time.perf_counter() - started,
            result["predicted_class"],
        )

    def _finish_cancelled(self, job: JobRecord, paths: JobPaths, ttl: float) -> None:
        if self.store.get(job.id) is None:
            paths.remove_all()
            return
        self.store.finish(job.id, "cancelled", ttl_seconds=ttl, error="cancelled while running")
        log.info("job %s: cancelled", job.id)

    def _process(self, job: JobRecord, paths: JobPaths) -> dict[str, Any]:
        model = self.registry.get(job.model)
        return self.executor.run(job, paths, model, _PoolControl(self, job.id))
