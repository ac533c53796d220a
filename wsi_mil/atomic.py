"""Atomic file writes: write to a temporary name beside the target, then rename it into place.

A crash or an exception mid-write never leaves a truncated file under the target's name: readers
see either the old file or the new one. Every writer in wsi_mil goes through `atomic_path`, and a
folder of results that must appear at once through `atomic_directory`.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


def temporary_sibling(path: str | Path) -> Path:
    """A unique hidden name in `path`'s folder, so the final rename stays on one filesystem."""
    target = Path(path)
    return target.parent / f".{target.name}.{uuid.uuid4().hex}.tmp"


@contextmanager
def atomic_path(path: str | Path, *, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` when the block succeeds.

    For writers that take a file name (torch.save, safetensors, h5py, PIL). On any exception the
    temporary file is removed and the target is left as it was.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = temporary_sibling(target)
    try:
        yield temp
        if fsync and temp.is_file():
            descriptor = os.open(temp, os.O_RDONLY)
            try:
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_open(
    path: str | Path, mode: str = "w", *, encoding: str | None = None, newline: str | None = None
) -> Iterator[IO[Any]]:
    """Open a temporary file beside `path` for writing; rename it onto `path` when the block succeeds.

    The file is created like any new file (0o666 minus the umask), unlike `mkstemp`'s 0o600.
    `newline` is `open`'s (`""` for the csv module).
    """
    if "w" not in mode:
        raise ValueError(f"atomic_open writes whole files; mode must contain 'w', got {mode!r}")
    if "b" not in mode and encoding is None:
        encoding = "utf-8"
    with atomic_path(path, fsync=False) as temp:
        descriptor = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(descriptor, mode, encoding=encoding, newline=newline) as stream:
            yield stream
            stream.flush()
            os.fsync(stream.fileno())


@contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a new temporary folder beside `path`; when the block succeeds it replaces `path`
    (any previous folder there is removed first). On any exception the temporary folder is removed."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = temporary_sibling(target)
    temp.mkdir()
    try:
        yield temp
        shutil.rmtree(target, ignore_errors=True)
        os.replace(temp, target)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    with atomic_open(path, "w") as stream:
        stream.write(text)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` atomically."""
    with atomic_open(path, "wb") as stream:
        stream.write(data)


def _json_default(value: Any) -> Any:
    """Encode numpy scalars/arrays and paths, which `json` does not know."""
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"object of type {type(value).__name__} is not JSON serializable")


def write_json_atomic(obj: Any, path: str | Path) -> None:
    """Write `obj` as strict JSON (no NaN/Infinity; numpy values and paths allowed) atomically."""
    with atomic_open(path, "w") as stream:
        json.dump(obj, stream, indent=2, allow_nan=False, default=_json_default)
        stream.write("\n")
