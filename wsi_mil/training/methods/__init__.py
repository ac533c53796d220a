"""Training methods and their registry: `create_method(name, **kwargs)` -> `TrainingMethod`.

Built in: `plain` (bag cross-entropy + the model's own auxiliary losses) and `acmil` (the same
method, meant for the `acmil` model: ACMIL's branch and diversity losses come from the model
through `MILOutput.aux_losses` / `MILModel.aux_losses`; `aux_weights={"<term>": w}` rescales a
term, unnamed terms weigh 1, as in the official code). Method modules register their own
factories with `register_method` when imported; each module listed in `_METHOD_MODULES` is
imported on its own, so one that fails to import only disables its own method names.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from typing import Any

from wsi_mil.errors import TrainingConfigError
from wsi_mil.models.base import MILModel
from wsi_mil.training.methods.base import Bag as Bag
from wsi_mil.training.methods.base import Batch as Batch
from wsi_mil.training.methods.base import StepResult as StepResult
from wsi_mil.training.methods.base import TrainingMethod as TrainingMethod

log = logging.getLogger(__name__)

MethodFactory = Callable[..., TrainingMethod]

_METHODS: dict[str, MethodFactory] = {}
#: method modules imported by `_load_method_modules`; each registers its names on import
_METHOD_MODULES = ("aem", "mhim", "packmil")
_IMPORT_ERRORS: dict[str, str] = {}
_loaded = False


def register_method(name: str) -> Callable[[MethodFactory], MethodFactory]:
    """Decorator: register a factory `(**kwargs) -> TrainingMethod` under `name`."""

    def decorator(factory: MethodFactory) -> MethodFactory:
        if name in _METHODS and _METHODS[name] is not factory:
            log.warning("training method %r registered twice; the later definition wins", name)
        _METHODS[name] = factory
        return factory

    return decorator


def _load_method_modules() -> None:
    """Import each method module once; a missing or broken module is recorded, never raised."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in _METHOD_MODULES:
        qualified = f"{__name__}.{module}"
        try:
            importlib.import_module(qualified)
        except ModuleNotFoundError as err:
            if err.name != qualified:
                _IMPORT_ERRORS[module] = f"{type(err).__name__}: {err}"
                log.warning("training method module %s failed to import: %s", qualified, err)
        except Exception as err:
            _IMPORT_ERRORS[module] = f"{type(err).__name__}: {err}"
            log.warning("training method module %s failed to import: %s", qualified, err)


def list_methods() -> list[str]:
    """Names of the registered training methods, sorted."""
    _load_method_modules()
    return sorted(_METHODS)


def create_method(name: str, **kwargs: Any) -> TrainingMethod:
    """Build a registered training method; unknown names and options raise `TrainingConfigError`."""
    _load_method_modules()
    if name not in _METHODS:
        broken = _IMPORT_ERRORS.get(name)
        reason = f" (its module failed to import: {broken})" if broken else ""
        raise TrainingConfigError(
            f"unknown training method {name!r}{reason}; --method takes one of {', '.join(list_methods())}"
        )
    try:
        return _METHODS[name](**kwargs)
    except TypeError as err:
        raise TrainingConfigError(f"bad method_kwargs for method {name!r}: {err}") from err


class ACMILMethod(TrainingMethod):
    """Plain supervised MIL for the `acmil` model: its branch/diversity losses arrive as aux losses.

    Warns once when the model returns no auxiliary loss, since `acmil` then trains exactly as
    `plain` (use `--model acmil` with more than one branch).
    """

    name = "acmil"

    def __init__(self, *, aux_weights: dict[str, float] | None = None) -> None:
        super().__init__(aux_weights=aux_weights)
        self._checked_aux = False

    def compute_loss(self, model: MILModel, batch: Batch, *, progress: float) -> StepResult:
        result = super().compute_loss(model, batch, progress=progress)
        if not self._checked_aux:
            self._checked_aux = True
            if set(result.terms) == {"bag"}:
                log.warning(
                    "method 'acmil': %s returns no auxiliary loss, so this trains as 'plain'; "
                    "use --model acmil with several branches",
                    type(model).__name__,
                )
        return result


register_method("plain")(TrainingMethod)
register_method("acmil")(ACMILMethod)

__all__ = [
    "Bag",
    "Batch",
    "StepResult",
    "TrainingMethod",
    "create_method",
    "list_methods",
    "register_method",
]
