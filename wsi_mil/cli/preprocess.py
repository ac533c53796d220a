"""`wsi-mil preprocess`, `wsi-mil inspect` and `wsi-mil demo`: shells over `wsi_mil.preprocessing`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from wsi_mil.cli._app import app, console
from wsi_mil.errors import WsiMilError

if TYPE_CHECKING:  # the preprocessing package imports torch and timm: loaded when a command runs
    from wsi_mil.preprocessing.batch import SlideTask
    from wsi_mil.preprocessing.pipeline import PreprocessConfig, SlideResult

STATUS_STYLE = {"done": "green", "skipped": "cyan", "no_tissue": "yellow", "failed": "red"}


@app.command()
def preprocess(
    inputs: Annotated[list[str] | None, typer.Argument(help="slide files, folders or glob patterns")] = None,
    out: Annotated[Path, typer.Option("--out", help="output folder")] = Path("preprocessed"),
    manifest: Annotated[Path | None, typer.Option(help="CSV with slide_path, optional slide_id, mpp")] = None,
    encoder: Annotated[str, typer.Option(help="encoder name (wsi-mil list-encoders)")] = "resnet50-trunc",
    weights: Annotated[str | None, typer.Option(help='weights file, or "random" for a test run')] = None,
    mpp: Annotated[float, typer.Option("--mpp", help="target µm per pixel of the tiles")] = 0.5,
    tile_px: Annotated[int, typer.Option(help="tile size in pixels at the target mpp")] = 256,
    overlap: Annotated[int, typer.Option(help="tile overlap in pixels at the target mpp")] = 0,
    min_tissue: Annotated[float, typer.Option(help="minimum tissue fraction of a kept tile")] = 0.25,
    tissue_mode: Annotated[str, typer.Option(help="brightfield | fluorescence | whole")] = "brightfield",
    ink: Annotated[bool, typer.Option("--ink/--no-ink", help="find marker ink and keep it out of the tissue")] = True,
    max_ink: Annotated[float, typer.Option(help="drop tiles with more marker ink than this fraction")] = 1.0,
    slide_mpp: Annotated[float | None, typer.Option(help="mpp for slides whose files carry none")] = None,
    max_unreadable: Annotated[float, typer.Option(help="share of unreadable tiles left out before a slide fails")] = 0.05,
    executor: Annotated[str, typer.Option(help="local | ray")] = "local",
    jobs: Annotated[int, typer.Option(help="slides processed at once (local executor)")] = 1,
    shard: Annotated[str | None, typer.Option(help="i/n: process the i-th of n shards (0-based)")] = None,
    ray_address: Annotated[str | None, typer.Option(help="Ray cluster address (default: start a local one)")] = None,
    ray_gpus: Annotated[float | None, typer.Option(help="GPUs per slide task on Ray (default: 1 if any)")] = None,
    batch_size: Annotated[int, typer.Option(help="tiles per encoder batch")] = 64,
    workers: Annotated[int | None, typer.Option(help="tile-decoding worker processes per slide; 0: threads of the slide's process decode (default: chosen for the device and CPUs)")] = None,
    threads: Annotated[int | None, typer.Option(help="torch threads per slide on CPU (default: the usable cores / --jobs)")] = None,
    precision: Annotated[str, typer.Option(help="auto | fp32 | bf16 | fp16")] = "auto",
    compile_model: Annotated[str, typer.Option("--compile", help="torch.compile the encoder: auto (where it pays off) | on | off")] = "auto",
    dtype: Annotated[str, typer.Option(help="stored feature dtype: float16 | float32")] = "float16",
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1 ... (default: cuda if available)")] = None,
) -> None:
    """Tissue → tiles at a physical size → features, one HDF5 file per slide in OUT/features/."""
    from wsi_mil.preprocessing.batch import parse_shard, select_shard
    from wsi_mil.preprocessing.pipeline import PreprocessConfig
    from wsi_mil.preprocessing.tiling import TilingParams
    from wsi_mil.preprocessing.tissue import TissueParams

    try:
        config = PreprocessConfig(
            tissue=TissueParams(mode=tissue_mode, remove_ink=ink),
            tiling=TilingParams(target_mpp=mpp, tile_px=tile_px, overlap_px=overlap, min_tissue_fraction=min_tissue,
                                max_ink_fraction=max_ink),
            encoder=encoder,
            weights=weights,
            precision=precision,
            features_dtype=dtype,
            slide_mpp=slide_mpp,
            max_unreadable_fraction=max_unreadable,
            batch_size=batch_size,
            num_workers=workers,
            num_threads=threads,
            compile=compile_model,
            device=device,
        )
        tasks = _collect_tasks(inputs or [], manifest)
        tasks = select_shard(tasks, parse_shard(shard))
        if executor not in ("local", "ray"):
            raise WsiMilError(f"--executor must be local or ray, got {executor!r}")
        results = _run_with_progress(tasks, out, config, executor, jobs, ray_address, ray_gpus)
    except WsiMilError as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from err
    except ValueError as err:  # pydantic validation of the options
        console.print(f"[red]invalid option:[/red] {err}")
        raise typer.Exit(2) from err
    _print_summary(results, out)
    if any(r.status == "failed" for r in results):
        raise typer.Exit(1)


def _collect_tasks(inputs: list[str], manifest: Path | None) -> list[SlideTask]:
    from wsi_mil.preprocessing.batch import find_slides, read_manifest

    tasks = read_manifest(manifest) if manifest else []
    if inputs:
        known = {t.slide_id for t in tasks}
        tasks += [t for t in find_slides(inputs) if t.slide_id not in known]
    if not tasks:
        raise WsiMilError("no slides given: pass slide files, folders or globs, or --manifest CSV")
    return tasks


def _run_with_progress(
    tasks: list[SlideTask],
    out: Path,
    config: PreprocessConfig,
    executor: Literal["local", "ray"] | str,
    jobs: int,
    ray_address: str | None,
    ray_gpus: float | None,
) -> list[SlideResult]:
    from wsi_mil.preprocessing.batch import run_batch

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        overall = progress.add_task("slides", total=len(tasks))
        per_slide: dict[str, int] = {}

        def on_tiles(slide_id: str, done: int, total: int) -> None:
            if slide_id not in per_slide:
                per_slide[slide_id] = progress.add_task(f"  {slide_id}", total=total)
            progress.update(per_slide[slide_id], completed=done)

        def on_result(result: SlideResult) -> None:
            progress.advance(overall)
            if result.slide_id in per_slide:
                progress.remove_task(per_slide.pop(result.slide_id))

        return run_batch(
            tasks,
            out,
            config,
            executor=executor,  # type: ignore[arg-type]
            jobs=jobs,
            ray_address=ray_address,
            ray_gpus_per_slide=ray_gpus,
            on_result=on_result,
            on_tiles=on_tiles,
        )


def _print_summary(results: list[SlideResult], out: Path) -> None:
    table = Table(title=f"preprocessing summary ({out})")
    for column in ("slide", "status", "tiles", "seconds", "mpp (source)", "reason"):
        table.add_column(column)
    for r in results:
        mpp = f"{r.mpp:.4g} ({r.mpp_source})" if r.mpp else ""
        style = STATUS_STYLE.get(r.status, "")
        table.add_row(r.slide_id, f"[{style}]{r.status}[/{style}]", str(r.tiles), f"{r.seconds:.1f}", mpp, r.reason)
    console.print(table)
    for r in results:
        for warning in r.warnings:
            console.print(f"[yellow]warning[/yellow] {r.slide_id}: {warning}")
    counts = {s: sum(r.status == s for r in results) for s in STATUS_STYLE}
    console.print(" ".join(f"{k}: {v}" for k, v in counts.items()) + f"  → features in {out / 'features'}")


@app.command()
def inspect(path: Annotated[Path, typer.Argument(help="a slide, or a feature file (.h5 / .pt)")]) -> None:
    """Print what a slide or a feature file holds."""
    from wsi_mil.preprocessing.feature_file import read_feature_file, validate_feature_file
    from wsi_mil.preprocessing.slide import describe_slide

    try:
        if path.suffix.lower() in (".h5", ".hdf5", ".pt", ".pth"):
            problems = validate_feature_file(path)
            bag = read_feature_file(path, validate=False)
            info = {
                "path": str(path),
                "format": bag.source_format,
                "tiles": bag.num_tiles,
                "feature_dim": bag.feature_dim,
                "dtype": str(bag.features.dtype),
                "coords": None if bag.coords is None else list(bag.coords.shape),
                "tile_size_level0": bag.tile_size_level0,
                "valid": not problems,
                "problems": problems,
                "attrs": bag.attrs,
            }
        else:
            info = dataclasses.asdict(describe_slide(path))
    except WsiMilError as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from err
    console.print_json(json.dumps(info, default=str))


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="demo folder")] = Path("demo_out"),
    slides: Annotated[int, typer.Option(min=6, help="synthetic slides, half with a lesion (3-fold cross-validation needs 6 or more)")] = 6,
    size: Annotated[int, typer.Option(min=1024, help="side of each synthetic slide in pixels at 0.5 µm/px")] = 3072,
    encoder: Annotated[str, typer.Option(help="encoder (random weights)")] = "resnet50-trunc",
    epochs: Annotated[int, typer.Option(help="training epochs per fold")] = 100,
    serve: Annotated[bool, typer.Option(help="end by serving the demo model (Ctrl-C stops)")] = True,
    host: Annotated[str, typer.Option(help="service host")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="service port")] = 8000,
) -> None:
    """The main job on a built-in demo: synthetic slides → features → a trained model → the service."""
    from wsi_mil.cli.train import print_held_out_predictions, print_metrics
    from wsi_mil.demo.run import preprocess_demo, serve_demo, train_demo

    try:
        console.rule("wsi-mil demo 1/3: synthetic cohort → features (random encoder weights)")
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=console) as progress:
            overall = progress.add_task("slides", total=slides)
            cohort, results = preprocess_demo(out, slides=slides, encoder=encoder, size=size,
                                              on_result=lambda _r: progress.advance(overall))
        _print_summary(results, out / "preprocessed")
        console.print(f"slides: {out / 'slides'}   QC thumbnails: {out / 'preprocessed' / 'qc'}")
        if any(r.status == "failed" for r in results):
            raise typer.Exit(1)
        console.rule("wsi-mil demo 2/3: train ABMIL, 3-fold cross-validation")
        metrics = train_demo(out, epochs=epochs)
        print_metrics(metrics)
        print_held_out_predictions(out / "run")
        console.print(f"run folder: {out / 'run'}   metrics: {out / 'run' / 'metrics.json'}")
        if serve:
            console.rule("wsi-mil demo 3/3: the service, one slide job, the viewer")
            serve_demo(out, cohort, host=host, port=port, console=console, keep_serving=True)
    except WsiMilError as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from err
