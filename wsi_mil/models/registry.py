"""Model registry and factory, after timm: `@register_model`, `create_model`, `list_models`.

An entrypoint states only what differs from its class: `@register_model(gated=False)` over
`def abmil_plain(in_dim, num_classes, **options) -> ABMIL`. Its options and their defaults are the
keyword-only parameters of the returned class's `__init__` (read from the return annotation), with
the decorator's overrides on top. An entrypoint that builds more than one class (a wrapper) declares
its own keyword-only parameters instead, and those are its options.
"""

from __future__ import annotations

import difflib
import fnmatch
import inspect
import typing
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, overload

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


def _keyword_defaults(fn: Callable[..., Any]) -> dict[str, Any]:
    """The keyword-only parameters of `fn` that have a default, with those defaults."""
    return {
        k: p.default
        for k, p in inspect.signature(fn).parameters.items()
        if p.kind is p.KEYWORD_ONLY and p.default is not inspect.Parameter.empty
    }


def _options_of(fn: ModelFn, overrides: dict[str, Any]) -> dict[str, Any]:
    """An entrypoint's options: its own keyword-only defaults, else its class's, updated by `overrides`."""
    own = _keyword_defaults(fn)
    if own:
        defaults = own
    else:
        model_class = typing.get_type_hints(fn).get("return")
        if not (inspect.isclass(model_class) and issubclass(model_class, MILModel)):
            raise TypeError(
                f"model entrypoint {fn.__name__!r} must be annotated to return its MILModel class "
                "(or declare its own keyword-only options)"
            )
        defaults = _keyword_defaults(model_class.__init__)
    unknown = set(overrides) - set(defaults)
    if unknown:
        raise TypeError(
            f"model entrypoint {fn.__name__!r} overrides unknown option(s) {sorted(unknown)}; "
            f"its options are {sorted(defaults)}"
        )
    return {**defaults, **overrides}


def _register(fn: ModelFn, overrides: dict[str, Any]) -> ModelFn:
    name = fn.__name__
    if name in _REGISTRY:
        warnings.warn(f"model {name!r} registered twice; the later definition wins", stacklevel=3)
    doc = (inspect.getdoc(fn) or "").strip().splitlines()
    _REGISTRY[name] = ModelEntry(name, fn, fn.__module__, _options_of(fn, overrides), doc[0] if doc else "")
    return fn


@overload
def register_model(fn: ModelFn, /) -> ModelFn: ...
@overload
def register_model(**overrides: Any) -> Callable[[ModelFn], ModelFn]: ...
def register_model(fn: ModelFn | None = None, /, **overrides: Any) -> ModelFn | Callable[[ModelFn], ModelFn]:
    """Register an entrypoint `fn(in_dim, num_classes, **options) -> MILModel` under its name.

    Bare (`@register_model`) the options keep the class defaults; `@register_model(**overrides)`
    changes some defaults (a variant). The docstring's first line is the model's summary.
    """
    if fn is not None:
        return _register(fn, overrides)
    return lambda entrypoint: _register(entrypoint, overrides)


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


def model_options(name: str, **overrides: Any) -> dict[str, Any]:
    """Every option `name` is built with: its defaults updated by the non-None `overrides`.

    `None` values are dropped so unset options keep the model's defaults; unknown options raise
    a `TypeError` that names the model's accepted options.
    """
    entry = model_entry(name)
    given = {k: v for k, v in overrides.items() if v is not None}
    unknown = set(given) - set(entry.defaults)
    if unknown:
        raise TypeError(
            f"model {name!r} got unknown option(s) {sorted(unknown)}; "
            f"it accepts {sorted(entry.defaults)}"
        )
    return {**entry.defaults, **given}


def create_model(name: str, in_dim: int, num_classes: int, **kwargs: Any) -> MILModel:
    """Build a registered model with `model_options(name, **kwargs)` (unset options keep defaults)."""
    return model_entry(name).fn(in_dim, num_classes, **model_options(name, **kwargs))
