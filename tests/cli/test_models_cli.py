"""`wsi-mil list-models` and `wsi-mil check-mil` through typer's CliRunner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from wsi_mil.cli import _register_commands, app
from wsi_mil.models import list_models

runner = CliRunner()
SMALL = ["--tests", "single-concept", "--seeds", "1", "--bags", "40"]


@pytest.fixture(autouse=True)
def registered_single_thread(single_torch_thread: None) -> None:
    _register_commands()


def test_list_models_shows_every_registered_model() -> None:
    result = runner.invoke(app, ["list-models"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    for name in list_models():
        assert name in result.output
    assert "reference" in result.output and "num_concepts=16" in result.output
    assert "INS instance classifier" in result.output and "negative_class=0" in result.output


def test_list_models_filters_by_pattern() -> None:
    result = runner.invoke(app, ["list-models", "multi_*"], env={"COLUMNS": "250"})
    assert result.exit_code == 0
    assert "multi_concept_mil" in result.output and "mi_net " not in result.output


def test_check_mil_prints_the_table_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "reports" / "mi_net.json"
    result = runner.invoke(
        app, ["check-mil", "mi_net", *SMALL, "--epochs", "3", "--json", str(out)], env={"COLUMNS": "200"}
    )
    assert result.exit_code == 0, result.output
    assert "test AUC mean ± sd" in result.output and "single-concept" in result.output
    report = json.loads(out.read_text())
    assert report["model"] == "mi_net" and report["settings"]["epochs"] == 3
    (row,) = report["results"]
    assert row["verdict"] in result.output
    assert 0.0 <= row["test_auc_mean"] <= 1.0


def test_check_mil_fast_sets_epochs_unless_given(tmp_path: Path) -> None:
    out = tmp_path / "fast.json"
    result = runner.invoke(app, ["check-mil", "mi_net", *SMALL, "--fast", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["settings"]["epochs"] == 20


def test_check_mil_compact_shrinks_a_wide_model(tmp_path: Path) -> None:
    out = tmp_path / "abmil.json"
    result = runner.invoke(
        app, ["check-mil", "abmil", *SMALL, "--epochs", "1", "--compact", "--json", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["model"] == "abmil"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["check-mil", "mi_nett"], "Did you mean mi_net"),
        (["check-mil", "mi_net", "--tests", "single-concept,bogus"], "--tests"),
    ],
)
def test_check_mil_errors_exit_2_with_a_hint(args: list[str], message: str) -> None:
    result = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 2
    assert message in result.output
