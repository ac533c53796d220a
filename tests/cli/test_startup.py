"""`wsi-mil --help` starts at once: printing help imports none of the heavy libraries."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

#: libraries that cost seconds to import and are only needed when a command runs
HEAVY_MODULES = ("torch", "torchvision", "timm", "ray", "fastapi", "uvicorn", "h5py", "openslide", "sklearn")

_PROBE = """
import json, sys
heavy = json.loads(sys.argv[2])
sys.argv = ["wsi-mil", *json.loads(sys.argv[1])]
from wsi_mil.cli import main
try:
    main()
except SystemExit:
    pass
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
