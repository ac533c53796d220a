"""Request and response schemas of the REST API, one family per resource, with OpenAPI examples."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

JOB_ID_PATTERN = r"^[0-9a-f]{32}$"
_JOB_ID_EXAMPLE = "3f2b9c0d4e5f46a7b8c9d0e1f2a3b4c5"


class ErrorPublic(BaseModel):
    """Every error response: a human-readable `detail` and the request id to quote."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "detail": "slide.h5 has 768-d features, the model expects 1024-d (uni); extract "
                    "features with the encoder the model was trained on",
                    "request_id": "a41c5e3f0b7d4e7c9a1f2b3c4d5e6f70",
                }
            ]
        }
    )

    detail: str | list[Any]
    request_id: str


# -- models -----------------------------------------------------------------------------------------


class FeatureContractPublic(BaseModel):
    """The features a model was trained on; other features are refused with a 422."""

    encoder: str | None = Field(None, examples=["resnet50-trunc"])
    feature_dim: int = Field(examples=[1024])
    target_mpp: float | None = Field(None, examples=[0.5])
    tile_px: int | None = Field(None, examples=[256])
    tile_size_level0: int | None = Field(None, examples=[512])


class PreprocessingPublic(BaseModel):
    """How a slide job turns a slide into features for this model (from the model card)."""

    source: Literal["card", "feature_contract"] = Field(
        description="`card`: the card's own preprocessing; `feature_contract`: derived, default tissue settings"
    )
    encoder: str
    weights: str | None = Field(
        description='"random", a weights file name, or None (resolved at run time)'
    )
    precision: str
    tissue: dict[str, Any]
    tiling: dict[str, Any]


class ModelPublic(BaseModel):
    """A served model: its classes, architecture and the feature contract inputs must meet."""

    model_config = ConfigDict(
        protected_namespaces=(),
        json_schema_extra={
            "examples": [
                {
                    "name": "camelyon_abmil/fold_0",
                    "architecture": "abmil",
                    "model_kwargs": {"hidden_dim": 512, "attention_dim": 256, "gated": True},
                    "num_classes": 2,
                    "class_names": ["normal", "tumor"],
                    "feature_contract": {
                        "encoder": "resnet50-trunc",
                        "feature_dim": 1024,
                        "target_mpp": 0.5,
                        "tile_px": 256,
                        "tile_size_level0": None,
                    },
                    "preprocessing": None,
                    "slide_jobs": False,
                    "slide_job_problem": "the model card has no `preprocessing` ...",
                    "weights_sha256": "9c1e...",
                    "training_method": "standard",
                    "fold": 0,
                }
            ]
        },
    )

    name: str
    architecture: str
    model_kwargs: dict[str, Any]
    num_classes: int
    class_names: list[str]
    feature_contract: FeatureContractPublic
    preprocessing: PreprocessingPublic | None
    slide_jobs: bool = Field(description="whether POST /v1/jobs can run this model on slides")
    slide_job_problem: str | None = Field(
        None, description="why slide jobs cannot run, when they cannot"
    )
    weights_sha256: str
    training_method: str
    fold: int


class ModelsPublic(BaseModel):
    """The served models and how many there are."""

    data: list[ModelPublic]
    count: int


# -- predictions -------------------------------------------------------------------------------------


class TopTilePublic(BaseModel):
    """One of the highest-scoring tiles: rank 1 is the highest; box in level-0 pixels."""

    rank: int = Field(examples=[1])
    index: int = Field(description="row of the tile in the feature file", examples=[412])
    x: int | None = Field(examples=[10240])
    y: int | None = Field(examples=[8192])
    size: int | None = Field(description="tile side in level-0 pixels", examples=[512])
    score: float = Field(examples=[0.0132])
    url: str | None = Field(
        None, description="PNG of the tile read from the slide (slide jobs only)"
    )


class TileAttentionPublic(BaseModel):
    """Attention of every tile, in feature-file order, with level-0 top-left coordinates when known."""

    x: list[int] | None
    y: list[int] | None
    tile_size_level0: int | None
    attention: list[float]


class PredictionPublic(BaseModel):
    """The slide-level prediction of a feature file plus every tile's attention and the top tiles."""

    model_config = ConfigDict(
        protected_namespaces=(),
        json_schema_extra={
            "examples": [
                {
                    "model": "camelyon_abmil/fold_0",
                    "slide_id": "tumor_001",
                    "class_names": ["normal", "tumor"],
                    "probabilities": {"normal": 0.08, "tumor": 0.92},
                    "predicted_class": "tumor",
                    "predicted_index": 1,
                    "logits": [-1.2, 1.24],
                    "n_tiles": 3,
                    "maps": ["attention_logits"],
                    "tiles": {
                        "x": [0, 512, 1024],
                        "y": [0, 0, 0],
                        "tile_size_level0": 512,
                        "attention": [0.2, 0.7, 0.1],
                    },
                    "top_tiles": [
                        {
                            "rank": 1,
                            "index": 1,
                            "x": 512,
                            "y": 0,
                            "size": 512,
                            "score": 0.7,
                            "url": None,
                        }
                    ],
                }
            ]
        },
    )

    model: str
    slide_id: str
    class_names: list[str]
    probabilities: dict[str, float]
    predicted_class: str
    predicted_index: int
    logits: list[float]
    n_tiles: int
    maps: list[str] = Field(description="names of the extra per-tile maps the model gives")
    tiles: TileAttentionPublic
    top_tiles: list[TopTilePublic]


# -- jobs ----------------------------------------------------------------------------------------------


class JobCreate(BaseModel):
    """A slide job on a file already on the server, named relative to the slide root."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"model": "camelyon_abmil/fold_0", "slide_path": "cohort_a/tumor_001.svs"}]
        },
    )

    model: str = Field(min_length=1, max_length=512)
    slide_path: str = Field(min_length=1, max_length=4096, description="path under the slide root")
    mpp_override: float | None = Field(
        None, gt=0, le=1000, description="µm/px for slides without it"
    )


class JobResultPublic(BaseModel):
    """A finished job's slide-level result; per-tile outputs are behind the job's links."""

    slide_id: str
    class_names: list[str]
    probabilities: dict[str, float]
    predicted_class: str
    predicted_index: int
    logits: list[float]
    n_tiles: int
    maps: list[str]
    tile_size_level0: int
    mpp: float | None
    mpp_source: str | None
    slide_width: int
    slide_height: int
    bounds: list[int] = Field(description="level-0 (x, y, w, h) the Deep Zoom image shows")
    timings: dict[str, float]


JobStatePublic = Literal["queued", "running", "done", "failed", "cancelled"]


class JobPublic(BaseModel):
    """A slide job: state, progress, the reason when it failed, the result when it is done."""

    model_config = ConfigDict(
        protected_namespaces=(),
        json_schema_extra={
            "examples": [
                {
                    "id": _JOB_ID_EXAMPLE,
                    "state": "running",
                    "model": "camelyon_abmil/fold_0",
                    "slide_name": "tumor_001.svs",
                    "source": "upload",
                    "mpp_override": None,
                    "progress": 0.42,
                    "stage": "features",
                    "error": None,
                    "result": None,
                    "created": "2026-05-01T10:00:00Z",
                    "updated": "2026-05-01T10:00:31Z",
                    "started": "2026-05-01T10:00:01Z",
                    "finished": None,
                    "expires": None,
                    "links": {"self": f"/v1/jobs/{_JOB_ID_EXAMPLE}"},
                }
            ]
        },
    )

    id: str
    state: JobStatePublic
    model: str
    slide_name: str
    source: Literal["upload", "path"]
    mpp_override: float | None
    progress: float = Field(ge=0, le=1)
    stage: str
    error: str | None
    result: JobResultPublic | None
    created: datetime
    updated: datetime
    started: datetime | None
    finished: datetime | None
    expires: datetime | None
    links: dict[str, str]


class JobsPublic(BaseModel):
    """A page of jobs."""

    data: list[JobPublic]
    count: int


class ScoresPublic(BaseModel):
    """Every tile's scores with level-0 coordinates (columns in tile order)."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "job_id": _JOB_ID_EXAMPLE,
                    "slide_id": "tumor_001",
                    "class_names": ["normal", "tumor"],
                    "tile_size_level0": 512,
                    "x": [0, 512],
                    "y": [0, 0],
                    "scores": {"attention": [0.3, 0.7], "attention_percentile": [0.5, 1.0]},
                }
            ]
        }
    )

    job_id: str
    slide_id: str
    class_names: list[str]
    tile_size_level0: int
    x: list[int]
    y: list[int]
    scores: dict[str, list[float]]


class LegendTickPublic(BaseModel):
    """One tick of a heatmap's colour bar."""

    position: float = Field(ge=0, le=1, description="place on the colour bar, 0 (left) to 1 (right)")
    value: float = Field(description="the score drawn in that colour")
    label: str = Field(description="the tick in the scale's unit: ×ratio, rank or score")


class HeatmapLegendPublic(BaseModel):
    """The colour bar of a heatmap: its colours and the score at each tick."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "job_id": _JOB_ID_EXAMPLE,
                    "score": "attention",
                    "scale": "relative",
                    "cmap": "jet",
                    "colors": ["rgba(0, 0, 127, 0.00)", "rgba(127, 0, 0, 1.00)"],
                    "ticks": [
                        {"position": 0.0, "value": 0.004, "label": "×1"},
                        {"position": 1.0, "value": 0.064, "label": "×16"},
                    ],
                }
            ]
        }
    )

    job_id: str
    score: str = Field(description="which score is drawn", examples=["attention"])
    scale: str
    cmap: str
    colors: list[str] = Field(description="CSS colours evenly spaced along the bar (with opacity)")
    ticks: list[LegendTickPublic]


class TopTilesPublic(BaseModel):
    """The highest-scoring tiles of a job's slide, highest first."""

    job_id: str
    score: str = Field(description="which score ranked the tiles", examples=["attention"])
    data: list[TopTilePublic]


# -- health ----------------------------------------------------------------------------------------------


class HealthPublic(BaseModel):
    """Liveness: always `ok` while the process serves requests."""

    status: Literal["ok"] = "ok"


class ReadyPublic(BaseModel):
    """Whether the service can take work: models loaded, job store open, workers alive."""

    status: Literal["ready", "not ready"]
    models: int
    workers: int
    reasons: list[str] = Field(description="why the service is not ready (empty when ready)")
    model_problems: dict[str, str] = Field(description="model folders that failed to load, and why")
