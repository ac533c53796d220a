"""Cohort loading: matching feature files with labels, every error path, formats, lazy cache."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from wsi_mil.errors import CohortError
from wsi_mil.training.cohort import index_feature_files, load_cohort


def _write_labels(path: Path, rows: list[dict[str, str]]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_loads_labels_classes_and_feature_contract(write_cohort):
    files = write_cohort(num_bags=12, class_names=["tumour", "normal"])
    cohort = load_cohort(files.features_dir, files.labels_csv)
    assert cohort.class_names == ["normal", "tumour"]  # sorted, not CSV order
    assert len(cohort.slides) == 12
    assert cohort.contract.encoder == "synthetic"
    assert cohort.contract.feature_dim == 8
    assert cohort.contract.target_mpp == pytest.approx(0.5)
    assert cohort.contract.tile_px == 224
    assert cohort.contract.tile_size_level0 == 448
    by_id = {bag.slide_id: bag for bag in files.bags}
    for slide in cohort.slides:
        written_name = ["tumour", "normal"][by_id[slide.slide_id].label]
        assert cohort.class_names[slide.label] == written_name
        assert slide.case_id.startswith("patient_")
    loaded = cohort.load("slide_003")
    torch.testing.assert_close(loaded.features, by_id["slide_003"].features)
    assert loaded.coords is not None and loaded.coords.shape == (len(loaded.features), 2)


def test_numeric_labels_sort_numerically(write_cohort):
    files = write_cohort(num_bags=9, num_classes=3, class_names=["10", "2", "1"])
    assert load_cohort(files.features_dir, files.labels_csv).class_names == ["1", "2", "10"]


def test_labelled_slides_without_features_are_listed_or_dropped(write_cohort, caplog):
    files = write_cohort(num_bags=10)
    rows = _rows(files.labels_csv)
    rows += [{"slide_id": "ghost_a", "label": "class0", "case_id": "x"}, {"slide_id": "ghost_b", "label": "class1", "case_id": "y"}]
    _write_labels(files.labels_csv, rows)
    with pytest.raises(CohortError, match=r"2 labelled slide\(s\) have no feature file.*ghost_a, ghost_b.*--drop-missing"):
        load_cohort(files.features_dir, files.labels_csv)
    with caplog.at_level(logging.WARNING, logger="wsi_mil.training.cohort"):
        cohort = load_cohort(files.features_dir, files.labels_csv, drop_missing_features=True)
    assert "ghost_a" not in cohort.slide_ids and len(cohort.slides) == 10
    assert "ghost_a, ghost_b" in caplog.text


def test_feature_files_without_labels_are_listed_or_ignored(write_cohort):
    files = write_cohort(num_bags=10)
    rows = _rows(files.labels_csv)
    _write_labels(files.labels_csv, rows[:-2])
    with pytest.raises(CohortError, match=r"2 feature file\(s\).*have no row.*slide_008, slide_009.*--ignore-unlabelled"):
        load_cohort(files.features_dir, files.labels_csv)
    cohort = load_cohort(files.features_dir, files.labels_csv, ignore_unlabelled_features=True)
    assert len(cohort.slides) == 8


def test_unknown_labels_and_single_class_are_refused(write_cohort):
    files = write_cohort(num_bags=6)
    with pytest.raises(CohortError, match=r"labels \['class1'\].*not among class_names"):
        load_cohort(files.features_dir, files.labels_csv, class_names=["class0", "other"])
    rows = [dict(r, label="class0") for r in _rows(files.labels_csv)]
    _write_labels(files.labels_csv, rows)
    with pytest.raises(CohortError, match="at least two classes"):
        load_cohort(files.features_dir, files.labels_csv)


def test_mixed_feature_dimensions_or_encoders_are_refused(write_cohort):
    first = write_cohort("a", num_bags=6, dim=8)
    other_dim = write_cohort("b", num_bags=6, dim=12, seed=1)
    other_encoder = write_cohort("c", num_bags=6, dim=8, encoder="uni", seed=2)
    for extra, pattern in ((other_dim, "differ in feature_dim"), (other_encoder, "differ in encoder.*'synthetic'.*'uni'")):
        mixed = first.features_dir.parent / f"mixed_{extra.features_dir.parent.name}"
        (mixed / "features").mkdir(parents=True)
        rows = []
        for source, tag in ((first, "x"), (extra, "y")):
            for path in source.features_dir.iterdir():
                (mixed / "features" / f"{tag}{path.name}").symlink_to(path)
            rows += [dict(r, slide_id=f"{tag}{r['slide_id']}") for r in _rows(source.labels_csv)]
        labels = _write_labels(mixed / "labels.csv", rows)
        with pytest.raises(CohortError, match=pattern):
            load_cohort(mixed / "features", labels)


@pytest.mark.parametrize(
    ("rows", "pattern"),
    [
        ([{"slide": "a", "label": "x"}], r"lacks column\(s\) \['slide_id'\]"),
        ([{"slide_id": "a", "label": "x"}, {"slide_id": "a", "label": "y"}], "more than once: a"),
        ([{"slide_id": "a", "label": ""}], "empty slide_id or label: a"),
        ([{"slide_id": "a", "label": "x", "split": "holdout"}], r"split value\(s\) \['holdout'\]"),
    ],
)
def test_malformed_labels_csv(tmp_path, write_cohort, rows, pattern):
    files = write_cohort(num_bags=4)
    labels = _write_labels(tmp_path / "bad.csv", rows)
    with pytest.raises(CohortError, match=pattern):
        load_cohort(files.features_dir, labels)


def test_missing_features_folder(tmp_path):
    with pytest.raises(CohortError, match=r"does not exist.*--features"):
        index_feature_files(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CohortError, match="no feature files"):
        index_feature_files(tmp_path / "empty")


def test_clam_layout_h5_preferred_over_pt(tmp_path):
    """A CLAM output folder: h5_files/ (features + coords, no encoder) and pt_files/."""
    root = tmp_path / "clam"
    (root / "h5_files").mkdir(parents=True)
    (root / "pt_files").mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(6):
        features = rng.normal(size=(5 + i, 4)).astype(np.float32)
        coords = np.arange(2 * len(features), dtype=np.int64).reshape(-1, 2) * 256
        with h5py.File(root / "h5_files" / f"s{i}.h5", "w") as handle:
            handle["features"] = features
            handle["coords"] = coords
        torch.save(torch.from_numpy(features), root / "pt_files" / f"s{i}.pt")
        rows.append({"slide_id": f"s{i}", "label": "pos" if i % 2 else "neg"})
    torch.save(torch.zeros(3, 4), root / "pt_files" / "only_pt.pt")
    rows.append({"slide_id": "only_pt", "label": "neg"})
    labels = _write_labels(tmp_path / "labels.csv", rows)
    cohort = load_cohort(root, labels)
    assert cohort.slide("s1").feature_path.suffix == ".h5"
    assert cohort.slide("only_pt").feature_path.suffix == ".pt"
    assert cohort.contract.encoder is None and cohort.contract.feature_dim == 4
    assert cohort.load("s2").coords is not None
    assert cohort.load("only_pt").coords is None


def test_lazy_loading_uses_a_bounded_cache(write_cohort):
    files = write_cohort(num_bags=6)
    cohort = load_cohort(files.features_dir, files.labels_csv, cache_size=2)
    first = cohort.load("slide_000")
    assert cohort.load("slide_000") is first  # cached
    cohort.load("slide_001")
    cohort.load("slide_002")  # evicts slide_000
    assert cohort.load("slide_000") is not first
    bags = cohort.bags(["slide_004", "slide_005"])
    assert bags.labels == [0, 1]
    assert [bag.slide_id for bag in bags] == ["slide_004", "slide_005"]
    with pytest.raises(CohortError, match="not in the cohort"):
        cohort.bags(["nope"])


def test_stored_bags_keep_the_file_dtype_and_bypass_the_cache(tmp_path):
    """CLAM-style float16 HDF5: `load` gives float32 (cached), `stored_bag` the file's float16, uncached."""
    root = tmp_path / "fp16"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        with h5py.File(root / f"s{i}.h5", "w") as handle:
            handle["features"] = rng.normal(size=(3 + i, 4)).astype(np.float16)
            handle["coords"] = np.zeros((3 + i, 2), dtype=np.int64)
    labels = _write_labels(tmp_path / "labels.csv", [{"slide_id": f"s{i}", "label": str(i % 2)} for i in range(4)])
    cohort = load_cohort(root, labels)
    bags = cohort.bags(["s1", "s2"])
    stored = bags.stored_bag(1)
    assert stored.features.dtype == torch.float16 and stored.slide_id == "s2" and stored.label == 0
    assert bags[1].features.dtype == torch.float32
    torch.testing.assert_close(bags[1].features, stored.features.float())
    assert bags.stored_bag(1).features is not stored.features  # read again: the store keeps it, not the cohort
