"""Streaming extraction on real tiles of CMU-1-Small-Region.svs (0.499 µm/px), random weights."""

from __future__ import annotations

import dataclasses
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from wsi_mil.preprocessing.encoders import Encoder, load_encoder, preprocess_tile
from wsi_mil.preprocessing.extract import (
    CpuPlan,
    TileDataset,
    _cgroup_cpu_quota,
    decode_in_threads,
    extract_features,
    measure_forward_throughput,
    plan_cpu_use,
    usable_cpus,
)
from wsi_mil.preprocessing.feature_file import (
    FeatureFileWriter,
    FeatureProvenance,
    read_feature_file,
)
from wsi_mil.preprocessing.slide import SlideReader, open_slide
from wsi_mil.preprocessing.tiling import TileGrid, TilingParams, read_tile, tile_grid
from wsi_mil.preprocessing.tissue import TissueParams, segment_tissue


@pytest.fixture(scope="module")
def slide(slides_dir: Path) -> SlideReader:
    return open_slide(slides_dir / "tissue" / "CMU-1-Small-Region.svs")


@pytest.fixture(scope="module")
def grid(slide: SlideReader) -> TileGrid:
    """The tissue tiles of 256 px at 0.5 µm/px (257 level-0 px, read at level 0)."""
    result = tile_grid(slide, segment_tissue(slide, TissueParams()), TilingParams())
    assert len(result) >= 16 and result.tile_size_level0 == 257
    return result


@pytest.fixture(scope="module")
def test_encoder() -> Encoder:
    return load_encoder("test-encoder", weights="random", device="cpu")


@pytest.fixture(scope="module")
def resnet() -> Encoder:
    return load_encoder("resnet50-trunc", weights="random", device="cpu")


def first_tiles(grid: TileGrid, n: int) -> TileGrid:
    return dataclasses.replace(
        grid, coords=grid.coords[:n], tissue_fractions=grid.tissue_fractions[:n]
    )


def run(slide: SlideReader, grid: TileGrid, encoder: Encoder, **kwargs: object) -> np.ndarray:
    batches = list(extract_features(slide, grid, encoder, **kwargs))  # type: ignore[arg-type]
    return np.concatenate([features for _, features in batches])


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_dataset_items_are_resized_real_tiles(
    slide: SlideReader, grid: TileGrid, test_encoder: Encoder
) -> None:
    dataset = TileDataset(slide, grid, test_encoder.cfg)
    assert len(dataset) == len(grid)
    item, error = dataset[3]
    assert error == ""
    assert item.dtype == torch.uint8 and item.shape == (3, 64, 64)
    expected = preprocess_tile(read_tile(slide, grid, 3), test_encoder.cfg)
    torch.testing.assert_close(item, expected, rtol=0, atol=0)
    assert item.float().std() > 5, "a tissue tile should not be blank"


def test_other_processes_read_through_their_own_reader(
    slide: SlideReader, grid: TileGrid, test_encoder: Encoder
) -> None:
    dataset = TileDataset(slide, grid, test_encoder.cfg)
    assert dataset._reader() is slide
    copy = pickle.loads(pickle.dumps(dataset))  # what a spawned worker receives
    assert copy._worker_reader is None
    dataset._owner_pid = os.getpid() + 1  # what a forked worker sees: a different pid
    private = dataset._reader()
    assert private is not slide and private.path == slide.path
    assert dataset._reader() is private
    torch.testing.assert_close(dataset[0][0], copy[0][0], rtol=0, atol=0)


def test_batches_come_in_order_with_progress(
    slide: SlideReader, grid: TileGrid, test_encoder: Encoder
) -> None:
    progress: list[tuple[int, int]] = []
    batches = list(
        extract_features(
            slide,
            grid,
            test_encoder,
            batch_size=5,
            num_workers=0,
            on_batch=lambda *a: progress.append(a),
        )
    )
    n = len(grid)
    assert [start for start, _ in batches] == list(range(0, n, 5))
    assert all(f.dtype == np.float32 and f.shape[1] == 32 for _, f in batches)
    assert progress[-1] == (n, n) and [done for done, _ in progress] == sorted(
        {min(n, s + 5) for s in range(0, n, 5)}
    )
    assert list(extract_features(slide, first_tiles(grid, 0), test_encoder)) == []


def test_features_do_not_depend_on_workers(
    slide: SlideReader, grid: TileGrid, test_encoder: Encoder
) -> None:
    tiles = first_tiles(grid, 16)
    reference = run(slide, tiles, test_encoder, batch_size=6, num_workers=0)
    for workers in (0, 1, 2):
        again = run(slide, tiles, test_encoder, batch_size=6, num_workers=workers)
        np.testing.assert_array_equal(again, reference, err_msg=f"num_workers={workers}")
    assert np.unique(reference, axis=0).shape[0] == 16


@pytest.mark.parametrize("threads", [1, 3])
def test_threads_decode_each_batch_in_tile_order(
    slide: SlideReader, grid: TileGrid, test_encoder: Encoder, threads: int
) -> None:
    tiles = first_tiles(grid, 11)
    dataset = TileDataset(slide, tiles, test_encoder.cfg)
    batches = list(decode_in_threads(dataset, batch_size=4, threads=threads))
    assert [len(images) for images, _ in batches] == [4, 4, 3]
    assert all(errors == [""] * len(images) for images, errors in batches)
    decoded = torch.cat([images for images, _ in batches])
    one_by_one = torch.stack([preprocess_tile(read_tile(slide, tiles, i), test_encoder.cfg) for i in range(11)])
    torch.testing.assert_close(decoded, one_by_one, rtol=0, atol=0)


def test_resnet50_trunc_features_do_not_depend_on_workers(
    slide: SlideReader, grid: TileGrid, resnet: Encoder
) -> None:
    few = first_tiles(grid, 3)
    reference = run(slide, few, resnet, batch_size=2, num_workers=0)
    assert reference.shape == (3, 1024)
    for workers in (1, 2):
        again = run(slide, few, resnet, batch_size=2, num_workers=workers)  # precision auto
        np.testing.assert_array_equal(again, reference, err_msg=f"num_workers={workers}")


def test_resnet50_trunc_bf16_stays_within_cosine_0999_of_fp32(
    slide: SlideReader, grid: TileGrid, resnet: Encoder
) -> None:
    """What makes `precision="auto"` pick bf16 on CPU for resnet50-trunc (measured 0.99999)."""
    tiles = first_tiles(grid, 16)
    fp32 = run(slide, tiles, resnet, batch_size=16, num_workers=0, precision="fp32")
    auto = run(slide, tiles, resnet, batch_size=16, num_workers=0, precision="auto")
    assert cosine(fp32, auto).min() > 0.999
    assert not np.array_equal(fp32, auto), "auto should have run in bf16 on CPU"


@pytest.mark.slow
def test_spawned_workers_give_the_same_features(
    slide: SlideReader, grid: TileGrid, test_encoder: Encoder
) -> None:
    few = first_tiles(grid, 6)
    reference = run(slide, few, test_encoder, batch_size=4, num_workers=0)
    spawned = run(
        slide, few, test_encoder, batch_size=4, num_workers=1, multiprocessing_context="spawn"
    )
    np.testing.assert_array_equal(spawned, reference)


def test_stream_into_a_feature_file(
    tmp_path: Path, slide: SlideReader, grid: TileGrid, test_encoder: Encoder
) -> None:
    width, height = slide.dimensions
    provenance = FeatureProvenance(
        slide_id="CMU-1-Small-Region",
        slide_path=str(slide.path),
        slide_quick_hash="0" * 64,
        slide_width=width,
        slide_height=height,
        slide_vendor=slide.vendor,
        mpp=slide.mpp.mpp,
        mpp_source=slide.mpp.source,
        target_mpp=0.5,
        tile_px=256,
        tile_size_level0=grid.tile_size_level0,
        overlap_px=0,
        read_level=grid.read_level,
        level0_magnification=20.0,
        target_magnification=20.0,
        encoder="test-encoder",
        encoder_weights=test_encoder.weights,
        encoder_weights_sha256=None,
        feature_dim=32,
        precision="fp32",
        transform=test_encoder.transform_info(),
        tissue={"mode": "brightfield"},
        tiling={"tile_px": 256},
        params_hash="test",
        read_size=grid.read_size,
    )
    with FeatureFileWriter(
        tmp_path / "cmu.h5",
        num_tiles=len(grid),
        feature_dim=32,
        coords=grid.coords,
        provenance=provenance,
        dtype="float32",
    ) as writer:
        for start, features in extract_features(
            slide, grid, test_encoder, batch_size=7, num_workers=2
        ):
            writer.write(start, features)
    bag = read_feature_file(tmp_path / "cmu.h5")
    expected = run(slide, grid, test_encoder, batch_size=7, num_workers=0)
    np.testing.assert_array_equal(bag.features, expected)
    np.testing.assert_array_equal(bag.coords, grid.coords)
    assert bag.tile_size_level0 == 257


def test_measure_forward_throughput_is_positive(test_encoder: Encoder) -> None:
    rate = measure_forward_throughput(test_encoder, batch_size=4, n_batches=2, precision="fp32")
    assert 0 < rate < float("inf")


@pytest.mark.parametrize(
    ("device", "cpus", "slides", "expected"),
    [
        ("cpu", 2, 1, CpuPlan(threads=2, workers=0)),  # the 2-core machine: 2 threads decode, then 2 run the model
        ("cpu", 16, 1, CpuPlan(threads=16, workers=0)),
        ("cpu", 64, 1, CpuPlan(threads=64, workers=0)),
        ("cpu", 16, 4, CpuPlan(threads=4, workers=0)),  # --jobs 4 shares the cores
        ("cpu", 2, 4, CpuPlan(threads=1, workers=0)),
        ("cuda", 16, 1, CpuPlan(threads=1, workers=8)),  # the GPU runs the model, the cores decode
        ("cuda", 2, 1, CpuPlan(threads=1, workers=1)),
    ],
)
def test_cpu_plan_follows_the_cores(device: str, cpus: int, slides: int, expected: CpuPlan) -> None:
    assert plan_cpu_use(device, cpus=cpus, slides_at_once=slides) == expected


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"cpu.max": "150000 100000\n"}, 1.5),
        ({"cpu.max": "max 100000\n"}, None),
        ({"cpu/cpu.cfs_quota_us": "400000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 4.0),
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({}, None),
    ],
)
def test_cgroup_cpu_quota_v2_and_v1(tmp_path: Path, files: dict[str, str], expected: float | None) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert _cgroup_cpu_quota(tmp_path) == expected


def test_usable_cpus_is_within_the_affinity_mask() -> None:
    assert 1 <= usable_cpus() <= len(os.sched_getaffinity(0))
