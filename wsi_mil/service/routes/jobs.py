"""`/v1/jobs`: slide jobs (upload a slide or name one under the slide root), their state, cancel, delete."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime
from typing import Annotated
from urllib.parse import parse_qs

from fastapi import APIRouter, HTTPException, Query, Request, Response, status
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from wsi_mil.errors import JobStateError, UnknownModelError
from wsi_mil.service.deps import DeepZoomDep, JobDep, PoolDep, RegistryDep, SettingsDep, StoreDep
from wsi_mil.service.job_files import JobPaths
from wsi_mil.service.job_store import JobRecord, JobState, JobStore, new_job_id
from wsi_mil.service.model_registry import ModelRegistry
from wsi_mil.service.observability import request_id_var
from wsi_mil.service.schemas import ErrorPublic, JobCreate, JobPublic, JobResultPublic, JobsPublic
from wsi_mil.service.uploads import printable_name, receive_form, resolve_slide_path

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

MAX_SMALL_BODY = 64 * 1024
_FORM_SCHEMA = {
    "type": "object",
    "required": ["model"],
    "properties": {
        "model": {
            "type": "string",
            "description": "name of a served model that can run slide jobs",
        },
        "file": {
            "type": "string",
            "format": "binary",
            "description": "the slide file (or give slide_path)",
        },
        "slide_path": {
            "type": "string",
            "description": "a slide under the slide root (or upload `file`)",
        },
        "mpp_override": {
            "type": "number",
            "exclusiveMinimum": 0,
            "description": "µm/px for slides without it",
        },
    },
}
_URLENCODED_SCHEMA = {
    "type": "object",
    "required": ["model", "slide_path"],
    "properties": {
        key: _FORM_SCHEMA["properties"][key] for key in ("model", "slide_path", "mpp_override")
    },
}
_REQUEST_BODY = {
    "required": True,
    "content": {
        "application/json": {"schema": JobCreate.model_json_schema()},
        "multipart/form-data": {"schema": _FORM_SCHEMA},
        "application/x-www-form-urlencoded": {"schema": _URLENCODED_SCHEMA},
    },
}


#: operations on one job, by the names their OpenAPI links carry
JOB_OPERATIONS = {
    "GetJob": "jobs-get_job",
    "CancelJob": "jobs-cancel_job",
    "DeleteJob": "jobs-delete_job",
    "GetHeatmapPng": "heatmaps-get_heatmap_png",
    "GetHeatmapLegend": "heatmaps-get_heatmap_legend",
    "GetHeatmapGeojson": "heatmaps-get_heatmap_geojson",
    "GetScores": "heatmaps-get_scores",
    "ListTopTiles": "heatmaps-list_top_tiles",
    "GetTopTilePng": "heatmaps-get_top_tile_png",
    "GetDzi": "viewer-get_dzi",
    "GetDziTile": "viewer-get_dzi_tile",
    "GetViewer": "viewer-get_viewer",
}


def job_openapi_links(job_id: str) -> dict[str, dict[str, object]]:
    """OpenAPI links from a response naming a job (`job_id`: where in the response its id is) to
    every operation on that job, for generated clients and stateful API tests."""
    return {
        name: {"operationId": operation, "parameters": {"job_id": job_id}}
        for name, operation in JOB_OPERATIONS.items()
    }


def _time(value: float | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, UTC)


def job_links(job_id: str) -> dict[str, str]:
    """URLs of a job and of its outputs."""
    base = f"/v1/jobs/{job_id}"
    return {
        "self": base,
        "cancel": f"{base}/cancel",
        "heatmap": f"{base}/heatmap.png",
        "heatmap_legend": f"{base}/heatmap-legend",
        "geojson": f"{base}/heatmap.geojson",
        "scores": f"{base}/scores.json",
        "top_tiles": f"{base}/top-tiles",
        "dzi": f"{base}/dzi.dzi",
        "viewer": f"{base}/viewer",
    }


def job_public(job: JobRecord) -> JobPublic:
    """The public view of a job (server paths are never shown)."""
    return JobPublic(
        id=job.id,
        state=job.state,
        model=job.model,
        slide_name=job.slide_name,
        source=job.source,
        mpp_override=job.mpp_override,
        progress=job.progress,
        stage=job.stage,
        error=job.error,
        result=JobResultPublic(**job.result) if job.result and job.state == "done" else None,
        created=_time(job.created),
        updated=_time(job.updated),
        started=_time(job.started),
        finished=_time(job.finished),
        expires=_time(job.expires),
        links=job_links(job.id),
    )


def _unprocessable(detail: str) -> HTTPException:
    return HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=detail)


def _check_model(registry: ModelRegistry, name: str) -> None:
    try:
        served = registry.get(name)
    except UnknownModelError as err:
        raise _unprocessable(str(err)) from err
    if served.preprocessing is None or served.slide_problem is not None:
        raise _unprocessable(f"model {name!r} cannot run slide jobs: {served.slide_problem}")


def _parse_mpp(raw: str | None) -> float | None:
    if raw is None or raw.strip() == "":
        return None
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value <= 1000:
        raise _unprocessable("form field `mpp_override` must be a number of µm/px in (0, 1000]")
    return value


async def _small_body(request: Request) -> bytes:
    """The body of a request without a file, refused (413) past 64 KiB."""
    too_large = HTTPException(
        status.HTTP_413_CONTENT_TOO_LARGE,
        detail="a job request without a file must be under 64 KiB",
    )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_SMALL_BODY:
        raise too_large
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_SMALL_BODY:
            raise too_large
    return body


async def _job_from_body(
    request: Request, settings: SettingsDep, *, urlencoded: bool
) -> tuple[JobCreate, str]:
    """A `JobCreate` from a JSON or URL-encoded body, and the resolved slide path it names."""
    body = await _small_body(request)
    try:
        if urlencoded:
            fields = {
                k: v[-1]
                for k, v in parse_qs(
                    body.decode("utf-8", "replace"), keep_blank_values=True
                ).items()
            }
            if fields.get("mpp_override", "").strip() == "":
                fields.pop("mpp_override", None)
            spec = JobCreate.model_validate(fields)
        else:
            spec = JobCreate.model_validate_json(body)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in err.errors()
        )
        raise _unprocessable(f"invalid job request: {problems}") from err
    return spec, str(resolve_slide_path(settings.slide_root, spec.slide_path))


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    summary="Start a slide job (upload a slide, or name one under the slide root)",
    openapi_extra={"requestBody": _REQUEST_BODY},
    responses={
        202: {"links": job_openapi_links("$response.body#/id")},
        400: {
            "model": ErrorPublic,
            "description": "bad slide_path (outside the slide root, `..`, no such file)",
        },
        413: {"model": ErrorPublic, "description": "the upload exceeds WSI_MIL_MAX_UPLOAD_MB"},
        415: {
            "model": ErrorPublic,
            "description": "not JSON, a URL-encoded form or multipart/form-data",
        },
        422: {
            "model": ErrorPublic,
            "description": "unknown model, or one that cannot run slide jobs",
        },
    },
)
async def create_job(
    request: Request,
    response: Response,
    settings: SettingsDep,
    registry: RegistryDep,
    store: StoreDep,
    pool: PoolDep,
) -> JobPublic:
    """JSON or a URL-encoded form `{"model", "slide_path", "mpp_override"?}`, or multipart with
    `model` and either `file` (streamed to disk; 413 past the size limit) or `slide_path`.

    Returns 202 with the queued job; poll `GET /v1/jobs/{id}` until it is done.
    """
    job_id = new_job_id()
    paths = JobPaths(settings.data_dir, job_id)
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    try:
        if content_type in ("application/json", "application/x-www-form-urlencoded"):
            urlencoded = content_type == "application/x-www-form-urlencoded"
            spec, slide_path = await _job_from_body(request, settings, urlencoded=urlencoded)
            model, mpp, slide_name, source = spec.model, spec.mpp_override, spec.slide_path, "path"
        else:
            form = await receive_form(
                request,
                dest_dir=paths.upload_dir,
                max_bytes=settings.max_upload_bytes,
                file_fields=frozenset({"file"}),
            )
            model = form.fields.get("model", "").strip()
            mpp = _parse_mpp(form.fields.get("mpp_override"))
            upload = form.files.get("file")
            named = form.fields.get("slide_path", "").strip()
            if not model or (upload is None) == (not named):
                raise _unprocessable(
                    "the form needs `model` and exactly one of `file` (upload) or `slide_path`"
                )
            if upload is not None:
                if upload.size == 0:
                    raise _unprocessable("the uploaded slide file is empty")
                slide_path, slide_name, source = str(upload.path), upload.filename, "upload"
            else:
                slide_path, slide_name, source = (
                    str(resolve_slide_path(settings.slide_root, named)),
                    named,
                    "path",
                )
        _check_model(registry, model)
        job = store.create(
            job_id=job_id,
            model=model,
            slide_path=slide_path,
            slide_name=printable_name(slide_name),
            source=source,
            mpp_override=mpp,
            request_id=request_id_var.get(),
        )
    except BaseException:
        shutil.rmtree(paths.upload_dir, ignore_errors=True)
        raise
    pool.wake()
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return job_public(job)


@router.get(
    "",
    summary="List jobs, newest first",
    responses={200: {"links": job_openapi_links("$response.body#/data/0/id")}},
)
def list_jobs(
    store: StoreDep,
    state: Annotated[JobState | None, Query(description="only jobs in this state")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
) -> JobsPublic:
    """Jobs in the store, optionally of one state, newest first."""
    data = [job_public(j) for j in store.list_jobs(state=state, limit=limit, offset=offset)]
    return JobsPublic(data=data, count=len(data))


@router.get(
    "/{job_id}",
    summary="A job's state, progress, failure reason or result",
    responses={
        200: {"links": job_openapi_links("$response.body#/id")},
        404: {"model": ErrorPublic, "description": "no such job (or it expired)"},
    },
)
def get_job(job: JobDep) -> JobPublic:
    """One job; poll it until `state` is done, failed or cancelled."""
    return job_public(job)


@router.post(
    "/{job_id}/cancel",
    summary="Cancel a queued or running job",
    responses={
        404: {"model": ErrorPublic, "description": "no such job"},
        409: {"model": ErrorPublic, "description": "the job already finished"},
    },
)
def cancel_job(job: JobDep, store: StoreDep, settings: SettingsDep) -> JobPublic:
    """A queued job is cancelled at once; a running one stops at its next batch of tiles."""
    try:
        record = store.request_cancel(job.id, ttl_seconds=settings.result_ttl_hours * 3600)
    except KeyError as err:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"no job {job.id}") from err
    except JobStateError as err:
        raise HTTPException(status.HTTP_409_CONFLICT, detail=str(err)) from err
    return job_public(record)


def _delete_files(store: JobStore, deepzoom: DeepZoomDep, job: JobRecord, paths: JobPaths) -> None:
    if job.source == "upload":
        deepzoom.forget(job.slide_path)
    store.delete(job.id)
    paths.remove_all()


@router.delete(
    "/{job_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Delete a job and its files",
    responses={
        404: {"model": ErrorPublic, "description": "no such job"},
        409: {"model": ErrorPublic, "description": "the job is running: cancel it first"},
    },
)
async def delete_job(
    job: JobDep, store: StoreDep, settings: SettingsDep, deepzoom: DeepZoomDep
) -> Response:
    """Removes the job, its uploaded slide and its results. A running job must be cancelled first."""
    if job.state == "running":
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            detail=f"job {job.id} is running; POST /v1/jobs/{job.id}/cancel first",
        )
    await run_in_threadpool(
        _delete_files, store, deepzoom, job, JobPaths(settings.data_dir, job.id)
    )
    return Response(status_code=status.HTTP_204_NO_CONTENT)
