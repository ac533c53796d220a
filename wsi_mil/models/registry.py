"""Model registry and factory, after timm: `@register_model`, `create_model`, `list_models`."""

from __future__ import annotations

import difflib
import fnmatch
import inspect
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from wsi_mil.errors import UnknownModelError
from wsi_mil.models.base import MILModel

ModelFn = Callable[..., MILModel]


@dataclass(frozen=True)
class ModelEntry:
    """A registered model: its entrypoint, its family module and its default keyword arguments."""

    name: str
    fn: ModelFn
    module: str
    defaults: dict[str, Any]
    summary: str


_REGISTRY: dict[str, ModelEntry] = {}


def _defaults_of(fn: ModelFn) -> dict[str, Any]:
    params = inspect.signature(fn).parameters
    return {
        k: p.default
        for k, p in params.items()
        if p.default is not inspect.Parameter.empty and p.kind is p.KEYWORD_ONLY
    }


def register_model(fn: ModelFn) -> ModelFn:
    """Register an entrypoint `fn(in_dim, num_classes, **kwargs) -> MILModel` under its name."""
    name = fn.__name__
    if name in _REGISTRY:
        warnings.warn(f"model {name!r} registered twice; the later definition wins", stacklevel=2)
    doc = (inspect.getdoc(fn) or "").strip().splitlines()
    _REGISTRY[name] = ModelEntry(name, fn, fn.__module__, _defaults_of(fn), doc[0] if doc else "")
    return fn


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching an fnmatch pattern, sorted."""
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def is_model(name: str) -> bool:
    return name in _REGISTRY


def model_entry(name: str) -> ModelEntry:
    """The registry entry of `name`; unknown names raise with the closest matches."""
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise UnknownModelError(
            f"unknown model {name!r}.{hint} Known models: {', '.join(list_models())}"
        ) from None


def create_model(name: str, in_dim: int, num_classes: int, **kwargs: Any) -> MILModel:
    """Build a registered model. `None` kwargs are dropped so unset options keep model defaults.

    Unknown keyword arguments raise a `TypeError` that names the model's accepted options.
    """
    entry = model_entry(name)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    unknown = set(kwargs) - set(entry.defaults)
    if unknown:
        raise TypeError(
            f"model {name!r} got unknown option(s) {sorted(unknown)}; "
            f"it accepts {sorted(entry.defaults)}"
        )
    return entry.fn(in_dim, num_classes, **kwargs)
