"""The model registry: options read from the class `__init__`, variant overrides, wrappers, errors."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from wsi_mil.errors import UnknownModelError
from wsi_mil.models import registry
from wsi_mil.models.base import MILModel, MILOutput
from wsi_mil.models.registry import create_model, model_entry, register_model


class MeanPool(MILModel):
    """A tiny model whose options are all keyword-only with defaults."""

    def __init__(self, in_dim: int, num_classes: int, *, scale: float = 1.0, bias: bool = True) -> None:
        super().__init__(in_dim, num_classes)
        self.scale = scale
        self.head = torch.nn.Linear(in_dim, num_classes, bias=bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> MILOutput:
        attention = torch.full(x.shape[:2], 1.0 / x.shape[1])
        return MILOutput(logits=self.scale * self.head(x.mean(dim=1)), attention=attention)


@pytest.fixture(autouse=True)
def scratch_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Registrations in a test go to a copy of the registry, dropped afterwards."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))


def test_bare_entrypoint_takes_the_class_defaults() -> None:
    @register_model
    def mean_pool(in_dim: int, num_classes: int, **options: Any) -> MeanPool:
        """Mean pooling."""
        return MeanPool(in_dim, num_classes, **options)

    entry = model_entry("mean_pool")
    assert entry.defaults == {"scale": 1.0, "bias": True} and entry.summary == "Mean pooling."
    model = create_model("mean_pool", 4, 2, scale=None, bias=False)  # None keeps the default
    assert isinstance(model, MeanPool) and model.scale == 1.0 and model.head.bias is None


def test_a_variant_states_only_what_differs() -> None:
    @register_model(scale=3.0)
    def mean_pool_scaled(in_dim: int, num_classes: int, **options: Any) -> MeanPool:
        """Scaled mean pooling."""
        return MeanPool(in_dim, num_classes, **options)

    assert model_entry("mean_pool_scaled").defaults == {"scale": 3.0, "bias": True}
    assert create_model("mean_pool_scaled", 4, 2).scale == 3.0
    assert create_model("mean_pool_scaled", 4, 2, scale=0.5).scale == 0.5
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['width'\].*accepts \['bias', 'scale'\]"):
        create_model("mean_pool_scaled", 4, 2, width=3)


def test_a_wrapper_declares_its_own_options() -> None:
    @register_model
    def doubled(in_dim: int, num_classes: int, *, base: str = "abmil", copies: int = 2) -> MILModel:
        """A wrapper whose options are not one class's."""
        assert copies == 2
        return create_model(base, in_dim, num_classes)

    assert model_entry("doubled").defaults == {"base": "abmil", "copies": 2}
    assert create_model("doubled", 4, 2).num_classes == 2


def test_registration_errors_name_the_problem() -> None:
    with pytest.raises(TypeError, match=r"overrides unknown option\(s\) \['scal'\]"):

        @register_model(scal=2.0)
        def typo(in_dim: int, num_classes: int, **options: Any) -> MeanPool:
            """Typo."""
            return MeanPool(in_dim, num_classes, **options)

    with pytest.raises(TypeError, match="must be annotated to return its MILModel class"):

        @register_model
        def unannotated(in_dim: int, num_classes: int, **options: Any):  # type: ignore[no-untyped-def]
            """No return annotation."""
            return MeanPool(in_dim, num_classes, **options)


def test_a_second_registration_warns_and_wins() -> None:
    def make(summary: str):  # type: ignore[no-untyped-def]
        def twice(in_dim: int, num_classes: int, **options: Any) -> MeanPool:
            return MeanPool(in_dim, num_classes, **options)

        twice.__doc__ = summary
        return twice

    register_model(make("first"))
    with pytest.warns(UserWarning, match="registered twice"):
        register_model(make("second"))
    assert model_entry("twice").summary == "second"


def test_unknown_names_suggest_close_matches() -> None:
    with pytest.raises(UnknownModelError, match="Did you mean abmil"):
        model_entry("abmill")


def test_built_in_variants_differ_from_their_class_only_where_stated() -> None:
    base, plain, ilse = (model_entry(n).defaults for n in ("abmil", "abmil_plain", "abmil_ilse"))
    assert {k for k in base if base[k] != plain[k]} == {"gated"}
    assert ilse == {"hidden_dim": 500, "attention_dim": 128, "gated": False, "dropout": 0.0, "attention_dropout": 0.0}
    assert model_entry("clam_sb").defaults["multi_branch"] is False
    assert model_entry("clam_mb").defaults["multi_branch"] is True
