"""`wsi-mil list-encoders`: the patch encoders `wsi-mil preprocess --encoder` takes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from wsi_mil.cli._app import app, console

if TYPE_CHECKING:
    from wsi_mil.preprocessing.encoders import EncoderCfg


def _input_size(cfg: EncoderCfg) -> str:
    size = f"{cfg.img_size} px"
    return size if cfg.resize_size == cfg.img_size else f"{size} (resize {cfg.resize_size}, centre crop)"


def _weights_source(cfg: EncoderCfg) -> str:
    """Where `load_encoder` finds the weights without --weights: a local file, else the hub."""
    from wsi_mil.preprocessing.encoders import WEIGHTS_DIR_ENV, find_weights_in_dir

    root = os.environ.get(WEIGHTS_DIR_ENV)
    folder = Path(root).expanduser() / cfg.name if root else None
    local = find_weights_in_dir(folder) if folder is not None and folder.is_dir() else None
    if local is not None:
        return f"local file {local}"
    if cfg.hf_hub_id is None:
        return f"none published: --weights PATH or ${WEIGHTS_DIR_ENV}/{cfg.name}/ (or --weights random)"
    access = " (gated: request access, then huggingface-cli login)" if cfg.gated else ""
    return f"Hugging Face hub {cfg.hf_hub_id}{access}"


@app.command("list-encoders")
def list_encoders_command(
    pattern: Annotated[str, typer.Argument(help="fnmatch pattern over encoder names")] = "*",
) -> None:
    """List the patch encoders: name, feature dimension, input size and where the weights come from.

    Weights are looked up in this order: --weights PATH, $WSI_MIL_WEIGHTS_DIR/<name>/, the hub.
    """
    from wsi_mil.preprocessing.encoders import encoder_cfg, list_encoders

    table = Table(title="Patch encoders (wsi-mil preprocess --encoder NAME)")
    for column in ("name", "feature dim", "input size", "weights (without --weights)", "license", "summary"):
        table.add_column(column, overflow="fold")
    for name in list_encoders(pattern):
        cfg = encoder_cfg(name)
        table.add_row(name, str(cfg.embed_dim), _input_size(cfg), _weights_source(cfg), cfg.license, cfg.summary)
    console.print(table)
