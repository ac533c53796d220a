"""Slide jobs as Ray tasks (`WSI_MIL_EXECUTOR=ray`): the worker pool's seam to a cluster.

The service keeps its threads, its SQLite job store and its routes; a worker thread hands the claimed
job to `RayExecutor.run`, which runs the same `run_slide_job` in a Ray task and waits for it. The task
loads the model from its folder (checked against the served weights' sha256), writes the job's results
under the data folder (renamed into place in one step, as locally) and returns the result record. A
small Ray actor carries progress from the task to the thread and stop requests (cancel, delete,
shutdown) back; a task that does not stop within `CANCEL_GRACE_S` is killed. On a cluster of several
machines, the data folder, the slides and the models must be at the same paths on every node.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from typing import Any

from wsi_mil.errors import JobCancelledError, WsiMilError
from wsi_mil.inference.loading import LoadedModel, load_model
from wsi_mil.preprocessing.encoders import default_device
from wsi_mil.ray_cluster import gpus_per_task, ray_session, task_exception
from wsi_mil.service.job_files import JobPaths
from wsi_mil.service.job_store import JobRecord
from wsi_mil.service.settings import ServiceSettings
from wsi_mil.service.slide_jobs import EncoderCache, JobControl, run_slide_job

log = logging.getLogger(__name__)

#: how often a waiting worker thread relays progress and stop requests
POLL_S = 0.25
#: how long a task may take to stop at its next batch before it is killed
CANCEL_GRACE_S = 30.0


class JobSignals:
    """A Ray actor between the service and its job tasks: each task's progress, and stop requests."""

    def __init__(self) -> None:
        self._progress: dict[str, tuple[float, str]] = {}
        self._stop: set[str] = set()

    def report(self, job_id: str, progress: float, stage: str) -> None:
        self._progress[job_id] = (progress, stage)

    def progress(self, job_id: str) -> tuple[float, str] | None:
        return self._progress.get(job_id)

    def request_stop(self, job_id: str) -> None:
        self._stop.add(job_id)

    def should_stop(self, job_id: str) -> bool:
        return job_id in self._stop

    def forget(self, job_id: str) -> None:
        self._progress.pop(job_id, None)
        self._stop.discard(job_id)


class _TaskControl:
    """`JobControl` inside a Ray task: progress and stop requests go through the `JobSignals` actor."""

    def __init__(self, signals: Any, job_id: str) -> None:
        self.signals = signals
        self.job_id = job_id

    def report(self, progress: float, stage: str) -> None:
        self.signals.report.remote(self.job_id, progress, stage)

    def check(self) -> None:
        import ray

        if ray.get(self.signals.should_stop.remote(self.job_id)):
            raise JobCancelledError("the service asked the job to stop")


@functools.lru_cache(maxsize=2)
def _model_in_this_worker(folder: str, weights_sha256: str, device: str | None) -> LoadedModel:
    model = load_model(folder, device=device or default_device())
    if model.weights_sha256 != weights_sha256:
        raise WsiMilError(
            f"model {model.folder.name!r} changed on disk since the service loaded it; restart the service"
        )
    return model


_ENCODERS = EncoderCache()


def run_job_task(
    job: JobRecord,
    paths: JobPaths,
    model_folder: str,
    weights_sha256: str,
    runtime: dict[str, Any],
    signals: Any,
) -> dict[str, Any]:
    """The body of a job's Ray task: `run_slide_job` with the model and encoder loaded once per worker;
    `runtime` holds the service's `device`, `batch_size` and `tile_workers` (never its API key)."""
    model = _model_in_this_worker(model_folder, weights_sha256, runtime["device"])
    return run_slide_job(
        job,
        paths,
        model,
        encoders=_ENCODERS,
        control=_TaskControl(signals, job.id),
        batch_size=runtime["batch_size"],
        tile_workers=runtime["tile_workers"],
    )


class RayExecutor:
    """Runs each job as a Ray task on the cluster at `settings.ray_address` (None: this machine's Ray,
    else a new local one)."""

    def __init__(self, settings: ServiceSettings) -> None:
        self.settings = settings
        self._session = contextlib.ExitStack()
        self._ray: Any = None
        self._task: Any = None
        self._signals: Any = None

    def start(self) -> None:
        """Connect to Ray, create the signals actor and the task with its resources."""
        ray = self._session.enter_context(ray_session(self.settings.ray_address))
        gpus = gpus_per_task(self.settings.ray_gpus_per_job)
        self._task = ray.remote(num_cpus=self.settings.ray_cpus_per_job, num_gpus=gpus, max_retries=0)(run_job_task)
        self._signals = ray.remote(num_cpus=0)(JobSignals).remote()
        self._ray = ray
        log.info("slide jobs run on Ray (%s CPU and %s GPU each)", self.settings.ray_cpus_per_job, gpus)

    def stop(self) -> None:
        """Drop the actor and leave Ray (a Ray this service started is shut down)."""
        if self._signals is not None:
            self._ray.kill(self._signals)
            self._signals = None
        self._session.close()

    def run(self, job: JobRecord, paths: JobPaths, model: LoadedModel, control: JobControl) -> dict[str, Any]:
        """Run the job as a Ray task; relay its progress and any stop request until it ends."""
        ray = self._ray
        runtime = self.settings.model_dump(include={"device", "batch_size", "tile_workers"})
        ref = self._task.remote(job, paths, str(model.folder), model.weights_sha256, runtime, self._signals)
        stop_sent: float | None = None
        try:
            while not ray.wait([ref], timeout=POLL_S)[0]:
                progress = ray.get(self._signals.progress.remote(job.id))
                if progress is not None:
                    control.report(*progress)
                if stop_sent is None:
                    try:
                        control.check()
                    except JobCancelledError:
                        self._signals.request_stop.remote(job.id)
                        stop_sent = time.monotonic()
                elif time.monotonic() - stop_sent > CANCEL_GRACE_S:
                    ray.cancel(ref, force=True)
            return ray.get(ref)
        except ray.exceptions.RayError as err:
            raise self._job_error(err, stopped=stop_sent is not None) from None
        finally:
            self._signals.forget.remote(job.id)

    @staticmethod
    def _job_error(error: Exception, *, stopped: bool) -> Exception:
        """What the worker pool is to see of a failed task: the task's own deliberate error, a stop, an
        unexpected error with its remote traceback, or a one-line reason when Ray lost the task."""
        cause = task_exception(error)
        if isinstance(cause, WsiMilError):
            return cause
        if cause is not error:
            return error  # a bug in the task: the pool logs it with the remote traceback
        if stopped:
            return JobCancelledError("the job's Ray task was stopped")
        return WsiMilError(
            f"the Ray task running the job ended without a result ({type(error).__name__}); see the Ray logs"
        )
