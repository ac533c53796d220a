"""The training-method registry: `register_method(name)` and `create_method(name, **kwargs)`.

Each method module registers its factories when imported, and `wsi_mil.training.methods` imports
every method module explicitly (as `wsi_mil.models` does for model families), so a broken module
fails loudly at import instead of silently removing its method.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from wsi_mil.errors import TrainingConfigError
from wsi_mil.training.methods.base import TrainingMethod

log = logging.getLogger(__name__)

MethodFactory = Callable[..., TrainingMethod]

_METHODS: dict[str, MethodFactory] = {}


def register_method(name: str) -> Callable[[MethodFactory], MethodFactory]:
    """Decorator: register a factory `(**kwargs) -> TrainingMethod` under `name`."""

    def decorator(factory: MethodFactory) -> MethodFactory:
        if name in _METHODS and _METHODS[name] is not factory:
            log.warning("training method %r registered twice; the later definition wins", name)
        _METHODS[name] = factory
        return factory

    return decorator


def list_methods() -> list[str]:
    """Names of the registered training methods, sorted."""
    return sorted(_METHODS)


def create_method(name: str, **kwargs: Any) -> TrainingMethod:
    """Build a registered training method; unknown names and options raise `TrainingConfigError`."""
    if name not in _METHODS:
        raise TrainingConfigError(
            f"unknown training method {name!r}; --method takes one of {', '.join(list_methods())}"
        )
    try:
        return _METHODS[name](**kwargs)
    except TypeError as err:
        raise TrainingConfigError(f"bad method_kwargs for method {name!r}: {err}") from err


register_method("plain")(TrainingMethod)
