"""The model card: what a trained model needs to be rebuilt, and to refuse features it was not trained on.

A card (`model_card.json`, beside the weights) records the architecture, the classes, the
`FeatureContract` of the features the model was trained on and, where those feature files recorded
it, the `PreprocessConfig` that made them, so a slide can be turned into the same features again.
The contract's fields, the flags that set them and the one contract check live here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_serializer

from wsi_mil import __version__
from wsi_mil.errors import FeatureContractError, RunFolderError, UnknownEncoderError
from wsi_mil.preprocessing.encoders import encoder_cfg
from wsi_mil.preprocessing.feature_file import FeatureBag
from wsi_mil.preprocessing.pipeline import PreprocessConfig
from wsi_mil.preprocessing.tiling import TilingParams
from wsi_mil.preprocessing.tissue import TissueParams

CARD_VERSION = 1
CARD_FILE = "model_card.json"
#: selection metrics where lower is better; all others are maximised
LOWER_IS_BETTER = frozenset({"loss"})
#: the `wsi-mil preprocess` flag that sets each checked contract field (error hints name it)
CONTRACT_FLAGS = {"encoder": "--encoder", "target_mpp": "--mpp", "tile_px": "--tile-px"}
#: the `PreprocessConfig` fields that decide a slide's features: what a card records of the config
PREPROCESS_FIELDS = ("tissue", "tiling", "encoder", "weights", "precision", "features_dtype")

PreprocessingSource = Literal["card", "feature_contract"]


class FeatureContract(BaseModel):
    """What features a model was trained on; features that differ are refused."""

    model_config = ConfigDict(frozen=True)

    encoder: str | None = None
    feature_dim: int
    target_mpp: float | None = None
    tile_px: int | None = None
    #: tile side in level-0 pixels; None when it differs between slides (it depends on slide mpp)
    tile_size_level0: int | None = None

    def check(self, bag: FeatureBag, *, source: str) -> None:
        """Raise `FeatureContractError` when `bag` differs from what the model was trained on.

        The feature dimension must match; encoder, target mpp and tile px must match where both
        sides record them. The message names `source`, the difference and the flag that fixes it.
        """
        if bag.feature_dim != self.feature_dim:
            raise FeatureContractError(
                f"{source} has {bag.feature_dim}-d features, the model expects {self.feature_dim}-d "
                f"({self.encoder or 'unknown encoder'}); extract features with the encoder the model was trained on"
            )
        recorded = {**bag.attrs, "encoder": bag.encoder}
        for key, flag in CONTRACT_FLAGS.items():
            expected, found = getattr(self, key), recorded.get(key)
            if expected is None or found is None:
                continue
            same = np.isclose(float(found), float(expected), rtol=1e-3) if key == "target_mpp" else found == expected
            if not same:
                raise FeatureContractError(
                    f"{source} was extracted with {key}={found!r}, the model expects {key}={expected!r}; "
                    f"re-extract with {flag} {expected}"
                )

    def mismatch(self, config: PreprocessConfig) -> str | None:
        """Why `config` cannot make features that meet this contract (None when it can)."""
        try:
            embed_dim = encoder_cfg(config.encoder).embed_dim
        except UnknownEncoderError as err:
            return f"the preprocessing names encoder {config.encoder!r}, which this installation lacks: {err}"
        made = {
            "encoder": config.encoder,
            "feature_dim": embed_dim,
            "tile_px": config.tiling.tile_px,
            "target_mpp": config.tiling.target_mpp,
        }
        for key, found in made.items():
            expected = getattr(self, key)
            if expected is not None and found != expected:
                return (
                    f"the card's preprocessing gives {key}={found!r} but its feature contract says "
                    f"{key}={expected!r}; fix the model card"
                )
        return None


def recorded_preprocessing(attrs: Mapping[str, Any]) -> PreprocessConfig | None:
    """The preprocessing a wsi_mil feature file records (tissue, tiling, encoder, weights,
    precision), or None when the file records none (CLAM/TRIDENT/`.pt` bags)."""
    tissue, tiling = attrs.get("tissue"), attrs.get("tiling")
    if not isinstance(tissue, dict) or not isinstance(tiling, dict) or not attrs.get("encoder"):
        return None
    weights = attrs.get("encoder_weights")
    return PreprocessConfig(
        # the record also holds provenance (method, area fraction) that is not a setting
        tissue=TissueParams(**{k: v for k, v in tissue.items() if k in TissueParams.model_fields}),
        tiling=TilingParams(**{k: v for k, v in tiling.items() if k in TilingParams.model_fields}),
        encoder=attrs["encoder"],
        # hub weights are found again by name; files and "random" are named explicitly
        weights=None if not weights or str(weights).startswith("hub:") else weights,
        precision=attrs.get("precision", "auto"),
    )


@dataclass(frozen=True)
class SlidePreprocessing:
    """How slides become a model's features: the config and where it came from, or why they cannot."""

    config: PreprocessConfig | None
    source: PreprocessingSource | None
    problem: str | None


class ModelCard(BaseModel):
    """What it takes to rebuild a trained model and to refuse features it was not trained on."""

    model_config = ConfigDict(protected_namespaces=())

    card_version: int = CARD_VERSION
    model_name: str
    model_kwargs: dict[str, Any]
    num_classes: int
    class_names: list[str]
    feature_contract: FeatureContract
    #: the preprocessing that made the training features, so slides can be processed the same way
    preprocessing: PreprocessConfig | None = None
    training_method: str
    method_kwargs: dict[str, Any] = Field(default_factory=dict)
    fold: int
    best_epoch: int
    epochs_run: int
    selection_metric: str
    metrics: dict[str, Any] = Field(default_factory=dict, description="val (and test) metrics of the best epoch")
    weights_file: str = "model.safetensors"
    wsi_mil_version: str = __version__
    created: str = Field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    @field_serializer("preprocessing")
    def _only_feature_settings(self, config: PreprocessConfig | None) -> dict[str, Any] | None:
        """Runtime knobs (batch size, workers, device) and the per-slide mpp are not the model's."""
        if config is None:
            return None
        return {k: v for k, v in config.model_dump(mode="json").items() if k in PREPROCESS_FIELDS}

    def validation_score(self) -> float | None:
        """The best epoch's validation value of the selection metric, signed so higher is better."""
        value = self.metrics.get("val", {}).get(self.selection_metric)
        if value is None:
            return None
        return -float(value) if self.selection_metric in LOWER_IS_BETTER else float(value)

    def slide_preprocessing(self) -> SlidePreprocessing:
        """The preprocessing that turns a slide into this model's features.

        The card's own `preprocessing` wins; without it the feature contract's encoder, target mpp
        and tile px give a config with default tissue settings. `problem` says why slides cannot
        be predicted with this model (feature files still can).
        """
        contract = self.feature_contract
        if self.preprocessing is not None:
            config, source = self.preprocessing, "card"
        elif contract.encoder and contract.target_mpp and contract.tile_px:
            config = PreprocessConfig(
                tiling=TilingParams(target_mpp=contract.target_mpp, tile_px=contract.tile_px),
                encoder=contract.encoder,
            )
            source = "feature_contract"
        else:
            return SlidePreprocessing(
                None,
                None,
                "the model card has no `preprocessing` and its feature contract lacks the encoder, "
                "target_mpp or tile_px; only feature-file predictions work",
            )
        return SlidePreprocessing(config, source, contract.mismatch(config))


def read_model_card(path: Path) -> ModelCard:
    """Load and validate a `model_card.json`; raises `RunFolderError` naming the file."""
    try:
        return ModelCard.model_validate_json(path.read_text())
    except OSError as err:
        raise RunFolderError(f"cannot read model card {path}: {err}; is this a finished training run?") from err
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'card'}: {e['msg']}" for e in err.errors())
        raise RunFolderError(f"model card {path} is malformed: {problems}") from err
