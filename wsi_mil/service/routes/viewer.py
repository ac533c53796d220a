"""The browser viewer of a job (OpenSeadragon page) and the Deep Zoom tiles it shows."""

from __future__ import annotations

import html
from importlib import resources
from string import Template
from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Request, Response, status
from fastapi.responses import HTMLResponse

from wsi_mil.errors import SlideOpenError, TileNotFoundError
from wsi_mil.service.deepzoom import SlideDeepZoom
from wsi_mil.service.deps import DeepZoomDep, JobDep, JobIdPath, SettingsDep
from wsi_mil.service.job_store import JobRecord
from wsi_mil.service.schemas import ErrorPublic

#: OpenSeadragon release pinned by package.json; the CDN copy is used when node_modules is absent
OPENSEADRAGON_VERSION = "6.1.1"
OPENSEADRAGON_CDN = (
    f"https://cdn.jsdelivr.net/npm/openseadragon@{OPENSEADRAGON_VERSION}/build/openseadragon/"
)
#: sha384 of openseadragon.min.js 6.1.1 as shipped in the npm tarball (Subresource Integrity)
OPENSEADRAGON_SRI = "sha384-KKly+4vqqBHitr2XfNKWa3+0asIVpzYs2HijkM/zz0X6rgnyLuQEVERX9HqkM5/P"
VENDOR_PREFIX = "/vendor/openseadragon/"

tiles_router = APIRouter(prefix="/v1/jobs", tags=["viewer"])
page_router = APIRouter(prefix="/v1/jobs", tags=["viewer"])

_TILE_ERRORS = {
    404: {"model": ErrorPublic, "description": "no such job, or a tile outside the pyramid"},
    410: {"model": ErrorPublic, "description": "the slide file is gone"},
}


def _deepzoom(job: JobRecord, deepzoom: DeepZoomDep) -> SlideDeepZoom:
    try:
        return deepzoom.get(job.slide_path)
    except SlideOpenError as err:
        raise HTTPException(
            status.HTTP_410_GONE, detail=f"the job's slide cannot be opened: {err}"
        ) from err


@tiles_router.get(
    "/{job_id}/dzi.dzi",
    summary="Deep Zoom descriptor of the job's slide",
    response_class=Response,
    responses={200: {"content": {"application/xml": {}}, "description": "DZI XML"}, **_TILE_ERRORS},
)
def get_dzi(job: JobDep, deepzoom: DeepZoomDep) -> Response:
    """254-px JPEG tiles with 1 px overlap; the tiles are at `dzi_files/{level}/{col}_{row}.jpeg`."""
    return Response(_deepzoom(job, deepzoom).dzi_xml(), media_type="application/xml")


@tiles_router.get(
    "/{job_id}/dzi_files/{level:int}/{col:int}_{row:int}.jpeg",
    summary="One Deep Zoom tile",
    response_class=Response,
    responses={200: {"content": {"image/jpeg": {}}, "description": "the tile"}, **_TILE_ERRORS},
)
def get_dzi_tile(
    job: JobDep,
    deepzoom: DeepZoomDep,
    level: Annotated[int, Path(ge=0, le=64)],
    col: Annotated[int, Path(ge=0, le=10_000_000)],
    row: Annotated[int, Path(ge=0, le=10_000_000)],
) -> Response:
    """One JPEG tile; 404 for a level or address outside the pyramid, and for any name other
    than `<col>_<row>.jpeg` in decimal digits."""
    try:
        tile = _deepzoom(job, deepzoom).tile_jpeg(level, (col, row))
    except TileNotFoundError as err:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=str(err)) from err
    return Response(
        tile, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"}
    )


def _page_template() -> Template:
    text = (
        resources.files("wsi_mil.service")
        .joinpath("static/viewer.html")
        .read_text(encoding="utf-8")
    )
    return Template(text)


@page_router.get(
    "/{job_id}/viewer",
    summary="Browser viewer: slide, attention overlay, prediction, top tiles",
    response_class=HTMLResponse,
    responses={200: {"content": {"text/html": {}}, "description": "the viewer page"}},
)
def get_viewer(job_id: JobIdPath, request: Request, settings: SettingsDep) -> HTMLResponse:
    """A static page; it reads everything through the (API-key protected) job endpoints. Open it as
    `/v1/jobs/{id}/viewer#api_key=KEY` when the service has a key (fragments never reach servers)."""
    local = settings.resolved_openseadragon_dir() is not None
    prefix = VENDOR_PREFIX if local else OPENSEADRAGON_CDN
    integrity = "" if local else f' integrity="{OPENSEADRAGON_SRI}" crossorigin="anonymous"'
    page = _page_template().substitute(
        job_id=html.escape(job_id),
        osd_script=f'<script src="{html.escape(prefix)}openseadragon.min.js"{integrity}></script>',
        osd_prefix=html.escape(prefix),
    )
    return HTMLResponse(page, headers={"Cache-Control": "no-store"})
