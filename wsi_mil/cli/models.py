"""`wsi-mil list-models` and `wsi-mil check-mil`: the model registry and the algorithmic MIL checks."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from wsi_mil.atomic import write_text_atomic
from wsi_mil.checks.names import CHECK_NAMES, DEFAULT_EPOCHS, FAST_EPOCHS, FAST_SEEDS
from wsi_mil.cli._app import app, console
from wsi_mil.errors import WsiMilError


def _format_defaults(defaults: dict[str, object]) -> str:
    return ", ".join(f"{key}={value!r}" for key, value in defaults.items())


@app.command("list-models")
def list_models_command(
    pattern: Annotated[str, typer.Argument(help="fnmatch pattern over model names")] = "*",
) -> None:
    """List the registered MIL models: name, family module, summary and default options."""
    from wsi_mil.models.registry import list_models, model_entry

    table = Table(title="Registered MIL models")
    for column in ("name", "family", "summary", "defaults"):
        table.add_column(column, overflow="fold")
    for name in list_models(pattern):
        entry = model_entry(name)
        family = entry.module.removeprefix("wsi_mil.models.")
        table.add_row(name, family, entry.summary, _format_defaults(entry.defaults))
    console.print(table)


@app.command("check-mil")
def check_mil(
    model: Annotated[str, typer.Argument(help="registered model name (see wsi-mil list-models)")],
    seeds: Annotated[int | None, typer.Option(help=f"seeds per test (default 5, {FAST_SEEDS} with --fast)")] = None,
    tests: Annotated[str, typer.Option(help=f"'all' or a comma-separated subset of {', '.join(CHECK_NAMES)}")] = "all",
    dim: Annotated[int, typer.Option(help="feature width D of the synthetic instances")] = 8,
    epochs: Annotated[int | None, typer.Option(help=f"training epochs per run (default {DEFAULT_EPOCHS}, {FAST_EPOCHS} with --fast)")] = None,
    bags: Annotated[int, typer.Option("--bags", help="bags per split (half positive)")] = 500,
    json_path: Annotated[Path | None, typer.Option("--json", help="also write the full report as JSON here")] = None,
    compact: Annotated[bool, typer.Option("--compact", help="cap the model's *_dim options at 64 (and landmarks at 16) for the tiny inputs")] = False,
    fast: Annotated[bool, typer.Option("--fast", help=f"{FAST_SEEDS} seeds and {FAST_EPOCHS} epochs unless given")] = False,
) -> None:
    """Train MODEL on the algorithmic MIL unit tests (Raff & Holt 2023) and print the verdicts."""
    from wsi_mil.checks.runner import run_mil_check

    seed_count = seeds if seeds is not None else (FAST_SEEDS if fast else 5)
    epoch_count = epochs if epochs is not None else (FAST_EPOCHS if fast else DEFAULT_EPOCHS)
    try:
        with console.status(f"checking {model}") as status:
            report = run_mil_check(
                model,
                tests=tests,
                seeds=seed_count,
                dim=dim,
                epochs=epoch_count,
                num_bags=bags,
                compact=compact,
                progress=lambda message: status.update(message),
            )
    except WsiMilError as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(code=2) from err
    console.print(report.to_table())
    for result in report.results:
        console.print(f"  {result.test}: {result.verdict} ({result.reason})")
    console.print(f"{report.seconds:.1f} s")
    if json_path is not None:
        write_text_atomic(json_path, report.to_json() + "\n")
        console.print(f"report written to {json_path}")
