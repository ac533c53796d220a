"""The `wsi-mil` command line: thin shells over library functions, one module per area."""

from __future__ import annotations

from wsi_mil.cli._app import app, console


def main() -> None:
    """Console-script entry point."""
    _register_commands()
    app()


def _register_commands() -> None:
    """Import the command modules; each adds its commands to `app` on import."""
    from wsi_mil.cli import encoders as _encoders  # noqa: F401
    from wsi_mil.cli import export as _export  # noqa: F401
    from wsi_mil.cli import models as _models  # noqa: F401
    from wsi_mil.cli import predict as _predict  # noqa: F401
    from wsi_mil.cli import preprocess as _preprocess  # noqa: F401
    from wsi_mil.cli import serve as _serve  # noqa: F401
    from wsi_mil.cli import train as _train  # noqa: F401


__all__ = ["app", "console", "main"]
