"""`wsi-mil predict`: a trained model on slides or feature files (a shell over `wsi_mil.inference`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from wsi_mil.cli._app import app, console
from wsi_mil.errors import WsiMilError

if TYPE_CHECKING:
    from wsi_mil.inference.predict import SlidePrediction
    from wsi_mil.preprocessing.encoders import Encoder


@app.command("predict")
def predict_command(
    model: Annotated[Path, typer.Argument(help="a run folder made by wsi-mil train, one of its fold_<k> folders, or a model folder")],
    inputs: Annotated[list[Path], typer.Argument(help="slides, or feature files (.h5 / .pt), to predict")],
    out: Annotated[Path | None, typer.Option("--out", help="write predictions to a .csv (one row per tile) or .json")] = None,
    heatmaps: Annotated[Path | None, typer.Option("--heatmaps", help="write one attention heatmap PNG per slide here")] = None,
    work_dir: Annotated[Path | None, typer.Option("--work-dir", help="keep each slide's features, tissue mask and QC image here")] = None,
    fold: Annotated[int | None, typer.Option(help="fold of a run folder whose model to use (default: best by validation)")] = None,
    slide_mpp: Annotated[float | None, typer.Option(help="µm/px for slides whose files carry none")] = None,
    device: Annotated[str, typer.Option(help="cpu | cuda[:N]")] = "cpu",
) -> None:
    """Predict slides (tissue, tiles and features made as the model's card says) or feature files:
    class probabilities and every tile's scores. A slide that fails is reported and the rest go on."""
    from wsi_mil.inference.loading import load_model
    from wsi_mil.inference.predict import (
        FEATURE_SUFFIXES,
        predict_features,
        predict_slide,
        save_predictions,
    )
    from wsi_mil.preprocessing.encoders import load_encoder

    try:
        loaded = load_model(model, fold=fold, device=device)
    except WsiMilError as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from err
    table = Table("input", "fold", "predicted", "probabilities", "tiles")
    predictions: list[SlidePrediction] = []
    encoder: Encoder | None = None  # loaded for the first slide, reused for the rest
    failed = 0
    for path in inputs:
        try:
            if path.suffix.lower() in FEATURE_SUFFIXES:
                result = predict_features(path, loaded)
            else:
                if encoder is None:
                    config = loaded.slide_config()
                    encoder = load_encoder(config.encoder, weights=config.weights, device=loaded.device)
                result = predict_slide(path, loaded, encoder=encoder, out_dir=work_dir, mpp_override=slide_mpp)
            if heatmaps is not None and result.coords is not None:
                result.save_heatmap(heatmaps / f"{result.slide_id}.png")
        except WsiMilError as err:
            failed += 1
            table.add_row(path.name, "", "[red]failed[/red]", str(err), "")
            continue
        predictions.append(result)
        p = result.prediction
        probs = ", ".join(f"{name} {value:.3f}" for name, value in p.class_probabilities.items())
        table.add_row(result.slide_id, str(p.fold), p.predicted_class, probs, str(p.num_tiles))
    console.print(table)
    if out is not None and predictions:
        try:
            save_predictions(predictions, out)
        except WsiMilError as err:
            console.print(f"[red]error:[/red] {err}")
            raise typer.Exit(2) from err
        console.print(f"predictions written to {out}")
    if heatmaps is not None:
        console.print(f"heatmaps in {heatmaps}")
    if failed:
        raise typer.Exit(1)
