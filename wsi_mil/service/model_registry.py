"""The models a service instance serves, loaded once at start-up from `models_dir`.

Two folder kinds are recognised anywhere under `models_dir`:
- a model folder: `model_card.json` + the weights file it names (`model.safetensors`), served under
  its path relative to `models_dir` (e.g. `tumor_abmil`);
- a training run folder (`wsi_mil.training.run` layout): each finished `fold_<k>` is served as
  `<run>/fold_<k>`, loaded with the trainer's `load_model_from_run`.

A folder that fails to load is reported (`problems`, `/readyz`) instead of stopping the service.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import ValidationError
from safetensors.torch import load_model

from wsi_mil.errors import (
    RunFolderError,
    TrainingConfigError,
    UnknownEncoderError,
    UnknownModelError,
    WsiMilError,
)
from wsi_mil.models import MILModel, MILOutput
from wsi_mil.preprocessing.encoders import default_device, encoder_cfg
from wsi_mil.preprocessing.pipeline import PreprocessConfig
from wsi_mil.preprocessing.tiling import TilingParams
from wsi_mil.training.run import ModelCard, build_model, load_model_from_run, read_model_card

log = logging.getLogger(__name__)

CARD_FILE = "model_card.json"
#: the `PreprocessConfig` fields a model card's `preprocessing` dict may carry (what decides features)
PREPROCESSING_FIELDS = ("tissue", "tiling", "encoder", "weights", "precision", "features_dtype")
_FOLD_DIR = re.compile(r"fold_(\d+)")

PreprocessingSource = Literal["card", "feature_contract"]


@dataclass(frozen=True)
class ServedModel:
    """A loaded model (eval mode) with its card and, where known, the preprocessing that made its features.

    `slide_job_problem` says why slide jobs cannot run with this model (None when they can);
    feature-file predictions work regardless.
    """

    name: str
    card: ModelCard
    model: MILModel
    device: torch.device
    folder: Path
    weights_sha256: str
    preprocessing: PreprocessConfig | None
    preprocessing_source: PreprocessingSource | None
    slide_job_problem: str | None

    @torch.inference_mode()
    def predict(self, features: np.ndarray) -> MILOutput:
        """Run the model on one bag `features [N, D]` (float32); the output has batch size 1."""
        bag = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)).to(self.device)
        return self.model(bag.unsqueeze(0))  # [1, N, D]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


def _raw_card(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise RunFolderError(f"cannot read model card {path}: {err}") from err
    if not isinstance(raw, dict):
        raise RunFolderError(f"model card {path} is not a JSON object")
    return raw


def _resolve_weights(weights: str | None, folder: Path) -> str | None:
    """Encoder weights named relative to the model folder become absolute paths."""
    if weights is None or weights == "random" or Path(weights).is_absolute():
        return weights
    candidate = folder / weights
    return str(candidate) if candidate.exists() else weights


def preprocessing_of(
    card: ModelCard, raw_card: dict[str, Any], folder: Path
) -> tuple[PreprocessConfig | None, PreprocessingSource | None, str | None]:
    """The preprocessing contract of a card: `(config, source, problem)`.

    The card's `preprocessing` dict wins; without it the feature contract's encoder, target mpp and
    tile px give a config with default tissue settings. `problem` says why slide jobs cannot run.
    """
    contract = card.feature_contract
    raw = raw_card.get("preprocessing")
    if isinstance(raw, dict):
        values = {key: raw[key] for key in PREPROCESSING_FIELDS if key in raw}
        try:
            config = PreprocessConfig.model_validate(values)
        except ValidationError as err:
            return (
                None,
                None,
                f"the model card's `preprocessing` is invalid: {err.errors()[0]['msg']}",
            )
        config = config.model_copy(update={"weights": _resolve_weights(config.weights, folder)})
        source: PreprocessingSource = "card"
    elif contract.encoder and contract.target_mpp and contract.tile_px:
        config = PreprocessConfig(
            tiling=TilingParams(target_mpp=contract.target_mpp, tile_px=contract.tile_px),
            encoder=contract.encoder,
        )
        source = "feature_contract"
    else:
        return (
            None,
            None,
            (
                "the model card has no `preprocessing` and its feature contract lacks the encoder, "
                "target_mpp or tile_px; only feature-file predictions (POST /v1/predictions) work"
            ),
        )
    return config, source, _contract_mismatch(card, config)


def _contract_mismatch(card: ModelCard, config: PreprocessConfig) -> str | None:
    contract = card.feature_contract
    try:
        embed_dim = encoder_cfg(config.encoder).embed_dim
    except UnknownEncoderError as err:
        return f"the preprocessing names encoder {config.encoder!r}, which this installation lacks: {err}"
    checks = [
        ("encoder", contract.encoder, config.encoder),
        ("feature_dim", contract.feature_dim, embed_dim),
        ("tile_px", contract.tile_px, config.tiling.tile_px),
        ("target_mpp", contract.target_mpp, config.tiling.target_mpp),
    ]
    for key, expected, found in checks:
        if expected is not None and found != expected:
            return (
                f"the card's preprocessing gives {key}={found!r} but its feature contract says "
                f"{key}={expected!r}; fix the model card"
            )
    return None


class ModelRegistry:
    """Served models by name, plus the folders that could not be loaded and why."""

    def __init__(
        self, models: dict[str, ServedModel], problems: dict[str, str] | None = None
    ) -> None:
        self._models = dict(sorted(models.items()))
        self.problems = dict(problems or {})

    def __len__(self) -> int:
        return len(self._models)

    def __contains__(self, name: object) -> bool:
        return name in self._models

    def names(self) -> list[str]:
        """Served model names, sorted."""
        return list(self._models)

    def models(self) -> list[ServedModel]:
        """Served models, sorted by name."""
        return list(self._models.values())

    def get(self, name: str) -> ServedModel:
        """The model served as `name`; raises `UnknownModelError` listing the served names."""
        try:
            return self._models[name]
        except KeyError:
            served = ", ".join(self._models) or "none (check WSI_MIL_MODELS_DIR / --models)"
            raise UnknownModelError(
                f"no model named {name!r} is served; served models: {served}"
            ) from None

    @classmethod
    def load(
        cls, models_dir: str | Path, *, device: str | torch.device | None = None
    ) -> ModelRegistry:
        """Load every model folder and training-run fold under `models_dir` onto `device`."""
        root = Path(models_dir)
        target = torch.device(device) if device is not None else default_device()
        models: dict[str, ServedModel] = {}
        problems: dict[str, str] = {}
        if not root.is_dir():
            problems[str(root)] = "models_dir does not exist; set WSI_MIL_MODELS_DIR or --models"
            return cls(models, problems)
        for card_path in sorted(root.rglob(CARD_FILE)):
            folder = card_path.parent
            name = folder.relative_to(root).as_posix() if folder != root else folder.name
            try:
                models[name] = _load_folder(name, folder, target)
            except (WsiMilError, OSError, RuntimeError, ValueError) as err:
                problems[name] = str(err)
                log.warning("model folder %s not served: %s", folder, err)
        log.info("serving %d model(s) from %s: %s", len(models), root, ", ".join(models) or "none")
        return cls(models, problems)


def _is_run_fold(folder: Path) -> int | None:
    """The fold number when `folder` is `fold_<k>` of a training run folder, else None."""
    match = _FOLD_DIR.fullmatch(folder.name)
    if match and (folder.parent / "config.yaml").is_file():
        return int(match.group(1))
    return None


def _load_folder(name: str, folder: Path, device: torch.device) -> ServedModel:
    card_path = folder / CARD_FILE
    raw = _raw_card(card_path)
    fold = _is_run_fold(folder)
    if fold is not None:
        model, card = load_model_from_run(folder.parent, fold, device=str(device))
    else:
        card = read_model_card(card_path)
        weights = folder / card.weights_file
        try:
            model = build_model(
                card.model_name,
                card.feature_contract.feature_dim,
                card.num_classes,
                card.model_kwargs,
            )
            load_model(model, str(weights), strict=True)
        except TrainingConfigError as err:
            raise RunFolderError(f"{card_path}: {err}") from err
        except (OSError, RuntimeError) as err:
            raise RunFolderError(
                f"cannot load weights {weights} into {card.model_name}: {err}"
            ) from err
        model = model.to(device).eval()
    if len(card.class_names) != card.num_classes:
        raise RunFolderError(
            f"{card_path}: {len(card.class_names)} class names for {card.num_classes} classes"
        )
    config, source, problem = preprocessing_of(card, raw, folder)
    return ServedModel(
        name=name,
        card=card,
        model=model,
        device=device,
        folder=folder,
        weights_sha256=_sha256(folder / card.weights_file),
        preprocessing=config,
        preprocessing_source=source,
        slide_job_problem=problem,
    )
