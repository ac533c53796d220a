"""The shared typer application and rich console of the CLI."""

from __future__ import annotations

import typer
from rich.console import Console

app = typer.Typer(
    name="wsi-mil",
    help="Whole-slide-image MIL: preprocess slides, train and check MIL models, serve predictions.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
