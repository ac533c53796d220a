"""Start-up: `wsi-mil --help` imports none of the heavy libraries; encoder commands restart once
with the fast allocator (opt-out: WSI_MIL_ALLOCATOR=system)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from wsi_mil.allocator import ALLOCATOR_ENV, REEXEC_MARKER_ENV, jemalloc_library

#: libraries that cost seconds to import and are only needed when a command runs
HEAVY_MODULES = ("torch", "torchvision", "timm", "ray", "fastapi", "uvicorn", "h5py", "openslide", "sklearn")

_PROBE = """
import json, sys
heavy = json.loads(sys.argv[2])
sys.argv = ["wsi-mil", *json.loads(sys.argv[1])]
from wsi_mil.cli import run_command_line
run_command_line()
print(json.dumps(sorted({name.split(".")[0] for name in sys.modules} & set(heavy))))
"""


@pytest.mark.parametrize(
    "args",
    [[], ["--help"], ["preprocess", "--help"], ["train", "--help"], ["serve", "--help"], ["predict", "--help"],
     ["check-mil", "--help"], ["export", "--help"]],
    ids=lambda args: " ".join(args) or "no-args",
)
def test_help_imports_no_heavy_library(args: list[str]) -> None:
    completed = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(args), json.dumps(HEAVY_MODULES)],
        capture_output=True, text=True, timeout=120, check=True,
    )
    *help_lines, imported = completed.stdout.strip().splitlines()
    assert "Usage" in "\n".join(help_lines)
    assert json.loads(imported) == [], f"`wsi-mil {' '.join(args)}` imported {imported}"


@pytest.mark.parametrize(("setting", "expected"), [(None, "jemalloc"), ("system", "glibc")])
def test_preprocess_restarts_with_the_allocator_unless_opted_out(
    slides_dir: Path, tmp_path: Path, setting: str | None, expected: str
) -> None:
    if setting is None and jemalloc_library() is None:
        pytest.skip("no libjemalloc.so in the ray package here")
    env = {k: v for k, v in os.environ.items() if k not in (ALLOCATOR_ENV, REEXEC_MARKER_ENV, "LD_PRELOAD", "GLIBC_TUNABLES")}
    if setting is not None:
        env[ALLOCATOR_ENV] = setting
    slide = slides_dir / "tissue" / "CMU-1-Small-Region.svs"
    subprocess.run(
        [sys.executable, "-m", "wsi_mil.cli", "preprocess", str(slide), "--out", str(tmp_path), "--encoder", "test-encoder",
         "--weights", "random", "--compile", "off"],
        env=env, capture_output=True, text=True, timeout=600, check=True,
    )
    runtime = json.loads((tmp_path / "run_config.json").read_text())["runtime"]
    assert runtime["allocator"] == expected
    assert json.loads((tmp_path / "status" / "CMU-1-Small-Region.json").read_text())["status"] == "done"


def test_a_local_preprocess_run_imports_neither_ray_nor_the_service(slides_dir: Path, tmp_path: Path) -> None:
    slide = slides_dir / "tissue" / "CMU-1-Small-Region.svs"
    args = ["preprocess", str(slide), "--out", str(tmp_path), "--encoder", "test-encoder", "--weights", "random",
            "--compile", "off"]
    env = {**os.environ, ALLOCATOR_ENV: "system"}  # no restart, so the probe sees this process's modules
    completed = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(args), json.dumps(HEAVY_MODULES)],
        capture_output=True, text=True, timeout=600, check=True, env=env,
    )
    imported = set(json.loads(completed.stdout.strip().splitlines()[-1]))
    assert {"torch", "timm", "h5py"} <= imported, "the probe should have run the command"
    assert not imported & {"ray", "fastapi", "uvicorn"}
    assert json.loads((tmp_path / "status" / "CMU-1-Small-Region.json").read_text())["status"] == "done"
