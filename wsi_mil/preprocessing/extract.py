"""Streaming feature extraction: tiles are read and resized, batch by batch, and the encoder embeds them.

On the CPU, threads of this process decode each batch on every core and the model then runs on every
core: the two phases take turns instead of a decoding process competing with the model's threads.
With a GPU (or `num_workers > 0`), DataLoader worker processes decode ahead while the model runs.

Batches come out in tile order as `(start_row, features [b, D])`, so a `FeatureFileWriter` can
write them straight to disk and memory stays bounded whatever the number of tiles.
"""

from __future__ import annotations

import math
import os
import pickle
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import openslide
import torch
from torch.utils.data import DataLoader, Dataset

from wsi_mil.allocator import tune_this_process, tune_worker
from wsi_mil.errors import SlideOpenError
from wsi_mil.preprocessing.encoders import Encoder, EncoderCfg, preprocess_tile
from wsi_mil.preprocessing.slide import SlideReader
from wsi_mil.preprocessing.tiling import TileGrid, read_tile

#: at most this many decoding workers per slide when the model runs on a GPU
MAX_GPU_DECODING_WORKERS = 8
#: OpenSlide tile cache per decoding thread (OpenSlide's own default for one handle is 32 MiB)
TILE_CACHE_BYTES_PER_THREAD = 32 * 2**20


def usable_cpus() -> int:
    """CPU cores this process may use: its affinity mask, capped by a cgroup v2 (`cpu.max`) or v1
    (`cpu.cfs_quota_us`) CPU quota rounded up, as containers and Slurm jobs set them."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    return max(1, min(cpus, math.ceil(quota))) if quota else max(1, cpus)


def _cgroup_cpu_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    try:
        text = (root / "cpu.max").read_text().split()
        if text and text[0] != "max":
            return int(text[0]) / int(text[1])
    except (OSError, ValueError, IndexError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class CpuPlan:
    """How one slide's feature extraction uses the cores: intra-op torch threads, and decoding worker
    processes (0: `threads` threads of the slide's own process decode each batch)."""

    threads: int
    workers: int


def plan_cpu_use(device_type: str, *, slides_at_once: int = 1, cpus: int | None = None) -> CpuPlan:
    """Threads and decoding workers for one slide when `slides_at_once` slides share `cpus` cores.

    On the CPU the model takes every core of its share, and so does the decoding of each batch,
    by as many threads of the slide's process, in turn with the model. On 2 cores this ran the
    stage at 1.05-1.26x the rate of one decoding worker process beside the model, whose core the
    model's threads kept waiting for, with 28 % less peak RSS (docs/benchmarks.md). On a GPU the
    cores decode ahead in worker processes (share - 1, at most `MAX_GPU_DECODING_WORKERS`) and the
    host keeps one thread.
    """
    share = max(1, (cpus if cpus is not None else usable_cpus()) // max(1, slides_at_once))
    if device_type == "cuda":
        return CpuPlan(threads=1, workers=max(1, min(MAX_GPU_DECODING_WORKERS, share - 1)))
    return CpuPlan(threads=share, workers=0)


class TileDataset(Dataset[tuple[torch.Tensor, str]]):
    """Tiles of `grid` as `(uint8 [3, img_size, img_size] resized and cropped for cfg, error)`.

    `error` is "" for a tile that was read, else the one-line reason it could not be (its image is
    then blank): a damaged tile never raises inside a DataLoader worker, whose traceback would
    become the slide's reason. Each process reads through its own `SlideReader`: the creating
    process uses `slide`, any other process (a DataLoader worker, forked or spawned) opens a
    private copy on first use. Decoding threads pass their own readers to `decode`
    (`decode_in_threads`), because an OpenSlide error is sticky on the handle it happened on.
    """

    def __init__(self, slide: SlideReader, grid: TileGrid, cfg: EncoderCfg) -> None:
        self.slide = slide
        self.grid = grid
        self.cfg = cfg
        self._owner_pid = os.getpid()
        self._worker_reader: SlideReader | None = None
        self._worker_pid: int | None = None

    def __len__(self) -> int:
        return len(self.grid.coords)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        return self.decode(index, self._reader())

    def decode(self, index: int, reader: SlideReader) -> tuple[torch.Tensor, str]:
        """Tile `index` read through `reader`, resized and cropped, with its error ("" when read)."""
        try:
            tile = read_tile(reader, self.grid, index)  # [tile_px, tile_px, 3]
        except SlideOpenError as err:
            side = self.grid.tile_px
            return preprocess_tile(np.zeros((side, side, 3), dtype=np.uint8), self.cfg), str(err)
        return preprocess_tile(tile, self.cfg), ""

    def private_reader(self) -> SlideReader:
        """A new reader of the same slide with no OpenSlide handle yet (a pickle round trip, see
        `SlideReader`): it opens its own on first use."""
        return pickle.loads(pickle.dumps(self.slide))

    def _reader(self) -> SlideReader:
        pid = os.getpid()
        if pid == self._owner_pid:
            return self.slide
        if self._worker_reader is None or self._worker_pid != pid:
            self._worker_reader = self.private_reader()
            self._worker_pid = pid
        return self._worker_reader

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_worker_reader"] = None
        state["_worker_pid"] = None
        return state


def extract_features(
    slide: SlideReader,
    grid: TileGrid,
    encoder: Encoder,
    *,
    batch_size: int = 64,
    num_workers: int | None = None,
    precision: str = "auto",
    on_batch: Callable[[int, int], None] | None = None,
    multiprocessing_context: str | None = None,
    on_unreadable: Callable[[int, str], None] | None = None,
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield `(start_row, features float32 [b, D])` for the tiles of `grid`, in order.

    `precision="auto"` runs the encoder's GPU precision on CUDA and its measured CPU precision
    on CPU (see `resolve_precision`). `on_batch(done, total)` is called after every batch.
    A tile that cannot be read (damaged data) raises `SlideOpenError` with its one-line reason, or,
    with `on_unreadable`, is reported as `on_unreadable(row, reason)` and its row holds the features
    of a blank tile. `num_workers` decoding processes decode ahead of the model; with 0, as many
    threads as torch uses decode each batch in this process (None: `plan_cpu_use`'s choice).
    Results do not depend on either. A process still on glibc's default malloc is tuned first
    (`wsi_mil.allocator`), and so are the workers.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    total = len(grid.coords)
    if total == 0:
        return
    tune_this_process()
    dataset = TileDataset(slide, grid, encoder.cfg)
    if num_workers is None:
        num_workers = plan_cpu_use(encoder.device.type).workers
    if num_workers > 0:
        batches: Iterator[tuple[torch.Tensor, list[str]]] = iter(DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=False,
            num_workers=num_workers,
            pin_memory=encoder.device.type == "cuda",
            persistent_workers=False,
            prefetch_factor=2,
            multiprocessing_context=multiprocessing_context,
            worker_init_fn=tune_worker,
        ))
    else:
        batches = decode_in_threads(dataset, batch_size=batch_size, threads=torch.get_num_threads())
    done = 0
    for images, errors in batches:  # uint8 [b, 3, S, S], b reasons ("" when read)
        for offset, error in enumerate(errors):
            if error and on_unreadable is None:
                raise SlideOpenError(error)
            if error:
                on_unreadable(done + offset, error)
        features = encoder.embed(images, precision=precision).cpu().numpy()  # [b, D]
        yield done, features
        done += len(features)
        if on_batch is not None:
            on_batch(done, total)


def decode_in_threads(
    dataset: TileDataset, *, batch_size: int, threads: int
) -> Iterator[tuple[torch.Tensor, list[str]]]:
    """Batches `(uint8 [b, 3, S, S], b reasons)` of `dataset` in order, each decoded by `threads`
    threads of this process (OpenSlide and Pillow release the GIL) before the next is started, so
    decoding and the model take turns on the same cores.

    Each thread reads through its own OpenSlide handle, so a damaged tile's (sticky) error cannot
    fail a sound tile read at the same moment by another thread; the handles share one tile cache,
    so neighbouring tiles read by different threads still decode each stored tile once.
    """
    threads = max(1, threads)
    cache = openslide.OpenSlideCache(threads * TILE_CACHE_BYTES_PER_THREAD)
    own = threading.local()

    def decode(index: int) -> tuple[torch.Tensor, str]:
        reader = getattr(own, "reader", None)
        if reader is None:
            reader = own.reader = dataset.private_reader()
            reader.share_cache(cache)
        return dataset.decode(index, reader)

    rows = range(len(dataset))
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="wsi-mil-decode") as pool:
        for start in range(0, len(rows), batch_size):
            items = list(pool.map(decode, rows[start : start + batch_size]))
            yield torch.stack([image for image, _ in items]), [error for _, error in items]


def measure_forward_throughput(
    encoder: Encoder,
    *,
    batch_size: int = 32,
    n_batches: int = 4,
    precision: str = "auto",
    warmup_batches: int = 1,
) -> float:
    """Tiles per second of the encoder step alone: `encoder.embed` (normalisation and forward,
    compiled where the encoder was compiled) on random uint8 tiles already decoded and resized,
    after `warmup_batches` untimed batches; no reading, no decoding, no workers."""
    generator = torch.Generator().manual_seed(0)
    side = encoder.cfg.img_size
    tiles = torch.randint(0, 256, (batch_size, 3, side, side), generator=generator, dtype=torch.uint8)
    on_cuda = encoder.device.type == "cuda"
    for _ in range(warmup_batches):
        encoder.embed(tiles, precision=precision)
    if on_cuda:
        torch.cuda.synchronize(encoder.device)
    start = time.perf_counter()
    for _ in range(n_batches):
        encoder.embed(tiles, precision=precision)
    if on_cuda:
        torch.cuda.synchronize(encoder.device)
    return batch_size * n_batches / (time.perf_counter() - start)
