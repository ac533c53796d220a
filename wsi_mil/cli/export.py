"""`wsi-mil export`: feature files in the layouts CLAM and TRIDENT train from."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.table import Table

from wsi_mil.cli._app import app, console


@app.command()
def export(
    out: Annotated[Path, typer.Argument(help="output folder")],
    inputs: Annotated[list[Path], typer.Option("--features", help="feature files or folders of them (e.g. OUT/features of wsi-mil preprocess)")],
    fmt: Annotated[Literal["clam", "trident"], typer.Option("--format", help="clam | trident")] = "clam",
) -> None:
    """Write feature files as CLAM's pt_files/ + h5_files/ or TRIDENT's features_<encoder>/ (float32)."""
    from wsi_mil.errors import WsiMilError
    from wsi_mil.preprocessing.export import export_features

    try:
        exported = export_features(inputs, out, fmt=fmt)
    except WsiMilError as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from err
    if not exported:
        console.print(f"[red]error:[/red] no feature files (.h5, .hdf5, .pt, .pth) in {', '.join(map(str, inputs))}")
        raise typer.Exit(2)
    table = Table(title=f"export to {fmt} ({out})")
    for column in ("slide", "written", "skipped because"):
        table.add_column(column)
    for item in exported:
        table.add_row(item.slide_id, ", ".join(str(p.relative_to(out)) for p in item.files), item.skipped)
    console.print(table)
    if any(item.skipped for item in exported):
        raise typer.Exit(1)
