"""The training-method registry: built-in names, errors, extension, and isolation of broken modules."""

from __future__ import annotations

import logging
import sys

import pytest
import torch

import wsi_mil.training.methods as methods
from wsi_mil.errors import TrainingConfigError
from wsi_mil.models import create_model
from wsi_mil.training.batching import pad_bags
from wsi_mil.training.methods import TrainingMethod, create_method, list_methods, register_method
from wsi_mil.training.methods.aem import AEMMethod
from wsi_mil.training.methods.base import Bag


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
    monkeypatch.setattr(methods, "_METHODS", dict(methods._METHODS))

    @register_method("scaled")
    class Scaled(TrainingMethod):
        name = "scaled"

    assert isinstance(create_method("scaled"), Scaled)
    assert "scaled" in list_methods()


def test_a_broken_method_module_only_disables_its_own_name(monkeypatch, tmp_path, caplog):
    (tmp_path / "broken.py").write_text("raise ImportError('needs a package that is not installed')\n")
    (tmp_path / "good.py").write_text(
        "from wsi_mil.training.methods import TrainingMethod, register_method\n"
        "register_method('good')(TrainingMethod)\n"
    )
    monkeypatch.setattr(methods, "__path__", [*methods.__path__, str(tmp_path)])
    monkeypatch.setattr(methods, "_METHOD_MODULES", ("broken", "not_written_yet", "good"))
    monkeypatch.setattr(methods, "_METHODS", dict(methods._METHODS))
    monkeypatch.setattr(methods, "_IMPORT_ERRORS", {})
    monkeypatch.setattr(methods, "_loaded", False)
    for name in ("broken", "good"):
        monkeypatch.setitem(sys.modules, f"wsi_mil.training.methods.{name}", None)
        monkeypatch.delitem(sys.modules, f"wsi_mil.training.methods.{name}")
    with caplog.at_level(logging.WARNING, logger="wsi_mil.training.methods"):
        names = list_methods()
    assert {"plain", "aem", "acmil", "good"} <= set(names)
    assert "broken failed to import" in caplog.text
    assert "not_written_yet" not in caplog.text  # a module not written yet is simply absent
    with pytest.raises(TrainingConfigError, match=r"its module failed to import.*needs a package"):
        create_method("broken")


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
