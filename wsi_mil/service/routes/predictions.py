"""`/v1/predictions`: a feature file in, the slide-level prediction and every tile's attention out."""

from __future__ import annotations

import shutil
import uuid

import numpy as np
from fastapi import APIRouter, HTTPException, Request, status
from starlette.concurrency import run_in_threadpool

from wsi_mil.errors import UnknownModelError
from wsi_mil.inference.heatmaps import top_tiles
from wsi_mil.inference.loading import LoadedModel
from wsi_mil.inference.predict import predict_features
from wsi_mil.preprocessing.feature_file import FeatureLimits
from wsi_mil.service.deps import MetricsDep, RegistryDep, SettingsDep
from wsi_mil.service.schemas import (
    ErrorPublic,
    PredictionPublic,
    TileAttentionPublic,
    TopTilePublic,
)
from wsi_mil.service.uploads import ReceivedFile, receive_form

router = APIRouter(prefix="/v1/predictions", tags=["predictions"])

MAX_TOP_K = 256
_FORM_SCHEMA = {
    "type": "object",
    "required": ["model", "file"],
    "properties": {
        "model": {"type": "string", "description": "name of a served model (GET /v1/models)"},
        "file": {
            "type": "string",
            "format": "binary",
            "description": "feature file: wsi_mil/CLAM/TRIDENT/STAMP .h5 or a .pt bag",
        },
        "top_k": {"type": "integer", "minimum": 1, "maximum": MAX_TOP_K, "default": 8},
    },
}


def form_int(fields: dict[str, str], name: str, *, default: int, low: int, high: int) -> int:
    """An integer form field within `[low, high]`, or a 422 naming the field."""
    raw = fields.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            detail=f"form field `{name}` must be an integer in {low}..{high}",
        )
    return value


def _predict_file(
    name: str, model: LoadedModel, upload: ReceivedFile, top_k: int, limits: FeatureLimits
) -> PredictionPublic:
    result = predict_features(upload.path, model, source=repr(upload.filename), limits=limits)
    prediction, coords = result.prediction, result.coords
    size = result.tile_size_level0
    ranked = top_tiles(prediction.attention, top_k)
    return PredictionPublic(
        model=name,
        slide_id=result.slide_id,
        **prediction.summary(),
        tiles=TileAttentionPublic(
            x=None if coords is None else coords[:, 0].tolist(),
            y=None if coords is None else coords[:, 1].tolist(),
            tile_size_level0=size,
            attention=np.asarray(prediction.attention, dtype=np.float64).tolist(),
        ),
        top_tiles=[
            TopTilePublic(
                rank=rank,
                index=int(i),
                x=None if coords is None else int(coords[i, 0]),
                y=None if coords is None else int(coords[i, 1]),
                size=size,
                score=float(prediction.attention[i]),
            )
            for rank, i in enumerate(ranked, start=1)
        ],
    )


@router.post(
    "",
    summary="Predict a slide from its feature file (synchronous)",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"multipart/form-data": {"schema": _FORM_SCHEMA}},
        }
    },
    responses={
        400: {"model": ErrorPublic, "description": "malformed multipart body"},
        413: {"model": ErrorPublic, "description": "the upload exceeds WSI_MIL_MAX_UPLOAD_MB"},
        415: {"model": ErrorPublic, "description": "not multipart/form-data"},
        422: {
            "model": ErrorPublic,
            "description": "not a feature file, or features the model was not trained on",
        },
    },
)
async def create_prediction(
    request: Request, settings: SettingsDep, registry: RegistryDep, metrics: MetricsDep
) -> PredictionPublic:
    """Multipart form: `model` (a served model name), `file` (the feature file), optional `top_k`.

    Refuses features whose dimension or encoder differ from the model's feature contract (422,
    the message says which and how to fix it) and files that are not feature files (422).
    """
    scratch = settings.data_dir / "tmp" / uuid.uuid4().hex
    try:
        form = await receive_form(
            request,
            dest_dir=scratch,
            max_bytes=settings.max_upload_bytes,
            file_fields=frozenset({"file"}),
        )
        model_name = form.fields.get("model", "").strip()
        upload = form.files.get("file")
        if not model_name or upload is None:
            raise HTTPException(
                status.HTTP_422_UNPROCESSABLE_CONTENT,
                detail="the form needs the fields `model` (a served model name) and `file` (the feature file)",
            )
        top_k = form_int(form.fields, "top_k", default=settings.top_k, low=1, high=MAX_TOP_K)
        try:
            model = registry.get(model_name)
        except UnknownModelError as err:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=str(err)) from err
        result = await run_in_threadpool(
            _predict_file, model_name, model, upload, top_k, settings.feature_limits
        )
        metrics.predictions.labels(model_name).inc()
        return result
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
