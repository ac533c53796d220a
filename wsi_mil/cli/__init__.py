"""The `wsi-mil` command line: thin shells over library functions, one module per area."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from wsi_mil.cli._app import app, console
from wsi_mil.cli._exit import exit_code_of, exit_now

#: commands that run a patch encoder: they restart once with the allocator of `wsi_mil.allocator`
ENCODER_COMMANDS = frozenset({"preprocess", "predict", "demo"})


def main() -> None:
    """Console-script entry point: run the command line, then leave without interpreter teardown
    (`wsi_mil.cli._exit`: 1.7-2 s once torch is loaded)."""
    exit_now(run_command_line())


def run_command_line() -> int:
    """Run the command in `sys.argv` and return its exit status (restarting first with the fast
    allocator when it runs an encoder)."""
    if runs_an_encoder(sys.argv[1:]):
        from wsi_mil.allocator import reexec_with_allocator

        reexec_with_allocator()
    _register_commands()
    try:
        app()
    except SystemExit as done:
        return exit_code_of(done)
    return 0


def runs_an_encoder(args: Sequence[str]) -> bool:
    """Whether the command line runs a patch encoder (not just its help)."""
    command = next((a for a in args if not a.startswith("-")), None)
    return command in ENCODER_COMMANDS and "--help" not in args


def _register_commands() -> None:
    """Import the command modules; each adds its commands to `app` on import."""
    from wsi_mil.cli import encoders as _encoders  # noqa: F401
    from wsi_mil.cli import export as _export  # noqa: F401
    from wsi_mil.cli import models as _models  # noqa: F401
    from wsi_mil.cli import predict as _predict  # noqa: F401
    from wsi_mil.cli import preprocess as _preprocess  # noqa: F401
    from wsi_mil.cli import serve as _serve  # noqa: F401
    from wsi_mil.cli import train as _train  # noqa: F401


__all__ = ["app", "console", "main", "run_command_line"]
