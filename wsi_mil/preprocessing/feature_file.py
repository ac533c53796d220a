"""The per-slide HDF5 feature file: a streaming, atomic writer and the one reader.

Layout (see docs/feature-file-format.md): datasets `features [N, D]` and `coords [N, 2]` (int64,
level-0 top-left), CLAM's and TRIDENT's attributes on `coords` so their loaders read our files,
and the full provenance on the root group. The reader also accepts CLAM, TRIDENT, STAMP and
`.pt` bags, so MIL training takes whatever features a user already has.

The reader trusts nothing a file declares: before any data is read it refuses links, raw storage
and virtual datasets that reach other files, shapes and dtypes that are not a bag, sizes past
`FeatureLimits`, and attributes of the wrong type, each with a message naming the field.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import pickle
import types
import typing
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Annotated, Any, Literal

import h5py
import numpy as np
import torch
from pydantic import BeforeValidator, Field, TypeAdapter, ValidationError

from wsi_mil.atomic import atomic_path
from wsi_mil.errors import FeatureFileError

FORMAT_VERSION = 1
FeatureDtype = Literal["float16", "float32"]
SourceFormat = Literal["wsi_mil", "clam", "trident", "stamp", "pt"]
PT_SUFFIXES = (".pt", ".pth")
MIN_CHUNK_ROWS = 64
TARGET_CHUNK_BYTES = 2 << 20
_ERRORS_OF_BROKEN_HDF5 = (OSError, KeyError, RuntimeError, ValueError)
_RESERVED_DATASETS = frozenset({"features", "coords"})
#: the most values one attribute may hold (CLAM's and our attributes hold a handful)
MAX_ATTRIBUTE_VALUES = 65_536
_FLOAT_KINDS = "f"
_INTEGER_KINDS = "iu"
_NUMBER_KINDS = "biuf"


@dataclass(frozen=True)
class FeatureLimits:
    """What a feature file may declare, checked on its metadata before any of its data is read.

    `max_bytes` bounds everything the reader will hold in memory: the features as float32, the
    coords and the per-tile datasets. The `*_setting` texts name what raises each limit in errors.
    """

    max_tiles: int = 2_000_000
    max_bytes: int = 16 << 30
    tiles_setting: str = "FeatureLimits.max_tiles"
    bytes_setting: str = "FeatureLimits.max_bytes"


def _not_text(value: Any) -> Any:
    """Numbers only: text and booleans are refused, not parsed."""
    if isinstance(value, str | bytes | bool):
        raise ValueError("not a number")
    return value


_PositiveNumber = Annotated[float, BeforeValidator(_not_text), Field(gt=0, allow_inf_nan=False)]
_POSITIVE_INT = (TypeAdapter(Annotated[int, BeforeValidator(_not_text), Field(gt=0)]), "a positive integer")
_LEVEL = (TypeAdapter(Annotated[int, BeforeValidator(_not_text), Field(ge=0)]), "a non-negative integer")
_POSITIVE_NUMBER = (TypeAdapter(_PositiveNumber), "a positive number")
_DOWNSAMPLE = (
    TypeAdapter(_PositiveNumber | Annotated[list[_PositiveNumber], Field(min_length=1)]),
    "a positive number or a list of them",
)
#: attributes the reader and the feature contract compute with: their type, and how it is said
_TYPED_ATTRIBUTES: dict[str, tuple[TypeAdapter[Any], str]] = {
    **dict.fromkeys(
        ("feature_dim", "tile_size_level0", "patch_size_level0", "patch_size", "tile_px",
         "tile_size_px", "slide_width", "slide_height"),
        _POSITIVE_INT,
    ),
    "patch_level": _LEVEL,
    **dict.fromkeys(("target_mpp", "mpp", "tile_size_um"), _POSITIVE_NUMBER),
    "downsample": _DOWNSAMPLE,
}


def _attribute_type_problems(name: str, attrs: Mapping[str, Any]) -> list[str]:
    """One problem per typed attribute whose value is not of its type (named, with the value)."""
    problems = []
    for key, (adapter, kind) in _TYPED_ATTRIBUTES.items():
        value = attrs.get(key)
        if value is None:
            continue
        try:
            adapter.validate_python(value)
        except ValidationError:
            problems.append(f"{name}: attribute `{key}` must be {kind}, got {repr(value)[:40]}")
    return problems


def _package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


def _utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass
class FeatureProvenance:
    """Everything a feature file records about how its features were made (root attributes).

    `level0_magnification` is the objective power when the slide states one, else 10 / mpp
    (the usual 10x = 1 µm/px convention); `target_magnification` is 10 / target_mpp. The
    optional `read_size`, `read_level_downsample` and `read_level_dimensions` describe the
    pyramid level tiles were read from; CLAM's `downsample`/`level_dim` attributes need them
    when `read_level > 0`.
    """

    slide_id: str
    slide_path: str
    slide_quick_hash: str
    slide_width: int
    slide_height: int
    slide_vendor: str
    mpp: float
    mpp_source: str
    target_mpp: float
    tile_px: int
    tile_size_level0: int
    overlap_px: int
    read_level: int
    level0_magnification: float
    target_magnification: float
    encoder: str
    encoder_weights: str
    encoder_weights_sha256: str | None
    feature_dim: int
    precision: str
    transform: dict[str, Any]
    tissue: dict[str, Any]
    tiling: dict[str, Any]
    params_hash: str
    timm_version: str = field(default_factory=lambda: _package_version("timm"))
    torch_version: str = field(default_factory=lambda: _package_version("torch"))
    wsi_mil_version: str = field(default_factory=lambda: _package_version("wsi-mil"))
    created_utc: str = field(default_factory=_utc_now)
    read_size: int | None = None
    read_level_downsample: float | None = None
    read_level_dimensions: tuple[int, int] | None = None
    objective_power: float | None = None
    background_rgb: tuple[int, int, int] | None = None
    color_correction: str | None = None
    edge_padding: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.encoder_weights_sha256 == "":
            self.encoder_weights_sha256 = None

    def to_attrs(self) -> dict[str, Any]:
        """HDF5-storable root attributes: scalars as is, dicts and tuples as JSON, None omitted."""
        attrs: dict[str, Any] = {}
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if value is None:
                continue
            if isinstance(value, dict | tuple | list):
                value = json.dumps(value, sort_keys=True, default=str)
            elif isinstance(value, str):
                value = str(value)  # str subclasses (torch.__version__) are not HDF5-storable
            elif isinstance(value, np.generic):
                value = value.item()
            attrs[item.name] = value
        return attrs

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> FeatureProvenance:
        """Rebuild from decoded root attributes (as in `FeatureBag.attrs`); unknown keys ignored."""
        required = required_provenance_attrs()
        missing = [name for name in required if name not in attrs]
        if missing:
            raise FeatureFileError(f"provenance attributes missing: {', '.join(missing)}")
        values = {
            f.name: attrs.get(f.name)
            for f in dataclasses.fields(cls)
            if f.name in attrs or f.name not in required
        }
        for name in ("read_level_dimensions", "background_rgb"):
            if values.get(name) is not None:
                values[name] = tuple(values[name])
        return cls(**values)


def required_provenance_attrs() -> list[str]:
    """Root attributes every wsi_mil feature file must carry: provenance fields that cannot be None."""
    hints = typing.get_type_hints(FeatureProvenance)
    return [
        f.name
        for f in dataclasses.fields(FeatureProvenance)
        if not (isinstance(hints[f.name], types.UnionType) and type(None) in hints[f.name].__args__)
    ]


def chunk_rows(num_tiles: int, feature_dim: int, itemsize: int) -> int:
    """Rows per `features` chunk: about 2 MiB, at least 64 rows, at most `num_tiles`."""
    return min(num_tiles, max(MIN_CHUNK_ROWS, TARGET_CHUNK_BYTES // (feature_dim * itemsize)))


def coords_attributes(provenance: FeatureProvenance) -> dict[str, Any]:
    """CLAM's and TRIDENT's attributes on `coords` (see docs/feature-file-format.md)."""
    attrs: dict[str, Any] = {
        "patch_size": provenance.tile_px,
        "patch_level": provenance.read_level,
        "name": provenance.slide_id,
        "patch_size_level0": provenance.tile_size_level0,
        "level0_magnification": float(provenance.level0_magnification),
        "target_magnification": float(provenance.target_magnification),
        "overlap": provenance.overlap_px,
        "level0_width": provenance.slide_width,
        "level0_height": provenance.slide_height,
    }
    downsample = provenance.read_level_downsample
    dimensions = provenance.read_level_dimensions
    if provenance.read_level == 0:
        downsample = 1.0 if downsample is None else downsample
        dimensions = dimensions or (provenance.slide_width, provenance.slide_height)
    if downsample is not None:
        attrs["downsample"] = np.array([downsample, downsample], dtype=np.float64)
    if dimensions is not None:
        attrs["level_dim"] = np.array(dimensions, dtype=np.int64)
        attrs["downsampled_level_dim"] = np.array(dimensions, dtype=np.int64)
    return attrs


class FeatureFileWriter:
    """Stream `[b, D]` feature batches into a new feature file that appears atomically.

    Use as a context manager. Rows go to a temporary file beside `path` (`wsi_mil.atomic`); on a
    clean exit every row must have been written or dropped (`drop_rows`: tiles that could not be
    read), dropped rows are removed from every dataset, and the file is renamed into place. On any
    exception the temporary file is deleted, so no partial file ever has the final name.
    `tile_data` holds extra per-tile values `[N]` (e.g. `ink_fraction`), stored as datasets.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        num_tiles: int,
        feature_dim: int,
        coords: np.ndarray,
        provenance: FeatureProvenance,
        dtype: FeatureDtype = "float16",
        tile_data: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        self.path = Path(path)
        if dtype not in ("float16", "float32"):
            raise FeatureFileError(
                f"{self.path.name}: dtype must be float16 or float32, got {dtype!r}"
            )
        if num_tiles < 0 or feature_dim < 1:
            raise FeatureFileError(
                f"{self.path.name}: need num_tiles >= 0 and feature_dim >= 1, "
                f"got {num_tiles} and {feature_dim}"
            )
        coords = np.asarray(coords)
        if coords.shape != (num_tiles, 2) or not np.issubdtype(coords.dtype, np.integer):
            raise FeatureFileError(
                f"{self.path.name}: coords must be integer [{num_tiles}, 2], "
                f"got {coords.dtype} {coords.shape}"
            )
        if provenance.feature_dim != feature_dim:
            raise FeatureFileError(
                f"{self.path.name}: provenance.feature_dim {provenance.feature_dim} != "
                f"feature_dim {feature_dim}"
            )
        self.tile_data = {name: np.asarray(values) for name, values in (tile_data or {}).items()}
        for name, values in self.tile_data.items():
            if name in _RESERVED_DATASETS or values.shape != (num_tiles,):
                raise FeatureFileError(
                    f"{self.path.name}: tile data {name!r} must be a [{num_tiles}] array not named "
                    f"{' or '.join(sorted(_RESERVED_DATASETS))}, got shape {values.shape}"
                )
        self.num_tiles = num_tiles
        self.feature_dim = feature_dim
        self.dtype = np.dtype(dtype)
        self.coords = coords.astype(np.int64)
        self.provenance = provenance
        self.temp_path: Path | None = None
        self._exit_stack = contextlib.ExitStack()
        self._file: h5py.File | None = None
        self._features: h5py.Dataset | None = None
        self._written = np.zeros(num_tiles, dtype=bool)
        self._dropped = np.zeros(num_tiles, dtype=bool)

    def __enter__(self) -> FeatureFileWriter:
        self.temp_path = self._exit_stack.enter_context(atomic_path(self.path))
        rows = chunk_rows(self.num_tiles, self.feature_dim, self.dtype.itemsize)
        chunk_bytes = max(rows, 1) * self.feature_dim * self.dtype.itemsize
        try:
            self._file = h5py.File(self.temp_path, "w", rdcc_nbytes=max(1 << 20, 4 * chunk_bytes))
            self._features = self._file.create_dataset(
                "features",
                shape=(self.num_tiles, self.feature_dim),
                maxshape=(None, self.feature_dim),  # so that dropped rows can be cut off
                dtype=self.dtype,
                chunks=(max(rows, 1), self.feature_dim),
            )
            self._features.attrs["name"] = self.provenance.slide_id
            self._features.attrs["encoder"] = self.provenance.encoder
            self._file.attrs.update(self.provenance.to_attrs())
            self._file.attrs["wsi_mil_format_version"] = FORMAT_VERSION
        except (OSError, ValueError, TypeError) as err:
            self._discard(err)
            raise FeatureFileError(
                f"{self.path.name}: cannot create the feature file: {err}"
            ) from err
        return self

    def write(self, start_row: int, features: np.ndarray) -> None:
        """Write rows `start_row .. start_row + b` from `features [b, D]` (cast to the file dtype)."""
        if self._features is None:
            raise FeatureFileError(f"{self.path.name}: write() called outside the `with` block")
        batch = np.asarray(features)
        if batch.ndim != 2 or batch.shape[1] != self.feature_dim:
            raise FeatureFileError(
                f"{self.path.name}: expected a [b, {self.feature_dim}] batch, got {batch.shape}"
            )
        stop = start_row + batch.shape[0]
        if start_row < 0 or stop > self.num_tiles:
            raise FeatureFileError(
                f"{self.path.name}: rows {start_row}..{stop} outside 0..{self.num_tiles}"
            )
        with np.errstate(over="ignore"):
            stored = batch.astype(self.dtype, copy=False)
        if not np.isfinite(stored).all():
            hint = (
                " (float16 overflow: write with dtype float32)" if np.isfinite(batch).all() else ""
            )
            raise FeatureFileError(
                f"{self.path.name}: non-finite features in rows {start_row}..{stop}{hint}; "
                "if the encoder overflows, run it with --precision fp32"
            )
        self._features[start_row:stop] = stored
        self._written[start_row:stop] = True

    def drop_rows(self, rows: Sequence[int] | np.ndarray) -> None:
        """Leave these rows (tiles that could not be read) out of the file; whatever was written
        for them is discarded."""
        self._dropped[np.asarray(rows, dtype=np.int64)] = True

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: types.TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self._discard(exc)
            return
        missing = ~self._written & ~self._dropped
        if missing.any():
            first = int(np.flatnonzero(missing)[0])
            error = FeatureFileError(
                f"{self.path.name}: {int(missing.sum())} of {self.num_tiles} rows were never "
                f"written (first: {first}); the file was not created"
            )
            self._discard(error)
            raise error
        try:
            self._finish()
            handle, self._file, self._features = self._file, None, None
            if handle is not None:
                handle.close()
            self._exit_stack.close()  # fsync and rename into place (the temporary goes on failure)
        except (OSError, ValueError) as err:
            self._discard(err)
            raise FeatureFileError(f"{self.path.name}: could not finish the file: {err}") from err

    def _finish(self) -> None:
        """Cut dropped rows out of `features` (moving kept rows up, chunk by chunk) and write
        `coords` and the tile data for the kept rows."""
        assert self._file is not None and self._features is not None
        keep = ~self._dropped
        if self._dropped.any():
            step = self._features.chunks[0]
            kept = 0
            for start in range(0, self.num_tiles, step):
                block_keep = keep[start : start + step]
                rows = self._features[start : start + step][block_keep]
                self._features[kept : kept + len(rows)] = rows
                kept += len(rows)
            self._features.resize((kept, self.feature_dim))
        coords = self._file.create_dataset("coords", data=self.coords[keep], dtype=np.int64)
        coords.attrs.update(coords_attributes(self.provenance))
        for name, values in self.tile_data.items():
            self._file.create_dataset(name, data=values[keep])
        self._file.flush()

    def _discard(self, error: BaseException) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError, RuntimeError, ValueError):
                self._file.close()
            self._file = None
        self._features = None
        # Unwinding `atomic_path` with the error deletes the temporary file (a no-op once closed).
        self._exit_stack.__exit__(type(error), error, error.__traceback__)


def write_feature_file(
    path: str | Path,
    features: np.ndarray,
    coords: np.ndarray,
    provenance: FeatureProvenance,
    *,
    dtype: FeatureDtype = "float16",
) -> Path:
    """Write an in-memory bag `features [N, D]` + `coords [N, 2]` in one go (atomically)."""
    features = np.asarray(features)
    if features.ndim != 2:
        raise FeatureFileError(f"{Path(path).name}: features must be [N, D], got {features.shape}")
    with FeatureFileWriter(
        path,
        num_tiles=features.shape[0],
        feature_dim=features.shape[1],
        coords=coords,
        provenance=provenance,
        dtype=dtype,
    ) as writer:
        writer.write(0, features)
    return Path(path)


@dataclass
class FeatureBag:
    """One slide's features as read from any supported file.

    `coords` are level-0 top-left pixels (`None` when the file has none or they cannot be put in
    level-0 pixels; `notes` then says why). `attrs` merges the file's attributes, JSON decoded:
    those on `coords`, then `features`, then the root group (which wins). `tile_data` holds the
    file's other per-tile datasets `[N]` by name, e.g. `ink_fraction` (absent in older files).
    """

    features: np.ndarray
    coords: np.ndarray | None
    tile_size_level0: int | None
    attrs: dict[str, Any]
    source_format: SourceFormat
    path: Path
    notes: list[str] = field(default_factory=list)
    tile_data: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def encoder(self) -> str | None:
        value = self.attrs.get("encoder", self.attrs.get("extractor"))
        return str(value) if value is not None else None

    @property
    def feature_dim(self) -> int:
        return int(self.features.shape[1])

    @property
    def num_tiles(self) -> int:
        return int(self.features.shape[0])

    @property
    def slide_id(self) -> str:
        """The recorded slide id (CLAM/TRIDENT `name`), else the file stem."""
        value = self.attrs.get("slide_id", self.attrs.get("name"))
        return str(value) if value else self.path.stem

    def provenance(self) -> FeatureProvenance:
        """The provenance of a wsi_mil file; other formats raise `FeatureFileError`."""
        if self.source_format != "wsi_mil":
            raise FeatureFileError(
                f"{self.path.name}: a {self.source_format} file has no provenance"
            )
        return FeatureProvenance.from_attrs(self.attrs)


def _plain(value: Any) -> Any:
    """An h5py attribute value as plain Python; JSON strings decoded."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, str) and value[:1] in ("{", "["):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _attrs_of(obj: h5py.HLObject) -> dict[str, Any]:
    """An object's attributes as plain Python; one holding more than `MAX_ATTRIBUTE_VALUES` values
    raises `FeatureFileError` before it is read."""
    for key in obj.attrs:
        count = obj.attrs.get_id(key).shape
        if count and int(np.prod(count)) > MAX_ATTRIBUTE_VALUES:
            raise FeatureFileError(
                f"attribute `{key}` holds {int(np.prod(count)):,} values; feature file attributes "
                f"hold at most {MAX_ATTRIBUTE_VALUES:,}"
            )
    return {key: _plain(value) for key, value in obj.attrs.items()}


def _outside_references(handle: h5py.File, name: str) -> list[str]:
    """Whatever in the file would make HDF5 read another file: external (or user-defined) links,
    external raw storage, virtual datasets. Links are listed without being followed."""
    problems: list[str] = []

    def visit_link(path: str, link: Any) -> None:
        if not isinstance(link, h5py.HardLink | h5py.SoftLink):
            problems.append(
                f"{name}: `{path}` is an external link; a feature file must hold its own data "
                "(links, external storage and virtual datasets are refused)"
            )

    handle.visititems_links(visit_link)
    if problems:
        return problems

    def visit_object(path: str, item: Any) -> None:
        if not isinstance(item, h5py.Dataset):
            return
        plist = item.id.get_create_plist()
        if plist.get_layout() == h5py.h5d.VIRTUAL:
            problems.append(
                f"{name}: `{path}` is a virtual dataset (its data lies in other files); "
                "write the features into the file itself"
            )
        elif plist.get_external_count() > 0:
            problems.append(
                f"{name}: `{path}` has external raw storage (its data lies in another file); "
                "write the features into the file itself"
            )

    handle.visititems(visit_object)
    return problems


def _dtype_name(dataset: h5py.Dataset) -> str:
    return "text" if h5py.check_string_dtype(dataset.dtype) else str(dataset.dtype)


def _kind_of(item: h5py.HLObject | None) -> str:
    return "missing" if item is None else "a group" if isinstance(item, h5py.Group) else "not a dataset"


@dataclass
class _Plan:
    """What `_load_h5` will read, every shape, dtype and size checked: per-tile datasets by name."""

    features: h5py.Dataset
    coords: h5py.Dataset | None
    tile_data: dict[str, h5py.Dataset]


def _plan_reads(
    handle: h5py.File, source: SourceFormat, features_key: str, name: str, limits: FeatureLimits
) -> tuple[_Plan | None, list[str]]:
    """Check the datasets to read against what a bag is and against `limits`, from metadata only."""
    features = handle.get(features_key)
    if not isinstance(features, h5py.Dataset):
        return None, [f"{name}: `{features_key}` is {_kind_of(features)}, expected a dataset [N, D]"]
    if features.dtype.kind not in _FLOAT_KINDS:
        return None, [f"{name}: `{features_key}` has dtype {_dtype_name(features)}, expected float"]
    if len(features.shape) != 2:
        return None, [f"{name}: features must be 2-D [N, D], got shape {features.shape}"]
    rows, dim = (int(n) for n in features.shape)
    if rows > limits.max_tiles:
        return None, [
            f"{name}: the file declares {rows:,} tiles, more than the limit of "
            f"{limits.max_tiles:,} ({limits.tiles_setting})"
        ]
    coords = handle.get("coords") if "coords" in handle else None
    if coords is not None:
        kinds = _INTEGER_KINDS + (_FLOAT_KINDS if source == "stamp" else "")
        if not isinstance(coords, h5py.Dataset):
            return None, [f"{name}: `coords` is {_kind_of(coords)}, expected a dataset [N, 2]"]
        if coords.dtype.kind not in kinds:
            return None, [f"{name}: `coords` has dtype {_dtype_name(coords)}, expected integer pixels"]
        if coords.shape != (rows, 2):
            return None, [
                f"{name}: coords shape {coords.shape} does not match {rows} feature rows "
                "(expected [N, 2])"
            ]
    tile_data = {
        key: item
        for key, item in handle.items()
        if key not in (features_key, "coords")
        and isinstance(item, h5py.Dataset)
        and item.shape == (rows,)
        and item.dtype.kind in _NUMBER_KINDS
    }
    in_memory = rows * (4 * dim + (16 if coords is not None else 0) + 8 * len(tile_data))
    if in_memory > limits.max_bytes:
        return None, [
            f"{name}: the file declares {rows:,} x {dim:,} features ({in_memory / 2**20:,.0f} MiB "
            f"in memory with coords and per-tile data), more than the limit of "
            f"{limits.max_bytes / 2**20:,.0f} MiB ({limits.bytes_setting})"
        ]
    return _Plan(features, coords, tile_data), []


def _detect_h5_format(handle: h5py.File) -> SourceFormat | None:
    if "wsi_mil_format_version" in handle.attrs:
        return "wsi_mil"
    if "features" in handle:
        features_attrs, coords_attrs = handle["features"].attrs, {}
        if "coords" in handle:
            coords_attrs = handle["coords"].attrs
        if "encoder" in features_attrs or "patch_size_level0" in coords_attrs:
            return "trident"
        return "clam"
    if "feats" in handle:
        return "stamp"
    return None


def _tile_size_from_attrs(source: SourceFormat, attrs: dict[str, Any]) -> int | None:
    if source == "wsi_mil" and "tile_size_level0" in attrs:
        return int(attrs["tile_size_level0"])
    if "patch_size_level0" in attrs:
        return int(attrs["patch_size_level0"])
    if source == "clam" and "patch_size" in attrs:
        downsample = attrs.get("downsample", 1.0 if attrs.get("patch_level", 0) == 0 else None)
        if isinstance(downsample, list):
            downsample = downsample[0]
        if downsample is not None:
            return round(float(attrs["patch_size"]) * float(downsample))
    return None


def _stamp_coords(
    coords: np.ndarray, attrs: dict[str, Any], slide_mpp: float | None, notes: list[str]
) -> tuple[np.ndarray | None, int | None]:
    """STAMP stores tile corners in µm: level-0 px with the slide's mpp, else tile-grid px."""
    tile_um, tile_px = attrs.get("tile_size_um"), attrs.get("tile_size_px")
    if attrs.get("unit") != "um":
        notes.append("STAMP coords have no `unit = um` attribute (older STAMP); coords dropped")
        return None, None
    if slide_mpp is not None:
        notes.append(f"STAMP coords converted from µm to level-0 px with slide_mpp={slide_mpp}")
        size = round(float(tile_um) / slide_mpp) if tile_um else None
        return np.rint(coords / slide_mpp).astype(np.int64), size
    if tile_um and tile_px:
        scale = float(tile_px) / float(tile_um)
        notes.append(
            "STAMP coords converted from µm to pixels at the extraction resolution "
            f"({tile_px} px per {tile_um} µm), not level 0; pass slide_mpp for level-0 px"
        )
        return np.rint(coords * scale).astype(np.int64), int(tile_px)
    notes.append(
        "STAMP coords are in µm and the file lacks tile_size_um/tile_size_px; coords dropped"
    )
    return None, None


def _load_h5(
    path: Path, slide_mpp: float | None, limits: FeatureLimits
) -> tuple[FeatureBag | None, list[str]]:
    name = path.name
    try:
        with h5py.File(path, "r", locking=False) as handle:
            refused = _outside_references(handle, name)
            if refused:
                return None, refused
            source = _detect_h5_format(handle)
            if source is None:
                found = ", ".join(sorted(handle.keys())) or "nothing"
                return None, [
                    f"{name}: no `features` (wsi_mil/CLAM/TRIDENT) or `feats` (STAMP) dataset; "
                    f"found {found}"
                ]
            features_key = "feats" if source == "stamp" else "features"
            if "features" not in handle and source == "wsi_mil":
                return None, [f"{name}: the `features` dataset is missing"]
            plan, refused = _plan_reads(handle, source, features_key, name, limits)
            if plan is None:
                return None, refused
            attrs: dict[str, Any] = {}
            if plan.coords is not None:
                attrs.update(_attrs_of(plan.coords))
            attrs.update(_attrs_of(plan.features))
            attrs.update(_attrs_of(handle))
            refused = _attribute_type_problems(name, attrs)
            if refused:
                return None, refused
            features = np.asarray(plan.features[()])
            coords = np.asarray(plan.coords[()]) if plan.coords is not None else None
            tile_data = {key: np.asarray(item[()]) for key, item in plan.tile_data.items()}
    except FeatureFileError as err:
        return None, [f"{name}: {err}"]
    except _ERRORS_OF_BROKEN_HDF5 as err:
        return None, [f"{name}: not a readable HDF5 feature file (truncated or corrupt?): {err}"]
    problems: list[str] = []
    notes: list[str] = []
    tile_size = _tile_size_from_attrs(source, attrs)
    if source == "stamp" and coords is not None:
        coords, tile_size = _stamp_coords(coords.astype(np.float64), attrs, slide_mpp, notes)
    if coords is None and source != "stamp":
        notes.append("the file has no `coords` dataset")
    if source == "wsi_mil":
        problems += _wsi_mil_attr_problems(name, attrs)
        if coords is None:
            problems.append(f"{name}: the `coords` dataset is missing")
    bag = FeatureBag(
        features=features.astype(np.float32, copy=False),
        coords=coords.astype(np.int64, copy=False) if coords is not None else None,
        tile_size_level0=tile_size,
        attrs=attrs,
        source_format=source,
        path=path,
        notes=notes,
        tile_data=tile_data,
    )
    return bag, problems


def _wsi_mil_attr_problems(name: str, attrs: dict[str, Any]) -> list[str]:
    problems = []
    missing = [key for key in required_provenance_attrs() if key not in attrs]
    if missing:
        problems.append(f"{name}: provenance attributes missing: {', '.join(missing)}")
    version_found = attrs.get("wsi_mil_format_version")
    if not isinstance(version_found, int) or version_found > FORMAT_VERSION:
        problems.append(
            f"{name}: wsi_mil_format_version {version_found!r} is not supported by this "
            f"wsi_mil (reads up to {FORMAT_VERSION}); upgrade wsi-mil"
        )
    return problems


def _numpy_array_globals() -> list[Any]:
    """What a pickled numeric numpy array needs from the unpickler: the array and dtype
    constructors (`_reconstruct` under numpy 2's module name and numpy 1's), and nothing else."""
    reconstruct = np._core.multiarray._reconstruct
    dtype_classes = [type(np.dtype(name)) for name in ("float16", "float32", "float64", "int32", "int64")]
    return [np.ndarray, np.dtype, *dtype_classes, reconstruct, (reconstruct, "numpy.core.multiarray._reconstruct")]


def _unpickling_cause(err: BaseException) -> str:
    """The useful part of torch's weights-only error (what it refused), on one line."""
    text = str(err).split("Check the documentation")[0]
    for marker in ("WeightsUnpickler error:", "from a trusted source."):
        if marker in text:
            text = text.rsplit(marker, 1)[1]
            break
    return " ".join(text.split())[:300]


def _as_tensor(value: Any) -> Any:
    return torch.from_numpy(value) if isinstance(value, np.ndarray) else value


def _pt_size_problems(path: Path, limits: FeatureLimits) -> list[str]:
    """A zip-format `.pt` whose entries unpack to more than `limits.max_bytes` (a legacy one is
    as large as its file)."""
    if not zipfile.is_zipfile(path):
        return []
    with zipfile.ZipFile(path) as archive:
        unpacked = sum(entry.file_size for entry in archive.infolist())
    if unpacked <= limits.max_bytes:
        return []
    return [
        f"{path.name}: the archive unpacks to {unpacked / 2**20:,.0f} MiB, more than the limit of "
        f"{limits.max_bytes / 2**20:,.0f} MiB ({limits.bytes_setting})"
    ]


def _load_pt(path: Path, limits: FeatureLimits) -> tuple[FeatureBag | None, list[str]]:
    """A `.pt` bag: a tensor or a numpy array (TRIDENT pickles one), or a dict of them.

    Loaded with `weights_only=True` and only the numpy array constructors allowed, so a user's
    file can never run code while it is read; its unpacked size is checked first.
    """
    name = path.name
    try:
        refused = _pt_size_problems(path, limits)
        if refused:
            return None, refused
        with torch.serialization.safe_globals(_numpy_array_globals()):
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, ValueError, zipfile.BadZipFile) as err:
        cause = _unpickling_cause(err)
        return None, [f"{name}: not a torch file of tensors or numpy arrays that loads safely: {cause}"]
    attrs: dict[str, Any] = {}
    coords_tensor = None
    if isinstance(loaded, dict):
        key = next((k for k in ("features", "feats") if k in loaded), None)
        if key is None:
            return None, [f"{name}: a dict without `features` or `feats`; keys: {sorted(loaded)}"]
        features_tensor = _as_tensor(loaded[key])
        coords_tensor = _as_tensor(loaded.get("coords"))
        attrs = {k: v for k, v in loaded.items() if isinstance(v, str | int | float | bool)}
    else:
        features_tensor = _as_tensor(loaded)
    if not isinstance(features_tensor, torch.Tensor) or (
        coords_tensor is not None and not isinstance(coords_tensor, torch.Tensor)
    ):
        return None, [
            f"{name}: features/coords must be tensors, got {type(features_tensor).__name__}"
        ]
    if features_tensor.ndim and features_tensor.shape[0] > limits.max_tiles:
        return None, [
            f"{name}: the bag holds {features_tensor.shape[0]:,} tiles, more than the limit of "
            f"{limits.max_tiles:,} ({limits.tiles_setting})"
        ]
    refused = _attribute_type_problems(name, attrs)
    if refused:
        return None, refused
    problems: list[str] = []
    if not features_tensor.is_floating_point():
        problems.append(f"{name}: features have dtype {features_tensor.dtype}, expected float")
    coords = None
    if coords_tensor is not None:
        if coords_tensor.is_floating_point():
            problems.append(f"{name}: coords have dtype {coords_tensor.dtype}, expected integer")
        coords = coords_tensor.numpy().astype(np.int64)
    bag = FeatureBag(
        features=features_tensor.float().numpy(),
        coords=coords,
        tile_size_level0=None,
        attrs=attrs,
        source_format="pt",
        path=path,
        notes=[] if coords is not None else ["the .pt bag has no coords"],
    )
    return bag, problems


def _content_problems(bag: FeatureBag) -> list[str]:
    name = bag.path.name
    features = bag.features
    if features.ndim != 2:
        return [f"{name}: features must be 2-D [N, D], got shape {features.shape}"]
    problems = []
    if features.shape[1] == 0:
        problems.append(f"{name}: features have zero columns")
    bad = int(features.size - np.isfinite(features).sum())
    if bad:
        problems.append(f"{name}: {bad} non-finite feature values (NaN or inf)")
    if bag.coords is not None and bag.coords.shape != (features.shape[0], 2):
        problems.append(
            f"{name}: coords shape {bag.coords.shape} does not match {features.shape[0]} "
            "feature rows (expected [N, 2])"
        )
    declared = bag.attrs.get("feature_dim") if bag.source_format == "wsi_mil" else None
    if declared is not None and int(declared) != features.shape[1]:
        problems.append(f"{name}: feature_dim attribute {declared} != {features.shape[1]} columns")
    return problems


def _load(
    path: Path, slide_mpp: float | None, limits: FeatureLimits | None
) -> tuple[FeatureBag | None, list[str]]:
    if not path.is_file():
        return None, [f"{path.name}: no such feature file ({path})"]
    limits = limits or FeatureLimits()
    try:
        if path.suffix.lower() in PT_SUFFIXES:
            bag, problems = _load_pt(path, limits)
        else:
            bag, problems = _load_h5(path, slide_mpp, limits)
        if bag is not None:
            problems += _content_problems(bag)
    except MemoryError:
        return None, [f"{path.name}: too large to read into this machine's memory"]
    return bag, problems


def read_feature_file(
    path: str | Path,
    *,
    validate: bool = True,
    slide_mpp: float | None = None,
    limits: FeatureLimits | None = None,
) -> FeatureBag:
    """Read a wsi_mil, CLAM, TRIDENT or STAMP `.h5`, or a `.pt`/`.pth` bag.

    Files that reach other files (external links or storage, virtual datasets), declare more than
    `limits` (default `FeatureLimits()`) or carry mistyped fields raise `FeatureFileError` before
    any data is read. With `validate`, any other problem (missing datasets or provenance, shapes,
    dtypes, NaN/inf) raises too, naming the file and the problem. `slide_mpp` is only used to put
    STAMP's µm coordinates into level-0 pixels.
    """
    bag, problems = _load(Path(path), slide_mpp, limits)
    if bag is None or (validate and problems):
        raise FeatureFileError("; ".join(problems))
    return bag


def validate_feature_file(path: str | Path, *, limits: FeatureLimits | None = None) -> list[str]:
    """The problems `read_feature_file` would raise for, as a list (empty when the file is fine)."""
    return _load(Path(path), None, limits)[1]


def read_feature_meta(path: str | Path) -> dict[str, Any]:
    """Attributes of an `.h5` feature file (merged as in `FeatureBag.attrs`) plus `num_tiles`,
    `feature_dim` and `source_format`, without reading the features (cheap; the batch job checks
    `params_hash` with it)."""
    file_path = Path(path)
    try:
        with h5py.File(file_path, "r", locking=False) as handle:
            refused = _outside_references(handle, file_path.name)
            if refused:
                raise FeatureFileError("; ".join(refused))
            source = _detect_h5_format(handle)
            meta: dict[str, Any] = {}
            key = next((k for k in ("features", "feats") if k in handle), None)
            for name in ("coords", key):
                if name is not None and name in handle:
                    meta.update(_attrs_of(handle[name]))
            meta.update(_attrs_of(handle))
            if key is not None and len(handle[key].shape) == 2:
                meta["num_tiles"], meta["feature_dim"] = (int(n) for n in handle[key].shape)
    except _ERRORS_OF_BROKEN_HDF5 as err:
        raise FeatureFileError(
            f"{file_path.name}: cannot read feature file attributes: {err}"
        ) from err
    meta["source_format"] = source
    return meta
