"""Whole-slide reading over OpenSlide: a lazy, picklable `SlideReader`, mpp resolution and slide facts.

Coordinates are level-0 `(x, y)` and sizes `(width, height)` everywhere, as in openslide-python.
Every OpenSlide or Pillow failure leaves this module as `SlideOpenError` naming the file and the cause.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import re
import struct
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import numpy as np
import openslide
import tifffile
from PIL import Image

from wsi_mil.errors import MissingMppError, SlideOpenError

logger = logging.getLogger(__name__)

MppSource = Literal["properties", "tiff_resolution", "override"]

# An override that differs from the slide's own mpp by more than this is ignored with a warning.
MPP_OVERRIDE_TOLERANCE = 0.05
# Metadata mpp outside this range is not a microscope scan: 72/96/300-dpi placeholder resolution
# tags give 352.8/264.6/84.7 µm/px. An override wins over such a value (see `resolve_mpp`).
PLAUSIBLE_MPP_RANGE = (0.01, 50.0)
# A pyramid level whose downsample exceeds the requested one by at most this factor still counts
# (scanners store 2.0005 for a nominal 2x level).
LEVEL_DOWNSAMPLE_TOLERANCE = 1.01
# Whole-slide resampling reads the source level in bands of about this many pixels.
_BAND_PIXELS = 16 * 1024 * 1024
_HASH_CHUNK = 1024 * 1024
_WHITE = (255, 255, 255)
_RESOLUTION_UNIT_UM = {"centimeter": 1e4, "inch": 25.4e3}
_OPENSLIDE_FAILURES = (openslide.OpenSlideError, OSError)
_NOT_CHECKED = object()
# JPEG baseline and extended: the transfer syntaxes whose frames may carry a JFIF (YCbCr) marker.
_DICOM_JPEG_SYNTAXES = frozenset({"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51"})
_DICOM_PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"  # (7FE0,0010), little endian
_DICOM_FRAME_SEARCH_BYTES = 8 << 20  # the header and offset tables come before the first frame
_JPEG_HEADER_BYTES = 64 << 10
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
# Encapsulated pixel data ends with a Sequence Delimitation Item (FFFE,E0DD) of length 0.
_DICOM_SEQUENCE_DELIMITER = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
_DICOM_NATIVE_SYNTAXES = frozenset(
    {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"}
)


@dataclass(frozen=True)
class MppInfo:
    """Microns per level-0 pixel and where the value came from (recorded in every output artifact)."""

    mpp: float
    source: MppSource


def _parse_positive_float(value: str | None) -> float | None:
    """`value` as a finite float > 0, or None when it is absent or not a usable number."""
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) and number > 0 else None


def _mean_of_axes(x: float | None, y: float | None, *, what: str, slide_name: str) -> float | None:
    """One mpp from its x and y values (their mean; a warning when pixels are not square)."""
    values = [v for v in (x, y) if v is not None]
    if not values:
        return None
    if len(values) == 2 and abs(values[0] - values[1]) > MPP_OVERRIDE_TOLERANCE * max(values):
        logger.warning("%s: %s x=%g and y=%g differ; using their mean", slide_name, what, x, y)
    return sum(values) / len(values)


def _mpp_from_properties(properties: Mapping[str, str], *, slide_name: str) -> float | None:
    x = _parse_positive_float(properties.get(openslide.PROPERTY_NAME_MPP_X))
    y = _parse_positive_float(properties.get(openslide.PROPERTY_NAME_MPP_Y))
    return _mean_of_axes(x, y, what="openslide.mpp", slide_name=slide_name)


def _mpp_from_tiff_resolution(properties: Mapping[str, str], *, slide_name: str) -> float | None:
    """mpp from the TIFF XResolution/YResolution tags (pixels per unit) and ResolutionUnit."""
    unit_um = _RESOLUTION_UNIT_UM.get(properties.get("tiff.ResolutionUnit", "").strip().lower())
    if unit_um is None:
        return None
    x_res = _parse_positive_float(properties.get("tiff.XResolution"))
    y_res = _parse_positive_float(properties.get("tiff.YResolution"))
    return _mean_of_axes(
        unit_um / x_res if x_res else None,
        unit_um / y_res if y_res else None,
        what="TIFF resolution mpp",
        slide_name=slide_name,
    )


def _is_plausible_mpp(mpp: float) -> bool:
    return PLAUSIBLE_MPP_RANGE[0] <= mpp <= PLAUSIBLE_MPP_RANGE[1]


def resolve_mpp(
    properties: Mapping[str, str],
    *,
    override: float | None = None,
    slide_name: str = "slide",
) -> MppInfo:
    """The slide's microns per level-0 pixel, from its metadata first and the override as fallback.

    Order: OpenSlide's `openslide.mpp-x`/`-y` (source `tiff_resolution` for a generic TIFF, where
    OpenSlide computes it from the resolution tags), then the TIFF resolution tags (`tiff.XResolution`
    + `tiff.ResolutionUnit` in centimeter or inch, which OpenSlide exposes for every TIFF-based format),
    then `override` (the manifest column `mpp` or `--slide-mpp`). The override is a fallback: when the
    slide has its own mpp and the override differs from it by more than 5 %, the slide's value is kept
    and a warning names both. One exception: a metadata value outside `PLAUSIBLE_MPP_RANGE` (a 72-dpi
    placeholder tag gives 352.8 µm/px) gives way to an override, with a warning.
    Raises `MissingMppError` when the slide has no mpp and no override is given.
    """
    if override is not None and not (math.isfinite(override) and override > 0):
        raise MissingMppError(
            f"{slide_name}: mpp override {override!r} is not a positive number; "
            "set the manifest column `mpp` or pass `--slide-mpp` with a value in µm/px"
        )
    # OpenSlide derives a generic TIFF's openslide.mpp-x from its resolution tags, so for that
    # format the value's real source is the tags.
    generic_tiff = properties.get(openslide.PROPERTY_NAME_VENDOR) == "generic-tiff"
    candidates: list[tuple[float | None, MppSource]] = [
        (
            _mpp_from_properties(properties, slide_name=slide_name),
            "tiff_resolution" if generic_tiff else "properties",
        ),
        (_mpp_from_tiff_resolution(properties, slide_name=slide_name), "tiff_resolution"),
    ]
    for mpp, source in candidates:
        if mpp is None:
            continue
        if override is None:
            if not _is_plausible_mpp(mpp):
                logger.warning(
                    "%s: mpp %g µm/px from %s is implausible for a microscope scan; "
                    "set the manifest column `mpp` or pass `--slide-mpp` if it is wrong",
                    slide_name,
                    mpp,
                    source,
                )
            return MppInfo(mpp, source)
        if not _is_plausible_mpp(mpp):
            logger.warning(
                "%s: slide mpp %g µm/px from %s is implausible; using the override %g µm/px",
                slide_name,
                mpp,
                source,
                override,
            )
            return MppInfo(float(override), "override")
        if abs(override - mpp) > MPP_OVERRIDE_TOLERANCE * mpp:
            logger.warning(
                "%s: mpp override %g µm/px differs from the slide's own %g µm/px (%s) by more "
                "than 5 %%; keeping the slide's value",
                slide_name,
                override,
                mpp,
                source,
            )
        return MppInfo(mpp, source)
    if override is not None:
        return MppInfo(float(override), "override")
    raise MissingMppError(
        f"{slide_name}: the slide has no microns-per-pixel in its metadata (no openslide.mpp-x, "
        "no TIFF resolution tag); set the manifest column `mpp` or pass `--slide-mpp`"
    )


def _describe_failure(err: BaseException) -> str:
    """A short cause for an OpenSlide/Pillow exception, e.g. 'corrupt image data: Bogus marker length'."""
    message = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, openslide.OpenSlideUnsupportedFormatError):
        return f"not a whole-slide image format OpenSlide supports ({message})"
    return message


class _LogRecords(logging.Handler):
    """Collects the records a library logs while it is attached (tifffile reports damage this way)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _tiff_damage(path: Path, size: int) -> str | None:
    """Why a TIFF's structure does not fit in its `size` bytes (an IFD or tile beyond the end), or None."""
    tifffile_log = logging.getLogger("tifffile")
    collector = _LogRecords()
    tifffile_log.addHandler(collector)
    try:
        with tifffile.TiffFile(path) as tif:
            data_end = max(
                (int(np.max(np.add(page.dataoffsets, page.databytecounts))) for page in tif.pages
                 if len(page.dataoffsets)),
                default=0,
            )
            pages = len(tif.pages)
    except (tifffile.TiffFileError, OSError, ValueError, struct.error):
        return f"file ends at byte {size}"
    finally:
        tifffile_log.removeHandler(collector)
    if data_end > size:
        return f"file ends at byte {size}; its tiles run to byte {data_end}"
    if pages == 0 or collector.records:
        return f"file ends at byte {size}"
    return None


def _dicom_damage(path: Path, size: int) -> str | None:
    """Why an encapsulated (compressed) DICOM file looks cut short: it lacks the closing delimiter."""
    with path.open("rb") as stream:
        meta = stream.read(4096)
        stream.seek(max(0, size - len(_DICOM_SEQUENCE_DELIMITER)))
        tail = stream.read()
    syntax = re.search(rb"\x02\x00\x10\x00UI(..)", meta, flags=re.DOTALL)
    if syntax is None:
        return None
    length = int.from_bytes(syntax.group(1), "little")
    uid = meta[syntax.end() : syntax.end() + length].rstrip(b"\x00 ").decode("ascii", "replace")
    if uid in _DICOM_NATIVE_SYNTAXES or tail == _DICOM_SEQUENCE_DELIMITER:
        return None
    return f"file ends at byte {size} inside its compressed frames"


def diagnose_damaged_file(path: str | Path) -> str | None:
    """Why a slide file looks damaged in transfer, as a short phrase, or None when it does not.

    An empty file; a TIFF (SVS, NDPI, generic) whose directories or tiles lie beyond its end; a
    compressed DICOM without the delimiter that closes its frames (a DICOM slide is checked together
    with the other `.dcm` files of its folder, which OpenSlide reads as one series).
    """
    path = Path(path)
    candidates = [path]
    if path.suffix.lower() == ".dcm":
        candidates += sorted(p for p in path.parent.glob("*.dcm") if p != path)
    for candidate in candidates:
        try:
            size = candidate.stat().st_size
            with candidate.open("rb") as stream:
                head = stream.read(132)
        except OSError:
            continue
        prefix = "" if candidate == path else f"{candidate.name} of the series: "
        if size == 0:
            return f"{prefix}empty file (0 bytes); copy it again"
        damage = None
        if head[:4] in _TIFF_MAGIC:
            damage = _tiff_damage(candidate, size)
        elif head[128:132] == b"DICM":
            damage = _dicom_damage(candidate, size)
        if damage is not None:
            return f"{prefix}truncated or corrupt ({damage}); copy it again"
    return None


def _jpeg_decodes_from_ycbcr(header: bytes) -> bool | None:
    """Whether libjpeg decodes this 3-component JPEG from YCbCr, by its own rules; None if unreadable.

    A JFIF marker means YCbCr; else an Adobe marker decides (transform 0 is RGB); else component ids
    'R', 'G', 'B' mean RGB and anything else YCbCr.
    """
    try:
        with Image.open(io.BytesIO(header)) as image:
            info, layers = image.info, [layer[0] for layer in getattr(image, "layer", [])]
    except (OSError, SyntaxError, ValueError):
        return None
    if len(layers) != 3:
        return None
    if "jfif" in info:
        return True
    if "adobe" in info:
        return info.get("adobe_transform") != 0
    return layers != [ord("R"), ord("G"), ord("B")]


def dicom_frames_are_ycbcr_labelled_rgb(path: str | Path, properties: Mapping[str, str]) -> bool:
    """True when a DICOM says PhotometricInterpretation RGB but its JPEG frames are YCbCr (JFIF).

    OpenSlide 4.0.1 trusts the header and skips the YCbCr-to-RGB conversion, so such a slide reads
    with salmon glass and teal tissue. Only the first frame of `path` is looked at (a series is
    written by one converter).
    """
    if properties.get(openslide.PROPERTY_NAME_VENDOR) != "dicom":
        return False
    if properties.get("dicom.PhotometricInterpretation") != "RGB":
        return False
    if properties.get("dicom.TransferSyntaxUID") not in _DICOM_JPEG_SYNTAXES:
        return False
    try:
        with Path(path).open("rb") as stream:
            head = stream.read(_DICOM_FRAME_SEARCH_BYTES)
    except OSError:
        return False
    pixel_data = head.find(_DICOM_PIXEL_DATA_TAG)
    start = head.find(b"\xff\xd8\xff", pixel_data) if pixel_data >= 0 else -1
    if start < 0:
        logger.warning("%s: no JPEG frame found to check its colour space", Path(path).name)
        return False
    return bool(_jpeg_decodes_from_ycbcr(head[start : start + _JPEG_HEADER_BYTES]))


class SlideReader:
    """A whole-slide image opened with OpenSlide on first use; picklable for DataLoader workers.

    Pickling drops the OpenSlide handle, so each process reopens its own (never share one across
    processes). After a failed read the handle is discarded, because OpenSlide errors are sticky.
    """

    def __init__(self, path: str | Path, *, mpp_override: float | None = None) -> None:
        self._path = Path(path)
        self._mpp_override = mpp_override
        self._handle: openslide.OpenSlide | None = None
        self._lock = threading.Lock()
        self._properties: Mapping[str, str] = MappingProxyType({})
        self._level_dimensions: tuple[tuple[int, int], ...] = ()
        self._level_downsamples: tuple[float, ...] = ()
        self._mpp_info: MppInfo | None = None
        self._damage_cause: str | object | None = _NOT_CHECKED
        self._ycbcr_labelled_rgb: bool | None = None
        self._cache: openslide.OpenSlideCache | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    def _open(self) -> openslide.OpenSlide:
        """The OpenSlide handle, opened now if needed; failures become `SlideOpenError`."""
        handle = self._handle
        if handle is not None:
            return handle
        with self._lock:
            if self._handle is not None:
                return self._handle
            if not self._path.exists():
                raise SlideOpenError(f"{self._path.name}: file not found ({self._path})")
            try:
                handle = openslide.OpenSlide(self._path)
                properties = MappingProxyType(dict(handle.properties))
                level_dimensions = tuple(handle.level_dimensions)
                level_downsamples = tuple(handle.level_downsamples)
            except _OPENSLIDE_FAILURES as err:
                cause = self._damage() or _describe_failure(err)
                raise SlideOpenError(f"{self._path.name}: cannot open: {cause}") from err
            self._properties = properties
            self._level_dimensions = level_dimensions
            self._level_downsamples = level_downsamples
            if self._ycbcr_labelled_rgb is None:
                self._ycbcr_labelled_rgb = dicom_frames_are_ycbcr_labelled_rgb(self._path, properties)
            if self._cache is not None:
                handle.set_cache(self._cache)
            self._handle = handle
            return handle

    def _fail(self, err: BaseException, action: str, handle: openslide.OpenSlide) -> SlideOpenError:
        """Forget a handle that hit an error (sticky in OpenSlide) and build the error to raise.

        The handle is dropped, not closed: another thread may still be using it, and
        openslide-python closes it when the last reference goes.
        """
        with self._lock:
            if self._handle is handle:
                self._handle = None
        cause = self._damage()
        if cause is None:
            cause = _describe_failure(err)
            if isinstance(err, openslide.OpenSlideError):
                cause = f"corrupt image data: {cause}"
        return SlideOpenError(f"{self._path.name}: {action} failed: {cause}")

    def _damage(self) -> str | None:
        """`diagnose_damaged_file` of this slide, worked out once, on the first failure."""
        if self._damage_cause is _NOT_CHECKED:
            self._damage_cause = diagnose_damaged_file(self._path)
        return self._damage_cause  # type: ignore[return-value]

    def share_cache(self, cache: openslide.OpenSlideCache) -> None:
        """Keep decoded tiles in `cache` (thread-safe), which other readers in this process may share,
        from now on and after any reopening."""
        with self._lock:
            self._cache = cache
            if self._handle is not None:
                self._handle.set_cache(cache)

    def close(self) -> None:
        """Release the OpenSlide handle (it is reopened on next use)."""
        with self._lock:
            handle, self._handle = self._handle, None
        if handle is not None:
            handle.close()

    def __enter__(self) -> SlideReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __reduce__(self) -> tuple[Any, ...]:
        # Only the path and the override travel; the receiving process opens its own handle.
        return (_unpickle_reader, (self._path, self._mpp_override))

    def __repr__(self) -> str:
        state = "open" if self._handle is not None else "closed"
        return f"SlideReader({str(self._path)!r}, mpp_override={self._mpp_override!r}) [{state}]"

    # -- metadata --------------------------------------------------------------------------------

    @property
    def path(self) -> Path:
        return self._path

    @property
    def name(self) -> str:
        """The file name, used in messages."""
        return self._path.name

    @property
    def mpp_override(self) -> float | None:
        return self._mpp_override

    @property
    def properties(self) -> Mapping[str, str]:
        """OpenSlide's metadata (`openslide.*`, `tiff.*`, vendor keys), read once at open; read-only."""
        self._open()
        return self._properties

    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 `(width, height)` in pixels."""
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        """`(width, height)` of each pyramid level, level 0 first."""
        self._open()
        return self._level_dimensions

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        """Level-0 pixels per pixel of each pyramid level."""
        self._open()
        return self._level_downsamples

    @property
    def vendor(self) -> str:
        """OpenSlide's format name (`aperio`, `hamamatsu`, `dicom`, `generic-tiff`, ...)."""
        vendor = self.properties.get(openslide.PROPERTY_NAME_VENDOR)
        return vendor or openslide.OpenSlide.detect_format(self._path) or "unknown"

    @property
    def color_correction(self) -> str | None:
        """What the reader corrects in OpenSlide's colours, in words (recorded with the features)."""
        self._open()
        if self._ycbcr_labelled_rgb:
            return "ycbcr_to_rgb: the DICOM header says RGB but its JPEG frames are YCbCr (JFIF)"
        return None

    @property
    def mpp(self) -> MppInfo:
        """Microns per level-0 pixel, resolved once by `resolve_mpp`; raises `MissingMppError`."""
        if self._mpp_info is None:
            self._mpp_info = resolve_mpp(
                self.properties, override=self._mpp_override, slide_name=self.name
            )
        return self._mpp_info

    @property
    def associated_image_names(self) -> tuple[str, ...]:
        """Names of the label/macro/thumbnail images stored beside the pyramid."""
        handle = self._open()
        try:
            return tuple(sorted(handle.associated_images.keys()))
        except _OPENSLIDE_FAILURES as err:
            raise self._fail(err, "listing associated images", handle) from err

    def best_level_for_downsample(self, downsample: float) -> int:
        """The coarsest level whose downsample is at most `downsample` (1 % tolerance), else 0."""
        allowed = downsample * LEVEL_DOWNSAMPLE_TOLERANCE
        candidates = [i for i, ds in enumerate(self.level_downsamples) if ds <= allowed]
        return max(candidates, default=0)

    # -- pixels ----------------------------------------------------------------------------------

    def read_region_image(
        self,
        location: tuple[int, int],
        level: int,
        size: tuple[int, int],
        *,
        background: tuple[int, int, int] = _WHITE,
    ) -> Image.Image:
        """An RGB Pillow image of `size` px at `level` from level-0 `location`.

        Transparent pixels (outside the slide or its scanned area) take the `background` colour.
        Frames that OpenSlide decodes in the wrong colour space are converted (`color_correction`).
        """
        return _composite_on(self.read_region_rgba(location, level, size), background)

    def read_region_rgba(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> Image.Image:
        """OpenSlide's RGBA region (transparent outside the scanned area) with the reader's colour
        correction: what OpenSlide-shaped consumers such as `DeepZoomGenerator` read."""
        width, height = size
        if width <= 0 or height <= 0:
            raise ValueError(f"region size must be positive, got {size}")
        if not 0 <= level < self.level_count:
            raise ValueError(f"level {level} out of range 0..{self.level_count - 1}")
        handle = self._open()
        try:
            rgba = handle.read_region((int(location[0]), int(location[1])), level, (width, height))
        except _OPENSLIDE_FAILURES as err:
            raise self._fail(err, f"reading level {level} at {tuple(location)}", handle) from err
        return _ycbcr_to_rgb(rgba) if self._ycbcr_labelled_rgb else rgba

    def read_region(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> np.ndarray:
        """uint8 `[h, w, 3]` RGB pixels of `size` at `level` from level-0 `location` (x, y).

        Transparent pixels (outside the scanned area or the slide) come back white.
        """
        return np.array(self.read_region_image(location, level, size))

    def read_level(self, level: int) -> np.ndarray:
        """uint8 `[h, w, 3]` RGB of a whole pyramid level (meant for small, low-resolution levels)."""
        return self.read_region((0, 0), level, self.level_dimensions[level])

    def read_resampled(
        self,
        size: tuple[int, int],
        *,
        region: tuple[float, float, float, float] | None = None,
    ) -> np.ndarray:
        """uint8 `[h, w, 3]` RGB of a level-0 `region` (x, y, w, h; default: the whole slide) at `size`.

        Area-averaged (Pillow BOX) from the finest level no coarser than needed, read band by band so
        memory stays bounded even for huge single-level slides. `region` may have fractional bounds.
        """
        out_w, out_h = size
        if out_w <= 0 or out_h <= 0:
            raise ValueError(f"resampled size must be positive, got {size}")
        x0, y0, width0, height0 = region if region is not None else (0, 0, *self.dimensions)
        if width0 <= 0 or height0 <= 0:
            raise ValueError(f"region size must be positive, got {region}")
        level = self.best_level_for_downsample(min(width0 / out_w, height0 / out_h))
        level_w, level_h = self.level_dimensions[level]
        level_ds = self.level_downsamples[level]
        # The region in level pixels, clipped to the level (pixels beyond it read as white).
        src_x0, src_x1 = x0 / level_ds, (x0 + width0) / level_ds
        scale_y = height0 / level_ds / out_h
        read_x0 = max(0, math.floor(src_x0))
        read_w = max(1, min(level_w, math.ceil(src_x1)) - read_x0)
        rows_per_band = max(1, int(_BAND_PIXELS / max(1.0, read_w * scale_y)))
        out = np.empty((out_h, out_w, 3), dtype=np.uint8)
        for row0 in range(0, out_h, rows_per_band):
            row1 = min(out_h, row0 + rows_per_band)
            src_y0 = y0 / level_ds + row0 * scale_y
            src_y1 = y0 / level_ds + row1 * scale_y
            read_y0 = max(0, math.floor(src_y0))
            read_h = max(1, min(level_h, math.ceil(src_y1)) - read_y0)
            band = self.read_region_image(
                (round(read_x0 * level_ds), round(read_y0 * level_ds)), level, (read_w, read_h)
            )
            box = (
                src_x0 - read_x0,
                src_y0 - read_y0,
                min(src_x1 - read_x0, read_w),
                min(src_y1 - read_y0, read_h),
            )
            resized = band.resize((out_w, row1 - row0), Image.Resampling.BOX, box=box)
            out[row0:row1] = np.asarray(resized)
        return out

    def get_thumbnail(self, max_size: tuple[int, int]) -> Image.Image:
        """An RGB thumbnail that fits in `max_size` = (w, h), keeping the aspect ratio."""
        width0, height0 = self.dimensions
        scale = min(max_size[0] / width0, max_size[1] / height0)
        size = (max(1, round(width0 * scale)), max(1, round(height0 * scale)))
        return Image.fromarray(self.read_resampled(size))


def _unpickle_reader(path: Path, mpp_override: float | None) -> SlideReader:
    return SlideReader(path, mpp_override=mpp_override)


def _composite_on(rgba: Image.Image, color: tuple[int, int, int]) -> Image.Image:
    """RGB image of an (unpremultiplied) RGBA region laid over a plain `color`."""
    if rgba.mode != "RGBA":
        return rgba.convert("RGB")
    if rgba.getchannel("A").getextrema() == (255, 255):
        return rgba.convert("RGB")
    background = Image.new("RGBA", rgba.size, (*color, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _ycbcr_to_rgb(rgba: Image.Image) -> Image.Image:
    """RGBA whose RGB channels actually hold JFIF YCbCr, converted to RGB (alpha kept)."""
    channels = rgba.split()
    rgb = Image.merge("YCbCr", channels[:3]).convert("RGB")
    if len(channels) == 4:
        rgb.putalpha(channels[3])
    return rgb


def open_slide(path: str | Path, *, mpp_override: float | None = None) -> SlideReader:
    """Open a whole-slide image now and check that its pixels decode, so bad files fail here.

    Only formats OpenSlide reads as slides are accepted (no fallback to plain images: a strip TIFF
    is rejected). Raises `SlideOpenError` with the file name and the cause.
    """
    reader = SlideReader(path, mpp_override=mpp_override)
    smallest = reader.level_count - 1
    width, height = reader.level_dimensions[smallest]
    downsample = reader.level_downsamples[smallest]
    center = (int(width // 2 * downsample), int(height // 2 * downsample))
    reader.read_region_image(center, smallest, (1, 1))
    return reader


def quick_hash(path: str | Path) -> str:
    """sha256 hex of the file size and its first and last MiB: a cheap identity for caching.

    For a DICOM series this hashes only the file given, not the whole folder.
    """
    file_path = Path(path)
    try:
        size = file_path.stat().st_size
        digest = hashlib.sha256(str(size).encode())
        with file_path.open("rb") as stream:
            digest.update(stream.read(_HASH_CHUNK))
            if size > _HASH_CHUNK:
                stream.seek(max(_HASH_CHUNK, size - _HASH_CHUNK))
                digest.update(stream.read(_HASH_CHUNK))
    except OSError as err:
        raise SlideOpenError(f"{file_path.name}: cannot read file for hashing: {err}") from err
    return digest.hexdigest()


@dataclass(frozen=True)
class SlideInfo:
    """Facts about one slide, as `wsi-mil inspect` prints them; mpp is None when unknown."""

    path: Path
    vendor: str
    dimensions: tuple[int, int]
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    mpp: float | None
    mpp_source: MppSource | None
    objective_power: float | None
    associated_images: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (paths as strings, tuples as lists)."""
        return {
            "path": str(self.path),
            "vendor": self.vendor,
            "dimensions": list(self.dimensions),
            "level_dimensions": [list(dims) for dims in self.level_dimensions],
            "level_downsamples": list(self.level_downsamples),
            "mpp": self.mpp,
            "mpp_source": self.mpp_source,
            "objective_power": self.objective_power,
            "associated_images": list(self.associated_images),
        }


def describe_slide(path: str | Path, *, mpp_override: float | None = None) -> SlideInfo:
    """Open a slide and summarise it; a missing mpp is reported as None instead of raised."""
    with open_slide(path, mpp_override=mpp_override) as reader:
        properties = reader.properties
        try:
            mpp_info: MppInfo | None = reader.mpp
        except MissingMppError:
            mpp_info = None
        return SlideInfo(
            path=reader.path,
            vendor=reader.vendor,
            dimensions=reader.dimensions,
            level_dimensions=reader.level_dimensions,
            level_downsamples=reader.level_downsamples,
            mpp=mpp_info.mpp if mpp_info else None,
            mpp_source=mpp_info.source if mpp_info else None,
            objective_power=_parse_positive_float(
                properties.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER)
            ),
            associated_images=reader.associated_image_names,
        )
