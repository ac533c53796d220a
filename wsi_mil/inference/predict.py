"""Predictions with a trained model: one bag, one feature file, one slide.

`predict_bag` is the one place a model's `MILOutput` becomes per-tile scores, `read_features` the one
place a feature file is read and checked for inference, and `predict_slide` turns a slide into the
model's features (the card's preprocessing), runs the model and keeps every tile's scores. Python
users, `wsi-mil predict`, `POST /v1/predictions` and the service's slide jobs all go through them.
"""

from __future__ import annotations

import csv
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from wsi_mil.atomic import atomic_open, write_json_atomic
from wsi_mil.errors import FeatureFileError, WsiMilError
from wsi_mil.inference.heatmaps import (
    HeatmapOptions,
    TileScores,
    canvas_size,
    render_heatmap,
    tile_columns,
)
from wsi_mil.inference.loading import LoadedModel
from wsi_mil.preprocessing.encoders import Encoder, load_encoder
from wsi_mil.preprocessing.feature_file import FeatureBag, FeatureLimits, read_feature_file
from wsi_mil.preprocessing.pipeline import OutputPaths, SlideResult, preprocess_slide
from wsi_mil.preprocessing.slide import open_slide

#: name under which per-tile class probabilities (`MILOutput.instance_logits`) are stored
TILE_PROBABILITY = "tile_probability"
#: name under which each tile's own probability (`MILOutput.instance_scores`, e.g. INS) is stored
INSTANCE_SCORE = "instance_score"
#: longer side of the slide thumbnail a slide prediction keeps for heatmaps
THUMBNAIL_MAX_SIZE = 2048
#: feature-file suffixes `wsi-mil predict` reads as features; anything else is opened as a slide
FEATURE_SUFFIXES = (".h5", ".hdf5", ".pt", ".pth")


@dataclass(frozen=True)
class BagPrediction:
    """A bag's prediction: logits and softmax probabilities `[C]`, attention `[N]`, maps `{name: [K, N]}`."""

    class_names: tuple[str, ...]
    logits: np.ndarray
    probabilities: np.ndarray
    attention: np.ndarray
    maps: dict[str, np.ndarray]
    #: the fold of the model that made it (its card's `fold`)
    fold: int

    @property
    def predicted_index(self) -> int:
        """Index of the most probable class."""
        return int(np.argmax(self.probabilities))

    @property
    def predicted_class(self) -> str:
        """Name of the most probable class."""
        return self.class_names[self.predicted_index]

    @property
    def class_probabilities(self) -> dict[str, float]:
        """Probability of each class, by name."""
        return {name: float(p) for name, p in zip(self.class_names, self.probabilities, strict=True)}

    @property
    def num_tiles(self) -> int:
        return int(self.attention.shape[0])

    def tile_columns(self) -> dict[str, np.ndarray]:
        """Every per-tile score as a named column `[N]` (attention, then each map row)."""
        return tile_columns(self.attention, self.maps, self.class_names)

    def summary(self) -> dict[str, Any]:
        """JSON-ready slide-level result (no per-tile arrays)."""
        return {
            "class_names": list(self.class_names),
            "probabilities": self.class_probabilities,
            "predicted_class": self.predicted_class,
            "predicted_index": self.predicted_index,
            "logits": [float(v) for v in self.logits],
            "n_tiles": self.num_tiles,
            "maps": sorted(self.maps),
        }


def _rows_of_one_bag(values: torch.Tensor) -> np.ndarray:
    """A map of one bag, `[1, K, N]` or `[1, N]`, as float32 `[K, N]`."""
    array = values.detach().float().cpu().numpy()[0]
    return array[None, :] if array.ndim == 1 else array


@torch.inference_mode()
def predict_bag(model: LoadedModel, features: np.ndarray | torch.Tensor) -> BagPrediction:
    """Run the model on one bag `features [N, D]`: probabilities, attention and every per-tile map.

    Per-tile class probabilities (softmax of `MILOutput.instance_logits`) are stored as the map
    `tile_probability` `[C, N]` for models that give instance logits, and each tile's own score
    (`MILOutput.instance_scores`) as the map `instance_score` `[1, N]` for models that give one.
    """
    bag = torch.as_tensor(np.asarray(features, dtype=np.float32)).to(model.device)
    output = model.model(bag.unsqueeze(0))  # [1, N, D] -> batch of one
    logits = output.logits.detach().float().cpu()[0]  # [C]
    maps = {name: _rows_of_one_bag(values) for name, values in output.maps.items()}
    if output.instance_logits is not None:
        tile_probs = torch.softmax(output.instance_logits.detach().float().cpu()[0], dim=-1)  # [N, C]
        maps[TILE_PROBABILITY] = tile_probs.T.numpy()  # [C, N]
    if output.instance_scores is not None:
        maps[INSTANCE_SCORE] = _rows_of_one_bag(output.instance_scores)  # [1, N]
    return BagPrediction(
        class_names=tuple(model.class_names),
        logits=logits.numpy(),
        probabilities=torch.softmax(logits, dim=-1).numpy(),
        attention=output.attention.detach().float().cpu().numpy()[0],
        maps=maps,
        fold=model.card.fold,
    )


def read_features(
    path: str | Path,
    model: LoadedModel,
    *,
    source: str | None = None,
    limits: FeatureLimits | None = None,
) -> FeatureBag:
    """Read a feature file for `model`: `FeatureFileError` when it is not a usable feature file
    (reaches other files, declares more than `limits`, mistyped fields, no tiles),
    `FeatureContractError` when its features are not what the model was trained on (both name
    `source`, by default the path)."""
    source = source or str(path)
    try:
        bag = read_feature_file(path, limits=limits)
    except FeatureFileError as err:
        raise FeatureFileError(f"{source} is not a usable feature file: {err}") from err
    if bag.num_tiles == 0:
        raise FeatureFileError(f"{source} holds no tiles (an empty bag): there is nothing to predict")
    model.card.feature_contract.check(bag, source=source)
    return bag


@dataclass(frozen=True)
class SlidePrediction:
    """One slide's prediction with every tile's scores, in tile order.

    `coords [N, 2]` are level-0 top-left pixels (None for feature files without coordinates);
    slide predictions also keep a thumbnail, the tissue mask and the preprocessing record.
    """

    slide_id: str
    prediction: BagPrediction
    coords: np.ndarray | None
    tile_size_level0: int | None
    #: level-0 (width, height); for feature files without it, the extent of the tiles
    slide_size: tuple[int, int] | None
    thumbnail: Image.Image | None = None
    tissue_mask: Image.Image | None = None
    #: the preprocessing record of a slide (mpp and its source, timings)
    preprocessing: SlideResult | None = None
    #: the feature file the prediction was made from, when it was kept
    feature_path: Path | None = None

    @property
    def scores(self) -> TileScores:
        """The per-tile scores with their level-0 boxes (what heatmaps and GeoJSON are drawn from)."""
        if self.coords is None or self.tile_size_level0 is None or self.slide_size is None:
            raise WsiMilError(f"{self.slide_id}: the features have no tile coordinates; heatmaps cannot be drawn")
        return TileScores(
            coords=self.coords,
            tile_size_level0=self.tile_size_level0,
            attention=self.prediction.attention,
            maps=self.prediction.maps,
            class_names=self.prediction.class_names,
            slide_width=self.slide_size[0],
            slide_height=self.slide_size[1],
        )

    def heatmap(self, options: HeatmapOptions | None = None) -> Image.Image:
        """The heatmap over the whole slide, on the thumbnail (where there is one) and clipped to tissue."""
        return render_heatmap(
            self.scores, options or HeatmapOptions(), thumbnail=self.thumbnail, tissue_mask=self.tissue_mask
        )

    def save_heatmap(self, path: str | Path, options: HeatmapOptions | None = None) -> Path:
        """Write `heatmap(options)` as a PNG (atomically); returns the path."""
        with atomic_open(path, "wb") as stream:
            self.heatmap(options).save(stream, format="PNG")
        return Path(path)


def _slide_size(bag: FeatureBag) -> tuple[int, int] | None:
    """Level-0 (width, height) a feature file records, else the extent of its tiles."""
    width, height = bag.attrs.get("slide_width"), bag.attrs.get("slide_height")
    if width and height:
        return int(width), int(height)
    if bag.coords is None or bag.tile_size_level0 is None or len(bag.coords) == 0:
        return None
    right, bottom = bag.coords.max(axis=0) + bag.tile_size_level0
    return int(right), int(bottom)


def predict_features(
    path: str | Path,
    model: LoadedModel,
    *,
    source: str | None = None,
    limits: FeatureLimits | None = None,
) -> SlidePrediction:
    """Predict a slide from its feature file (checked by `read_features`)."""
    bag = read_features(path, model, source=source, limits=limits)
    return SlidePrediction(
        slide_id=bag.slide_id,
        prediction=predict_bag(model, bag.features),
        coords=bag.coords,
        tile_size_level0=bag.tile_size_level0,
        slide_size=_slide_size(bag),
        feature_path=Path(path),
    )


def predict_slide(
    slide: str | Path,
    model: LoadedModel,
    *,
    encoder: Encoder | None = None,
    out_dir: str | Path | None = None,
    slide_id: str | None = None,
    mpp_override: float | None = None,
    batch_size: int | None = None,
    num_workers: int | None = None,
    on_tiles: Callable[[int, int], None] | None = None,
) -> SlidePrediction:
    """Predict a slide: the model card's preprocessing (tissue, tiles, features), then the model.

    `encoder` reuses a loaded patch encoder (else the card's is loaded on the model's device).
    Preprocessing outputs (features, tissue mask, QC thumbnail) go to `out_dir` when given, else
    to a temporary folder that is removed. `on_tiles(done, total)` reports feature progress and
    may raise to stop. Raises `WsiMilError` when the model cannot predict slides, the slide has
    no tissue, or the slide cannot be processed (the message says why).
    """
    slide_path = Path(slide)
    slide_id = slide_id or slide_path.stem
    config = model.slide_config(batch_size=batch_size, num_workers=num_workers, device=str(model.device))
    if encoder is None:
        encoder = load_encoder(config.encoder, weights=config.weights, device=model.device)
    with tempfile.TemporaryDirectory(prefix="wsi-mil-predict-") as scratch:
        work = Path(out_dir) if out_dir is not None else Path(scratch)
        record = preprocess_slide(
            slide_path, work, config, slide_id=slide_id, mpp_override=mpp_override, encoder=encoder, on_tiles=on_tiles
        )
        if record.status == "no_tissue":
            raise WsiMilError(f"no tissue: {record.reason}")
        if record.status != "done" or record.feature_path is None:
            raise WsiMilError(record.reason or f"preprocessing ended with status {record.status}")
        bag = read_features(record.feature_path, model, source=slide_path.name)
        mask_path = OutputPaths(work, slide_id).mask
        tissue_mask = Image.open(mask_path).copy() if mask_path.is_file() else None
    with open_slide(slide_path, mpp_override=mpp_override) as reader:
        width, height = reader.dimensions
        thumbnail = Image.fromarray(reader.read_resampled(canvas_size(width, height, max_size=THUMBNAIL_MAX_SIZE)))
    return SlidePrediction(
        slide_id=slide_id,
        prediction=predict_bag(model, bag.features),
        coords=bag.coords,
        tile_size_level0=bag.tile_size_level0,
        slide_size=(int(width), int(height)),
        thumbnail=thumbnail,
        tissue_mask=tissue_mask,
        preprocessing=record,
        feature_path=Path(record.feature_path) if out_dir is not None else None,
    )


def save_predictions(predictions: Sequence[SlidePrediction], path: str | Path) -> None:
    """Write predictions as JSON (one object per slide, every tile's scores) or CSV (one row per tile)."""
    path = Path(path)
    if path.suffix.lower() == ".json":
        payload = [
            {
                "slide_id": p.slide_id,
                "fold": p.prediction.fold,
                "predicted": p.prediction.predicted_class,
                "probabilities": p.prediction.class_probabilities,
                "coords": None if p.coords is None else p.coords.tolist(),
                "tile_size_level0": p.tile_size_level0,
                "tile_scores": {name: values.tolist() for name, values in p.prediction.tile_columns().items()},
            }
            for p in predictions
        ]
        write_json_atomic(payload, path)
        return
    if path.suffix.lower() != ".csv":
        raise WsiMilError(f"predictions file {path} must end in .csv or .json (--out)")
    class_names = list(predictions[0].prediction.class_names) if predictions else []
    columns = sorted({name for p in predictions for name in p.prediction.tile_columns()}, key=lambda n: (n != "attention", n))
    with atomic_open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["slide_id", "fold", "predicted", *[f"prob_{n}" for n in class_names], "tile_index", "x", "y", *columns])
        for p in predictions:
            probs = [p.prediction.class_probabilities[n] for n in class_names]
            table = p.prediction.tile_columns()
            for i in range(p.prediction.num_tiles):
                x, y = ("", "") if p.coords is None else (int(p.coords[i, 0]), int(p.coords[i, 1]))
                scores = [float(table[c][i]) if c in table else "" for c in columns]
                writer.writerow([p.slide_id, p.prediction.fold, p.prediction.predicted_class, *probs, i, x, y, *scores])
