"""Attention localisation: how well a trained model's attention finds the tiles of a known region.

For slides with an annotated region (the demo cohort's lesion boxes, or a region inserted into
real tissue), each tile is positive when at least `min_overlap` of its area lies in the region;
the instance-level ROC-AUC of the attention scores against those labels says whether the model
attends to the region. Every slide is scored by the fold model that held it out (its test part),
so no slide is scored by a model that trained or selected on it.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

from wsi_mil.atomic import write_text_atomic
from wsi_mil.errors import RunFolderError
from wsi_mil.inference.loading import RunLayout, load_model
from wsi_mil.inference.predict import predict_bag, read_features
from wsi_mil.training.cohort import index_feature_files
from wsi_mil.training.splits import load_split

Region = tuple[int, int, int, int]  # level-0 (x, y, width, height)


@dataclass
class SlideLocalisation:
    """One slide's localisation score: instance AUC of attention vs tiles in the region."""

    slide_id: str
    fold: int
    tiles: int
    positive_tiles: int
    instance_auc: float | None
    #: the share of the attention mass on region tiles (chance: positive_tiles / tiles); NaN
    #: for models whose scores can be negative
    attention_in_region: float


def tiles_in_region(coords: np.ndarray, tile_size: int, region: Region, *, min_overlap: float = 0.5) -> np.ndarray:
    """`[N]` bool: tile i (level-0 top-left `coords[i]`, side `tile_size`) has ≥ `min_overlap` of its area in `region`."""
    x, y, w, h = region
    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    overlap_x = np.clip(np.minimum(coords[:, 0] + tile_size, x + w) - np.maximum(coords[:, 0], x), 0, None)
    overlap_y = np.clip(np.minimum(coords[:, 1] + tile_size, y + h) - np.maximum(coords[:, 1], y), 0, None)
    return overlap_x * overlap_y >= min_overlap * tile_size * tile_size


def instance_auc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """ROC-AUC of per-tile `scores` for the `positive` tiles; None when either class is absent."""
    positive = np.asarray(positive, dtype=bool)
    if positive.all() or not positive.any():
        return None
    return float(roc_auc_score(positive, np.asarray(scores, dtype=np.float64)))


def localise_run(
    run_dir: Path | str,
    features_dir: Path | str,
    regions: Mapping[str, Region],
    *,
    min_overlap: float = 0.5,
    device: str = "cpu",
) -> list[SlideLocalisation]:
    """Score every test-part slide of every finished fold that has a region in `regions`.

    The features must carry level-0 coords and their tile size (our, CLAM's and TRIDENT's files do).
    """
    layout = RunLayout(Path(run_dir))
    folds = layout.folds()
    if not folds:
        raise RunFolderError(f"{layout.root} has no finished fold; train it first")
    files = index_feature_files(Path(features_dir))
    missing = sorted(set(regions) - set(files))
    if missing:
        raise RunFolderError(f"no feature file in {features_dir} for slides with a region: {', '.join(missing[:5])}")
    results = []
    for fold in folds:
        split = load_split(layout.split(fold), fold=fold)
        test_ids = [slide_id for slide_id in split.test if slide_id in regions]
        if not test_ids:
            continue
        model = load_model(layout.root, fold=fold, device=device)
        for slide_id in test_ids:
            bag = read_features(files[slide_id], model)
            if bag.coords is None or bag.tile_size_level0 is None:
                raise RunFolderError(f"{bag.path} has no level-0 coords or tile size; localisation needs both")
            attention = predict_bag(model, bag.features).attention
            positive = tiles_in_region(bag.coords, bag.tile_size_level0, regions[slide_id], min_overlap=min_overlap)
            nonnegative = bool((attention >= 0).all() and attention.sum() > 0)
            mass = float(attention[positive].sum() / attention.sum()) if nonnegative else float("nan")
            results.append(SlideLocalisation(
                slide_id, fold, len(positive), int(positive.sum()), instance_auc(attention, positive), mass,
            ))
    return results


def read_regions(path: Path | str) -> dict[str, Region]:
    """Regions from JSON: `{"slide_id": [x, y, w, h], ...}`, or a list of objects with `slide_id` and
    `region` or `lesion_box` (the demo's `cohort.json`; entries whose box is null are skipped)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise RunFolderError(f"cannot read regions from {path}: {err}") from err
    if isinstance(data, list):
        data = {item.get("slide_id"): item.get("region", item.get("lesion_box")) for item in data if isinstance(item, dict)}
    if not isinstance(data, dict):
        raise RunFolderError(f"{path}: regions must be a JSON object {{slide_id: [x, y, w, h]}} or a list of objects")
    regions: dict[str, Region] = {}
    for slide_id, box in data.items():
        if box is None:
            continue
        if not isinstance(slide_id, str) or not isinstance(box, list | tuple) or len(box) != 4 \
                or not all(isinstance(v, int | float) for v in box) or box[2] <= 0 or box[3] <= 0:
            raise RunFolderError(f"{path}: region of {slide_id!r} must be [x, y, width, height] in level-0 pixels, got {box!r}")
        x, y, w, h = (int(v) for v in box)
        regions[slide_id] = (x, y, w, h)
    if not regions:
        raise RunFolderError(f"{path} holds no region")
    return regions


def summarise_localisation(results: Sequence[SlideLocalisation]) -> dict[str, Any]:
    """Mean, sd, min and count of the per-slide instance AUCs (slides with both tile classes)."""
    aucs = [r.instance_auc for r in results if r.instance_auc is not None]
    return {
        "slides": len(aucs),
        "instance_auc_mean": statistics.mean(aucs) if aucs else None,
        "instance_auc_sd": statistics.stdev(aucs) if len(aucs) > 1 else None,
        "instance_auc_min": min(aucs) if aucs else None,
        "attention_in_region_mean": statistics.mean(r.attention_in_region for r in results) if results else None,  # NaN if any slide has none
        "positive_tile_fraction_mean": statistics.mean(r.positive_tiles / r.tiles for r in results) if results else None,
    }


def save_localisation(results: Sequence[SlideLocalisation], path: Path | str) -> None:
    """Write the summary and the per-slide results as JSON (atomically)."""
    payload = {"summary": summarise_localisation(results), "slides": [vars(r) for r in results]}
    write_text_atomic(path, json.dumps(payload, indent=2))
