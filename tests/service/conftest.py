"""Service fixtures: settings on fresh folders, a live uvicorn server with one finished job (the
model folders and the lesion slide come from the root conftest), and hostile feature files."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import httpx
import numpy as np
import pytest
import uvicorn

from wsi_mil.service import ServiceSettings, create_app

JOB_TIMEOUT_S = 120.0


@pytest.fixture()
def make_settings(tmp_path: Path) -> Callable[..., ServiceSettings]:
    """Settings on fresh folders under tmp_path; keyword arguments override fields."""

    def make(**overrides: Any) -> ServiceSettings:
        values: dict[str, Any] = {
            "models_dir": tmp_path / "models",
            "data_dir": tmp_path / "data",
            "slide_root": tmp_path / "slides",
            "workers": 1,
            "device": "cpu",
            "purge_interval_s": 3600,
        }
        values.update(overrides)
        for key in ("models_dir", "slide_root"):
            if values.get(key) is not None:
                Path(values[key]).mkdir(parents=True, exist_ok=True)
        return ServiceSettings(**values)

    return make


def wait_for_job(
    client: httpx.Client, job_id: str, *, timeout: float = JOB_TIMEOUT_S
) -> dict[str, Any]:
    """Poll a job until it reaches a terminal state; returns its JSON."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["state"] in ("done", "failed", "cancelled"):
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not finish in {timeout} s: {job}")


@pytest.fixture(scope="session")
def job_waiter() -> Callable[..., dict[str, Any]]:
    return wait_for_job


def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class LiveService:
    base_url: str
    settings: ServiceSettings


@contextlib.contextmanager
def run_uvicorn(settings: ServiceSettings) -> Iterator[LiveService]:
    """A real uvicorn server of `create_app(settings)` on a free loopback port, in a thread."""
    port = free_port()
    config = uvicorn.Config(
        create_app(settings), host="127.0.0.1", port=port, log_level="warning", access_log=False
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="test-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield LiveService(f"http://127.0.0.1:{port}", settings)
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture(scope="session")
def uvicorn_server() -> Callable[[ServiceSettings], contextlib.AbstractContextManager[LiveService]]:
    """`run_uvicorn(settings)`: a context manager running a real server in a thread."""
    return run_uvicorn


@pytest.fixture(scope="session")
def live_service(
    tmp_path_factory: pytest.TempPathFactory, lesion_models_dir: Path, lesion_slide: Any
) -> Iterator[LiveService]:
    settings = ServiceSettings(
        models_dir=lesion_models_dir,
        data_dir=tmp_path_factory.mktemp("live_data"),
        slide_root=lesion_slide.root,
        workers=1,
        device="cpu",
    )
    with run_uvicorn(settings) as service:
        yield service


@pytest.fixture(scope="session")
def finished_job(live_service: LiveService) -> dict[str, Any]:
    """A done job of `lesion_abmil` on the lesion slide, run by the live server."""
    with httpx.Client(base_url=live_service.base_url, timeout=30) as client:
        response = client.post(
            "/v1/jobs", json={"model": "lesion_abmil", "slide_path": "lesion.tiff"}
        )
        assert response.status_code == 202, response.text
        job = wait_for_job(client, response.json()["id"])
    assert job["state"] == "done", job
    return job


@pytest.fixture()
def live_client(live_service: LiveService) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live_service.base_url, timeout=30) as client:
        yield client


#: a declared dataset of this many rows is never written: HDF5 stores no chunk until data arrives
HUGE_ROWS = 10**9


@dataclass(frozen=True)
class HostileFile:
    """A feature file built to attack the service, and what the 422 refusing it must say."""

    content: bytes
    reason: str


def h5_bytes(path: Path, build: Callable[[h5py.File], None]) -> bytes:
    """The bytes of an HDF5 file written by `build(handle)` at `path`."""
    with h5py.File(path, "w") as handle:
        build(handle)
    return path.read_bytes()


def _clam(handle: h5py.File, *, rows: int = 16, dim: int = 32, **coords_attrs: Any) -> None:
    """A small CLAM-style bag: `features [rows, dim]`, `coords` with patch attributes."""
    rng = np.random.default_rng(0)
    handle["features"] = rng.normal(size=(rows, dim)).astype(np.float32)
    coords = handle.create_dataset("coords", data=np.arange(2 * rows).reshape(rows, 2) * 128)
    coords.attrs.update({"patch_size": 128, "patch_level": 0, **coords_attrs})


def _huge(handle: h5py.File, name: str, shape: tuple[int, ...], dtype: str) -> None:
    """A chunked, gzip-compressed dataset declaring `shape` without storing any of it."""
    handle.create_dataset(
        name, shape=shape, dtype=dtype, chunks=(1 << 12, *shape[1:]), compression="gzip"
    )


def _wsi_mil_with(source: Path, **root_attrs: Any) -> Callable[[h5py.File], None]:
    """A copy of the wsi_mil feature file `source` with root attributes replaced."""

    def build(handle: h5py.File) -> None:
        with h5py.File(source, "r") as original:
            for name in original:
                original.copy(original[name], handle, name)
            handle.attrs.update(original.attrs)
        handle.attrs.update(root_attrs)

    return build


def _replaced(source: Path, name: str, make: Callable[[h5py.File], None]) -> Callable[[h5py.File], None]:
    """A copy of `source` whose dataset `name` is deleted and made again by `make(handle)`."""
    copy = _wsi_mil_with(source)

    def build(handle: h5py.File) -> None:
        copy(handle)
        del handle[name]
        make(handle)

    return build


def hostile_feature_files(
    folder: Path, server_file: Path, server_raw: Path
) -> dict[str, HostileFile]:
    """Feature files that read outside the upload, declare more than memory holds, carry mistyped
    fields or hold no tiles. `server_file` is a feature file and `server_raw` raw float32 bytes that
    lie on the server outside any upload: a file that reaches them must be refused, not answered."""
    folder.mkdir(parents=True, exist_ok=True)
    raw_rows = server_raw.stat().st_size // (4 * 32)
    with h5py.File(server_file, "r") as handle:
        server_shape = handle["features"].shape

    def virtual(handle: h5py.File) -> None:
        layout = h5py.VirtualLayout(shape=server_shape, dtype="f4")
        layout[:] = h5py.VirtualSource(str(server_file), "features", shape=server_shape)
        handle.create_virtual_dataset("features", layout)
        handle["coords"] = np.zeros((server_shape[0], 2), dtype=np.int64)

    builders: dict[str, tuple[Callable[[h5py.File], None], str]] = {
        # reads outside the upload
        "external link to a server file": (
            lambda h: (
                h.__setitem__("features", h5py.ExternalLink(str(server_file), "features")),
                h.__setitem__("coords", h5py.ExternalLink(str(server_file), "coords")),
            ),
            "external link",
        ),
        "external link to a missing file": (
            lambda h: (
                h.__setitem__("features", h5py.ExternalLink(str(folder / "absent.h5"), "features")),
                h.__setitem__("coords", h5py.ExternalLink(str(folder / "absent.h5"), "coords")),
            ),
            "external link",
        ),
        "external link in a subgroup": (
            lambda h: (
                _clam(h),
                h.create_group("extra").__setitem__(
                    "leak", h5py.ExternalLink(str(server_file), "features")
                ),
            ),
            "external link",
        ),
        "external raw storage": (
            lambda h: (
                h.create_dataset(
                    "features", shape=(raw_rows, 32), dtype="f4", external=[(str(server_raw), 0, raw_rows * 128)]
                ),
                h.__setitem__("coords", np.zeros((raw_rows, 2), dtype=np.int64)),
            ),
            "external raw storage",
        ),
        "virtual dataset": (virtual, "virtual dataset"),
        # more than memory holds, declared in a few KB
        "1e9 x 1 float16 features": (
            lambda h: (_huge(h, "features", (HUGE_ROWS, 1), "f2"), _huge(h, "coords", (HUGE_ROWS, 2), "i8")),
            "tiles",
        ),
        "1e9 x 1024 float16 features": (
            lambda h: _huge(h, "features", (HUGE_ROWS, 1024), "f2"),
            "tiles",
        ),
        "900k x 1024 float16 features": (
            lambda h: _huge(h, "features", (900_000, 1024), "f2"),
            "WSI_MIL_MAX_FEATURE_MB",
        ),
        "1e9 coords for 16 tiles": (
            lambda h: (_clam(h), h.__delitem__("coords"), _huge(h, "coords", (HUGE_ROWS, 2), "i8")),
            "coords shape (1000000000, 2) does not match 16",
        ),
        # mistyped fields
        "string feature_dim": (_wsi_mil_with(server_file, feature_dim="abc"), "feature_dim"),
        "string tile_size_level0": (
            _wsi_mil_with(server_file, tile_size_level0="abc"),
            "tile_size_level0",
        ),
        "string target_mpp": (_wsi_mil_with(server_file, target_mpp="abc"), "target_mpp"),
        "string slide_width": (_wsi_mil_with(server_file, slide_width="abc"), "slide_width"),
        "string patch_size_level0": (
            lambda h: _clam(h, patch_size_level0="abc"),
            "patch_size_level0",
        ),
        "string patch_size": (lambda h: _clam(h, patch_size="abc"), "patch_size"),
        "string downsample": (lambda h: _clam(h, downsample="abc"), "downsample"),
        "group as features": (
            _replaced(server_file, "features", lambda h: h.create_group("features")),
            "`features`",
        ),
        "group as coords": (
            _replaced(server_file, "coords", lambda h: h.create_group("coords")),
            "`coords`",
        ),
        "string features": (
            _replaced(
                server_file,
                "features",
                lambda h: h.create_dataset(
                    "features", data=np.full(server_shape, "abc", dtype=object), dtype=h5py.string_dtype()
                ),
            ),
            "`features`",
        ),
        "string coords": (
            _replaced(
                server_file,
                "coords",
                lambda h: h.create_dataset(
                    "coords", data=np.full((server_shape[0], 2), "x", dtype=object), dtype=h5py.string_dtype()
                ),
            ),
            "`coords`",
        ),
        # nothing to predict
        "empty bag": (lambda h: _clam(h, rows=0), "no tiles"),
    }
    return {
        name: HostileFile(h5_bytes(folder / f"{index}.h5", build), reason)
        for index, (name, (build, reason)) in enumerate(builders.items())
    }


@pytest.fixture(scope="session")
def server_side_files(tmp_path_factory: pytest.TempPathFactory, lesion_features: Path) -> tuple[Path, Path]:
    """A feature file and a raw float32 file on the server, outside any upload (what attacks reach for)."""
    folder = tmp_path_factory.mktemp("server_side")
    raw = folder / "secret.bin"
    raw.write_bytes(np.random.default_rng(1).normal(size=(16, 32)).astype(np.float32).tobytes())
    return lesion_features, raw


@pytest.fixture(scope="session")
def hostile_files(
    tmp_path_factory: pytest.TempPathFactory, server_side_files: tuple[Path, Path]
) -> dict[str, HostileFile]:
    """`hostile_feature_files` built once per session."""
    return hostile_feature_files(tmp_path_factory.mktemp("hostile"), *server_side_files)
