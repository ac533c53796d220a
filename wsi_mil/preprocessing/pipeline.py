"""One slide end to end: open → tissue → tiles → features.h5 (+ mask, GeoJSON, QC thumbnail).

`preprocess_slide` is the single-slide call the batch job, the service and Python users share, so
features of the same tiles are identical whichever way a slide is processed.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import timm
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from wsi_mil import __version__
from wsi_mil.errors import SlideOpenError, WsiMilError
from wsi_mil.preprocessing.encoders import Encoder, load_encoder, resolve_precision
from wsi_mil.preprocessing.extract import extract_features, plan_cpu_use
from wsi_mil.preprocessing.feature_file import FeatureFileWriter, FeatureProvenance
from wsi_mil.preprocessing.qc import (
    background_warning,
    render_qc_thumbnail,
    save_json_atomic,
    save_png_atomic,
)
from wsi_mil.preprocessing.slide import SlideReader, open_slide, quick_hash
from wsi_mil.preprocessing.tiling import TileGrid, TilingParams, tile_grid, tissue_coverage
from wsi_mil.preprocessing.tissue import TissueMask, TissueParams, segment_tissue, tissue_geojson

log = logging.getLogger(__name__)

SlideStatus = Literal["done", "failed", "no_tissue", "skipped"]
# A kept tile at least this much under marker ink is counted (and warned about) in the QC.
INKED_TILE_FRACTION = 0.25
# Status files list the coordinates of at most this many unreadable tiles.
MAX_UNREADABLE_LISTED = 100


class PreprocessConfig(BaseModel):
    """Everything that decides a slide's outputs, plus runtime knobs that do not change them."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tissue: TissueParams = Field(default_factory=TissueParams)
    tiling: TilingParams = Field(default_factory=TilingParams)
    encoder: str = "resnet50-trunc"
    weights: str | None = Field(default=None, description='a weights file, or "random" (tests, demo)')
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    features_dtype: Literal["float16", "float32"] = "float16"
    slide_mpp: float | None = Field(default=None, description="mpp for slides whose files carry none")
    max_unreadable_fraction: float = Field(
        0.05, ge=0, le=1, description="tiles that cannot be read are left out up to this share; above, the slide fails"
    )
    # runtime only: not part of the parameter hash
    batch_size: int = 64
    num_workers: int | None = Field(default=None, ge=0, description="tile-decoding worker processes; 0: threads of this process (None: plan_cpu_use)")
    num_threads: int | None = Field(default=None, ge=1, description="torch intra-op threads on CPU (None: plan_cpu_use)")
    compile: Literal["auto", "on", "off"] = Field(
        "auto", description="torch.compile the encoder: auto where measured to pay off for the slide's tiles"
    )
    device: str | None = None
    qc_max_size: int = 1024

    def output_params(self, slide_mpp_override: float | None) -> dict[str, object]:
        """The settings that change a slide's outputs (what `params_hash` covers)."""
        return {
            "tissue": self.tissue.model_dump(),
            "tiling": self.tiling.model_dump(),
            "encoder": self.encoder,
            "weights": self.weights,
            "precision": self.precision,
            "features_dtype": self.features_dtype,
            "slide_mpp_override": slide_mpp_override,
            "max_unreadable_fraction": self.max_unreadable_fraction,
        }

    def params_hash(self, slide_mpp_override: float | None = None) -> str:
        """A short stable hash of `output_params`; a slide is done only if its file carries it."""
        blob = json.dumps(self.output_params(slide_mpp_override), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class OutputPaths:
    """Where one slide's outputs go under the batch output folder."""

    root: Path
    slide_id: str

    @property
    def features(self) -> Path:
        return self.root / "features" / f"{self.slide_id}.h5"

    @property
    def mask(self) -> Path:
        return self.root / "tissue" / f"{self.slide_id}_mask.png"

    @property
    def geojson(self) -> Path:
        return self.root / "tissue" / f"{self.slide_id}.geojson"

    @property
    def qc(self) -> Path:
        return self.root / "qc" / f"{self.slide_id}.png"

    @property
    def status(self) -> Path:
        return self.root / "status" / f"{self.slide_id}.json"

    def make_dirs(self) -> None:
        for p in (self.features, self.mask, self.qc, self.status):
            p.parent.mkdir(parents=True, exist_ok=True)

    def remove_stale_temporaries(self) -> None:
        """Delete temporary files a killed run left for this slide's outputs (never a final name).

        `wsi_mil.atomic` names them `.<final name>.<hex>.tmp`; older versions used `<final name>.tmp-*`.
        """
        for final in (self.features, self.mask, self.geojson, self.qc, self.status):
            for pattern in (f".{glob.escape(final.name)}.*.tmp", f"{glob.escape(final.name)}.tmp-*"):
                for tmp in final.parent.glob(pattern):
                    tmp.unlink(missing_ok=True)


@dataclass
class SlideResult:
    """The status record of one slide (written as JSON to `status/<slide_id>.json`).

    `warnings` are one-line notes that need a look (also drawn on the QC image); `qc` holds the
    measured facts behind them (background colour, colour correction, ...).
    """

    slide_id: str
    slide_path: str
    status: SlideStatus
    reason: str = ""
    tiles: int = 0
    seconds: float = 0.0
    params_hash: str = ""
    mpp: float | None = None
    mpp_source: str | None = None
    feature_path: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    finished_utc: str = ""
    warnings: list[str] = field(default_factory=list)
    qc: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def preprocess_slide(
    slide_path: str | Path,
    out_dir: str | Path,
    config: PreprocessConfig,
    *,
    slide_id: str | None = None,
    mpp_override: float | None = None,
    encoder: Encoder | None = None,
    on_tiles: Callable[[int, int], None] | None = None,
) -> SlideResult:
    """Process one slide into `out_dir`; bad input gives a `failed` result, never an exception.

    `mpp_override` (per slide) falls back to `config.slide_mpp`. `encoder` lets a caller reuse a
    loaded encoder across slides. `on_tiles(done, total)` reports feature-extraction progress.
    """
    slide_path = Path(slide_path)
    slide_id = slide_id or slide_path.stem
    override = mpp_override if mpp_override is not None else config.slide_mpp
    paths = OutputPaths(Path(out_dir), slide_id)
    paths.make_dirs()
    paths.remove_stale_temporaries()
    result = SlideResult(slide_id, str(slide_path), "failed", params_hash=config.params_hash(override))
    started = time.perf_counter()
    try:
        _run_slide(slide_path, paths, config, result, override, encoder, on_tiles)
    except WsiMilError as err:
        result.status, result.reason = "failed", one_line_reason(err)
    except Exception as err:  # a broken slide must fail alone, with its reason, not stop a batch
        log.exception("unexpected error on slide %s", slide_id)
        result.status, result.reason = "failed", one_line_reason(err)
    result.seconds = round(time.perf_counter() - started, 3)
    result.finished_utc = datetime.now(UTC).isoformat(timespec="seconds")
    save_json_atomic(result.to_json(), paths.status)
    return result


def one_line_reason(err: BaseException) -> str:
    """An exception as the one-line reason a status record and summary.csv hold.

    A DataLoader worker's error arrives as "Caught X in DataLoader worker process 0. Original
    Traceback ..."; the reason is then its last line, the original "X: message". Other messages are
    joined onto one line; errors that are not wsi_mil's own keep their type name in front.
    """
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if len(lines) > 1 and any(line.startswith("Original Traceback") for line in lines):
        return lines[-1]
    message = " ".join(lines) or type(err).__name__
    return message if isinstance(err, WsiMilError) else f"{type(err).__name__}: {message}"


class _UnreadableTiles:
    """Collects tiles that could not be read, in `result.qc`; fails the slide once there are too many."""

    def __init__(self, slide: SlideReader, grid: TileGrid, max_fraction: float, result: SlideResult) -> None:
        self.slide_name = slide.name
        self.grid = grid
        self.max_fraction = max_fraction
        self.result = result
        self.rows: list[int] = []
        self.first_cause = ""

    def __call__(self, row: int, reason: str) -> None:
        self.rows.append(row)
        self.first_cause = self.first_cause or reason.removeprefix(f"{self.slide_name}: ")
        self.result.qc["unreadable_tiles"] = len(self.rows)
        coords = self.grid.coords[self.rows[:MAX_UNREADABLE_LISTED]]
        self.result.qc["unreadable_coords"] = coords.tolist()
        if len(self.rows) > self.max_fraction * len(self.grid):
            raise SlideOpenError(
                f"{self.slide_name}: more than {self.max_fraction:.0%} of its {len(self.grid)} tiles "
                f"cannot be read ({len(self.rows)} so far; first: {self.first_cause}); "
                "see unreadable_coords in its status file"
            )

    def warning(self) -> str:
        return (
            f"{len(self.rows)} of {len(self.grid)} tiles could not be read and were left out "
            f"(first: {self.first_cause}; where: unreadable_coords)"
        )


def _run_slide(
    slide_path: Path,
    paths: OutputPaths,
    config: PreprocessConfig,
    result: SlideResult,
    override: float | None,
    encoder: Encoder | None,
    on_tiles: Callable[[int, int], None] | None,
) -> None:
    clock = time.perf_counter()
    with open_slide(slide_path, mpp_override=override) as slide:
        mpp = slide.mpp
        result.mpp, result.mpp_source = mpp.mpp, mpp.source
        mask = segment_tissue(slide, config.tissue)
        grid = tile_grid(slide, mask, config.tiling)
        result.timings["tissue_and_tiling_s"] = round(time.perf_counter() - clock, 3)
        _check_quality(slide, mask, grid, result)
        _write_tissue_outputs(slide, mask, grid, paths, config, result.warnings)
        result.tiles = len(grid)
        if len(grid) == 0:
            result.status = "no_tissue"
            result.reason = (
                f"no tile reached tissue fraction {config.tiling.min_tissue_fraction} "
                f"(tissue area {mask.area_fraction:.1%} of the slide, mode {config.tissue.mode!r}); "
                "try --tissue-mode or a lower --min-tissue"
            )
            return
        if encoder is None:
            encoder = load_encoder(config.encoder, weights=config.weights, device=config.device)
        config = with_cpu_plan(config, encoder.device.type)
        if encoder.device.type == "cpu" and config.num_threads is not None:
            torch.set_num_threads(config.num_threads)
        if encoder.should_compile(len(grid), config.compile):
            seconds = encoder.compile(batch_size=config.batch_size, precision=config.precision)
            if seconds is not None:
                result.timings["compile_s"] = round(seconds, 3)
        clock = time.perf_counter()
        provenance = _provenance(slide, grid, mask, encoder, config, result.params_hash, result.slide_id)
        with FeatureFileWriter(
            paths.features,
            num_tiles=len(grid),
            feature_dim=encoder.cfg.embed_dim,
            coords=grid.coords,
            provenance=provenance,
            dtype=config.features_dtype,
            tile_data={"ink_fraction": grid.ink_fractions},
        ) as writer:
            unreadable = _UnreadableTiles(slide, grid, config.max_unreadable_fraction, result)
            done = 0
            for start, feats in extract_features(
                slide,
                grid,
                encoder,
                batch_size=config.batch_size,
                num_workers=config.num_workers,
                precision=config.precision,
                on_unreadable=unreadable,
            ):
                writer.write(start, feats)
                done += len(feats)
                if on_tiles is not None:
                    on_tiles(done, len(grid))
            writer.drop_rows(unreadable.rows)
        if unreadable.rows:
            result.tiles = len(grid) - len(unreadable.rows)
            result.warnings.append(unreadable.warning())
        result.timings["features_s"] = round(time.perf_counter() - clock, 3)
        result.status, result.feature_path = "done", str(paths.features)


def with_cpu_plan(config: PreprocessConfig, device_type: str, *, slides_at_once: int = 1) -> PreprocessConfig:
    """`config` with the threads and decoding workers it leaves open (None) chosen for this machine
    by `plan_cpu_use`, for `slides_at_once` slides sharing its cores."""
    if config.num_threads is not None and config.num_workers is not None:
        return config
    plan = plan_cpu_use(device_type, slides_at_once=slides_at_once)
    return config.model_copy(update={
        "num_threads": config.num_threads if config.num_threads is not None else plan.threads,
        "num_workers": config.num_workers if config.num_workers is not None else plan.workers,
    })


def _check_quality(slide: SlideReader, mask: TissueMask, grid: TileGrid, result: SlideResult) -> None:
    """Record the slide's QC facts in `result.qc` and add a warning for each one that is off."""
    result.qc["background_rgb"] = list(mask.background_rgb) if mask.background_rgb else None
    result.qc["color_correction"] = slide.color_correction
    result.qc["tissue_coverage"] = round(tissue_coverage(grid, mask), 4)
    result.qc["padded_edge_tiles"] = grid.padded_tiles
    result.qc["ink_area_fraction"] = round(mask.ink_area_fraction, 4)
    inked = int((grid.ink_fractions >= INKED_TILE_FRACTION).sum()) if grid.ink_fractions is not None else 0
    result.qc["inked_tiles"] = inked
    warnings = [background_warning(mask)]
    if inked:
        warnings.append(
            f"marker ink covers at least {INKED_TILE_FRACTION:.0%} of {inked} of {len(grid)} kept tiles "
            "(ink_fraction in the feature file; --max-ink drops such tiles)"
        )
    for warning in warnings:
        if warning is not None:
            log.warning("%s: %s", result.slide_id, warning)
            result.warnings.append(warning)


def _write_tissue_outputs(
    slide: SlideReader,
    mask: TissueMask,
    grid: TileGrid,
    paths: OutputPaths,
    config: PreprocessConfig,
    warnings: list[str],
) -> None:
    save_png_atomic(Image.fromarray((mask.mask * 255).astype(np.uint8)), paths.mask)
    save_json_atomic(tissue_geojson(mask, name=paths.slide_id), paths.geojson)
    thumbnail = render_qc_thumbnail(slide, mask, grid, max_size=config.qc_max_size, warnings=warnings)
    save_png_atomic(thumbnail, paths.qc)


def _provenance(
    slide: SlideReader,
    grid: TileGrid,
    mask: TissueMask,
    encoder: Encoder,
    config: PreprocessConfig,
    params_hash: str,
    slide_id: str,
) -> FeatureProvenance:
    mpp = slide.mpp
    objective = slide.properties.get("openslide.objective-power")
    width, height = slide.dimensions
    return FeatureProvenance(
        slide_id=slide_id,
        slide_path=str(slide.path),
        slide_quick_hash=quick_hash(slide.path),
        slide_width=int(width),
        slide_height=int(height),
        slide_vendor=str(slide.vendor),
        mpp=float(mpp.mpp),
        mpp_source=mpp.source,
        target_mpp=float(config.tiling.target_mpp),
        tile_px=int(config.tiling.tile_px),
        tile_size_level0=int(grid.tile_size_level0),
        overlap_px=int(config.tiling.overlap_px),
        read_level=int(grid.read_level),
        read_size=int(grid.read_size),
        read_level_downsample=float(slide.level_downsamples[grid.read_level]),
        read_level_dimensions=tuple(int(v) for v in slide.level_dimensions[grid.read_level]),
        objective_power=float(objective) if objective else None,
        # 10 / mpp (not the nominal objective) so TRIDENT's loaders recompute the exact tile extent
        level0_magnification=round(10.0 / mpp.mpp, 4),
        target_magnification=round(10.0 / config.tiling.target_mpp, 3),
        encoder=encoder.cfg.name,
        encoder_weights=encoder.weights,
        encoder_weights_sha256=encoder.weights_sha256 or "",
        feature_dim=int(encoder.cfg.embed_dim),
        precision=resolve_precision(config.precision, encoder.cfg, encoder.device),
        transform=encoder.transform_info(),
        tissue={"method": "classical", **config.tissue.model_dump(), "area_fraction": mask.area_fraction},
        background_rgb=mask.background_rgb,
        color_correction=slide.color_correction,
        tiling=config.tiling.model_dump(),
        edge_padding=grid.edge_padding(),
        params_hash=params_hash,
        timm_version=timm.__version__,
        torch_version=torch.__version__,
        wsi_mil_version=__version__,
        created_utc=datetime.now(UTC).isoformat(timespec="seconds"),
    )
