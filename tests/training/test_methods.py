"""The training-method registry: built-in names, errors, extension, explicit imports, the acmil method."""

from __future__ import annotations

import json
import logging
import pkgutil
import subprocess
import sys

import pytest
import torch

import wsi_mil.training.methods as methods
from wsi_mil.errors import TrainingConfigError
from wsi_mil.models import create_model
from wsi_mil.training.bag import Bag
from wsi_mil.training.batching import pad_bags
from wsi_mil.training.methods import (
    TrainingMethod,
    create_method,
    list_methods,
    register_method,
    registry,
)
from wsi_mil.training.methods.aem import AEMMethod


def test_built_in_methods():
    assert {"plain", "aem", "acmil"} <= set(list_methods())
    assert type(create_method("plain")) is TrainingMethod
    assert isinstance(create_method("aem", weight=0.2), AEMMethod)
    assert create_method("acmil", aux_weights={"diversity": 0.5}).aux_weights == {"diversity": 0.5}


def test_unknown_method_and_bad_options_name_the_setting():
    with pytest.raises(TrainingConfigError, match=r"unknown training method 'nope'.*--method.*aem"):
        create_method("nope")
    with pytest.raises(TrainingConfigError, match="method_kwargs for method 'aem'"):
        create_method("aem", lamda=0.1)


def test_register_a_new_method(monkeypatch):
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))

    @register_method("scaled")
    class Scaled(TrainingMethod):
        name = "scaled"

    assert isinstance(create_method("scaled"), Scaled)
    assert "scaled" in list_methods()


def test_every_method_module_is_imported_explicitly_by_the_package():
    """Each module under methods/ that registers a method is imported by the package itself, so a
    broken method module fails at import and no method silently disappears."""
    infrastructure = {"base", "registry"}
    modules = {m.name for m in pkgutil.iter_modules(methods.__path__)} - infrastructure
    assert modules == {"acmil", "aem", "ins", "mhim", "packmil", "scmil"}
    script = (
        "import json, sys; import wsi_mil.training.methods as m; "
        "print(json.dumps([sorted(sys.modules), m.list_methods()]))"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    imported, names = json.loads(result.stdout)
    assert {f"wsi_mil.training.methods.{name}" for name in modules} <= set(imported)
    assert names == ["acmil", "aem", "ins", "mhim", "packmil", "plain", "scmil"]


def test_acmil_method_warns_when_the_model_returns_no_aux_loss(caplog):
    torch.manual_seed(0)
    batch = pad_bags([Bag(torch.randn(6, 8), 0, "a"), Bag(torch.randn(4, 8), 1, "b")])
    with caplog.at_level(logging.WARNING, logger="wsi_mil.training.methods"):
        create_method("acmil").compute_loss(create_model("acmil", 8, 2), batch, progress=0.0)
    assert "returns no auxiliary loss" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="wsi_mil.training.methods"):
        result = create_method("acmil").compute_loss(create_model("abmil", 8, 2), batch, progress=0.0)
    assert "returns no auxiliary loss" in caplog.text
    assert set(result.terms) == {"bag"}


def test_acmil_aux_weights_scale_the_model_losses():
    torch.manual_seed(0)
    model = create_model("acmil", 8, 2, mask_top_k=0).eval()
    batch = pad_bags([Bag(torch.randn(6, 8), 0, "a"), Bag(torch.randn(4, 8), 1, "b")])
    unweighted = create_method("acmil").compute_loss(model, batch, progress=0.0)
    weighted = create_method("acmil", aux_weights={"diversity": 0.0, "branch": 2.0}).compute_loss(model, batch, progress=0.0)
    terms = unweighted.terms
    assert unweighted.loss.item() == pytest.approx(terms["bag"] + terms["diversity"] + terms["branch"], rel=1e-5)
    assert weighted.loss.item() == pytest.approx(terms["bag"] + 2.0 * terms["branch"], rel=1e-5)
