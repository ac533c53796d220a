"""Client-named paths and file names: the slide root cannot be escaped, names are made safe."""

from __future__ import annotations

from pathlib import Path

import pytest

from wsi_mil.errors import SlidePathError
from wsi_mil.service.uploads import resolve_slide_path, safe_filename


def test_safe_filename() -> None:
    assert safe_filename("../../etc/passwd") == "passwd"
    assert safe_filename(r"C:\\slides\\a b.svs") == "a_b.svs"
    assert safe_filename("test3-DAPI-2-(387).ndpi") == "test3-DAPI-2-(387).ndpi"
    assert safe_filename("...") == "upload" and safe_filename("") == "upload"
    long = safe_filename("x" * 300 + ".ome.tiff")
    assert len(long) == 128 and long.endswith(".ome.tiff")


def test_resolve_slide_path(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    (root / "a" / "s.svs").write_bytes(b"x")
    (tmp_path / "secret.svs").write_bytes(b"x")
    (root / "escape.svs").symlink_to(tmp_path / "secret.svs")
    (root / "inner.svs").symlink_to(root / "a" / "s.svs")
    assert resolve_slide_path(root, "a/s.svs") == (root / "a" / "s.svs").resolve()
    assert resolve_slide_path(root, "a\\s.svs") == (root / "a" / "s.svs").resolve()
    assert resolve_slide_path(root, "inner.svs") == (root / "a" / "s.svs").resolve()
    assert resolve_slide_path(root, str(root / "a" / "s.svs")) == (root / "a" / "s.svs").resolve()
    for bad in (
        "../secret.svs",
        "a/../../secret.svs",
        "escape.svs",
        str(tmp_path / "secret.svs"),
        "a",
        "nope",
        "a/s.svs\x00",
        " ",
    ):
        with pytest.raises(SlidePathError):
            resolve_slide_path(root, bad)
    with pytest.raises(SlidePathError, match="WSI_MIL_SLIDE_ROOT"):
        resolve_slide_path(None, "a/s.svs")
