"""Splits: patient-grouped stratified k-fold with inner validation, the split column, CSV round trip."""

from __future__ import annotations

import csv

import pytest

from wsi_mil.errors import CohortError
from wsi_mil.training.cohort import load_cohort
from wsi_mil.training.splits import (
    check_patient_separation,
    column_split,
    kfold_splits,
    load_split,
    make_splits,
    save_split,
)


@pytest.fixture
def cohort(write_cohort):
    files = write_cohort(num_bags=40)
    return load_cohort(files.features_dir, files.labels_csv)


def test_kfold_parts_are_disjoint_grouped_stratified_and_cover_every_slide(cohort):
    splits = kfold_splits(cohort, folds=4, val_fraction=0.25, seed=3)
    assert len(splits) == 4
    tested = [s for split in splits for s in split.test]
    assert sorted(tested) == sorted(cohort.slide_ids)  # every slide tested exactly once
    for split in splits:
        train, val, test = set(split.train), set(split.val), set(split.test)
        assert not (train & val or train & test or val & test)
        assert train | val | test == set(cohort.slide_ids)
        assert val and test
        check_patient_separation(cohort, split)  # raises if a patient spans parts
        for part in (split.train, split.test):
            assert {cohort.slide(s).label for s in part} == {0, 1}
        assert 0.15 < len(val) / (len(train) + len(val)) < 0.35


def test_kfold_is_seeded(cohort):
    assert kfold_splits(cohort, folds=4, val_fraction=0.25, seed=3) == kfold_splits(
        cohort, folds=4, val_fraction=0.25, seed=3
    )
    assert kfold_splits(cohort, folds=4, val_fraction=0.25, seed=3) != kfold_splits(
        cohort, folds=4, val_fraction=0.25, seed=4
    )


def test_too_many_folds_names_the_flag(cohort):
    with pytest.raises(CohortError, match="--folds"):
        kfold_splits(cohort, folds=30, val_fraction=0.2, seed=0)


def _with_split_column(files, assign):
    with files.labels_csv.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    for i, row in enumerate(rows):
        row["split"] = assign(i, row)
    with files.labels_csv.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return load_cohort(files.features_dir, files.labels_csv)


def test_split_column_is_used_in_auto_mode(write_cohort):
    files = write_cohort(num_bags=12)
    cohort = _with_split_column(files, lambda i, row: ("train", "train", "val", "test")[(i // 2) % 4])
    config = files.config(split_mode="auto")
    [split] = make_splits(cohort, config)
    assert split.fold == 0
    assert (split.train, split.val, split.test) == (
        ["slide_000", "slide_001", "slide_002", "slide_003", "slide_008", "slide_009", "slide_010", "slide_011"],
        ["slide_004", "slide_005"],
        ["slide_006", "slide_007"],
    )
    assert len(make_splits(cohort, files.config(split_mode="kfold", folds=2))) == 2


def test_split_column_errors(write_cohort):
    files = write_cohort(num_bags=12)
    cohort = _with_split_column(files, lambda i, row: "" if i == 0 else "train")
    with pytest.raises(CohortError, match="no split value"):
        column_split(cohort)
    cohort = _with_split_column(files, lambda i, row: "train" if i < 10 else "test")
    with pytest.raises(CohortError, match="no 'val' slide"):
        column_split(cohort)
    # slides i=0,1 share patient_000: put them in different parts
    cohort = _with_split_column(files, lambda i, row: ("train", "val", "test")[i % 3])
    with pytest.raises(CohortError, match=r"patient_000.*more than one"):
        column_split(cohort)


def test_split_csv_round_trip(cohort, tmp_path):
    split = kfold_splits(cohort, folds=2, val_fraction=0.2, seed=0)[1]
    path = tmp_path / "splits" / "fold_1.csv"
    save_split(cohort, split, path)
    assert load_split(path, fold=1) == split
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert set(rows[0]) == {"slide_id", "case_id", "label", "split"}
    assert {r["label"] for r in rows} == {"class0", "class1"}
