"""The models a service instance serves, loaded once at start-up from `models_dir`.

Every model folder (`model_card.json` + its weights) anywhere under `models_dir` is served under its
path relative to `models_dir`: a plain folder as e.g. `tumor_abmil`, each finished fold of a training
run folder as `<run>/fold_<k>`. Loading is `wsi_mil.inference.load_model`. A folder that fails to load
is reported (`problems`, `/readyz`) instead of stopping the service.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from wsi_mil.errors import UnknownModelError, WsiMilError
from wsi_mil.inference.card import CARD_FILE
from wsi_mil.inference.loading import LoadedModel, load_model
from wsi_mil.preprocessing.encoders import default_device

log = logging.getLogger(__name__)


class ModelRegistry:
    """Served models by name, plus the folders that could not be loaded and why."""

    def __init__(self, models: dict[str, LoadedModel], problems: dict[str, str] | None = None) -> None:
        self._models = dict(sorted(models.items()))
        self.problems = dict(problems or {})

    def __len__(self) -> int:
        return len(self._models)

    def __contains__(self, name: object) -> bool:
        return name in self._models

    def names(self) -> list[str]:
        """Served model names, sorted."""
        return list(self._models)

    def items(self) -> list[tuple[str, LoadedModel]]:
        """(name, model) pairs, sorted by name."""
        return list(self._models.items())

    def get(self, name: str) -> LoadedModel:
        """The model served as `name`; raises `UnknownModelError` listing the served names."""
        try:
            return self._models[name]
        except KeyError:
            served = ", ".join(self._models) or "none (check WSI_MIL_MODELS_DIR / --models)"
            raise UnknownModelError(f"no model named {name!r} is served; served models: {served}") from None

    @classmethod
    def load(cls, models_dir: str | Path, *, device: str | torch.device | None = None) -> ModelRegistry:
        """Load every model folder (run folds included) under `models_dir` onto `device`."""
        root = Path(models_dir)
        target = torch.device(device) if device is not None else default_device()
        models: dict[str, LoadedModel] = {}
        problems: dict[str, str] = {}
        if not root.is_dir():
            problems["models_dir"] = "the models folder does not exist; set WSI_MIL_MODELS_DIR or --models"
            return cls(models, problems)
        for card_path in sorted(root.rglob(CARD_FILE)):
            folder = card_path.parent
            name = folder.relative_to(root).as_posix() if folder != root else folder.name
            try:
                models[name] = load_model(folder, device=target)
            except (WsiMilError, OSError, RuntimeError, ValueError) as err:
                # the folder's own files are named relative to it: problems are shown to clients
                problems[name] = str(err).replace(f"{folder}/", "").replace(str(folder), name)
                log.warning("model folder %s not served: %s", folder, err)
        log.info("serving %d model(s) from %s: %s", len(models), root, ", ".join(models) or "none")
        return cls(models, problems)
