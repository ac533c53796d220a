"""Client-named paths and file names: the slide root cannot be escaped, names are made safe."""

from __future__ import annotations

from pathlib import Path

import pytest

from wsi_mil.errors import SlidePathError
from wsi_mil.service.uploads import printable_name, resolve_slide_path, safe_filename, slide_id_for


def test_safe_filename() -> None:
    assert safe_filename("../../etc/passwd") == "passwd"
    assert safe_filename(r"C:\\slides\\a b.svs") == "a_b.svs"
    assert safe_filename("test3-DAPI-2-(387).ndpi") == "test3-DAPI-2-(387).ndpi"
    assert safe_filename("...") == "upload" and safe_filename("") == "upload"
    long = safe_filename("x" * 300 + ".ome.tiff")
    assert len(long) == 128 and long.endswith(".ome.tiff")


def test_client_names_become_printable_names_and_safe_slide_ids() -> None:
    assert printable_name("a\x00b\nc\u202e.svs") == "a?b?c?.svs"
    assert printable_name("Gewebe 腫瘍.svs") == "Gewebe 腫瘍.svs"
    assert len(printable_name("x" * 300)) == 256
    assert slide_id_for("cohort/tumor_001.svs") == "tumor_001"
    assert slide_id_for("Gewebe-Éé 腫瘍.tiff") == "Gewebe-Ee_"
    assert slide_id_for("a\x00b\n.tiff") == "a_b_"
    assert slide_id_for("腫瘍.svs") == "slide" and slide_id_for("...") == "slide"
    assert slide_id_for("n" * 300 + ".tiff") == "n" * 128


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
