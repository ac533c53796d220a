"""Loading a trained model: the run-folder layout and one `load_model(folder)`.

Two folder kinds hold trained models:
- a model folder: `model_card.json` + the weights file it names (`model.safetensors`); each
  finished fold of a training run (`<run>/fold_<k>/`) is one;
- a training run folder (`wsi-mil train --out`): `config.yaml` and one model folder per fold;
  `load_model(run)` takes the fold with the best validation score, `load_model(run, fold=k)` fold k.

Layout of a run folder::

    config.yaml               resolved TrainConfig
    splits/fold_<k>.csv       slide_id, case_id, label, split (train/val/test)
    fold_<k>/model.safetensors  best weights by the validation metric
    fold_<k>/model_card.json  model, classes, feature contract, method, metrics, version, time
    fold_<k>/last.pt          resumable state after the last finished epoch
    metrics.json              per fold (val/test, bootstrap 95% CIs), mean ± sd, pooled test
    predictions.csv           per slide: fold, split, label, probabilities, top-attention tiles
    roc.png, confusion.png    test ROC curves and the pooled test confusion matrix
    train.log                 the training log
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model as load_safetensors

from wsi_mil.errors import RunFolderError, WsiMilError
from wsi_mil.inference.card import CARD_FILE, ModelCard, PreprocessingSource, read_model_card
from wsi_mil.models import MILModel, create_model
from wsi_mil.preprocessing.pipeline import PreprocessConfig


@dataclass(frozen=True)
class RunLayout:
    """Paths inside a training run folder."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"

    @property
    def predictions(self) -> Path:
        return self.root / "predictions.csv"

    @property
    def roc(self) -> Path:
        return self.root / "roc.png"

    @property
    def confusion(self) -> Path:
        return self.root / "confusion.png"

    @property
    def log(self) -> Path:
        return self.root / "train.log"

    def split(self, fold: int) -> Path:
        return self.root / "splits" / f"fold_{fold}.csv"

    def fold_dir(self, fold: int) -> Path:
        return self.root / f"fold_{fold}"

    def model(self, fold: int) -> Path:
        return self.fold_dir(fold) / "model.safetensors"

    def card(self, fold: int) -> Path:
        return self.fold_dir(fold) / CARD_FILE

    def last_checkpoint(self, fold: int) -> Path:
        return self.fold_dir(fold) / "last.pt"

    def folds(self) -> list[int]:
        """Folds with a model card (finished folds), ascending."""
        found = []
        for path in self.root.glob(f"fold_*/{CARD_FILE}"):
            suffix = path.parent.name.removeprefix("fold_")
            if suffix.isdigit():
                found.append(int(suffix))
        return sorted(found)


@dataclass(frozen=True)
class LoadedModel:
    """A trained model in use: the network (eval mode, on `device`), its card and folder, and the
    preprocessing that turns a slide into its features (`slide_problem` says why none can)."""

    model: MILModel
    card: ModelCard
    folder: Path
    device: torch.device
    weights_sha256: str
    preprocessing: PreprocessConfig | None
    preprocessing_source: PreprocessingSource | None
    slide_problem: str | None

    @property
    def class_names(self) -> list[str]:
        return self.card.class_names

    def slide_config(self, **runtime: Any) -> PreprocessConfig:
        """The preprocessing for slides, with runtime knobs (`batch_size`, `num_workers`, `device`)
        replaced; raises `WsiMilError` naming the reason when this model cannot predict slides."""
        if self.preprocessing is None or self.slide_problem is not None:
            raise WsiMilError(f"model {self.folder.name!r} cannot predict slides: {self.slide_problem}")
        return self.preprocessing.model_copy(update={k: v for k, v in runtime.items() if v is not None})


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


def _resolve_weights(weights: str | None, folder: Path) -> str | None:
    """Encoder weights named relative to the model folder become absolute paths."""
    if weights is None or weights == "random" or Path(weights).is_absolute():
        return weights
    candidate = folder / weights
    return str(candidate) if candidate.exists() else weights


def _load_model_folder(folder: Path, device: torch.device) -> LoadedModel:
    card_path = folder / CARD_FILE
    card = read_model_card(card_path)
    if len(card.class_names) != card.num_classes:
        raise RunFolderError(f"{card_path}: {len(card.class_names)} class names for {card.num_classes} classes")
    try:
        model = create_model(card.model_name, card.feature_contract.feature_dim, card.num_classes, **card.model_kwargs)
    except (TypeError, WsiMilError) as err:
        raise RunFolderError(f"{card_path}: cannot build model {card.model_name!r}: {err}") from err
    weights = folder / card.weights_file
    try:
        load_safetensors(model, str(weights), strict=True)
    except (OSError, RuntimeError, SafetensorError) as err:
        raise RunFolderError(f"cannot load weights {weights} into {card.model_name}: {err}") from err
    slides = card.slide_preprocessing()
    config = slides.config
    if config is not None:
        config = config.model_copy(update={"weights": _resolve_weights(config.weights, folder)})
    return LoadedModel(
        model=model.to(device).eval(),
        card=card,
        folder=folder,
        device=device,
        weights_sha256=_sha256(weights),
        preprocessing=config,
        preprocessing_source=slides.source,
        slide_problem=slides.problem,
    )


def _best_fold(layout: RunLayout, folds: list[int]) -> int:
    """The fold whose best epoch has the best validation score (ties: the lowest fold)."""

    def key(fold: int) -> tuple[float, int]:
        score = read_model_card(layout.card(fold)).validation_score()
        return (-score if score is not None else float("inf"), fold)

    return min(folds, key=key)


def load_model(folder: Path | str, *, fold: int | None = None, device: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild a trained model (eval mode, on `device`) from a model folder or a training run folder.

    For a run folder `fold=None` picks the fold with the best validation value of the run's
    selection metric (the test part never decides); a model folder takes no `fold`.
    """
    path, target = Path(folder), torch.device(device)
    if (path / CARD_FILE).is_file():
        if fold is not None:
            raise RunFolderError(f"{path} is one model folder; --fold applies to training run folders")
        return _load_model_folder(path, target)
    layout = RunLayout(path)
    folds = layout.folds()
    if not folds:
        raise RunFolderError(
            f"{path} holds no model: neither {CARD_FILE} nor a finished fold (fold_<k>/{CARD_FILE}); "
            "train it first or name a model folder"
        )
    if fold is None:
        fold = _best_fold(layout, folds)
    elif fold not in folds:
        raise RunFolderError(f"{path} has no finished fold {fold}; it has folds {folds} (--fold)")
    return _load_model_folder(layout.fold_dir(fold), target)
