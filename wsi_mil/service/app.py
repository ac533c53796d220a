"""The FastAPI application factory: settings in, app out; models and workers live in its lifespan."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from wsi_mil import __version__
from wsi_mil.errors import (
    FeatureContractError,
    FeatureFileError,
    HeatmapRequestError,
    JobStateError,
    MissingMppError,
    SlideOpenError,
    SlidePathError,
    TileNotFoundError,
    UnknownModelError,
    UploadTooLargeError,
    WsiMilError,
)
from wsi_mil.service.deepzoom import DeepZoomCache
from wsi_mil.service.deps import require_api_key
from wsi_mil.service.job_store import JobStore
from wsi_mil.service.model_registry import ModelRegistry
from wsi_mil.service.observability import (
    REQUEST_ID_HEADER,
    RequestContextMiddleware,
    ServiceMetrics,
    install_log_record_factory,
    request_id_var,
)
from wsi_mil.service.redaction import redact_paths
from wsi_mil.service.render_cache import RenderCache
from wsi_mil.service.routes import health, heatmaps, jobs, models, predictions, viewer
from wsi_mil.service.settings import ServiceSettings
from wsi_mil.service.workers import WorkerPool

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
#: HTTP status of each deliberate error; the most specific class in the MRO wins
ERROR_STATUS: dict[type[WsiMilError], int] = {
    UploadTooLargeError: 413,
    SlidePathError: 400,
    JobStateError: 409,
    TileNotFoundError: 404,
    UnknownModelError: 404,
    FeatureContractError: 422,
    FeatureFileError: 422,
    SlideOpenError: 422,
    MissingMppError: 422,
    HeatmapRequestError: 422,
    WsiMilError: 400,
}
TAGS = [
    {"name": "models", "description": "The served models, their classes and feature contracts."},
    {"name": "predictions", "description": "Synchronous predictions from feature files."},
    {
        "name": "jobs",
        "description": "Slide jobs: preprocessing with the model's contract, then the model.",
    },
    {
        "name": "heatmaps",
        "description": "A finished job's per-tile outputs: PNG, GeoJSON, scores, top tiles.",
    },
    {"name": "viewer", "description": "The browser viewer and the Deep Zoom tiles it reads."},
    {"name": "health", "description": "Liveness, readiness and Prometheus metrics (no API key)."},
]


def operation_id(route: APIRoute) -> str:
    """Stable operation ids for generated clients: `<tag>-<function name>`."""
    tag = route.tags[0] if route.tags else "default"
    return f"{tag}-{route.name}"


def _error_body(detail: Any) -> dict[str, Any]:
    return {"detail": detail, "request_id": request_id_var.get()}


def status_of(error: WsiMilError) -> int:
    """The HTTP status of a deliberate error (see `ERROR_STATUS`)."""
    for cls in type(error).__mro__:
        if cls in ERROR_STATUS:
            return ERROR_STATUS[cls]
    return 400


def _install_error_handlers(app: FastAPI, settings: ServiceSettings) -> None:
    """Error bodies `{detail, request_id}`; details never name a server path (`redact_paths`)."""

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        detail = redact_paths(exc.detail, settings) if isinstance(exc.detail, str) else exc.detail
        return JSONResponse(_error_body(detail), status_code=exc.status_code, headers=exc.headers)

    async def validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        errors = [{k: v for k, v in e.items() if k in ("loc", "msg", "type")} for e in exc.errors()]
        return JSONResponse(_error_body(jsonable_encoder(errors)), status_code=422)

    async def domain_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, WsiMilError)
        return JSONResponse(
            _error_body(redact_paths(str(exc), settings)), status_code=status_of(exc)
        )

    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(WsiMilError, domain_error)


def create_app(settings: ServiceSettings | None = None) -> FastAPI:
    """Build the service. Models load and job workers start when the app's lifespan begins.

    `settings=None` reads `WSI_MIL_*` environment variables (what `uvicorn --factory` uses).
    """
    settings = settings or ServiceSettings()
    install_log_record_factory()
    metrics = ServiceMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        registry = await run_in_threadpool(
            ModelRegistry.load, settings.models_dir, device=settings.device
        )
        store = JobStore(settings.database_path)
        deepzoom = DeepZoomCache(settings.deepzoom_cache_size)
        pool = WorkerPool(store, registry, settings=settings, deepzoom=deepzoom)
        app.state.registry, app.state.store, app.state.deepzoom, app.state.pool = (
            registry,
            store,
            deepzoom,
            pool,
        )
        app.state.heatmap_cache = RenderCache(int(settings.heatmap_cache_mb * 2**20))
        pool.start()
        log.info(
            "wsi-mil service ready: %d model(s), %d job worker(s)", len(registry), settings.workers
        )
        try:
            yield
        finally:
            await run_in_threadpool(pool.stop)
            deepzoom.clear()
            store.close()

    app = FastAPI(
        title="wsi-mil",
        version=__version__,
        summary="Whole-slide MIL inference: predictions from feature files, slide jobs, heatmaps, a viewer.",
        lifespan=lifespan,
        openapi_tags=TAGS,
        generate_unique_id_function=operation_id,
        # a slash redirect would build its URL from the client's Host header; paths are exact
        redirect_slashes=False,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    metrics.watch_jobs(lambda: app.state.store.counts() if hasattr(app.state, "store") else {})
    _install_error_handlers(app, settings)

    protected = [Depends(require_api_key)]
    for router in (
        models.router,
        predictions.router,
        jobs.router,
        heatmaps.router,
        viewer.tiles_router,
    ):
        app.include_router(router, dependencies=protected)
    app.include_router(viewer.page_router)
    app.include_router(health.router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    osd_dir = settings.resolved_openseadragon_dir()
    if osd_dir is not None:
        app.mount(
            viewer.VENDOR_PREFIX.rstrip("/"), StaticFiles(directory=osd_dir), name="openseadragon"
        )

    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["X-API-Key", REQUEST_ID_HEADER, "Content-Type"],
            expose_headers=[REQUEST_ID_HEADER, "Location", "X-Level0-Size"],
        )
    app.add_middleware(RequestContextMiddleware, metrics=metrics)
    return app
