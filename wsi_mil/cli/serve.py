"""`wsi-mil serve`: run the REST service with uvicorn; flags override `WSI_MIL_*` environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from wsi_mil.cli._app import app, console


def serve_settings(**flags: Any) -> Any:
    """`ServiceSettings` from the environment, with every flag that was given (not None) on top."""
    from wsi_mil.service.settings import ServiceSettings

    return ServiceSettings(**{name: value for name, value in flags.items() if value is not None})


@app.command()
def serve(
    models: Annotated[
        Path | None, typer.Option("--models", help="folder of model folders / run folders")
    ] = None,
    host: Annotated[
        str | None, typer.Option(help="interface to listen on (WSI_MIL_HOST, default 127.0.0.1)")
    ] = None,
    port: Annotated[int | None, typer.Option(help="port (WSI_MIL_PORT, default 8000)")] = None,
    workers: Annotated[
        int | None, typer.Option(help="slide-job worker threads (WSI_MIL_WORKERS, default 1)")
    ] = None,
    slide_root: Annotated[
        Path | None, typer.Option(help="slides named by path must lie here (WSI_MIL_SLIDE_ROOT)")
    ] = None,
    data_dir: Annotated[
        Path | None, typer.Option(help="job database, uploads and results (WSI_MIL_DATA_DIR)")
    ] = None,
    executor: Annotated[
        str | None,
        typer.Option(help="where slide jobs run: local (worker threads) | ray (WSI_MIL_EXECUTOR)"),
    ] = None,
    ray_address: Annotated[
        str | None,
        typer.Option(help="Ray cluster for --executor ray, e.g. auto (WSI_MIL_RAY_ADDRESS; default: this machine's Ray, else a new local one)"),
    ] = None,
    log_level: Annotated[str, typer.Option(help="debug | info | warning | error")] = "info",
) -> None:
    """Serve models over REST: predictions from feature files, slide jobs, heatmaps and a viewer.

    The API key, upload limit, CORS origins and the rest come from WSI_MIL_* variables (docs/service.md).
    """
    import uvicorn
    from pydantic import ValidationError

    from wsi_mil.service import create_app
    from wsi_mil.service.observability import uvicorn_log_config

    try:
        settings = serve_settings(
            models_dir=models,
            host=host,
            port=port,
            workers=workers,
            slide_root=slide_root,
            data_dir=data_dir,
            executor=executor,
            ray_address=ray_address,
        )
    except ValidationError as err:
        console.print(f"[red]invalid setting:[/red] {err}")
        raise typer.Exit(2) from err
    console.print(
        f"serving models from [bold]{settings.models_dir}[/bold] on http://{settings.host}:{settings.port} "
        f"(docs at /docs, {settings.workers} job worker(s), executor {settings.executor})"
    )
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_config=uvicorn_log_config(log_level),
        access_log=False,
    )
