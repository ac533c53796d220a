"""`wsi-mil export` and `wsi-mil inspect` on foreign files, through typer's CliRunner."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from wsi_mil.cli import _register_commands, app
from wsi_mil.preprocessing.pipeline import PreprocessConfig, preprocess_slide

runner = CliRunner()


@pytest.fixture(autouse=True)
def registered() -> None:
    _register_commands()


def test_export_writes_clam_layout_and_fails_on_skipped_files(demo_slides: list, tmp_path: Path) -> None:
    slide = demo_slides[0]
    config = PreprocessConfig(encoder="test-encoder", weights="random", num_workers=0)
    assert preprocess_slide(slide.path, tmp_path / "pre", config, slide_id=slide.slide_id).status == "done"
    features = tmp_path / "pre" / "features"
    result = runner.invoke(app, ["export", str(tmp_path / "clam"), "--features", str(features)],
                           env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert (tmp_path / "clam" / "pt_files" / f"{slide.slide_id}.pt").is_file()
    assert (tmp_path / "clam" / "h5_files" / f"{slide.slide_id}.h5").is_file()
    torch.save(np.zeros((2, 32), dtype=np.float32), features / "nocoords.pt")
    result = runner.invoke(app, ["export", str(tmp_path / "trident"), "--features", str(features),
                                 "--format", "trident"], env={"COLUMNS": "200"})
    assert result.exit_code == 1 and "no coords" in result.output
    assert (tmp_path / "trident" / "features_test-encoder" / f"{slide.slide_id}.h5").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    result = runner.invoke(app, ["export", str(tmp_path / "x"), "--features", str(empty)])
    assert result.exit_code == 2 and "no feature files" in result.output


def test_inspect_reads_tridents_pt(tmp_path: Path) -> None:
    torch.save(np.ones((5, 7), dtype=np.float16), tmp_path / "slide.pt")
    result = runner.invoke(app, ["inspect", str(tmp_path / "slide.pt")], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert (info["format"], info["tiles"], info["feature_dim"], info["valid"]) == ("pt", 5, 7, True)
