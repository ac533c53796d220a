"""A cohort: a folder of per-slide feature files plus a labels CSV, checked once and loaded lazily.

Feature files may be ours (`wsi-mil preprocess`), CLAM/TRIDENT HDF5 or CLAM `.pt` tensors; a CLAM
output folder with `h5_files/` and `pt_files/` works as well (HDF5 preferred: it has coords). The
CSV has `slide_id` and `label`, optionally `case_id` (patient; splits never separate a patient's
slides) and `split` (train/val/test). Class names are the sorted distinct labels unless given.
"""

from __future__ import annotations

import csv
import logging
from collections import OrderedDict, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

import h5py
import numpy as np
import torch

from wsi_mil.errors import CohortError, FeatureFileError, TrainingConfigError
from wsi_mil.inference.card import CONTRACT_FLAGS, FeatureContract, recorded_preprocessing
from wsi_mil.preprocessing.feature_file import read_feature_file, read_feature_meta
from wsi_mil.preprocessing.pipeline import PreprocessConfig
from wsi_mil.training.bag import Bag
from wsi_mil.training.config import TrainConfig

log = logging.getLogger(__name__)

#: feature file extensions, in order of preference when a slide has several
FEATURE_SUFFIXES = (".h5", ".hdf5", ".pt")
#: CLAM's feature subfolders, used when the features folder itself holds no feature file
CLAM_SUBFOLDERS = ("h5_files", "pt_files")
SPLIT_NAMES = ("train", "val", "test")
_MAX_LISTED = 10


#: how to make every slide of a cohort agree on a contract field; fields not named here may differ
_SHARED_FIELD_FIXES = {
    "feature_dim": "extract all slides with one encoder",
    "encoder": f"extract all slides with one {CONTRACT_FLAGS['encoder']}, or point --features at one encoder's folder",
    "target_mpp": f"extract all slides at one {CONTRACT_FLAGS['target_mpp']}",
    "tile_px": f"extract all slides with one {CONTRACT_FLAGS['tile_px']}",
}


@dataclass(frozen=True)
class CohortSlide:
    """One labelled slide of the cohort."""

    slide_id: str
    label: int
    case_id: str
    feature_path: Path
    #: the CSV's `split` value (train/val/test), None when the CSV has none for this slide
    split: str | None = None


@dataclass(frozen=True)
class SlideFeatures:
    """A slide's features `[N, D]` (float32) and level-0 tile coords `[N, 2]` (None if the file has none)."""

    features: torch.Tensor
    coords: np.ndarray | None


def _listing(items: Iterable[str]) -> str:
    items = sorted(items)
    shown = ", ".join(items[:_MAX_LISTED])
    more = len(items) - _MAX_LISTED
    return f"{shown} (and {more} more)" if more > 0 else shown


def _label_sort_key(label: str) -> tuple[int, float | str]:
    """Numeric labels sort numerically ("2" before "10"), the rest alphabetically after them."""
    try:
        return (0, float(label))
    except ValueError:
        return (1, label)


def index_feature_files(features_dir: Path) -> dict[str, Path]:
    """Map slide id (file stem) -> feature file in `features_dir` (or its CLAM subfolders)."""
    if not features_dir.is_dir():
        raise CohortError(f"features folder {features_dir} does not exist (--features)")
    folders = [features_dir]
    if not any(p.suffix.lower() in FEATURE_SUFFIXES for p in features_dir.iterdir() if p.is_file()):
        folders = [features_dir / sub for sub in CLAM_SUBFOLDERS if (features_dir / sub).is_dir()]
    found: dict[str, Path] = {}
    for folder in folders:
        for path in sorted(folder.iterdir()):
            suffix = path.suffix.lower()
            if not path.is_file() or suffix not in FEATURE_SUFFIXES:
                continue
            current = found.get(path.stem)
            if current is None or FEATURE_SUFFIXES.index(suffix) < FEATURE_SUFFIXES.index(current.suffix.lower()):
                found[path.stem] = path
    if not found:
        raise CohortError(
            f"no feature files ({', '.join(FEATURE_SUFFIXES)}) in {features_dir} or its "
            f"{'/'.join(CLAM_SUBFOLDERS)} subfolders (--features)"
        )
    return found


def stored_float_dtype(path: Path) -> torch.dtype:
    """torch.float16 when an HDF5 feature file stores its features as float16, else torch.float32."""
    if path.suffix.lower() not in (".h5", ".hdf5"):
        return torch.float32
    with h5py.File(path, "r", locking=False) as handle:
        key = next((k for k in ("features", "feats") if k in handle), None)
        return torch.float16 if key is not None and handle[key].dtype == np.float16 else torch.float32


def feature_file_meta(path: Path) -> dict[str, Any]:
    """Attributes of a feature file with `feature_dim` and `num_tiles`: cheap for HDF5 (no features
    read), a full load for `.pt` bags (which carry no separate header)."""
    if path.suffix.lower() in (".h5", ".hdf5"):
        return read_feature_meta(path)
    bag = read_feature_file(path)
    return {**bag.attrs, "encoder": bag.encoder, "feature_dim": bag.feature_dim, "num_tiles": bag.num_tiles}


@dataclass(frozen=True)
class LabelRow:
    """One row of the labels CSV."""

    slide_id: str
    label: str
    case_id: str
    split: str | None


def read_labels_csv(labels_csv: Path) -> list[LabelRow]:
    """Read and check the labels CSV: required columns, no empty labels, no duplicate slide ids."""
    try:
        with labels_csv.open(newline="") as handle:
            reader = csv.DictReader(handle)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            raw_rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    except OSError as err:
        raise CohortError(f"cannot read the labels CSV {labels_csv} (--labels): {err}") from err
    missing = {"slide_id", "label"} - set(columns)
    if missing:
        raise CohortError(
            f"labels CSV {labels_csv} lacks column(s) {sorted(missing)}; it needs slide_id,label "
            f"and optionally case_id,split (found: {columns})"
        )
    rows: list[LabelRow] = []
    empty, seen, duplicates, bad_split = [], set(), set(), set()
    for row in raw_rows:
        slide_id, label = row["slide_id"], row["label"]
        if not slide_id and not label:
            continue
        if not slide_id or not label:
            empty.append(slide_id or "<no slide_id>")
            continue
        if slide_id in seen:
            duplicates.add(slide_id)
        seen.add(slide_id)
        split = row.get("split", "").lower() or None
        if split is not None and split not in SPLIT_NAMES:
            bad_split.add(split)
        rows.append(LabelRow(slide_id, label, row.get("case_id") or slide_id, split))
    if empty:
        raise CohortError(f"labels CSV {labels_csv} has rows with an empty slide_id or label: {_listing(empty)}")
    if duplicates:
        raise CohortError(f"labels CSV {labels_csv} lists slide(s) more than once: {_listing(duplicates)}")
    if bad_split:
        raise CohortError(
            f"labels CSV {labels_csv} has split value(s) {sorted(bad_split)}; use train, val or test"
        )
    if not rows:
        raise CohortError(f"labels CSV {labels_csv} has no rows (--labels)")
    return rows


def _contract_from_meta(metas: dict[str, dict[str, Any]]) -> FeatureContract:
    """Check that all slides share one encoder, feature dim, target mpp and tile px; return them."""
    contract: dict[str, Any] = {}
    for key in FeatureContract.model_fields:
        fix = _SHARED_FIELD_FIXES.get(key)
        groups: dict[Any, list[str]] = defaultdict(list)
        for slide_id, meta in metas.items():
            value = meta.get(key)
            if value is not None:
                groups[value.item() if isinstance(value, np.generic) else value].append(slide_id)
        if len(groups) > 1 and fix is not None:
            detail = "; ".join(f"{key}={value!r}: {_listing(ids)}" for value, ids in sorted(groups.items(), key=str))
            raise CohortError(f"feature files in one cohort differ in {key} ({detail}); {fix}")
        contract[key] = next(iter(groups)) if len(groups) == 1 else None
    if contract["feature_dim"] is None:
        raise CohortError("no feature file tells its feature dimension; check the files under --features")
    unknown_encoder = [s for s, m in metas.items() if m.get("encoder") is None]
    if contract["encoder"] is not None and unknown_encoder:
        log.warning(
            "feature files without an encoder attribute (%s) are assumed to use %s",
            _listing(unknown_encoder),
            contract["encoder"],
        )
    return FeatureContract(**contract)


def _shared_preprocessing(metas: dict[str, dict[str, Any]]) -> PreprocessConfig | None:
    """The preprocessing every slide's file records, so slides can be turned into the same features
    later; None when a file records none (CLAM/TRIDENT/.pt) or the slides disagree."""
    configs = [recorded_preprocessing(meta) for meta in metas.values()]
    first = configs[0] if configs else None
    return first if first is not None and all(c == first for c in configs) else None


class Cohort:
    """Labelled slides with checked feature files; features load lazily through a small LRU cache."""

    def __init__(
        self,
        slides: Sequence[CohortSlide],
        class_names: Sequence[str],
        contract: FeatureContract,
        *,
        cache_size: int = 32,
        preprocessing: PreprocessConfig | None = None,
    ) -> None:
        self.slides = list(slides)
        self.class_names = list(class_names)
        self.contract = contract
        #: the preprocessing that made every slide's features, when the files record it
        self.preprocessing = preprocessing
        self.cache_size = cache_size
        self._by_id = {s.slide_id: s for s in self.slides}
        self._cache: OrderedDict[str, SlideFeatures] = OrderedDict()

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def slide_ids(self) -> list[str]:
        return [s.slide_id for s in self.slides]

    def slide(self, slide_id: str) -> CohortSlide:
        """The cohort entry of `slide_id`."""
        try:
            return self._by_id[slide_id]
        except KeyError:
            raise CohortError(f"slide {slide_id!r} is not in the cohort") from None

    def load(self, slide_id: str) -> SlideFeatures:
        """Features and coords of a slide, from the cache or the feature file."""
        cached = self._cache.get(slide_id)
        if cached is not None:
            self._cache.move_to_end(slide_id)
            return cached
        features, coords = self._read(slide_id)
        loaded = SlideFeatures(features, coords)
        if self.cache_size > 0:
            self._cache[slide_id] = loaded
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return loaded

    def load_stored(self, slide_id: str) -> torch.Tensor:
        """A slide's features at the dtype its HDF5 file stores them in (float16 halves the memory;
        the round trip through float32 is exact), bypassing the cache: for the trainer's `BagStore`,
        which keeps every bag once."""
        features = self._read(slide_id)[0]
        return features.to(stored_float_dtype(self.slide(slide_id).feature_path))

    def _read(self, slide_id: str) -> tuple[torch.Tensor, np.ndarray | None]:
        path = self.slide(slide_id).feature_path
        try:
            bag = read_feature_file(path)
        except FeatureFileError as err:
            raise CohortError(f"cannot read features of slide {slide_id!r} from {path}: {err}") from err
        if bag.features.shape[0] == 0:
            raise CohortError(f"feature file {path} of slide {slide_id!r} holds no tiles; drop it from --labels")
        return torch.as_tensor(np.asarray(bag.features, dtype=np.float32)), bag.coords

    def bags(self, slide_ids: Sequence[str]) -> CohortBags:
        """A lazy `Sequence[Bag]` over the given slides (features load on access)."""
        for slide_id in slide_ids:
            self.slide(slide_id)
        return CohortBags(self, list(slide_ids))


class CohortBags(Sequence[Bag]):
    """A lazy sequence of `Bag`s over some slides of a cohort; labels are known without loading."""

    def __init__(self, cohort: Cohort, slide_ids: list[str]) -> None:
        self.cohort = cohort
        self.slide_ids = slide_ids

    @property
    def labels(self) -> list[int]:
        return [self.cohort.slide(s).label for s in self.slide_ids]

    def __len__(self) -> int:
        return len(self.slide_ids)

    @overload
    def __getitem__(self, index: int) -> Bag: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[Bag]: ...
    def __getitem__(self, index: int | slice) -> Bag | Sequence[Bag]:
        if isinstance(index, slice):
            return CohortBags(self.cohort, self.slide_ids[index])
        slide_id = self.slide_ids[index]
        return Bag(self.cohort.load(slide_id).features, self.cohort.slide(slide_id).label, slide_id)

    def stored_bag(self, index: int) -> Bag:
        """`self[index]` at the dtype of its feature file, read past the cache (see `BagStore`)."""
        slide_id = self.slide_ids[index]
        return Bag(self.cohort.load_stored(slide_id), self.cohort.slide(slide_id).label, slide_id)


def load_cohort(
    features_dir: Path | str,
    labels_csv: Path | str,
    *,
    class_names: Sequence[str] | None = None,
    drop_missing_features: bool = False,
    ignore_unlabelled_features: bool = False,
    cache_size: int = 32,
) -> Cohort:
    """Match a features folder with a labels CSV, check both, and return the `Cohort`.

    Raises `CohortError` listing labelled slides without a feature file (unless
    `drop_missing_features`, which drops them with a warning), feature files without a label (unless
    `ignore_unlabelled_features`), labels outside `class_names`, fewer than two classes, and feature
    files that differ in encoder, feature dimension, target mpp or tile px.
    """
    features_dir, labels_csv = Path(features_dir), Path(labels_csv)
    rows = read_labels_csv(labels_csv)
    files = index_feature_files(features_dir)

    without_features = [r.slide_id for r in rows if r.slide_id not in files]
    if without_features:
        message = f"{len(without_features)} labelled slide(s) have no feature file in {features_dir}: {_listing(without_features)}"
        if not drop_missing_features:
            raise CohortError(f"{message}; extract them, or set drop_missing_features (--drop-missing) to skip them")
        log.warning("%s; dropped (drop_missing_features)", message)
        rows = [r for r in rows if r.slide_id in files]
    labelled = {r.slide_id for r in rows}
    without_labels = sorted(set(files) - labelled)
    if without_labels:
        message = f"{len(without_labels)} feature file(s) in {features_dir} have no row in {labels_csv}: {_listing(without_labels)}"
        if not ignore_unlabelled_features:
            raise CohortError(f"{message}; label them, or set ignore_unlabelled_features (--ignore-unlabelled)")
        log.info("%s; ignored", message)
    if not rows:
        raise CohortError(f"no labelled slide of {labels_csv} has a feature file in {features_dir}")

    distinct = sorted({r.label for r in rows}, key=_label_sort_key)
    names = list(class_names) if class_names is not None else distinct
    unknown = sorted(set(distinct) - set(names))
    if unknown:
        raise CohortError(
            f"labels {unknown} in {labels_csv} are not among class_names {names}; fix the CSV or class_names"
        )
    if len(names) < 2:
        raise CohortError(f"the cohort needs at least two classes, {labels_csv} has only {names}")

    metas: dict[str, dict[str, Any]] = {}
    for row in rows:
        try:
            metas[row.slide_id] = feature_file_meta(files[row.slide_id])
        except FeatureFileError as err:
            raise CohortError(f"feature file of slide {row.slide_id!r} is unreadable: {err}") from err
    contract = _contract_from_meta(metas)
    preprocessing = _shared_preprocessing(metas)

    index = {name: i for i, name in enumerate(names)}
    slides = [
        CohortSlide(r.slide_id, index[r.label], r.case_id, files[r.slide_id], r.split)
        for r in sorted(rows, key=lambda r: r.slide_id)
    ]
    return Cohort(slides, names, contract, cache_size=cache_size, preprocessing=preprocessing)


def cohort_for(config: TrainConfig) -> Cohort:
    """Load the cohort a config names (`features_dir`, `labels_csv` and the cohort options)."""
    if config.features_dir is None or config.labels_csv is None:
        raise TrainingConfigError("training needs features_dir and labels_csv (--features DIR --labels CSV)")
    return load_cohort(
        config.features_dir,
        config.labels_csv,
        class_names=config.class_names,
        drop_missing_features=config.drop_missing_features,
        ignore_unlabelled_features=config.ignore_unlabelled_features,
        cache_size=config.cache_bags,
    )
