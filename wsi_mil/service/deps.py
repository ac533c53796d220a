"""`Annotated` dependency aliases: what handlers get from the app state, plus API-key checking."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, HTTPException, Path, Request, Security, status
from fastapi.security import APIKeyHeader

from wsi_mil.service.deepzoom import DeepZoomCache
from wsi_mil.service.job_store import JobRecord, JobStore
from wsi_mil.service.model_registry import ModelRegistry
from wsi_mil.service.observability import ServiceMetrics
from wsi_mil.service.render_cache import RenderCache
from wsi_mil.service.schemas import JOB_ID_PATTERN
from wsi_mil.service.settings import ServiceSettings
from wsi_mil.service.workers import WorkerPool

API_KEY_HEADER = "X-API-Key"
api_key_header = APIKeyHeader(
    name=API_KEY_HEADER,
    auto_error=False,
    description="required on /v1 endpoints when the service has an API key (WSI_MIL_API_KEY)",
)


def get_settings(request: Request) -> ServiceSettings:
    """The app's settings."""
    return request.app.state.settings


def get_registry(request: Request) -> ModelRegistry:
    """The served models."""
    return request.app.state.registry


def get_store(request: Request) -> JobStore:
    """The job store."""
    return request.app.state.store


def get_pool(request: Request) -> WorkerPool:
    """The job worker pool."""
    return request.app.state.pool


def get_deepzoom(request: Request) -> DeepZoomCache:
    """The Deep Zoom generator cache."""
    return request.app.state.deepzoom


def get_metrics(request: Request) -> ServiceMetrics:
    """The app's Prometheus metrics."""
    return request.app.state.metrics


def get_heatmap_cache(request: Request) -> RenderCache:
    """Rendered heatmap PNGs by job and options."""
    return request.app.state.heatmap_cache


SettingsDep = Annotated[ServiceSettings, Depends(get_settings)]
RegistryDep = Annotated[ModelRegistry, Depends(get_registry)]
StoreDep = Annotated[JobStore, Depends(get_store)]
PoolDep = Annotated[WorkerPool, Depends(get_pool)]
DeepZoomDep = Annotated[DeepZoomCache, Depends(get_deepzoom)]
MetricsDep = Annotated[ServiceMetrics, Depends(get_metrics)]
HeatmapCacheDep = Annotated[RenderCache, Depends(get_heatmap_cache)]


def require_api_key(
    settings: SettingsDep, api_key: Annotated[str | None, Security(api_key_header)]
) -> None:
    """401 without `X-API-Key`, 403 with a wrong one; nothing when the service has no key."""
    if settings.api_key is None:
        return
    if not api_key:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            detail=f"missing {API_KEY_HEADER} header: this service requires an API key",
            headers={"WWW-Authenticate": "ApiKey"},
        )
    expected = settings.api_key.get_secret_value().encode()
    if not secrets.compare_digest(api_key.encode(), expected):
        raise HTTPException(status.HTTP_403_FORBIDDEN, detail=f"the {API_KEY_HEADER} is not valid")


JobIdPath = Annotated[str, Path(pattern=JOB_ID_PATTERN, description="job id (32 hex digits)")]


def get_job(job_id: JobIdPath, store: StoreDep) -> JobRecord:
    """The job named in the path, or 404."""
    job = store.get(job_id)
    if job is None:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND, detail=f"no job {job_id} (it may have expired)"
        )
    return job


JobDep = Annotated[JobRecord, Depends(get_job)]


def get_done_job(job: JobDep) -> JobRecord:
    """The job named in the path when it is done; 409 while it is not (its outputs do not exist yet)."""
    if job.state != "done":
        reason = f": {job.error}" if job.error else ""
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            detail=f"job {job.id} is {job.state}{reason}; its outputs exist once it is done",
        )
    return job


DoneJobDep = Annotated[JobRecord, Depends(get_done_job)]
