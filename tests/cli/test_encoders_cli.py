"""`wsi-mil list-encoders`: every registered encoder with its size, and where its weights come from."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from wsi_mil.cli import _register_commands, app
from wsi_mil.preprocessing.encoders import encoder_cfg, list_encoders

runner = CliRunner()
WIDE = {"COLUMNS": "400"}


def test_every_encoder_is_listed_with_its_feature_dim_and_input_size() -> None:
    _register_commands()
    result = runner.invoke(app, ["list-encoders"], env={**WIDE, "WSI_MIL_WEIGHTS_DIR": ""})
    assert result.exit_code == 0, result.output
    for name in list_encoders():
        row = next(line for line in result.output.splitlines() if f" {name} " in line)
        assert f" {encoder_cfg(name).embed_dim} " in row, row
    gigapath = next(line for line in result.output.splitlines() if " prov-gigapath " in line)
    assert "224 px (resize 256, centre crop)" in gigapath and "prov-gigapath/prov-gigapath (gated" in gigapath
    assert "none published" in next(line for line in result.output.splitlines() if " test-encoder " in line)


def test_a_local_weights_file_is_shown_and_a_pattern_filters(tmp_path: Path) -> None:
    _register_commands()
    (tmp_path / "uni").mkdir()
    (tmp_path / "uni" / "model.safetensors").write_bytes(b"")
    result = runner.invoke(app, ["list-encoders", "uni*"], env={**WIDE, "WSI_MIL_WEIGHTS_DIR": str(tmp_path)})
    assert result.exit_code == 0, result.output
    assert "local file" in result.output and "uni2-h" in result.output
    assert "resnet50-trunc" not in result.output


def test_the_preprocess_help_points_at_a_command_that_exists() -> None:
    _register_commands()
    assert "wsi-mil list-encoders" in runner.invoke(app, ["preprocess", "--help"], env=WIDE).output
    assert runner.invoke(app, ["list-encoders", "--help"]).exit_code == 0
