"""Service benchmark with wrk on loopback: feature-file predictions (1k and 20k tiles) and Deep Zoom
tiles of a real slide, against bare FastAPI endpoints (GET hello, POST body sink) run in the same
session, so the table separates framework, upload and model costs.

    uv run --locked python benchmarks/bench_service.py [--duration 10] [--out results.json]

Needs Debian's `wrk` (apt-get install -y wrk) and the real slide CMU-1-Small-Region.svs from
../shared. Servers are single uvicorn processes on 127.0.0.1 (uvloop + httptools, no access log);
wrk runs on the same cores, so every figure is a lower bound of the server's capacity.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import numpy as np
import torch
from safetensors.torch import save_file

from wsi_mil.inference.card import FeatureContract, ModelCard
from wsi_mil.models import create_model, model_options
from wsi_mil.preprocessing.feature_file import FeatureProvenance, write_feature_file
from wsi_mil.preprocessing.pipeline import PreprocessConfig
from wsi_mil.preprocessing.tiling import TilingParams

ROOT = Path(__file__).resolve().parents[1]
SHARED_SLIDES = Path(os.environ.get("WSI_MIL_SHARED", ROOT.parent / "shared")) / "data" / "slides"
SLIDE = "tissue/CMU-1-Small-Region.svs"
FEATURE_DIM = 1024
ENCODER = "resnet50-trunc"
BOUNDARY = "wsimilbenchboundary"
BARE_APP = """
from fastapi import FastAPI, Request

app = FastAPI()


@app.get("/hello")
async def hello():
    return {"msg": "hello"}


@app.post("/sink")
async def sink(request: Request):
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
    return {"bytes": size}
"""
POST_LUA = """
local file = io.open("{body}", "rb")
wrk.method = "POST"
wrk.body = file:read("*all")
file:close()
wrk.headers["Content-Type"] = "multipart/form-data; boundary={boundary}"
"""
PATHS_LUA = """
local paths = {{{paths}}}
local i = 0
request = function()
  i = i % #paths + 1
  return wrk.format("GET", paths[i])
end
"""


@dataclass
class Row:
    """One wrk run."""

    endpoint: str
    payload: str
    connections: int
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    non_2xx: int
    requests: int


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def provenance(num_tiles: int) -> FeatureProvenance:
    """Plausible provenance of a resnet50-trunc bag at 0.5 µm/px, 256-px tiles (values only label the file)."""
    return FeatureProvenance(
        slide_id=f"bench_{num_tiles}",
        slide_path=f"bench_{num_tiles}.svs",
        slide_quick_hash="0" * 64,
        slide_width=512 * 200,
        slide_height=512 * 200,
        slide_vendor="aperio",
        mpp=0.25,
        mpp_source="properties",
        target_mpp=0.5,
        tile_px=256,
        tile_size_level0=512,
        overlap_px=0,
        read_level=0,
        level0_magnification=40.0,
        target_magnification=20.0,
        encoder=ENCODER,
        encoder_weights="random",
        encoder_weights_sha256=None,
        feature_dim=FEATURE_DIM,
        precision="fp32",
        transform={},
        tissue={},
        tiling={"target_mpp": 0.5, "tile_px": 256},
        params_hash="bench",
    )


def write_bag(path: Path, num_tiles: int) -> Path:
    """A wsi_mil feature file of `num_tiles` random 1024-d features on a square grid."""
    rng = np.random.default_rng(num_tiles)
    features = np.exp(0.8 * rng.standard_normal((num_tiles, FEATURE_DIM)) - 1).astype(np.float32)
    side = int(np.ceil(np.sqrt(num_tiles)))
    coords = np.stack(np.divmod(np.arange(num_tiles), side)[::-1], axis=1).astype(np.int64) * 512
    return write_feature_file(path, features, coords, provenance(num_tiles), dtype="float16")


def multipart_body(path: Path, bag: Path, model: str) -> Path:
    """The multipart request body of a prediction, written once so wrk can send it."""
    head = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="model"\r\n\r\n{model}\r\n'
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{bag.name}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    path.write_bytes(head + bag.read_bytes() + f"\r\n--{BOUNDARY}--\r\n".encode())
    return path


def write_model(folder: Path) -> None:
    """An ABMIL (CLAM-size defaults) on 1024-d resnet50-trunc features, in the trainer's card format."""
    torch.manual_seed(0)
    kwargs = model_options("abmil")
    model = create_model("abmil", FEATURE_DIM, 2, **kwargs)
    card = ModelCard(
        model_name="abmil",
        model_kwargs=kwargs,
        num_classes=2,
        class_names=["normal", "tumor"],
        feature_contract=FeatureContract(
            encoder=ENCODER, feature_dim=FEATURE_DIM, target_mpp=0.5, tile_px=256
        ),
        preprocessing=PreprocessConfig(
            tiling=TilingParams(target_mpp=0.5, tile_px=256), encoder=ENCODER, weights="random"
        ),
        training_method="plain",
        fold=0,
        best_epoch=1,
        epochs_run=1,
        selection_metric="roc_auc_macro",
    )
    folder.mkdir(parents=True)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(folder / "model.safetensors"),
    )
    (folder / "model_card.json").write_text(card.model_dump_json(indent=2))


def start_server(args: list[str], env: dict[str, str], port: int) -> subprocess.Popen[bytes]:
    """Start a server process and wait until it answers."""
    process = subprocess.Popen(
        [sys.executable, "-c", *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"server exited: {process.stderr.read().decode() if process.stderr else ''}"
            )
        try:
            httpx.get(f"http://127.0.0.1:{port}/openapi.json", timeout=2)
            return process
        except httpx.TransportError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("server did not start in 120 s")


def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]


def run_wrk(
    url: str, *, connections: int, duration: int, script: Path | None
) -> tuple[float, float, float, int, int]:
    """req/s, p50 ms, p99 ms, non-2xx responses, total requests of one wrk run."""
    command = ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency", "--timeout", "60s"]
    if script is not None:
        command += ["-s", str(script)]
    output = subprocess.run([*command, url], capture_output=True, text=True, check=True).stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))
    p50 = _ms(re.search(r"\s50%\s+(\S+)", output).group(1))
    p99 = _ms(re.search(r"\s99%\s+(\S+)", output).group(1))
    errors = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    total = int(re.search(r"(\d+) requests in", output).group(1))
    return rate, p50, p99, int(errors.group(1)) if errors else 0, total


def main() -> None:
    """Build the fixtures, start both servers, run wrk and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--duration", type=int, default=10, help="seconds per wrk run (after a 3 s warm-up)"
    )
    parser.add_argument("--out", type=Path, help="also write the rows as JSON")
    options = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is missing: apt-get install -y wrk")
    slide = SHARED_SLIDES / SLIDE
    if not slide.exists():
        sys.exit(f"{slide} is missing (the team's ../shared checkout)")
    load_before = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="wsi_mil_bench_service_"))
    servers: list[subprocess.Popen[bytes]] = []
    try:
        write_model(work / "models" / "bench_abmil")
        bodies = {
            n: multipart_body(
                work / f"body_{n}.bin", write_bag(work / f"bag_{n}.h5", n), "bench_abmil"
            )
            for n in (1000, 20000)
        }
        service_port, bare_port = free_port(), free_port()
        env = {
            **os.environ,
            "WSI_MIL_MODELS_DIR": str(work / "models"),
            "WSI_MIL_DATA_DIR": str(work / "data"),
            "WSI_MIL_SLIDE_ROOT": str(SHARED_SLIDES),
            "WSI_MIL_WORKERS": "0",
            "WSI_MIL_DEVICE": "cpu",
        }
        uvicorn_options = "host='127.0.0.1', log_level='warning', access_log=False"
        servers.append(
            start_server(
                [
                    "import uvicorn; "
                    f"uvicorn.run('wsi_mil.service.app:create_app', factory=True, port={service_port}, {uvicorn_options})"
                ],
                env,
                service_port,
            )
        )
        (work / "bare_app.py").write_text(BARE_APP)
        servers.append(
            start_server(
                [
                    f"import sys, uvicorn; sys.path.insert(0, {str(work)!r}); uvicorn.run('bare_app:app', port={bare_port}, {uvicorn_options})"
                ],
                env,
                bare_port,
            )
        )
        service, bare = f"http://127.0.0.1:{service_port}", f"http://127.0.0.1:{bare_port}"
        job = httpx.post(
            f"{service}/v1/jobs", json={"model": "bench_abmil", "slide_path": SLIDE}, timeout=30
        ).json()
        dzi = httpx.get(f"{service}/v1/jobs/{job['id']}/dzi.dzi", timeout=30).text
        width, height = (int(v) for v in re.search(r'Width="(\d+)"\s+Height="(\d+)"', dzi).groups())
        top = int(np.ceil(np.log2(max(width, height))))
        tile_paths = [
            f"/v1/jobs/{job['id']}/dzi_files/{level}/{col}_{row}.jpeg"
            for level in (top - 2, top - 1, top)
            for col in range(int(np.ceil(width / 2 ** (top - level) / 254)))
            for row in range(int(np.ceil(height / 2 ** (top - level) / 254)))
        ]
        check = httpx.post(
            f"{service}/v1/predictions",
            content=bodies[1000].read_bytes(),
            headers={"content-type": f"multipart/form-data; boundary={BOUNDARY}"},
            timeout=60,
        )
        check.raise_for_status()
        scripts = {}
        for n, body in bodies.items():
            scripts[n] = work / f"post_{n}.lua"
            scripts[n].write_text(POST_LUA.format(body=body, boundary=BOUNDARY))
        scripts["tiles"] = work / "tiles.lua"
        scripts["tiles"].write_text(PATHS_LUA.format(paths=", ".join(f'"{p}"' for p in tile_paths)))
        mib = {n: body.stat().st_size / 2**20 for n, body in bodies.items()}
        plan = [
            ("bare FastAPI GET /hello (async)", "-", f"{bare}/hello", 64, None),
            (
                "bare FastAPI POST /sink (reads the body)",
                f"1k-tile file body, {mib[1000]:.1f} MiB",
                f"{bare}/sink",
                8,
                scripts[1000],
            ),
            (
                "bare FastAPI POST /sink (reads the body)",
                f"20k-tile file body, {mib[20000]:.1f} MiB",
                f"{bare}/sink",
                2,
                scripts[20000],
            ),
            (
                "POST /v1/predictions",
                f"1k tiles x 1024-d fp16, {mib[1000]:.1f} MiB",
                f"{service}/v1/predictions",
                8,
                scripts[1000],
            ),
            (
                "POST /v1/predictions",
                f"20k tiles x 1024-d fp16, {mib[20000]:.1f} MiB",
                f"{service}/v1/predictions",
                2,
                scripts[20000],
            ),
            (
                "GET /v1/jobs/{id}/dzi_files/...jpeg",
                f"{len(tile_paths)} distinct tiles of CMU-1-Small-Region.svs",
                service,
                32,
                scripts["tiles"],
            ),
            ("GET /healthz (full middleware stack)", "-", f"{service}/healthz", 64, None),
        ]
        rows = []
        for endpoint, payload, url, connections, script in plan:
            run_wrk(url, connections=connections, duration=3, script=script)  # warm-up
            rate, p50, p99, errors, total = run_wrk(
                url, connections=connections, duration=options.duration, script=script
            )
            rows.append(Row(endpoint, payload, connections, rate, p50, p99, errors, total))
            print(f"done: {endpoint} [{payload}] {rate:.1f} req/s", file=sys.stderr)
    finally:
        for server in servers:
            server.terminate()
            server.wait(30)
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"\nwrk -t1, {options.duration} s per row after a 3 s warm-up, loopback, {os.cpu_count()} CPUs, "
        f"torch threads {torch.get_num_threads()}, load average {load_before:.1f} before and "
        f"{os.getloadavg()[0]:.1f} after the runs\n"
    )
    print("| endpoint | payload | connections | req/s | p50 ms | p99 ms | non-2xx | requests |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row.endpoint} | {row.payload} | {row.connections} | {row.requests_per_s:,.1f} | "
            f"{row.p50_ms:.1f} | {row.p99_ms:.1f} | {row.non_2xx} | {row.requests} |"
        )
    if options.out:
        options.out.write_text(json.dumps([asdict(r) for r in rows], indent=2))


if __name__ == "__main__":
    main()
