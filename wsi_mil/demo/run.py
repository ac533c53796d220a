"""The built-in demo end to end: synthetic cohort → features → a trained model → the service."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console

from wsi_mil.demo.synthetic import DemoSlide, make_demo_cohort
from wsi_mil.errors import WsiMilError
from wsi_mil.preprocessing.batch import find_slides, run_batch
from wsi_mil.preprocessing.pipeline import PreprocessConfig, SlideResult


def preprocess_demo(
    out: Path,
    *,
    slides: int,
    encoder: str,
    size: int = 3072,
    on_result: Callable[[SlideResult], None] | None = None,
    on_tiles: Callable[[str, int, int], None] | None = None,
) -> tuple[list[DemoSlide], list[SlideResult]]:
    """Write the synthetic cohort (`size`² px slides) under `out/slides` and preprocess it into
    `out/preprocessed`."""
    cohort = make_demo_cohort(out / "slides", num_slides=slides, size=size)
    config = PreprocessConfig(encoder=encoder, weights="random", num_workers=2)
    results = run_batch(find_slides([str(out / "slides")]), out / "preprocessed", config,
                        on_result=on_result, on_tiles=on_tiles)
    return cohort, results


#: a small ABMIL without dropout: the demo's random-encoder features differ between lesion and
#: stroma tiles by little in absolute terms, and the full-size model with dropout stays near chance
DEMO_MODEL_KWARGS = {"hidden_dim": 128, "attention_dim": 64, "dropout": 0.0, "attention_dropout": 0.0}
DEMO_EPOCHS = 100


def train_demo(out: Path, *, epochs: int = DEMO_EPOCHS) -> dict[str, Any]:
    """Train a small ABMIL with 3-fold cross-validation on the demo features into `out/run`;
    returns the run's metrics (`metrics.json`)."""
    from wsi_mil.training import TrainConfig, train_cohort

    config = TrainConfig(
        features_dir=out / "preprocessed" / "features",
        labels_csv=out / "slides" / "labels.csv",
        model="abmil",
        model_kwargs=DEMO_MODEL_KWARGS,
        folds=3,
        epochs=epochs,
        lr=2e-3,
        patience=None,
        bootstrap_samples=200,
    )
    return train_cohort(config, out / "run")


def serve_demo(out: Path, cohort: list[DemoSlide], *, host: str, port: int, console: Console, keep_serving: bool) -> str:
    """Start the service on the demo run, run one slide job, print the viewer URL; then keep serving
    until interrupted (unless `keep_serving` is False). Returns the viewer URL."""
    import uvicorn

    from wsi_mil.service import create_app
    from wsi_mil.service.settings import ServiceSettings

    settings = ServiceSettings(models_dir=out / "run", slide_root=out / "slides", data_dir=out / "service",
                               host=host, port=port, workers=1)
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://{host}:{port}"
    _wait_until_ready(base)
    models = _get_json(f"{base}/v1/models")
    names = [m["name"] for m in models["data"]]
    if not names:
        raise WsiMilError(f"the service found no model under {out / 'run'}")
    tumor = next(s for s in cohort if s.lesion_box is not None)
    job = _post_json(f"{base}/v1/jobs", {"model": names[0], "slide_path": Path(tumor.path).name})
    job_id = job["id"]
    console.print(f"slide job {job_id}: {Path(tumor.path).name} with model {names[0]} …")
    state = job
    while state["state"] in ("queued", "running"):
        time.sleep(1.0)
        state = _get_json(f"{base}/v1/jobs/{job_id}")
    if state["state"] != "done":
        raise WsiMilError(f"the demo slide job ended {state['state']}: {state.get('error')}")
    viewer = f"{base}/v1/jobs/{job_id}/viewer"
    console.print(f"[bold green]viewer:[/bold green] {viewer}   (API docs: {base}/docs)")
    if keep_serving:
        console.print("serving; press Ctrl-C to stop")
        try:
            thread.join()
        except KeyboardInterrupt:
            pass
    server.should_exit = True
    thread.join(timeout=10)
    return viewer


def _wait_until_ready(base: str, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{base}/readyz", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise WsiMilError(f"the demo service did not become ready at {base}")


def _get_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def _post_json(url: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())
