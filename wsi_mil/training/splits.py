"""Train/val/test splits: patient-grouped stratified k-fold with a validation part inside each
training fold, or the CSV's own `split` column. Splits are saved as CSV with the run.

The test part of a fold is only ever predicted after training; model selection and early
stopping use the validation part alone.
"""

from __future__ import annotations

import csv
import logging
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from wsi_mil.atomic import atomic_open
from wsi_mil.errors import CohortError
from wsi_mil.training.cohort import SPLIT_NAMES, Cohort
from wsi_mil.training.config import TrainConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FoldSplit:
    """The slide ids of one fold's train, validation and test parts."""

    fold: int
    train: list[str]
    val: list[str]
    test: list[str]

    def part(self, name: str) -> list[str]:
        """The slide ids of part `name` (train, val or test)."""
        return {"train": self.train, "val": self.val, "test": self.test}[name]


def _grouped_stratified_parts(
    labels: np.ndarray, groups: np.ndarray, *, n_splits: int, seed: int, what: str
) -> list[np.ndarray]:
    """Indices of the held-out part of each of `n_splits` patient-grouped stratified folds."""
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
            return [held_out for _, held_out in splitter.split(np.zeros(len(labels)), labels, groups)]
    except ValueError as err:
        raise CohortError(
            f"cannot make {n_splits} patient-grouped folds for the {what} ({len(set(groups))} patients): "
            f"{err}; lower --folds or raise val_fraction"
        ) from err


def kfold_splits(cohort: Cohort, *, folds: int, val_fraction: float, seed: int) -> list[FoldSplit]:
    """Patient-grouped stratified k-fold; each training fold gives a grouped stratified val part.

    `val_fraction` sets the validation part as about that share of the training fold's patients
    (an inner grouped k-fold with `round(1 / val_fraction)` splits, first split used; fewer
    splits, with a warning, when the fold has too few patients).
    """
    ids = np.array(cohort.slide_ids)
    labels = np.array([s.label for s in cohort.slides])
    groups = np.array([s.case_id for s in cohort.slides])
    wanted_inner = max(2, round(1.0 / val_fraction))
    splits = []
    for fold, test_idx in enumerate(
        _grouped_stratified_parts(labels, groups, n_splits=folds, seed=seed, what="test folds")
    ):
        rest = np.setdiff1d(np.arange(len(ids)), test_idx)
        # small folds: fewer inner splits (a larger validation part) rather than failing
        limit = min(len(np.unique(groups[rest])), int(np.bincount(labels[rest]).max()))
        inner_splits = max(2, min(wanted_inner, limit))
        if inner_splits < wanted_inner:
            log.warning(
                "fold %d has too few patients for val_fraction %.2f; its validation part is about 1/%d",
                fold, val_fraction, inner_splits,
            )
        val_local = _grouped_stratified_parts(
            labels[rest], groups[rest], n_splits=inner_splits, seed=seed + fold + 1, what=f"validation part of fold {fold}"
        )[0]
        val_idx = rest[val_local]
        train_idx = np.setdiff1d(rest, val_idx)
        splits.append(FoldSplit(fold, sorted(ids[train_idx]), sorted(ids[val_idx]), sorted(ids[test_idx])))
    return splits


def column_split(cohort: Cohort) -> FoldSplit:
    """One fold from the CSV's `split` column; train and val must be non-empty, test may be empty."""
    missing = [s.slide_id for s in cohort.slides if s.split is None]
    if missing:
        raise CohortError(
            f"{len(missing)} slide(s) have no split value ({', '.join(missing[:10])}); fill the split column "
            "or use split_mode: kfold"
        )
    parts = {name: sorted(s.slide_id for s in cohort.slides if s.split == name) for name in SPLIT_NAMES}
    for name in ("train", "val"):
        if not parts[name]:
            raise CohortError(f"the split column has no '{name}' slide; a run needs train and val slides")
    split = FoldSplit(0, parts["train"], parts["val"], parts["test"])
    check_patient_separation(cohort, split)
    return split


def check_patient_separation(cohort: Cohort, split: FoldSplit) -> None:
    """Raise `CohortError` when one patient (case_id) has slides in more than one part."""
    parts_of_case: dict[str, set[str]] = defaultdict(set)
    for name in SPLIT_NAMES:
        for slide_id in split.part(name):
            parts_of_case[cohort.slide(slide_id).case_id].add(name)
    mixed = sorted(case for case, parts in parts_of_case.items() if len(parts) > 1)
    if mixed:
        raise CohortError(
            f"patient(s) {', '.join(mixed[:10])} have slides in more than one of train/val/test; "
            "put each case_id in one split"
        )


def make_splits(cohort: Cohort, config: TrainConfig) -> list[FoldSplit]:
    """The splits `config` asks for: its `split_mode` decides between the CSV column and k-fold."""
    has_column = any(s.split is not None for s in cohort.slides)
    use_column = config.split_mode == "column" or (config.split_mode == "auto" and has_column)
    if use_column:
        splits = [column_split(cohort)]
    else:
        splits = kfold_splits(cohort, folds=config.folds, val_fraction=config.val_fraction, seed=config.seed)
    for split in splits:
        train_classes = {cohort.slide(s).label for s in split.train}
        absent = [cohort.class_names[c] for c in range(cohort.num_classes) if c not in train_classes]
        if absent:
            raise CohortError(f"fold {split.fold} has no training slide of class(es) {absent}; lower --folds")
        val_classes = {cohort.slide(s).label for s in split.val}
        if len(val_classes) < cohort.num_classes:
            log.warning("fold %d: the validation part lacks some classes; its macro ROC-AUC is partial", split.fold)
    return splits


def save_split(cohort: Cohort, split: FoldSplit, path: Path) -> None:
    """Write one fold as CSV (atomically): slide_id, case_id, label (class name), split."""
    with atomic_open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["slide_id", "case_id", "label", "split"])
        for name in SPLIT_NAMES:
            for slide_id in split.part(name):
                slide = cohort.slide(slide_id)
                writer.writerow([slide_id, slide.case_id, cohort.class_names[slide.label], name])


def load_split(path: Path, *, fold: int) -> FoldSplit:
    """Read a fold CSV written by `save_split`."""
    parts: dict[str, list[str]] = {name: [] for name in SPLIT_NAMES}
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            parts[row["split"]].append(row["slide_id"])
    return FoldSplit(fold, parts["train"], parts["val"], parts["test"])
