"""Multipart uploads streamed straight to disk with a size limit (no spooled temporary copy).

Starlette's form parser spools every file to the system temp folder before a handler runs; a
multi-GB slide would then be written twice and the size limit checked only at the end. Here the
request body is parsed as it arrives: file parts go into `dest_dir`, and the request fails with
`UploadTooLargeError` (413) the moment it passes `max_bytes` (or at once, from Content-Length).
"""

from __future__ import annotations

import re
import shutil
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import BinaryIO

from fastapi import HTTPException, Request, status
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from wsi_mil.errors import SlidePathError, UploadTooLargeError

_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9._()+-]")
MAX_FILENAME_CHARS = 128
#: longest client-given name a job shows and logs
MAX_DISPLAY_CHARS = 256


def printable_name(name: str, *, limit: int = MAX_DISPLAY_CHARS) -> str:
    """A client's name as shown back and logged: control and format characters (NUL, newlines)
    become `?`, at most `limit` characters; letters of any script are kept."""
    shown = "".join("?" if unicodedata.category(char)[0] == "C" else char for char in name)
    return shown if len(shown) <= limit else shown[: limit - 1] + "…"


def slide_id_for(name: str) -> str:
    """The slide id a job's outputs are named after: the file name's stem with accents folded to
    ASCII and every other unsafe character made `_`, at most 128 characters of `[A-Za-z0-9._()+-]`."""
    folded = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    stem, dot, _ = PureWindowsPath(PurePosixPath(folded).name).name.rpartition(".")
    return safe_filename(stem if dot else folded, default="slide")


def safe_filename(name: str, *, default: str = "upload") -> str:
    """A client's file name reduced to a safe base name that keeps its extension (`a b.svs` -> `a_b.svs`)."""
    base = PureWindowsPath(PurePosixPath(name).name).name
    cleaned = _UNSAFE_NAME_CHARS.sub("_", base).lstrip(".")
    if not cleaned:
        return default
    if len(cleaned) > MAX_FILENAME_CHARS:
        suffix = "".join(PurePosixPath(cleaned).suffixes)[-16:]
        cleaned = cleaned[: MAX_FILENAME_CHARS - len(suffix)] + suffix
    return cleaned


def too_large(limit_bytes: int) -> UploadTooLargeError:
    """The error for a body past `limit_bytes`, naming the setting that raises it."""
    return UploadTooLargeError(
        f"the upload is larger than the service's limit of {limit_bytes / 2**20:g} MiB "
        "(WSI_MIL_MAX_UPLOAD_MB)"
    )


def check_content_length(request: Request, limit_bytes: int) -> None:
    """Refuse a request whose declared Content-Length already exceeds the limit (before reading it)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit_bytes:
        raise too_large(limit_bytes)


@dataclass
class ReceivedFile:
    """A file part written to `path`: the form field, the client's (unsanitised) name, the size."""

    field: str
    filename: str
    path: Path
    size: int


@dataclass
class ReceivedForm:
    """The text fields and the files of one multipart request."""

    fields: dict[str, str] = field(default_factory=dict)
    files: dict[str, ReceivedFile] = field(default_factory=dict)


def _bad_form(detail: str) -> HTTPException:
    return HTTPException(
        status.HTTP_400_BAD_REQUEST, detail=f"malformed multipart/form-data body: {detail}"
    )


class _FormReceiver:
    """python-multipart callbacks that route text parts to memory and file parts to disk."""

    def __init__(self, dest_dir: Path, file_fields: frozenset[str], max_field_bytes: int) -> None:
        self.dest_dir = dest_dir
        self.file_fields = file_fields
        self.max_field_bytes = max_field_bytes
        self.form = ReceivedForm()
        self.finished = False
        self._header_name = b""
        self._header_value = b""
        self._disposition = b""
        self._field = ""
        self._text: bytearray | None = None
        self._sink: BinaryIO | None = None
        self._file: ReceivedFile | None = None

    def on_part_begin(self) -> None:
        self._disposition = b""
        self._field = ""
        self._text = None
        self._sink = None
        self._file = None

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        if self._header_name.strip().lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name = b""
        self._header_value = b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        if b"name" not in options:
            raise _bad_form('a part lacks the Content-Disposition "name"')
        self._field = options[b"name"].decode("utf-8", "replace")
        if b"filename" not in options:
            self._text = bytearray()
            return
        if self._field not in self.file_fields:
            return  # a file in a field this endpoint does not take: read past it
        if self._field in self.form.files:
            raise _bad_form(f"more than one file in field {self._field!r}")
        filename = options[b"filename"].decode("utf-8", "replace")
        path = self.dest_dir / safe_filename(filename)
        self._file = ReceivedFile(self._field, filename, path, 0)
        self.form.files[self._field] = self._file
        self._sink = path.open("wb")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._sink is not None and self._file is not None:
            self._sink.write(data[start:end])
            self._file.size += end - start
        elif self._text is not None:
            if len(self._text) + (end - start) > self.max_field_bytes:
                raise _bad_form(
                    f"field {self._field!r} is longer than {self.max_field_bytes} bytes"
                )
            self._text += data[start:end]

    def on_part_end(self) -> None:
        if self._sink is not None:
            self._sink.close()
            self._sink = None
        elif self._text is not None:
            self.form.fields[self._field] = self._text.decode("utf-8", "replace")

    def on_end(self) -> None:
        self.finished = True

    def close(self) -> None:
        if self._sink is not None:
            self._sink.close()


async def receive_form(
    request: Request,
    *,
    dest_dir: Path,
    max_bytes: int,
    file_fields: frozenset[str],
    max_field_bytes: int = 64 * 1024,
) -> ReceivedForm:
    """Parse a multipart/form-data request, writing the parts named in `file_fields` into `dest_dir`.

    Raises `UploadTooLargeError` past `max_bytes` of body, an HTTP 415 for another content type and
    an HTTP 400 for a malformed or truncated body; `dest_dir` is removed on any failure.
    """
    content_type, params = parse_options_header(request.headers.get("content-type"))
    if content_type != b"multipart/form-data" or b"boundary" not in params:
        raise HTTPException(
            status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
            detail="send the request as multipart/form-data (with a boundary)",
        )
    check_content_length(request, max_bytes)
    dest_dir.mkdir(parents=True, exist_ok=True)
    receiver = _FormReceiver(dest_dir, file_fields, max_field_bytes)
    try:
        parser = MultipartParser(
            params[b"boundary"],
            {
                "on_part_begin": receiver.on_part_begin,
                "on_part_data": receiver.on_part_data,
                "on_part_end": receiver.on_part_end,
                "on_header_field": receiver.on_header_field,
                "on_header_value": receiver.on_header_value,
                "on_header_end": receiver.on_header_end,
                "on_headers_finished": receiver.on_headers_finished,
                "on_end": receiver.on_end,
            },
        )
        received = 0
        async for chunk in request.stream():
            received += len(chunk)
            if received > max_bytes:
                raise too_large(max_bytes)
            parser.write(chunk)
        parser.finalize()
        if not receiver.finished:
            raise _bad_form("the body ended before the closing boundary")
    except MultipartParseError as err:
        receiver.close()
        shutil.rmtree(dest_dir, ignore_errors=True)
        raise _bad_form(str(err)) from err
    except BaseException:
        receiver.close()
        shutil.rmtree(dest_dir, ignore_errors=True)
        raise
    return receiver.form


def resolve_slide_path(slide_root: Path | None, requested: str) -> Path:
    """The real path of a slide a client named, which must be a file under `slide_root`.

    Raises `SlidePathError` when no root is configured, for any `..` component, absolute paths
    outside the root, symlinks that lead out of it, and paths that name no file.
    """
    if slide_root is None:
        raise SlidePathError(
            "slide paths are disabled on this service: set WSI_MIL_SLIDE_ROOT (--slide-root) or upload the slide"
        )
    if "\x00" in requested or not requested.strip():
        raise SlidePathError("slide_path must be a non-empty path without NUL characters")
    shown = printable_name(requested)
    candidate = PurePosixPath(requested.replace("\\", "/"))
    if ".." in candidate.parts:
        raise SlidePathError(
            f"slide_path {shown!r} contains '..'; name the slide relative to the slide root"
        )
    root = slide_root.resolve()
    try:
        resolved = (
            (root / candidate).resolve() if not candidate.is_absolute() else Path(candidate).resolve()
        )
        inside = resolved.is_relative_to(root)
        is_file = inside and resolved.is_file()
    except RuntimeError as err:  # Python < 3.13 reports a symlink loop so
        raise SlidePathError(f"slide_path {shown!r} runs into a symlink loop") from err
    except OSError as err:  # ELOOP, ENAMETOOLONG, EACCES: the message would name server folders
        raise SlidePathError(
            f"slide_path {shown!r} cannot be looked up under the slide root: {err.strerror}"
        ) from err
    if not inside:
        raise SlidePathError(
            f"slide_path {shown!r} lies outside the slide root (after resolving symlinks); "
            "only slides under WSI_MIL_SLIDE_ROOT can be named"
        )
    if not is_file:
        raise SlidePathError(f"no slide file {shown!r} under the slide root (WSI_MIL_SLIDE_ROOT)")
    return resolved
