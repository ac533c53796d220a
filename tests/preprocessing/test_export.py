"""Export to CLAM's and TRIDENT's layouts, checked the way their loaders read the files."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from wsi_mil.preprocessing.export import export_features
from wsi_mil.preprocessing.feature_file import read_feature_file
from wsi_mil.preprocessing.pipeline import PreprocessConfig, preprocess_slide


@pytest.fixture(scope="module")
def features_dir(demo_slides: list, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Float16 feature files of two demo slides, as `wsi-mil preprocess` writes them by default."""
    out = tmp_path_factory.mktemp("preprocessed")
    config = PreprocessConfig(encoder="test-encoder", weights="random", num_workers=0)
    for slide in demo_slides[:2]:
        assert preprocess_slide(slide.path, out, config, slide_id=slide.slide_id).status == "done"
    return out / "features"


def clam_item(data_dir: Path, slide_id: str, *, use_h5: bool) -> tuple[torch.Tensor, np.ndarray | None]:
    """What CLAM's Generic_MIL_Dataset.__getitem__ does with `data_dir` (main.py's data_root_dir)."""
    if not use_h5:
        return torch.load(data_dir / "pt_files" / f"{slide_id}.pt"), None
    with h5py.File(data_dir / "h5_files" / f"{slide_id}.h5", "r") as handle:
        features = handle["features"][:]
        coords = handle["coords"][:]
    return torch.from_numpy(features), coords


def test_clam_export_trains_from_pt_files_and_reads_h5_files(features_dir: Path, tmp_path: Path) -> None:
    exported = export_features([features_dir], tmp_path, fmt="clam")
    assert [item.skipped for item in exported] == ["", ""]
    for item in exported:
        ours = read_feature_file(item.source)
        assert ours.source_format == "wsi_mil"
        features, _ = clam_item(tmp_path, item.slide_id, use_h5=False)
        assert features.dtype == torch.float32 and features.shape == (ours.num_tiles, ours.feature_dim)
        np.testing.assert_array_equal(features.numpy(), ours.features)
        # CLAM's collate_MIL concatenates the bag and its first layer is a float32 nn.Linear.
        bag = torch.cat([features], dim=0)
        assert torch.nn.Linear(ours.feature_dim, 4)(bag).shape == (ours.num_tiles, 4)
        h5_features, coords = clam_item(tmp_path, item.slide_id, use_h5=True)
        assert h5_features.dtype == torch.float32
        np.testing.assert_array_equal(coords, ours.coords)
        with h5py.File(tmp_path / "h5_files" / f"{item.slide_id}.h5", "r") as handle:
            attrs = handle["coords"].attrs
            assert (attrs["patch_level"], attrs["patch_size"], attrs["name"]) == (0, 256, item.slide_id)
            np.testing.assert_array_equal(attrs["downsample"], [1.0, 1.0])
    # The float16 source would have broken CLAM's model: the export is why the files are float32.
    with pytest.raises(RuntimeError):
        torch.nn.Linear(ours.feature_dim, 4)(torch.from_numpy(ours.features.astype(np.float16)))


def test_trident_export_has_its_folder_and_attributes(features_dir: Path, tmp_path: Path) -> None:
    [first, _] = export_features([features_dir], tmp_path, fmt="trident")
    [path] = first.files
    assert path == tmp_path / "features_test-encoder" / f"{first.slide_id}.h5"
    with h5py.File(path, "r") as handle:
        assert dict(handle["features"].attrs) == {
            "name": first.slide_id, "savetodir": str(path.parent), "encoder": "test-encoder"
        }
        coords_attrs = set(handle["coords"].attrs)
    assert {"patch_size", "patch_size_level0", "level0_magnification", "target_magnification",
            "overlap", "level0_width", "level0_height", "name"} <= coords_attrs
    bag = read_feature_file(path)
    assert bag.source_format == "trident" and bag.features.dtype == np.float32
    np.testing.assert_array_equal(bag.features, read_feature_file(first.source).features)


def test_files_without_coords_or_unreadable_are_skipped_with_a_reason(tmp_path: Path) -> None:
    torch.save(np.zeros((3, 4), dtype=np.float32), tmp_path / "trident.pt")  # TRIDENT's .pt
    (tmp_path / "broken.h5").write_bytes(b"not hdf5")
    exported = {item.slide_id: item for item in export_features([tmp_path], tmp_path / "out", fmt="clam")}
    assert "no coords" in exported["trident"].skipped and exported["trident"].files == ()
    assert "broken.h5: not a readable HDF5" in exported["broken"].skipped
    assert not (tmp_path / "out").exists()
