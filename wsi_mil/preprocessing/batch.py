"""The resumable batch job: many slides → one feature file, mask, GeoJSON, QC image and status each.

A slide counts as done when its feature file exists and records the same parameter hash (not just
the same name); done slides are skipped, so a re-run after `kill -9` finishes the rest. Failures
are recorded per slide and never stop the batch. Slides run in this process, in a local process
pool (`jobs > 1`), or as Ray tasks on a cluster.
"""

from __future__ import annotations

import csv
import glob
import json
import logging
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Literal

from wsi_mil.allocator import active_allocator
from wsi_mil.atomic import atomic_open
from wsi_mil.errors import FeatureFileError, WsiMilError
from wsi_mil.preprocessing.encoders import Encoder, load_encoder
from wsi_mil.preprocessing.extract import usable_cpus
from wsi_mil.preprocessing.feature_file import read_feature_meta
from wsi_mil.preprocessing.pipeline import (
    OutputPaths,
    PreprocessConfig,
    SlideResult,
    one_line_reason,
    preprocess_slide,
    with_cpu_plan,
)
from wsi_mil.preprocessing.qc import save_json_atomic
from wsi_mil.ray_cluster import gpus_per_task, ray_session

log = logging.getLogger(__name__)

#: file extensions OpenSlide reads (DICOM files are grouped into one slide per folder)
SLIDE_EXTENSIONS = frozenset(
    {".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".dcm"}
)


@dataclass(frozen=True)
class SlideTask:
    """One slide to process: its path, its id (the output file stem) and an optional mpp override."""

    slide_path: str
    slide_id: str
    mpp: float | None = None


def find_slides(inputs: Sequence[str | Path]) -> list[SlideTask]:
    """Expand files, folders (recursively) and glob patterns into slide tasks, sorted by id.

    DICOM files in one folder form one slide (OpenSlide reads the whole series from any file);
    its id is the folder name when the folder holds several .dcm files, else the file stem.
    """
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files.extend(p for p in sorted(path.rglob("*")) if p.is_file() and p.suffix.lower() in SLIDE_EXTENSIONS)
        elif path.exists():
            files.append(path)
        else:
            matches = sorted(glob.glob(str(item), recursive=True))
            if not matches:
                raise WsiMilError(f"input {str(item)!r} is not a file, a folder or a glob that matches anything")
            files.extend(Path(m) for m in matches if Path(m).is_file())
    tasks: dict[str, SlideTask] = {}
    dicom_dirs: dict[Path, list[Path]] = {}
    for f in files:
        if f.suffix.lower() == ".dcm":
            dicom_dirs.setdefault(f.parent, []).append(f)
        else:
            _add_task(tasks, SlideTask(str(f), f.stem))
    for folder, dcms in dicom_dirs.items():
        dcms = sorted(set(dcms))
        slide_id = folder.name if len(dcms) > 1 else dcms[0].stem
        _add_task(tasks, SlideTask(str(dcms[0]), slide_id))
    return sorted(tasks.values(), key=lambda t: t.slide_id)


def read_manifest(path: str | Path) -> list[SlideTask]:
    """Read a CSV manifest with `slide_path`, optional `slide_id` and `mpp` columns.

    Relative slide paths are resolved against the manifest's folder.
    """
    path = Path(path)
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or "slide_path" not in rows[0]:
        raise WsiMilError(f"manifest {path} needs a 'slide_path' column (optional: slide_id, mpp)")
    tasks: dict[str, SlideTask] = {}
    for line, row in enumerate(rows, start=2):
        slide_path = Path(row["slide_path"].strip())
        if not slide_path.is_absolute():
            slide_path = path.parent / slide_path
        mpp_text = (row.get("mpp") or "").strip()
        try:
            mpp = float(mpp_text) if mpp_text else None
        except ValueError as err:
            raise WsiMilError(f"manifest {path} line {line}: mpp {mpp_text!r} is not a number") from err
        slide_id = (row.get("slide_id") or "").strip() or slide_path.stem
        _add_task(tasks, SlideTask(str(slide_path), slide_id, mpp))
    return sorted(tasks.values(), key=lambda t: t.slide_id)


def _add_task(tasks: dict[str, SlideTask], task: SlideTask) -> None:
    if task.slide_id in tasks and tasks[task.slide_id].slide_path != task.slide_path:
        raise WsiMilError(
            f"two slides share the id {task.slide_id!r} ({tasks[task.slide_id].slide_path} and "
            f"{task.slide_path}); give them distinct ids with a manifest column 'slide_id'"
        )
    tasks[task.slide_id] = task


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """Parse `--shard i/n` (0-based index i of n shards)."""
    if not text:
        return None
    try:
        index, count = (int(v) for v in text.split("/"))
    except ValueError as err:
        raise WsiMilError(f"--shard must look like i/n (e.g. 0/4), got {text!r}") from err
    if count < 1 or not 0 <= index < count:
        raise WsiMilError(f"--shard {text}: need 0 <= i < n")
    return index, count


def select_shard(tasks: Sequence[SlideTask], shard: tuple[int, int] | None) -> list[SlideTask]:
    """The tasks of one shard: every n-th slide in id order, starting at i."""
    if shard is None:
        return list(tasks)
    index, count = shard
    return [t for k, t in enumerate(sorted(tasks, key=lambda t: t.slide_id)) if k % count == index]


def is_done(task: SlideTask, out_dir: Path, config: PreprocessConfig) -> SlideResult | None:
    """The recorded result if this slide is already done with the same parameters, else None."""
    paths = OutputPaths(out_dir, task.slide_id)
    want = config.params_hash(task.mpp if task.mpp is not None else config.slide_mpp)
    if paths.features.exists():
        try:
            meta = read_feature_meta(paths.features)
        except (FeatureFileError, OSError):
            return None
        if meta.get("params_hash") == want:
            return SlideResult(task.slide_id, task.slide_path, "skipped", "already done with the same parameters",
                               tiles=int(meta.get("num_tiles", 0) or 0), params_hash=want,
                               mpp=meta.get("mpp"), mpp_source=meta.get("mpp_source"),
                               feature_path=str(paths.features))
        return None
    if paths.status.exists():
        record = json.loads(paths.status.read_text())
        if record.get("status") == "no_tissue" and record.get("params_hash") == want:
            return SlideResult(task.slide_id, task.slide_path, "skipped", "no tissue (same parameters)",
                               params_hash=want, mpp=record.get("mpp"), mpp_source=record.get("mpp_source"))
    return None


Executor = Literal["local", "ray"]


def run_batch(
    tasks: Sequence[SlideTask],
    out_dir: str | Path,
    config: PreprocessConfig,
    *,
    executor: Executor = "local",
    jobs: int = 1,
    ray_address: str | None = None,
    ray_gpus_per_slide: float | None = None,
    on_result: Callable[[SlideResult], None] | None = None,
    on_tiles: Callable[[str, int, int], None] | None = None,
) -> list[SlideResult]:
    """Process every task not already done; returns one result per task (skipped ones included).

    `jobs` slides run at once locally, sharing the cores (`with_cpu_plan` unless the config sets
    `num_threads` and `num_workers`).
    With `executor="ray"`, slides become Ray tasks on the cluster at `ray_address` (None starts a
    local instance); each asks for `ray_gpus_per_slide` GPUs (default: 1 when the cluster has GPUs).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results: list[SlideResult] = []
    pending: list[SlideTask] = []
    for task in tasks:
        done = is_done(task, out, config)
        if done is not None:
            results.append(done)
            if on_result:
                on_result(done)
        else:
            pending.append(task)
    encoder = None
    if pending:
        # fail fast, before any slide, when the encoder cannot be loaded (e.g. weights missing)
        encoder = load_encoder(config.encoder, weights=config.weights, device=config.device)
        parallel = jobs if executor == "local" and jobs > 1 and len(pending) > 1 else 1
        config = with_cpu_plan(config, encoder.device.type, slides_at_once=min(parallel, len(pending)))
    runtime = {"allocator": active_allocator(), "usable_cpus": usable_cpus()}
    save_json_atomic({"config": config.model_dump(mode="json"), "slides": len(tasks), "runtime": runtime},
                     out / "run_config.json")
    if executor == "ray":
        new = _run_ray(pending, out, config, ray_address, ray_gpus_per_slide, on_result)
    elif jobs > 1 and len(pending) > 1:
        new = _run_pool(pending, out, config, jobs, on_result)
    else:
        new = _run_inline(pending, out, config, encoder, on_result, on_tiles)
    results.extend(new)
    order = {t.slide_id: i for i, t in enumerate(tasks)}
    results.sort(key=lambda r: order.get(r.slide_id, 0))
    write_summary(results, out)
    return results


def _run_inline(
    tasks: Iterable[SlideTask],
    out: Path,
    config: PreprocessConfig,
    encoder: Encoder | None,
    on_result: Callable[[SlideResult], None] | None,
    on_tiles: Callable[[str, int, int], None] | None,
) -> list[SlideResult]:
    results = []
    for task in tasks:
        progress = (lambda done, total, sid=task.slide_id: on_tiles(sid, done, total)) if on_tiles else None
        result = preprocess_slide(task.slide_path, out, config, slide_id=task.slide_id, mpp_override=task.mpp,
                                  encoder=encoder, on_tiles=progress)
        results.append(result)
        if on_result:
            on_result(result)
    return results


_WORKER_ENCODER: Encoder | None = None


def _pool_worker(task: SlideTask, out: str, config: PreprocessConfig) -> SlideResult:
    """Run one slide in a pool process, loading the encoder once per process."""
    global _WORKER_ENCODER
    if _WORKER_ENCODER is None:
        _WORKER_ENCODER = load_encoder(config.encoder, weights=config.weights, device=config.device)
    return preprocess_slide(task.slide_path, out, config, slide_id=task.slide_id, mpp_override=task.mpp,
                            encoder=_WORKER_ENCODER)


def _run_pool(
    tasks: Sequence[SlideTask],
    out: Path,
    config: PreprocessConfig,
    jobs: int,
    on_result: Callable[[SlideResult], None] | None,
) -> list[SlideResult]:
    results = []
    # spawn: never fork a process that may hold OpenSlide handles or torch thread pools
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(_pool_worker, t, str(out), config): t for t in tasks}
        for future in as_completed(futures):
            task = futures[future]
            try:
                result = future.result()
            except Exception as err:  # a worker that died (e.g. a crash inside a native reader)
                result = SlideResult(task.slide_id, task.slide_path, "failed", f"worker crashed: {one_line_reason(err)}")
                save_json_atomic(result.to_json(), OutputPaths(out, task.slide_id).status)
            results.append(result)
            if on_result:
                on_result(result)
    return results


def _run_ray(
    tasks: Sequence[SlideTask],
    out: Path,
    config: PreprocessConfig,
    address: str | None,
    gpus_per_slide: float | None,
    on_result: Callable[[SlideResult], None] | None,
) -> list[SlideResult]:
    with ray_session(address) as ray:
        remote = ray.remote(
            num_gpus=gpus_per_task(gpus_per_slide), num_cpus=max(1, config.num_workers or 1), max_retries=0
        )(_pool_worker)
        refs = {remote.remote(t, str(out), config): t for t in tasks}
        results = []
        remaining = list(refs)
        while remaining:
            ready, remaining = ray.wait(remaining, num_returns=1)
            task = refs[ready[0]]
            try:
                result = ray.get(ready[0])
            except Exception as err:  # the task's process died
                result = SlideResult(task.slide_id, task.slide_path, "failed", f"ray task failed: {one_line_reason(err)}")
                save_json_atomic(result.to_json(), OutputPaths(out, task.slide_id).status)
            results.append(result)
            if on_result:
                on_result(result)
        return results


def write_summary(results: Sequence[SlideResult], out: Path) -> Path:
    """Write `summary.csv` (one row per slide of this run) atomically; returns its path."""
    path = out / "summary.csv"
    with atomic_open(path, "w", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(
            ["slide_id", "status", "tiles", "seconds", "mpp", "mpp_source", "reason", "warnings", "slide_path"]
        )
        for r in results:
            writer.writerow([r.slide_id, r.status, r.tiles, r.seconds, r.mpp, r.mpp_source, r.reason,
                             " | ".join(r.warnings), r.slide_path])
    return path
