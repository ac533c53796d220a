"""`/v1/models`: the served models, their classes and feature contracts."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException, status

from wsi_mil.errors import UnknownModelError
from wsi_mil.inference.loading import LoadedModel
from wsi_mil.service.deps import RegistryDep
from wsi_mil.service.schemas import (
    ErrorPublic,
    FeatureContractPublic,
    ModelPublic,
    ModelsPublic,
    PreprocessingPublic,
)

router = APIRouter(prefix="/v1/models", tags=["models"])


def _weights_label(weights: str | None) -> str | None:
    """Encoder weights as shown to clients: "random", a file name, or None (never a server path)."""
    if weights is None or weights == "random":
        return weights
    return Path(weights).name


def model_public(name: str, served: LoadedModel) -> ModelPublic:
    """The public description of the model served as `name`."""
    card = served.card
    config = served.preprocessing
    preprocessing = None
    if config is not None and served.preprocessing_source is not None:
        preprocessing = PreprocessingPublic(
            source=served.preprocessing_source,
            encoder=config.encoder,
            weights=_weights_label(config.weights),
            precision=config.precision,
            tissue=config.tissue.model_dump(),
            tiling=config.tiling.model_dump(),
        )
    return ModelPublic(
        name=name,
        architecture=card.model_name,
        model_kwargs=card.model_kwargs,
        num_classes=card.num_classes,
        class_names=card.class_names,
        feature_contract=FeatureContractPublic(**card.feature_contract.model_dump()),
        preprocessing=preprocessing,
        slide_jobs=served.slide_problem is None and preprocessing is not None,
        slide_job_problem=served.slide_problem,
        weights_sha256=served.weights_sha256,
        training_method=card.training_method,
        fold=card.fold,
    )


@router.get("", summary="List the served models")
def list_models(registry: RegistryDep) -> ModelsPublic:
    """Every model loaded from the models folder, sorted by name."""
    data = [model_public(name, model) for name, model in registry.items()]
    return ModelsPublic(data=data, count=len(data))


@router.get(
    "/{name:path}",
    summary="One model: classes and feature contract",
    responses={404: {"model": ErrorPublic, "description": "no model of that name is served"}},
)
def get_model(name: str, registry: RegistryDep) -> ModelPublic:
    """A served model by name (names of run folds contain a slash: `run/fold_0`)."""
    try:
        return model_public(name, registry.get(name))
    except UnknownModelError as err:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=str(err)) from err
