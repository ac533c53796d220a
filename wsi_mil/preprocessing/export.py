"""Export feature files to the layouts CLAM and TRIDENT train and plot from.

CLAM's `main.py` trains only from `<data_root_dir>/pt_files/<slide_id>.pt` (a float32 tensor
`[N, D]`); its `use_h5` mode, heatmaps and patch re-extraction read `h5_files/<slide_id>.h5` with
`features` and `coords` and the patch attributes on `coords`. TRIDENT keeps
`features_<encoder>/<slide_id>.h5` with `name`, `savetodir` and `encoder` on `features` and its
patching attributes on `coords`. Any file `read_feature_file` reads can be exported; every file
is written through `wsi_mil.atomic`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import h5py
import numpy as np
import torch

from wsi_mil.atomic import atomic_path
from wsi_mil.errors import FeatureFileError
from wsi_mil.preprocessing.feature_file import (
    PT_SUFFIXES,
    FeatureBag,
    coords_attributes,
    read_feature_file,
)

log = logging.getLogger(__name__)

ExportFormat = Literal["clam", "trident"]
FEATURE_FILE_SUFFIXES = (".h5", ".hdf5", *PT_SUFFIXES)


@dataclass(frozen=True)
class ExportedSlide:
    """One exported slide: the files written, or why it was skipped."""

    slide_id: str
    source: Path
    files: tuple[Path, ...] = ()
    skipped: str = ""


def _tile_attrs(bag: FeatureBag) -> dict[str, Any]:
    """The `coords` attributes CLAM's and TRIDENT's readers look for, from the bag's provenance."""
    if bag.source_format == "wsi_mil":
        return coords_attributes(bag.provenance())
    return {k: v for k, v in bag.attrs.items() if k in _PASSED_ON_ATTRS}


# Attributes of foreign files that describe their tiles and are passed on as they are.
_PASSED_ON_ATTRS = frozenset(
    {"patch_size", "patch_level", "downsample", "downsampled_level_dim", "level_dim", "name",
     "patch_size_level0", "level0_magnification", "target_magnification", "overlap",
     "level0_width", "level0_height"}
)


def _write_h5(path: Path, bag: FeatureBag, *, features_attrs: dict[str, Any]) -> None:
    """`features` as float32 `[N, D]` and `coords` as int64 `[N, 2]` with their attributes."""
    with atomic_path(path) as temp, h5py.File(temp, "w") as handle:
        features = handle.create_dataset("features", data=bag.features.astype(np.float32))
        features.attrs.update(features_attrs)
        coords = handle.create_dataset("coords", data=bag.coords.astype(np.int64))
        coords.attrs.update(_tile_attrs(bag))


def _export_clam(bag: FeatureBag, out: Path) -> tuple[Path, ...]:
    pt_path = out / "pt_files" / f"{bag.slide_id}.pt"
    h5_path = out / "h5_files" / f"{bag.slide_id}.h5"
    with atomic_path(pt_path) as temp:
        torch.save(torch.from_numpy(np.ascontiguousarray(bag.features, dtype=np.float32)), temp)
    _write_h5(h5_path, bag, features_attrs={})
    return pt_path, h5_path


def _export_trident(bag: FeatureBag, out: Path) -> tuple[Path, ...]:
    folder = out / f"features_{bag.encoder or 'unknown'}"
    h5_path = folder / f"{bag.slide_id}.h5"
    attrs = {"name": bag.slide_id, "savetodir": str(folder), "encoder": bag.encoder or "unknown"}
    _write_h5(h5_path, bag, features_attrs=attrs)
    return (h5_path,)


_EXPORTERS: dict[ExportFormat, Callable[[FeatureBag, Path], tuple[Path, ...]]] = {
    "clam": _export_clam,
    "trident": _export_trident,
}


def find_feature_files(inputs: Iterable[str | Path]) -> list[Path]:
    """Feature files among `inputs`: files as given, folders searched (not recursively)."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files.extend(sorted(p for p in path.iterdir() if p.suffix.lower() in FEATURE_FILE_SUFFIXES))
        else:
            files.append(path)
    return files


def export_features(
    inputs: Iterable[str | Path], out: str | Path, *, fmt: ExportFormat
) -> list[ExportedSlide]:
    """Export every feature file in `inputs` to `out` in CLAM's or TRIDENT's layout.

    A file that cannot be read, or has no coords (CLAM and TRIDENT need them), is skipped with its
    reason; the others are exported. Features are written as float32 whatever the source dtype,
    because CLAM's models take float32 only.
    """
    if fmt not in _EXPORTERS:
        raise FeatureFileError(f"export format must be one of {sorted(_EXPORTERS)}, got {fmt!r}")
    out = Path(out)
    exported: list[ExportedSlide] = []
    for path in find_feature_files(inputs):
        try:
            bag = read_feature_file(path)
        except FeatureFileError as err:
            exported.append(ExportedSlide(path.stem, path, skipped=str(err)))
            continue
        if bag.coords is None:
            reason = f"{path.name}: no coords, which CLAM and TRIDENT need"
            exported.append(ExportedSlide(bag.slide_id, path, skipped=reason))
            continue
        files = _EXPORTERS[fmt](bag, out)
        log.info("%s -> %s", path, ", ".join(map(str, files)))
        exported.append(ExportedSlide(bag.slide_id, path, files))
    return exported
