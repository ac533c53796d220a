"""A finished job's per-tile outputs: heatmap PNG and its colour legend, QuPath GeoJSON, score
table, top tiles."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
from fastapi import APIRouter, Depends, HTTPException, Path, Query, Response, status
from fastapi.responses import JSONResponse
from PIL import Image

from wsi_mil.errors import SlideOpenError
from wsi_mil.inference.heatmaps import (
    HeatmapOptions,
    Scale,
    TileScores,
    heatmap_geojson,
    legend_colors,
    measurements,
    png_bytes,
    render_heatmap,
    scale_legend,
    top_tiles,
)
from wsi_mil.preprocessing.slide import open_slide
from wsi_mil.service.deps import DoneJobDep, HeatmapCacheDep, SettingsDep
from wsi_mil.service.job_files import JobPaths
from wsi_mil.service.job_store import JobRecord
from wsi_mil.service.schemas import (
    ErrorPublic,
    HeatmapLegendPublic,
    LegendTickPublic,
    ScoresPublic,
    TopTilePublic,
    TopTilesPublic,
)
from wsi_mil.service.settings import ServiceSettings

router = APIRouter(prefix="/v1/jobs", tags=["heatmaps"])

ScaleQuery = Annotated[
    Scale,
    Query(
        description="relative (score ÷ slide mean, ×1..×16, fades below) | percentile (rank within "
        "slide) | minmax | raw"
    ),
]
Colormap = Literal[
    "jet", "turbo", "viridis", "inferno", "magma", "plasma", "coolwarm", "RdYlBu_r", "gray"
]
CmapQuery = Annotated[Colormap, Query(description="matplotlib colormap")]
_NOT_READY = {
    404: {"model": ErrorPublic, "description": "no such job"},
    409: {"model": ErrorPublic, "description": "the job is not done"},
}
ClassIndex = Annotated[
    int | None,
    Query(ge=0, le=4096, description="row of the model's per-class map (default: the attention)"),
]
MapName = Annotated[
    str | None,
    Query(
        alias="map",
        max_length=64,
        pattern=r"^[A-Za-z0-9_]+$",
        description="a stored map (the job result's `maps`)",
    ),
]


@dataclass(frozen=True)
class ScoreView:
    """Which scores a heatmap shows, on which scale and in which colours."""

    scale: Scale
    class_index: int | None
    map_name: str | None
    cmap: str


def score_view(
    scale: ScaleQuery = "relative",
    class_index: ClassIndex = None,
    map_name: MapName = None,
    cmap: CmapQuery = "jet",
) -> ScoreView:
    """The query parameters `heatmap.png` and `heatmap-legend` share."""
    return ScoreView(scale, class_index, map_name, cmap)


ScoreViewDep = Annotated[ScoreView, Depends(score_view)]


def _scores(settings: ServiceSettings, job: JobRecord) -> TileScores:
    path = JobPaths(settings.data_dir, job.id).scores
    if not path.is_file():
        raise HTTPException(
            status.HTTP_410_GONE, detail=f"job {job.id}'s results are no longer on the server"
        )
    return TileScores.load(path)


def _render_png(settings: ServiceSettings, job: JobRecord, options: HeatmapOptions) -> bytes:
    scores = _scores(settings, job)
    paths = JobPaths(settings.data_dir, job.id)
    thumbnail = (
        Image.open(paths.thumbnail)
        if options.background == "thumbnail" and paths.thumbnail.is_file()
        else None
    )
    mask = Image.open(paths.tissue_mask) if paths.tissue_mask.is_file() else None
    return png_bytes(render_heatmap(scores, options, thumbnail=thumbnail, tissue_mask=mask))


@router.get(
    "/{job_id}/heatmap.png",
    summary="Heatmap PNG covering the whole level-0 slide",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}, "description": "the heatmap"}, **_NOT_READY},
)
def get_heatmap_png(
    job: DoneJobDep,
    settings: SettingsDep,
    cache: HeatmapCacheDep,
    view: ScoreViewDep,
    alpha: Annotated[float, Query(ge=0, le=1, description="opacity of the colours")] = 0.5,
    smooth: Annotated[
        float,
        Query(ge=0, le=10, description="Gaussian sigma in tiles (0: none; capped by the service)"),
    ] = 0.0,
    max_size: Annotated[
        int,
        Query(ge=64, le=8192, description="longer side of the PNG in pixels (capped by the service)"),
    ] = 2048,
    background: Annotated[
        Literal["thumbnail", "none"],
        Query(description="thumbnail: blended on the slide; none: RGBA overlay"),
    ] = "thumbnail",
) -> Response:
    """The PNG spans level-0 `[0, W) x [0, H)` exactly (`X-Level0-Size`), so it can be laid over
    the slide at x = 0, width = W; colour is drawn only on tissue. `max_size` and `smooth` are
    honoured up to `WSI_MIL_HEATMAP_MAX_SIZE` and `WSI_MIL_HEATMAP_MAX_SMOOTH`; a repeated request
    is answered from memory."""
    options = HeatmapOptions(
        scale=view.scale,
        map_name=view.map_name,
        class_index=view.class_index,
        cmap=view.cmap,
        alpha=alpha,
        smooth_tiles=min(smooth, settings.heatmap_max_smooth),
        max_size=min(max_size, settings.heatmap_max_size),
        background=background,
    )
    key = (job.id, options)
    image = cache.get(key)
    if image is None:
        image = _render_png(settings, job, options)
        cache.put(key, image)
    result = job.result or {}
    return Response(
        image,
        media_type="image/png",
        headers={
            "X-Level0-Size": f"{result.get('slide_width')},{result.get('slide_height')}",
            "Cache-Control": "private, max-age=300",
        },
    )


@router.get(
    "/{job_id}/heatmap-legend",
    summary="The colour bar of a heatmap: colours and the score at each tick",
    responses=_NOT_READY,
)
def get_heatmap_legend(
    job: DoneJobDep, settings: SettingsDep, view: ScoreViewDep
) -> HeatmapLegendPublic:
    """What `heatmap.png` with the same options paints in which colour, for a viewer's legend."""
    values, label = _scores(settings, job).select(view.map_name, view.class_index)
    ticks = scale_legend(values, view.scale)
    return HeatmapLegendPublic(
        job_id=job.id,
        score=label,
        scale=view.scale,
        cmap=view.cmap,
        colors=legend_colors(view.cmap, view.scale),
        ticks=[LegendTickPublic(position=t.position, value=t.value, label=t.label) for t in ticks],
    )


@router.get(
    "/{job_id}/heatmap.geojson",
    summary="QuPath GeoJSON: one tile per instance with its scores as measurements",
    response_class=JSONResponse,
    responses={
        200: {"content": {"application/geo+json": {}}, "description": "a FeatureCollection"},
        **_NOT_READY,
    },
)
def get_heatmap_geojson(job: DoneJobDep, settings: SettingsDep) -> JSONResponse:
    """Level-0 squares (closed rings), `objectType: tile`, `measurements` = attention (raw,
    percentile, minmax) and every map row; import in QuPath by drag-and-drop."""
    scores = _scores(settings, job)
    slide_id = (job.result or {}).get("slide_id", job.id)
    return JSONResponse(
        heatmap_geojson(scores, name=f"{job.id}/{slide_id}"), media_type="application/geo+json"
    )


@router.get(
    "/{job_id}/scores.json",
    summary="Every tile's scores with level-0 coordinates",
    responses=_NOT_READY,
)
def get_scores(job: DoneJobDep, settings: SettingsDep) -> ScoresPublic:
    """Columns x, y (level-0 top-left) and every per-tile score, in tile order."""
    scores = _scores(settings, job)
    return ScoresPublic(
        job_id=job.id,
        slide_id=str((job.result or {}).get("slide_id", "")),
        class_names=list(scores.class_names),
        tile_size_level0=scores.tile_size_level0,
        x=scores.coords[:, 0].tolist(),
        y=scores.coords[:, 1].tolist(),
        scores={
            name: np.asarray(values, dtype=np.float64).tolist()
            for name, values in measurements(scores).items()
        },
    )


@router.get(
    "/{job_id}/top-tiles",
    summary="The highest-scoring tiles, with links to their images",
    responses=_NOT_READY,
)
def list_top_tiles(
    job: DoneJobDep,
    settings: SettingsDep,
    k: Annotated[int, Query(ge=1, le=256)] = 8,
    class_index: ClassIndex = None,
    map_name: MapName = None,
) -> TopTilesPublic:
    """The k highest-scoring tiles (attention, or a map row with `map`/`class_index`), highest first."""
    scores = _scores(settings, job)
    values, label = scores.select(map_name, class_index)
    query = "".join(
        f"&{key}={value}"
        for key, value in (("class_index", class_index), ("map", map_name))
        if value is not None
    )
    data = []
    for rank, index in enumerate(top_tiles(values, k), start=1):
        x, y = (int(v) for v in scores.coords[index])
        data.append(
            TopTilePublic(
                rank=rank,
                index=int(index),
                x=x,
                y=y,
                size=scores.tile_size_level0,
                score=float(values[index]),
                url=f"/v1/jobs/{job.id}/top-tiles/{rank}.png?{query.lstrip('&')}".rstrip("?"),
            )
        )
    return TopTilesPublic(job_id=job.id, score=label, data=data)


@router.get(
    "/{job_id}/top-tiles/{rank}.png",
    summary="Image of the tile at a rank (1 = highest), read from the slide",
    response_class=Response,
    responses={
        200: {"content": {"image/png": {}}, "description": "the tile"},
        **_NOT_READY,
        410: {"model": ErrorPublic, "description": "the slide file is gone"},
    },
)
def get_top_tile_png(
    job: DoneJobDep,
    settings: SettingsDep,
    rank: Annotated[int, Path(ge=1, le=256)],
    class_index: ClassIndex = None,
    map_name: MapName = None,
    size: Annotated[int, Query(ge=16, le=1024, description="output side in pixels")] = 256,
) -> Response:
    """The tile at `rank` read from the slide and resized to `size` pixels."""
    scores = _scores(settings, job)
    values, _ = scores.select(map_name, class_index)
    ranked = top_tiles(values, rank)
    if rank > len(ranked):
        raise HTTPException(
            status.HTTP_404_NOT_FOUND, detail=f"the slide has only {len(ranked)} tiles"
        )
    x, y = (int(v) for v in scores.coords[ranked[rank - 1]])
    side = scores.tile_size_level0
    try:
        with open_slide(job.slide_path, mpp_override=job.mpp_override) as slide:
            pixels = slide.read_resampled((size, size), region=(x, y, side, side))
    except SlideOpenError as err:
        raise HTTPException(
            status.HTTP_410_GONE, detail=f"the slide can no longer be read: {err}"
        ) from err
    return Response(png_bytes(Image.fromarray(pixels)), media_type="image/png")
