"""Liveness, readiness and Prometheus metrics (never behind the API key)."""

from __future__ import annotations

import sqlite3

from fastapi import APIRouter, Response, status
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from wsi_mil.service.deps import MetricsDep, PoolDep, RegistryDep, SettingsDep, StoreDep
from wsi_mil.service.redaction import redact_paths
from wsi_mil.service.schemas import HealthPublic, ReadyPublic

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness: the process answers")
async def healthz() -> HealthPublic:
    """Always 200 while the server runs (the container HEALTHCHECK uses it)."""
    return HealthPublic()


@router.get(
    "/readyz",
    summary="Readiness: models loaded, job store open, workers alive",
    responses={503: {"model": ReadyPublic, "description": "not ready; `reasons` says why"}},
)
def readyz(
    response: Response, settings: SettingsDep, registry: RegistryDep, store: StoreDep, pool: PoolDep
) -> ReadyPublic:
    """200 when the service can take work, else 503 with the reasons (no server paths: this
    endpoint needs no API key)."""
    reasons = []
    if len(registry) == 0:
        reasons.append("no model loaded from the models folder (WSI_MIL_MODELS_DIR / --models)")
    try:
        store.counts()
    except sqlite3.Error as err:
        reasons.append(
            f"job store unavailable: {type(err).__name__}: {redact_paths(str(err), settings)}"
        )
    if pool.alive_workers < settings.workers:
        reasons.append(f"{pool.alive_workers} of {settings.workers} job workers alive")
    if reasons:
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    return ReadyPublic(
        status="not ready" if reasons else "ready",
        models=len(registry),
        workers=pool.alive_workers,
        reasons=reasons,
        model_problems={
            name: redact_paths(problem, settings) for name, problem in registry.problems.items()
        },
    )


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={
        200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format"}
    },
)
def metrics(metrics: MetricsDep) -> Response:
    """Request counts and latencies per route, predictions per model, jobs per state."""
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
