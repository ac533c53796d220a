"""Service settings: pydantic-settings read from `WSI_MIL_*` environment variables, built in `create_app`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

if TYPE_CHECKING:  # the settings stay importable without torch and h5py
    from wsi_mil.preprocessing.feature_file import FeatureLimits

REPO_ROOT = Path(__file__).resolve().parents[2]
#: where `npm ci` at the repository root puts OpenSeadragon's browser build
DEFAULT_OPENSEADRAGON_DIR = REPO_ROOT / "node_modules" / "openseadragon" / "build" / "openseadragon"


class ServiceSettings(BaseSettings):
    """Everything the REST service reads from its environment (`WSI_MIL_<FIELD>`, case-insensitive).

    `wsi-mil serve` flags override the environment; tests pass an instance to `create_app`.
    """

    model_config = SettingsConfigDict(env_prefix="WSI_MIL_", env_ignore_empty=True, extra="ignore")

    models_dir: Path = Field(
        Path("models"), description="folder of model folders and training run folders"
    )
    slide_root: Path | None = Field(
        None,
        description="slides named by path must lie under this folder; None refuses slide paths",
    )
    data_dir: Path = Field(
        Path("wsi_mil_data"), description="job database, uploads and job results"
    )
    api_key: SecretStr | None = Field(
        None, description="when set, every /v1 request needs this X-API-Key"
    )
    max_upload_mb: float = Field(
        4096.0, gt=0, description="largest accepted upload (slide or feature file)"
    )
    max_feature_mb: float = Field(
        2048.0,
        gt=0,
        description="most memory an uploaded feature file may declare (features as float32, "
        "coords, per-tile data); checked before it is read",
    )
    max_tiles: int = Field(
        1_000_000, ge=1, description="most tiles an uploaded feature file may declare"
    )
    workers: int = Field(
        1, ge=0, description="slide-job worker threads; 0 accepts jobs without running them"
    )
    max_job_attempts: int = Field(
        3,
        ge=1,
        description="a job left running by a stopped service is started again until it has been "
        "started this many times, then it fails",
    )
    result_ttl_hours: float = Field(
        72.0, gt=0, description="finished jobs and their files are purged after this"
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="origins allowed by CORS (comma-separated or a JSON list)"
    )
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    device: str | None = Field(
        None, description="torch device of models and encoders (default: cuda if available)"
    )
    tile_workers: int = Field(
        0, ge=0, description="tile-reading processes per slide job (0: threads of the service process read each batch)"
    )
    batch_size: int = Field(64, ge=1, description="tiles per encoder batch in slide jobs")
    top_k: int = Field(
        8, ge=1, le=256, description="default number of top-attention tiles returned"
    )
    heatmap_max_size: int = Field(
        2048, ge=64, le=8192, description="longest side a heatmap PNG is drawn at (larger requests get this)"
    )
    heatmap_max_smooth: float = Field(
        10.0, ge=0, description="largest heatmap smoothing sigma in tiles (larger requests get this)"
    )
    heatmap_cache_mb: float = Field(
        64.0, ge=0, description="memory for rendered heatmap PNGs, reused for repeated requests"
    )
    deepzoom_cache_size: int = Field(
        8, ge=1, description="slides whose DeepZoom generators stay open"
    )
    purge_interval_s: float = Field(
        300.0, gt=0, description="how often expired jobs are looked for"
    )
    executor: Literal["local", "ray"] = Field(
        "local", description="where slide jobs run: the worker threads (local) or Ray tasks (ray)"
    )
    ray_address: str | None = Field(
        None,
        description="Ray cluster of slide jobs with executor=ray ('auto': this node's); None: this machine's, else a new local one",
    )
    ray_cpus_per_job: float = Field(1.0, gt=0, description="CPUs a slide job asks Ray for")
    ray_gpus_per_job: float | None = Field(
        None, ge=0, description="GPUs a slide job asks Ray for (default: 1 when the cluster has GPUs)"
    )
    openseadragon_dir: Path | None = Field(
        None,
        description="OpenSeadragon's build folder; default: node_modules at the repository root",
    )

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [origin.strip() for origin in text.split(",") if origin.strip()]
        return value

    @property
    def max_upload_bytes(self) -> int:
        """The upload limit in bytes."""
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def feature_limits(self) -> FeatureLimits:
        """What an uploaded feature file may declare (checked before any of its data is read)."""
        from wsi_mil.preprocessing.feature_file import FeatureLimits

        return FeatureLimits(
            max_tiles=self.max_tiles,
            max_bytes=int(self.max_feature_mb * 2**20),
            tiles_setting="WSI_MIL_MAX_TILES",
            bytes_setting="WSI_MIL_MAX_FEATURE_MB",
        )

    @property
    def database_path(self) -> Path:
        """The SQLite job database."""
        return self.data_dir / "jobs.sqlite3"

    def resolved_openseadragon_dir(self) -> Path | None:
        """The OpenSeadragon build folder when it holds `openseadragon.min.js`, else None (CDN)."""
        folder = self.openseadragon_dir or DEFAULT_OPENSEADRAGON_DIR
        return folder if (folder / "openseadragon.min.js").is_file() else None
