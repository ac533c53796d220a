"""The HDF5 feature file: atomic streaming writes, CLAM/TRIDENT/STAMP/.pt reading, validation."""

from __future__ import annotations

import dataclasses
import os
import zipfile
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import psutil
import pytest
import torch

from wsi_mil.errors import FeatureFileError
from wsi_mil.preprocessing.feature_file import (
    FeatureFileWriter,
    FeatureLimits,
    FeatureProvenance,
    chunk_rows,
    read_feature_file,
    read_feature_meta,
    required_provenance_attrs,
    validate_feature_file,
    write_feature_file,
)

RNG = np.random.default_rng(0)


def make_provenance(**overrides: Any) -> FeatureProvenance:
    values: dict[str, Any] = {
        "slide_id": "slide-a",
        "slide_path": "/data/slide-a.svs",
        "slide_quick_hash": "ab" * 32,
        "slide_width": 46000,
        "slide_height": 32914,
        "slide_vendor": "aperio",
        "mpp": 0.2527,
        "mpp_source": "properties",
        "target_mpp": 0.5,
        "tile_px": 256,
        "tile_size_level0": 507,
        "overlap_px": 0,
        "read_level": 0,
        "level0_magnification": 10 / 0.2527,
        "target_magnification": 20.0,
        "encoder": "resnet50-trunc",
        "encoder_weights": "random",
        "encoder_weights_sha256": None,
        "feature_dim": 8,
        "precision": "bf16",
        "transform": {"size": 224, "resize": 224, "mean": [0.485, 0.456, 0.406]},
        "tissue": {"method": "otsu", "min_area": 0.5},
        "tiling": {"tile_px": 256, "target_mpp": 0.5},
        "params_hash": "0123456789abcdef",
        "read_size": 507,
    }
    values.update(overrides)
    return FeatureProvenance(**values)


def make_bag(n: int = 100, d: int = 8) -> tuple[np.ndarray, np.ndarray]:
    features = RNG.normal(size=(n, d)).astype(np.float32)
    coords = np.stack([np.arange(n) * 507, np.arange(n) % 7 * 507], axis=1).astype(np.int64)
    return features, coords


def folder_is_empty(folder: Path) -> bool:
    return not any(folder.iterdir())


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_round_trip_keeps_features_coords_and_provenance(tmp_path: Path, dtype: str) -> None:
    features, coords = make_bag()
    # torch.__version__ is a str subclass and numpy scalars are common: both must store
    provenance = make_provenance(torch_version=torch.__version__, mpp=np.float64(0.2527))
    path = write_feature_file(tmp_path / "a.h5", features, coords, provenance, dtype=dtype)

    bag = read_feature_file(path)
    assert bag.source_format == "wsi_mil"
    assert bag.features.dtype == np.float32
    np.testing.assert_array_equal(bag.features, features.astype(dtype).astype(np.float32))
    np.testing.assert_array_equal(bag.coords, coords)
    assert bag.coords.dtype == np.int64
    assert bag.tile_size_level0 == 507
    assert (bag.num_tiles, bag.feature_dim) == (100, 8)
    assert bag.encoder == "resnet50-trunc"
    assert bag.slide_id == "slide-a"
    assert bag.provenance() == provenance
    assert bag.attrs["tissue"] == {"method": "otsu", "min_area": 0.5}
    with h5py.File(path, "r") as handle:
        assert handle["features"].dtype == np.dtype(dtype)
        assert handle["features"].compression is None


def test_batches_may_arrive_in_any_order(tmp_path: Path) -> None:
    features, coords = make_bag(n=130)
    with FeatureFileWriter(
        tmp_path / "b.h5",
        num_tiles=130,
        feature_dim=8,
        coords=coords,
        provenance=make_provenance(),
        dtype="float32",
    ) as writer:
        for start in (64, 0, 128):
            writer.write(start, features[start : start + 64])
    np.testing.assert_array_equal(read_feature_file(tmp_path / "b.h5").features, features)


def test_dropped_rows_leave_every_dataset_and_tile_data_round_trips(tmp_path: Path) -> None:
    features, coords = make_bag(n=300)
    ink = np.linspace(0, 1, 300, dtype=np.float32)
    dropped = [0, 5, 64, 65, 200, 299]  # across several 64-row chunks, first and last included
    with FeatureFileWriter(
        tmp_path / "dropped.h5",
        num_tiles=300,
        feature_dim=8,
        coords=coords,
        provenance=make_provenance(),
        dtype="float32",
        tile_data={"ink_fraction": ink},
    ) as writer:
        for start in range(0, 300, 64):
            writer.write(start, features[start : start + 64])
        writer.drop_rows(dropped)
    bag = read_feature_file(tmp_path / "dropped.h5")
    keep = np.setdiff1d(np.arange(300), dropped)
    np.testing.assert_array_equal(bag.features, features[keep])
    np.testing.assert_array_equal(bag.coords, coords[keep])
    np.testing.assert_array_equal(bag.tile_data["ink_fraction"], ink[keep])
    # Dropped rows need not be written at all.
    with FeatureFileWriter(
        tmp_path / "unwritten.h5", num_tiles=3, feature_dim=8, coords=coords[:3], provenance=make_provenance()
    ) as writer:
        writer.write(0, features[:1])
        writer.drop_rows([1, 2])
    assert read_feature_file(tmp_path / "unwritten.h5").num_tiles == 1
    assert read_feature_file(write_feature_file(tmp_path / "plain.h5", features, coords, make_provenance())).tile_data == {}
    with pytest.raises(FeatureFileError, match="tile data 'coords'"):
        FeatureFileWriter(tmp_path / "x.h5", num_tiles=300, feature_dim=8, coords=coords,
                          provenance=make_provenance(), tile_data={"coords": ink})


def test_coords_attributes_serve_clam_and_trident_readers(tmp_path: Path) -> None:
    provenance = make_provenance(
        read_level=1, read_size=254, read_level_downsample=2.0, read_level_dimensions=(23000, 16457)
    )
    path = write_feature_file(tmp_path / "c.h5", *make_bag(), provenance)
    with h5py.File(path, "r") as handle:
        coords_attrs = dict(handle["coords"].attrs)
        assert handle["features"].attrs["encoder"] == "resnet50-trunc"
    # CLAM's Whole_Slide_Bag_FP reads patch_level + patch_size; its patch files also carry these.
    assert coords_attrs["patch_level"] == 1
    assert coords_attrs["name"] == "slide-a"
    np.testing.assert_array_equal(coords_attrs["downsample"], [2.0, 2.0])
    np.testing.assert_array_equal(coords_attrs["level_dim"], [23000, 16457])
    np.testing.assert_array_equal(coords_attrs["downsampled_level_dim"], [23000, 16457])
    # TRIDENT's WSIPatcher: level-0 size = patch_size * (10 / target_mag) / (10 / level0_mag).
    assert coords_attrs["patch_size"] == 256
    downsample = (10 / coords_attrs["target_magnification"]) / (
        10 / coords_attrs["level0_magnification"]
    )
    assert (
        round(coords_attrs["patch_size"] * downsample) == coords_attrs["patch_size_level0"] == 507
    )
    assert coords_attrs["overlap"] == 0
    assert (coords_attrs["level0_width"], coords_attrs["level0_height"]) == (46000, 32914)


def test_feature_chunks_hold_at_least_64_rows(tmp_path: Path) -> None:
    assert chunk_rows(200_000, 1024, 2) == 1024
    assert chunk_rows(200_000, 1536, 4) == 341
    assert chunk_rows(200_000, 65536, 4) == 64
    assert chunk_rows(10, 1024, 2) == 10
    features, coords = make_bag(n=5000, d=1024)
    path = write_feature_file(
        tmp_path / "d.h5", features, coords, make_provenance(feature_dim=1024)
    )
    with h5py.File(path, "r") as handle:
        assert handle["features"].chunks == (1024, 1024)


def test_interrupted_write_leaves_no_file(tmp_path: Path) -> None:
    features, coords = make_bag()
    with pytest.raises(KeyboardInterrupt):
        with FeatureFileWriter(
            tmp_path / "e.h5",
            num_tiles=100,
            feature_dim=8,
            coords=coords,
            provenance=make_provenance(),
        ) as writer:
            writer.write(0, features[:50])
            assert writer.temp_path.exists() and not (tmp_path / "e.h5").exists()
            raise KeyboardInterrupt
    assert folder_is_empty(tmp_path)


def test_crash_mid_write_leaves_no_file(tmp_path: Path) -> None:
    features, coords = make_bag()

    def batches() -> Any:
        yield 0, features[:40]
        raise RuntimeError("encoder crashed")

    with pytest.raises(RuntimeError, match="encoder crashed"):
        with FeatureFileWriter(
            tmp_path / "f.h5",
            num_tiles=100,
            feature_dim=8,
            coords=coords,
            provenance=make_provenance(),
        ) as writer:
            for start, batch in batches():
                writer.write(start, batch)
    assert folder_is_empty(tmp_path)


def test_clean_exit_with_missing_rows_raises_and_leaves_no_file(tmp_path: Path) -> None:
    features, coords = make_bag()
    with pytest.raises(FeatureFileError, match="40 of 100 rows were never written"):
        with FeatureFileWriter(
            tmp_path / "g.h5",
            num_tiles=100,
            feature_dim=8,
            coords=coords,
            provenance=make_provenance(),
        ) as writer:
            writer.write(0, features[:60])
    assert folder_is_empty(tmp_path)


def test_existing_file_is_replaced_only_on_success(tmp_path: Path) -> None:
    features, coords = make_bag()
    path = write_feature_file(tmp_path / "h.h5", features, coords, make_provenance())
    broken = features[:, :4].copy()
    broken[7, 1] = np.inf
    with pytest.raises(FeatureFileError, match="non-finite"):
        write_feature_file(path, broken, coords, make_provenance(feature_dim=4))
    assert read_feature_file(path).feature_dim == 8
    write_feature_file(path, features[:, :4], coords, make_provenance(feature_dim=4))
    assert read_feature_file(path).feature_dim == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h.h5"]


@pytest.mark.parametrize(
    ("batch", "start", "message"),
    [
        (np.full((4, 8), np.nan, dtype=np.float32), 0, "non-finite"),
        (np.full((4, 8), 1e6, dtype=np.float32), 0, "float16 overflow"),
        (np.zeros((4, 7), dtype=np.float32), 0, r"\[b, 8\] batch"),
        (np.zeros((4, 8), dtype=np.float32), 98, "outside"),
    ],
)
def test_bad_batches_are_refused(
    tmp_path: Path, batch: np.ndarray, start: int, message: str
) -> None:
    _, coords = make_bag()
    with pytest.raises(FeatureFileError, match=message):
        with FeatureFileWriter(
            tmp_path / "i.h5",
            num_tiles=100,
            feature_dim=8,
            coords=coords,
            provenance=make_provenance(),
        ) as writer:
            writer.write(start, batch)
    assert folder_is_empty(tmp_path)


def test_writer_checks_its_arguments(tmp_path: Path) -> None:
    _, coords = make_bag()
    with pytest.raises(FeatureFileError, match="coords must be integer"):
        FeatureFileWriter(
            tmp_path / "j.h5",
            num_tiles=100,
            feature_dim=8,
            coords=coords.astype(float),
            provenance=make_provenance(),
        )
    with pytest.raises(FeatureFileError, match="feature_dim"):
        FeatureFileWriter(
            tmp_path / "j.h5",
            num_tiles=100,
            feature_dim=16,
            coords=coords,
            provenance=make_provenance(),
        )


def test_reads_a_clam_feature_file(tmp_path: Path) -> None:
    """CLAM's h5_files/<slide>.h5: save_hdf5 with (32, D) chunks, resizable, no attributes."""
    features, coords = make_bag(n=70, d=1024)
    path = tmp_path / "h5_files" / "TCGA-XX.h5"
    path.parent.mkdir()
    with h5py.File(path, "w") as handle:
        for key, value in (("features", features), ("coords", coords.astype(np.int32))):
            dset = handle.create_dataset(
                key,
                shape=value.shape,
                maxshape=(None, value.shape[1]),
                chunks=(32, value.shape[1]),
                dtype=value.dtype,
            )
            dset[:] = value
    bag = read_feature_file(path)
    assert bag.source_format == "clam"
    np.testing.assert_array_equal(bag.features, features)
    np.testing.assert_array_equal(bag.coords, coords)
    assert bag.coords.dtype == np.int64
    assert bag.tile_size_level0 is None
    assert bag.slide_id == "TCGA-XX"
    assert bag.encoder is None


def test_reads_clam_patch_attributes_for_the_tile_size(tmp_path: Path) -> None:
    features, coords = make_bag(n=10)
    path = tmp_path / "clam.h5"
    with h5py.File(path, "w") as handle:
        handle["features"] = features
        handle["coords"] = coords
        handle["coords"].attrs.update(
            {
                "patch_size": 256,
                "patch_level": 1,
                "downsample": np.array([4.0, 4.0]),
                "downsampled_level_dim": np.array([10000, 8000]),
                "level_dim": np.array([10000, 8000]),
                "name": "slide-b",
                "save_path": "/out/patches",
            }
        )
    bag = read_feature_file(path)
    assert (bag.source_format, bag.tile_size_level0, bag.slide_id) == ("clam", 1024, "slide-b")


def test_reads_a_trident_feature_file(tmp_path: Path) -> None:
    """TRIDENT's features_<enc>/<slide>.h5: save_h5 with (1, D) chunks, attrs on both datasets."""
    features, coords = make_bag(n=12, d=1024)
    path = tmp_path / "features_uni_v1" / "slide-c.h5"
    path.parent.mkdir()
    coords_attrs = {
        "patch_size": 256,
        "patch_size_level0": 512,
        "level0_magnification": 40,
        "target_magnification": 20,
        "overlap": 0,
        "name": "slide-c",
        "savetodir": "/job/patches",
        "level0_width": 80000,
        "level0_height": 60000,
    }
    with h5py.File(path, "w") as handle:
        for key, value, attrs in (
            (
                "features",
                features,
                {"name": "slide-c", "savetodir": str(path.parent), "encoder": "uni_v1"},
            ),
            ("coords", coords, coords_attrs),
        ):
            dset = handle.create_dataset(
                key,
                shape=value.shape,
                maxshape=(None, value.shape[1]),
                chunks=(1, value.shape[1]),
                dtype=value.dtype,
            )
            dset[:] = value
            dset.attrs.update(attrs)
    bag = read_feature_file(path)
    assert bag.source_format == "trident"
    assert (bag.tile_size_level0, bag.encoder, bag.slide_id) == (512, "uni_v1", "slide-c")
    np.testing.assert_array_equal(bag.features, features)
    np.testing.assert_array_equal(bag.coords, coords)
    assert bag.attrs["target_magnification"] == 20
    meta = read_feature_meta(path)
    assert (meta["source_format"], meta["encoder"], meta["num_tiles"]) == ("trident", "uni_v1", 12)


def _write_stamp(path: Path, *, unit: str | None = "um") -> tuple[np.ndarray, np.ndarray]:
    features = RNG.normal(size=(6, 16)).astype(np.float16)
    coords_um = np.array(
        [[0, 0], [256, 0], [512, 256], [0, 512], [768, 768], [256, 256]], dtype=np.float32
    )
    with h5py.File(path, "w") as handle:
        handle["coords"] = coords_um
        handle["feats"] = features
        handle.attrs.update(
            {
                "stamp_version": "2.3.0",
                "extractor": "uni2",
                "tile_size_um": 256.0,
                "tile_size_px": 224,
                "code_hash": "abcd1234",
            }
        )
        if unit is not None:
            handle.attrs["unit"] = unit
    return features, coords_um


def test_reads_a_stamp_feature_file(tmp_path: Path) -> None:
    features, coords_um = _write_stamp(tmp_path / "stamp.h5")
    bag = read_feature_file(tmp_path / "stamp.h5")
    assert bag.source_format == "stamp"
    assert bag.encoder == "uni2"
    np.testing.assert_array_equal(bag.features, features.astype(np.float32))
    np.testing.assert_array_equal(bag.coords, np.rint(coords_um * 224 / 256).astype(np.int64))
    assert bag.tile_size_level0 == 224
    assert "not level 0" in bag.notes[0]

    level0 = read_feature_file(tmp_path / "stamp.h5", slide_mpp=0.5)
    np.testing.assert_array_equal(level0.coords, (coords_um / 0.5).astype(np.int64))
    assert level0.tile_size_level0 == 512

    _write_stamp(tmp_path / "old.h5", unit=None)
    old = read_feature_file(tmp_path / "old.h5")
    assert old.coords is None and "coords dropped" in old.notes[0]


def test_reads_pt_bags(tmp_path: Path) -> None:
    features, coords = make_bag(n=9, d=32)
    torch.save(torch.from_numpy(features), tmp_path / "clam.pt")
    bag = read_feature_file(tmp_path / "clam.pt")
    assert (bag.source_format, bag.coords, bag.num_tiles) == ("pt", None, 9)
    np.testing.assert_array_equal(bag.features, features)

    torch.save(
        {"feats": torch.from_numpy(features).half(), "coords": torch.from_numpy(coords)},
        tmp_path / "dict.pth",
    )
    bag = read_feature_file(tmp_path / "dict.pth")
    np.testing.assert_array_equal(bag.coords, coords)
    np.testing.assert_array_equal(bag.features, features.astype(np.float16).astype(np.float32))

    torch.save({"embeddings": torch.zeros(3, 4)}, tmp_path / "bad.pt")
    with pytest.raises(FeatureFileError, match=r"bad.pt: a dict without `features` or `feats`"):
        read_feature_file(tmp_path / "bad.pt")


def _resave_as_numpy1(path: Path) -> None:
    """Rewrite a torch file's pickle as numpy 1.x writes an array (`numpy.core`, not `numpy._core`)."""
    with zipfile.ZipFile(path) as source:
        entries = {info: source.read(info) for info in source.infolist()}
    with zipfile.ZipFile(path, "w") as target:
        for info, data in entries.items():
            if info.filename.endswith("data.pkl"):
                assert b"numpy._core.multiarray" in data
                data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            target.writestr(info, data)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_reads_tridents_pt_a_pickled_numpy_array_without_full_unpickling(tmp_path: Path, dtype: str) -> None:
    features, _ = make_bag(n=12, d=16)
    torch.save(features.astype(dtype), tmp_path / "trident.pt")  # TRIDENT's saveas="pt"
    bag = read_feature_file(tmp_path / "trident.pt")
    assert (bag.source_format, bag.num_tiles, bag.feature_dim) == ("pt", 12, 16)
    np.testing.assert_array_equal(bag.features, features.astype(dtype).astype(np.float32))
    _resave_as_numpy1(tmp_path / "trident.pt")
    np.testing.assert_array_equal(read_feature_file(tmp_path / "trident.pt").features, bag.features)


class _RunsCode:
    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, ("touch pwned",))


def test_a_pt_file_that_would_run_code_is_refused_unrun(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    torch.save({"features": torch.zeros(2, 3), "hook": _RunsCode()}, tmp_path / "evil.pt")
    with pytest.raises(FeatureFileError, match=r"evil\.pt: not a torch file .* loads safely: .*posix\.system"):
        read_feature_file(tmp_path / "evil.pt")
    assert not (tmp_path / "pwned").exists()


def test_truncated_file_raises_with_the_file_name(tmp_path: Path) -> None:
    path = write_feature_file(
        tmp_path / "trunc.h5", *make_bag(n=2000, d=64), make_provenance(feature_dim=64)
    )
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(FeatureFileError, match=r"trunc.h5: not a readable HDF5 feature file"):
        read_feature_file(path)
    with pytest.raises(FeatureFileError, match=r"trunc\.h5"):
        read_feature_meta(path)


def test_missing_dataset_raises(tmp_path: Path) -> None:
    with h5py.File(tmp_path / "empty.h5", "w") as handle:
        handle["embeddings"] = np.zeros((3, 4), dtype=np.float32)
    with pytest.raises(FeatureFileError, match=r"empty.h5: no `features`.*found embeddings"):
        read_feature_file(tmp_path / "empty.h5")
    with pytest.raises(FeatureFileError, match="no such feature file"):
        read_feature_file(tmp_path / "absent.h5")


def _edit(path: Path, edit: Any) -> None:
    with h5py.File(path, "a") as handle:
        edit(handle)


def test_invalid_contents_raise_or_are_listed(tmp_path: Path) -> None:
    features, coords = make_bag()
    nan_path = write_feature_file(tmp_path / "nan.h5", features, coords, make_provenance())
    _edit(nan_path, lambda h: h["features"].__setitem__((3, 2), np.nan))
    with pytest.raises(FeatureFileError, match=r"nan.h5: 1 non-finite feature values"):
        read_feature_file(nan_path)
    assert np.isnan(read_feature_file(nan_path, validate=False).features[3, 2])

    short_path = write_feature_file(tmp_path / "short.h5", features, coords, make_provenance())

    def shorten_coords(handle: h5py.File) -> None:
        del handle["coords"]
        handle["coords"] = coords[:90]

    _edit(short_path, shorten_coords)
    with pytest.raises(FeatureFileError, match=r"coords shape \(90, 2\) does not match 100"):
        read_feature_file(short_path)

    attr_path = write_feature_file(tmp_path / "attr.h5", features, coords, make_provenance())
    _edit(attr_path, lambda h: h.attrs.__delitem__("params_hash"))
    assert validate_feature_file(attr_path) == [
        "attr.h5: provenance attributes missing: params_hash"
    ]
    assert (
        validate_feature_file(
            write_feature_file(tmp_path / "ok.h5", features, coords, make_provenance())
        )
        == []
    )


def test_every_provenance_field_is_required_except_the_optional_ones() -> None:
    required = set(required_provenance_attrs())
    optional = {f.name for f in dataclasses.fields(FeatureProvenance)} - required
    assert optional == {
        "encoder_weights_sha256",
        "read_size",
        "read_level_downsample",
        "read_level_dimensions",
        "objective_power",
        "background_rgb",
        "color_correction",
        "edge_padding",
    }
    assert {"params_hash", "mpp", "mpp_source", "transform", "created_utc"} <= required


def test_read_feature_meta_gives_params_hash_and_shape(tmp_path: Path) -> None:
    path = write_feature_file(tmp_path / "m.h5", *make_bag(n=33), make_provenance())
    meta = read_feature_meta(path)
    assert meta["params_hash"] == "0123456789abcdef"
    assert (meta["num_tiles"], meta["feature_dim"]) == (33, 8)
    assert (meta["wsi_mil_format_version"], meta["source_format"]) == (1, "wsi_mil")
    assert meta["tiling"] == {"tile_px": 256, "target_mpp": 0.5}


def test_streaming_200k_rows_keeps_memory_bounded(tmp_path: Path) -> None:
    """200k x 1024 float16 (400 MB on disk) streamed in batches of 512 must not grow RSS much."""
    n, d, batch_rows = 200_000, 1024, 512
    batch = RNG.normal(size=(batch_rows, d)).astype(np.float32)
    coords = np.zeros((n, 2), dtype=np.int64)
    process = psutil.Process(os.getpid())
    rss_before = process.memory_info().rss
    peak = rss_before
    with FeatureFileWriter(
        tmp_path / "big.h5",
        num_tiles=n,
        feature_dim=d,
        coords=coords,
        provenance=make_provenance(feature_dim=d),
    ) as writer:
        for start in range(0, n, batch_rows):
            writer.write(start, batch[: min(batch_rows, n - start)])
            if start % (50 * batch_rows) == 0:
                peak = max(peak, process.memory_info().rss)
    peak = max(peak, process.memory_info().rss)
    growth_mib = (peak - rss_before) / 2**20
    assert growth_mib < 64, f"RSS grew by {growth_mib:.0f} MiB while streaming 400 MB"
    assert read_feature_meta(tmp_path / "big.h5")["num_tiles"] == n


def test_limits_refuse_a_file_before_its_data_is_read(tmp_path: Path) -> None:
    features, coords = make_bag(n=1000)
    h5_path = write_feature_file(tmp_path / "bag.h5", features, coords, make_provenance())
    with pytest.raises(FeatureFileError, match=r"1,000 tiles, more than the limit of 999 \(FeatureLimits.max_tiles\)"):
        read_feature_file(h5_path, limits=FeatureLimits(max_tiles=999))
    with pytest.raises(FeatureFileError, match=r"more than the limit of 0 MiB \(FeatureLimits.max_bytes\)"):
        read_feature_file(h5_path, limits=FeatureLimits(max_bytes=1000))
    pt_path = tmp_path / "bag.pt"
    torch.save({"features": torch.from_numpy(features)}, pt_path)
    with pytest.raises(FeatureFileError, match=r"bag.pt: the archive unpacks to"):
        read_feature_file(pt_path, limits=FeatureLimits(max_bytes=1000))
    assert read_feature_file(pt_path).num_tiles == 1000


def test_mistyped_attributes_are_named_not_parsed(tmp_path: Path) -> None:
    features, coords = make_bag()
    path = write_feature_file(tmp_path / "typed.h5", features, coords, make_provenance())
    _edit(path, lambda h: h.attrs.update({"tile_size_level0": "507", "target_mpp": True}))
    problems = validate_feature_file(path)
    assert problems == [
        "typed.h5: attribute `tile_size_level0` must be a positive integer, got '507'",
        "typed.h5: attribute `target_mpp` must be a positive number, got True",
    ]
