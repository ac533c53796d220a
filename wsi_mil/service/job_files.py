"""Where a slide job's files live under the data folder, and how a finished job's results are stored.

A job's results are built in a temporary folder beside `jobs/<id>` and renamed into place in one
step (`atomic_directory`), so a reader never sees half a result.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wsi_mil.atomic import atomic_directory, write_json_atomic
from wsi_mil.inference.predict import SlidePrediction
from wsi_mil.preprocessing.slide import open_slide
from wsi_mil.service.deepzoom import slide_bounds
from wsi_mil.service.job_store import JobRecord


@dataclass(frozen=True)
class JobPaths:
    """Where one job's files live under the data folder."""

    data_dir: Path
    job_id: str

    @property
    def upload_dir(self) -> Path:
        """Where an uploaded slide is kept until the job expires."""
        return self.data_dir / "uploads" / self.job_id

    @property
    def work_dir(self) -> Path:
        """Scratch folder of the running job (preprocessing outputs)."""
        return self.data_dir / "work" / self.job_id

    @property
    def result_dir(self) -> Path:
        """The finished job's results (renamed into place in one step)."""
        return self.data_dir / "jobs" / self.job_id

    @property
    def features(self) -> Path:
        """The slide's feature file."""
        return self.result_dir / "features.h5"

    @property
    def scores(self) -> Path:
        """Per-tile scores (`TileScores` .npz)."""
        return self.result_dir / "scores.npz"

    @property
    def prediction(self) -> Path:
        """The slide-level result as JSON."""
        return self.result_dir / "prediction.json"

    @property
    def thumbnail(self) -> Path:
        """The slide thumbnail heatmaps are drawn on."""
        return self.result_dir / "thumbnail.png"

    @property
    def tissue_mask(self) -> Path:
        """The tissue mask heatmaps are clipped to."""
        return self.result_dir / "tissue_mask.png"

    def remove_all(self) -> None:
        """Delete the job's upload, scratch and result folders (missing ones are fine)."""
        for folder in (self.upload_dir, self.work_dir, self.result_dir):
            shutil.rmtree(folder, ignore_errors=True)


def save_job_results(paths: JobPaths, job: JobRecord, result: SlidePrediction) -> dict[str, Any]:
    """Store a slide prediction as the job's results (features, scores, thumbnail, mask, prediction
    JSON) in one step; returns the job's result record (what `prediction.json` holds)."""
    scores = result.scores
    with open_slide(job.slide_path, mpp_override=job.mpp_override) as slide:
        bounds = slide_bounds(slide.properties, slide.dimensions)
    record = {
        "slide_id": result.slide_id,
        "model": job.model,
        **result.prediction.summary(),
        "tile_size_level0": scores.tile_size_level0,
        "mpp": result.preprocessing.mpp if result.preprocessing else None,
        "mpp_source": result.preprocessing.mpp_source if result.preprocessing else None,
        "slide_width": scores.slide_width,
        "slide_height": scores.slide_height,
        "bounds": list(bounds),
        "timings": dict(result.preprocessing.timings) if result.preprocessing else {},
    }
    with atomic_directory(paths.result_dir) as staging:
        if result.thumbnail is not None:
            result.thumbnail.save(staging / paths.thumbnail.name)
        if result.tissue_mask is not None:
            result.tissue_mask.save(staging / paths.tissue_mask.name)
        scores.save(staging / paths.scores.name)
        if result.feature_path is not None:
            os.replace(result.feature_path, staging / paths.features.name)
        write_json_atomic(record, staging / paths.prediction.name)
    shutil.rmtree(paths.work_dir, ignore_errors=True)
    return record
