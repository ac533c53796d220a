"""`wsi-mil demo --no-serve` on a small cohort: tables, not raw JSON, for the metrics and held-out predictions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from wsi_mil.cli import _register_commands, app

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def test_the_demo_prints_tables_of_metrics_and_held_out_predictions(tmp_path: Path) -> None:
    _register_commands()
    out = tmp_path / "demo"
    result = CliRunner().invoke(
        app,
        ["demo", "--out", str(out), "--slides", "6", "--size", "1024", "--encoder", "test-encoder", "--epochs", "2", "--no-serve"],
        env={"COLUMNS": "160"},
    )
    assert result.exit_code == 0, result.output
    assert "test (mean ± sd over folds)" in result.output and "roc_auc_macro" in result.output
    assert "held-out predictions" in result.output
    for slide in json.loads((out / "slides" / "cohort.json").read_text()):
        assert slide["slide_id"] in result.output.split("held-out predictions")[1]
    assert '"summary"' not in result.output and '"mean":' not in result.output  # no raw JSON dump
