"""A slide job's work, wherever it runs: the encoder cache, `run_slide_job` and the local executor.

`run_slide_job` is the one body of a slide job (the model's preprocessing, `predict_slide`, the stored
results); `LocalExecutor` runs it in the worker thread, `wsi_mil.service.ray_jobs.RayExecutor` in a Ray
task. Both report progress and learn of stop requests through a `JobControl`; the worker pool
(`wsi_mil.service.workers`) owns job state and picks the executor.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections import OrderedDict
from typing import Any, Protocol

import torch

from wsi_mil.errors import WsiMilError
from wsi_mil.inference.loading import LoadedModel
from wsi_mil.inference.predict import predict_slide
from wsi_mil.preprocessing.encoders import Encoder, load_encoder
from wsi_mil.service.job_files import JobPaths, save_job_results
from wsi_mil.service.job_store import JobRecord
from wsi_mil.service.settings import ServiceSettings
from wsi_mil.service.uploads import slide_id_for

ENCODER_CACHE_SIZE = 2
# Share of a job's progress bar before feature extraction starts and after it ends.
_PROGRESS_FEATURES_START = 0.1
_PROGRESS_FEATURES_END = 0.9


class EncoderCache:
    """Loaded patch encoders keyed by (name, weights, device), least recently used evicted; thread-safe."""

    def __init__(self, capacity: int = ENCODER_CACHE_SIZE) -> None:
        self.capacity = capacity
        self._items: OrderedDict[tuple[str, str | None, str], Encoder] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, name: str, *, weights: str | None, device: torch.device) -> Encoder:
        """The encoder, loaded on first use."""
        key = (name, weights, str(device))
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            encoder = load_encoder(name, weights=weights, device=device)
            self._items[key] = encoder
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
            return encoder


class JobControl(Protocol):
    """How a running job reports its progress and learns that it must stop, wherever it runs."""

    def report(self, progress: float, stage: str) -> None:
        """Record the job's progress (0..1) and stage name."""

    def check(self) -> None:
        """Raise `JobCancelledError` when the job was cancelled or the service is stopping."""


class JobExecutor(Protocol):
    """Runs a claimed job's work (`run_slide_job`) somewhere and returns its result record."""

    def start(self) -> None:
        """Get ready to run jobs (called by `WorkerPool.start`)."""

    def stop(self) -> None:
        """Release what `start` took (called by `WorkerPool.stop` after its threads ended)."""

    def run(
        self, job: JobRecord, paths: JobPaths, model: LoadedModel, control: JobControl
    ) -> dict[str, Any]:
        """Run the job to its stored results; raise `JobCancelledError` or `WsiMilError` as the work does."""


def run_slide_job(
    job: JobRecord,
    paths: JobPaths,
    model: LoadedModel,
    *,
    encoders: EncoderCache,
    control: JobControl,
    batch_size: int,
    tile_workers: int,
) -> dict[str, Any]:
    """A slide job's work: the model's preprocessing, `predict_slide` and the stored results (under
    `paths`, renamed into place in one step); returns the job's result record."""
    config = model.slide_config()
    shutil.rmtree(paths.work_dir, ignore_errors=True)
    control.check()
    control.report(0.02, "loading encoder")
    encoder = encoders.get(config.encoder, weights=config.weights, device=model.device)
    control.check()
    control.report(0.05, "tissue and tiling")
    last_report = [0.0]

    def on_tiles(done: int, total: int) -> None:
        control.check()
        now = time.monotonic()
        if now - last_report[0] >= 0.5 or done == total:
            last_report[0] = now
            share = _PROGRESS_FEATURES_END - _PROGRESS_FEATURES_START
            control.report(_PROGRESS_FEATURES_START + share * done / total, "features")

    try:
        result = predict_slide(
            job.slide_path,
            model,
            encoder=encoder,
            out_dir=paths.work_dir,
            slide_id=slide_id_for(job.slide_name),
            mpp_override=job.mpp_override,
            batch_size=batch_size,
            num_workers=tile_workers,
            on_tiles=on_tiles,
        )
    except WsiMilError:
        control.check()  # a job stopped inside preprocessing reports the stop
        raise
    control.check()
    control.report(0.96, "saving results")
    return save_job_results(paths, job, result)


class LocalExecutor:
    """Runs jobs in the calling worker thread, sharing one encoder cache between the threads."""

    def __init__(self, settings: ServiceSettings, encoders: EncoderCache) -> None:
        self.settings = settings
        self.encoders = encoders

    def start(self) -> None:
        """Nothing to start."""

    def stop(self) -> None:
        """Nothing to stop."""

    def run(
        self, job: JobRecord, paths: JobPaths, model: LoadedModel, control: JobControl
    ) -> dict[str, Any]:
        """Run the job here."""
        return run_slide_job(
            job,
            paths,
            model,
            encoders=self.encoders,
            control=control,
            batch_size=self.settings.batch_size,
            tile_workers=self.settings.tile_workers,
        )
