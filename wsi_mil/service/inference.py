"""One bag through a served model: the feature-contract check, the forward pass, probabilities and maps.

Shared by synchronous feature-file predictions and slide jobs, so both give identical numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from wsi_mil.preprocessing.feature_file import FeatureBag
from wsi_mil.service.model_registry import ServedModel
from wsi_mil.training.run import check_feature_contract

#: name under which per-tile class probabilities (`MILOutput.instance_logits`) are stored
TILE_PROBABILITY = "tile_probability"


@dataclass(frozen=True)
class BagPrediction:
    """A bag's prediction: logits and softmax probabilities `[C]`, attention `[N]`, maps `{name: [K, N]}`."""

    class_names: tuple[str, ...]
    logits: np.ndarray
    probabilities: np.ndarray
    attention: np.ndarray
    maps: dict[str, np.ndarray]

    @property
    def predicted_index(self) -> int:
        """Index of the most probable class."""
        return int(np.argmax(self.probabilities))

    @property
    def predicted_class(self) -> str:
        """Name of the most probable class."""
        return self.class_names[self.predicted_index]

    def summary(self) -> dict[str, Any]:
        """JSON-ready slide-level result (no per-tile arrays)."""
        return {
            "class_names": list(self.class_names),
            "probabilities": {
                name: float(p) for name, p in zip(self.class_names, self.probabilities, strict=True)
            },
            "predicted_class": self.predicted_class,
            "predicted_index": self.predicted_index,
            "logits": [float(v) for v in self.logits],
            "n_tiles": int(self.attention.shape[0]),
            "maps": sorted(self.maps),
        }


def _as_rows(values: torch.Tensor) -> np.ndarray:
    """A map of one bag, `[1, K, N]` or `[1, N]`, as float32 `[K, N]`."""
    array = values.detach().float().cpu().numpy()[0]
    return array[None, :] if array.ndim == 1 else array


def predict_bag(served: ServedModel, bag: FeatureBag, *, source: str) -> BagPrediction:
    """Check `bag` against the model's feature contract, then run the model on it.

    Raises `FeatureContractError` (naming `source` and the mismatch) for features the model was
    not trained on.
    """
    check_feature_contract(
        served.card.feature_contract, dict(bag.attrs), feature_dim=bag.feature_dim, source=source
    )
    output = served.predict(bag.features)
    logits = output.logits.detach().float().cpu()[0]  # [C]
    maps = {name: _as_rows(values) for name, values in output.maps.items()}
    if output.instance_logits is not None:
        tile_probs = torch.softmax(
            output.instance_logits.detach().float().cpu()[0], dim=-1
        )  # [N, C]
        maps[TILE_PROBABILITY] = tile_probs.T.numpy()  # [C, N]
    return BagPrediction(
        class_names=tuple(served.card.class_names),
        logits=logits.numpy(),
        probabilities=torch.softmax(logits, dim=-1).numpy(),
        attention=output.attention.detach().float().cpu().numpy()[0],
        maps=maps,
    )
