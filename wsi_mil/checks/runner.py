"""Train any MIL model on the algorithmic MIL unit tests and judge it with the pass/fail rule.

The rule (our MIL-checks spec, §1.5), per test over several seeds:

* ``n/a-underfit`` (our addition): mean train AUC < 0.70; the model did not fit its training bags
  (too few epochs), so the test says nothing yet.
* ``inversion`` (hard fail): mean test AUC < 0.5; the model learnt "trap absent ⇒ positive".
  Where a control ran, its mean test AUC must also be ≥ 0.55 (our addition): a model at chance
  without the trap is not "inverted" by it.
* ``n/a-capacity`` (wherever a control ran; always for threshold-poisoned and false-frequency):
  the control's mean train AUC < 0.9, so the model cannot represent the concept (e.g. mi-Net and
  "A and B"), or (our addition) its mean test AUC < 0.70, so it does not generalise even without
  the trap; either way the test says nothing about its MIL behaviour.
* ``pass``: mean test AUC ≥ 0.70 and, for single-concept, every seed ≥ 0.5.
* ``fail``: anything else.

Controls: threshold-poisoned trains a second model on poison-free data; false-frequency's training
data is its own control (t = 1), so its control test AUC is the same model on unflooded test bags;
single-concept runs a poison-free control only on request (`single_concept_control=True`).
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

import numpy as np
import torch
from rich.table import Table
from sklearn.metrics import roc_auc_score
from torch import nn

from wsi_mil.checks.generators import (
    DEFAULT_BACKGROUND_SIZE,
    DEFAULT_DIM,
    DEFAULT_NUM_BAGS,
    FALSE_FREQUENCY,
    SINGLE_CONCEPT,
    THRESHOLD_POISONED,
    MILBags,
    Split,
    make_bags,
    resolve_check_names,
)
from wsi_mil.checks.names import DEFAULT_EPOCHS
from wsi_mil.errors import MilCheckError
from wsi_mil.models.base import MILOutput
from wsi_mil.models.layers import pad_sequences
from wsi_mil.models.registry import create_model, model_entry
from wsi_mil.training.methods.base import Batch, TrainingMethod

ModelFactory = Callable[[], nn.Module]

INVERSION_BELOW = 0.5
PASS_MEAN_AUC = 0.70
PASS_SEED_MIN_AUC = 0.5
CAPACITY_TRAIN_AUC = 0.9
FIT_TRAIN_AUC = 0.70
INVERSION_CONTROL_AUC = 0.55
COMPACT_WIDTH = 64
COMPACT_LANDMARKS = 16
EVAL_BATCH_SIZE = 256
#: the columns of a report's table
COLUMNS = (
    "test",
    "train AUC",
    "test AUC mean ± sd",
    "min",
    "control train AUC",
    "control test AUC",
    "verdict",
)


class Verdict(StrEnum):
    """Outcome of one MIL check."""

    PASS = "pass"
    FAIL = "fail"
    INVERSION = "inversion"
    CAPACITY = "n/a-capacity"
    UNDERFIT = "n/a-underfit"


@dataclass(frozen=True)
class CheckSettings:
    """The data and training setup shared by every run of a check."""

    dim: int = DEFAULT_DIM
    num_bags: int = DEFAULT_NUM_BAGS
    background_size: int = DEFAULT_BACKGROUND_SIZE
    epochs: int = DEFAULT_EPOCHS
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4


@dataclass(frozen=True)
class SeedRun:
    """AUCs of one seed of one check (`None` where no control was run)."""

    seed: int
    train_auc: float
    test_auc: float
    control_train_auc: float | None = None
    control_test_auc: float | None = None


@dataclass(frozen=True)
class CheckResult:
    """All seeds of one check, its summary numbers and its verdict."""

    test: str
    runs: tuple[SeedRun, ...]
    verdict: Verdict
    reason: str

    @property
    def train_auc_mean(self) -> float:
        """Mean train AUC over seeds."""
        return _mean([r.train_auc for r in self.runs])

    @property
    def test_auc_mean(self) -> float:
        """Mean test AUC over seeds."""
        return _mean([r.test_auc for r in self.runs])

    @property
    def test_auc_sd(self) -> float:
        """Sample standard deviation of the test AUC over seeds (0 for one seed)."""
        values = [r.test_auc for r in self.runs]
        return statistics.stdev(values) if len(values) > 1 else 0.0

    @property
    def test_auc_min(self) -> float:
        """Worst seed's test AUC."""
        return min(r.test_auc for r in self.runs)

    @property
    def control_train_auc_mean(self) -> float | None:
        """Mean train AUC of the control runs (None without a control)."""
        return _mean_present([r.control_train_auc for r in self.runs])

    @property
    def control_test_auc_mean(self) -> float | None:
        """Mean test AUC of the control runs (None without a control)."""
        return _mean_present([r.control_test_auc for r in self.runs])

    def summary(self) -> dict[str, Any]:
        """The row of this check as plain numbers."""
        return {
            "test": self.test,
            "train_auc_mean": self.train_auc_mean,
            "test_auc_mean": self.test_auc_mean,
            "test_auc_sd": self.test_auc_sd,
            "test_auc_min": self.test_auc_min,
            "control_train_auc_mean": self.control_train_auc_mean,
            "control_test_auc_mean": self.control_test_auc_mean,
            "verdict": str(self.verdict),
            "reason": self.reason,
        }


@dataclass(frozen=True)
class CheckReport:
    """The results of `run_mil_check` for one model, renderable as a table, markdown or JSON."""

    model: str
    settings: CheckSettings
    seeds: tuple[int, ...]
    results: tuple[CheckResult, ...]
    seconds: float = 0.0

    def result(self, test: str) -> CheckResult:
        """The result of one test by name."""
        (name,) = resolve_check_names([test])
        for result in self.results:
            if result.test == name:
                return result
        raise MilCheckError(f"test {name!r} was not run; add it to tests= / --tests")

    def to_dict(self) -> dict[str, Any]:
        """Settings, seeds, per-test summaries and every seed's AUCs as plain data."""
        return {
            "model": self.model,
            "settings": asdict(self.settings),
            "seeds": list(self.seeds),
            "seconds": self.seconds,
            "results": [
                {**r.summary(), "runs": [asdict(run) for run in r.runs]} for r in self.results
            ],
        }

    def to_json(self, *, indent: int = 2) -> str:
        """`to_dict()` as a JSON string."""
        return json.dumps(self.to_dict(), indent=indent)

    def to_table(self) -> Table:
        """A rich table: one row per test with train AUC, test AUC mean ± sd, min and verdict."""
        table = Table(title=f"MIL checks: {self.model} ({len(self.seeds)} seed(s), D={self.settings.dim})")
        for column in COLUMNS:
            table.add_column(column)
        for row in self._rows():
            table.add_row(*row)
        return table

    def to_markdown(self) -> str:
        """The same rows as a GitHub markdown table."""
        lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        lines += ["| " + " | ".join(row) + " |" for row in self._rows()]
        return "\n".join(lines)

    def _rows(self) -> list[tuple[str, ...]]:
        rows = []
        for r in self.results:
            rows.append(
                (
                    r.test,
                    _fmt(r.train_auc_mean),
                    f"{_fmt(r.test_auc_mean)} ± {_fmt(r.test_auc_sd)}",
                    _fmt(r.test_auc_min),
                    _fmt(r.control_train_auc_mean),
                    _fmt(r.control_test_auc_mean),
                    str(r.verdict),
                )
            )
        return rows

    def __str__(self) -> str:
        return self.to_markdown()


def _fmt(value: float | None) -> str:
    if value is None:
        return "–"
    return "nan" if math.isnan(value) else f"{value:.3f}"


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if values else math.nan


def _mean_present(values: Sequence[float | None]) -> float | None:
    """Mean of the values that are not None; None when there are none (no control was run)."""
    present = [v for v in values if v is not None]
    return _mean(present) if present else None


def judge(test: str, runs: Sequence[SeedRun]) -> tuple[Verdict, str]:
    """Apply the pass/fail rule of the module docstring to the seeds of one check."""
    test_aucs = [r.test_auc for r in runs]
    if any(math.isnan(a) for a in test_aucs):
        return Verdict.FAIL, "non-finite scores on some seed"
    mean_test = _mean(test_aucs)
    mean_train = _mean([r.train_auc for r in runs])
    if mean_train < FIT_TRAIN_AUC:
        return (
            Verdict.UNDERFIT,
            f"mean train AUC {mean_train:.3f} < {FIT_TRAIN_AUC}: did not fit its training bags; raise epochs",
        )
    control_train = _mean_present([r.control_train_auc for r in runs])
    control_test = _mean_present([r.control_test_auc for r in runs])
    if test in (THRESHOLD_POISONED, FALSE_FREQUENCY) and control_train is None:
        raise MilCheckError(f"{test} needs its control runs (control_train_auc) to be judged")
    if mean_test < INVERSION_BELOW and (control_test is None or control_test >= INVERSION_CONTROL_AUC):
        return Verdict.INVERSION, f"mean test AUC {mean_test:.3f} < {INVERSION_BELOW}: ranking inverted"
    if control_train is not None and control_test is not None:
        if control_train < CAPACITY_TRAIN_AUC:
            return (
                Verdict.CAPACITY,
                f"control train AUC {control_train:.3f} < {CAPACITY_TRAIN_AUC}: cannot represent the concept",
            )
        if control_test < PASS_MEAN_AUC:
            return (
                Verdict.CAPACITY,
                f"control test AUC {control_test:.3f} < {PASS_MEAN_AUC}: does not generalise even without the trap",
            )
    if mean_test < PASS_MEAN_AUC:
        return Verdict.FAIL, f"mean test AUC {mean_test:.3f} < {PASS_MEAN_AUC}"
    if test == SINGLE_CONCEPT and min(test_aucs) < PASS_SEED_MIN_AUC:
        return Verdict.FAIL, f"a seed's test AUC {min(test_aucs):.3f} < {PASS_SEED_MIN_AUC}"
    return Verdict.PASS, f"mean test AUC {mean_test:.3f} ≥ {PASS_MEAN_AUC}"


def positive_score(logits: torch.Tensor) -> torch.Tensor:
    """Positive-class score of binary logits: `[B, 2]` -> `logits[:, 1] - logits[:, 0]`, `[B, 1]` -> itself."""
    if logits.dim() != 2 or logits.shape[1] not in (1, 2):
        raise MilCheckError(
            f"MIL checks need binary logits [B, 2] or [B, 1], got {tuple(logits.shape)}; "
            "build the model with num_classes=2"
        )
    return logits[:, 0] if logits.shape[1] == 1 else logits[:, 1] - logits[:, 0]


def forward_output(model: nn.Module, x: torch.Tensor, mask: torch.Tensor) -> MILOutput:
    """Call a contract model and check that it returned a `MILOutput`-like object."""
    output = model(x, mask)
    if not hasattr(output, "logits"):
        raise MilCheckError(
            f"the model returned {type(output).__name__}, not a MILOutput; a model factory "
            "must build an nn.Module whose forward(x [B, N, D], mask [B, N]) returns MILOutput"
        )
    return output


@torch.no_grad()
def score_bags(
    model: nn.Module, bags: Sequence[torch.Tensor], *, device: torch.device | str = "cpu"
) -> np.ndarray:
    """Positive-class scores of bags in eval mode, in padded batches -> `[num_bags]`."""
    was_training = model.training
    model.eval()
    scores = []
    for start in range(0, len(bags), EVAL_BATCH_SIZE):
        x, mask = pad_sequences(bags[start : start + EVAL_BATCH_SIZE])
        output = forward_output(model, x.to(device), mask.to(device))
        scores.append(positive_score(output.logits).float().cpu())
    model.train(was_training)
    return torch.cat(scores).numpy()


def bag_auc(model: nn.Module, data: MILBags, *, device: torch.device | str = "cpu") -> float:
    """Bag-level ROC-AUC of the model's positive score (nan when scores are not finite)."""
    scores = score_bags(model, data.bags, device=device)
    if not np.isfinite(scores).all():
        return math.nan
    return float(roc_auc_score(data.labels.numpy(), scores))


def train_model(
    model: nn.Module,
    data: MILBags,
    settings: CheckSettings,
    *,
    seed: int,
    device: torch.device | str = "cpu",
) -> nn.Module:
    """Train with Adam on shuffled padded mini-batches of bags (in place) with the trainer's loss
    (bag cross-entropy plus the model's auxiliary losses); returns the model."""
    model.to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    loss_of = TrainingMethod()
    order_generator = torch.Generator().manual_seed(seed)
    for _ in range(settings.epochs):
        order = torch.randperm(len(data), generator=order_generator).tolist()
        for start in range(0, len(order), settings.batch_size):
            index = order[start : start + settings.batch_size]
            x, mask = pad_sequences([data.bags[i] for i in index], device=device)
            batch = Batch(x, mask, data.labels[index].to(device))
            output = forward_output(model, batch.features, batch.mask)
            if output.logits.shape[-1] != 2:
                raise MilCheckError(
                    f"MIL checks train with cross-entropy over two classes, got logits {tuple(output.logits.shape)}; "
                    "build the model with num_classes=2"
                )
            loss = loss_of.supervised_loss(model, output, batch).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return model


def _fit_and_score(
    factory: ModelFactory,
    train: MILBags,
    tests: Sequence[MILBags],
    settings: CheckSettings,
    *,
    seed: int,
    device: torch.device | str,
) -> tuple[float, list[float]]:
    """Build a model under `seed`, train it, and return its train AUC and each test set's AUC."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = factory()
        train_model(model, train, settings, seed=seed, device=device)
    return bag_auc(model, train, device=device), [bag_auc(model, t, device=device) for t in tests]


def _run_seed(
    factory: ModelFactory,
    test: str,
    settings: CheckSettings,
    *,
    seed: int,
    single_concept_control: bool,
    device: torch.device | str,
) -> SeedRun:
    def bags(split: Split, control: bool = False) -> MILBags:
        return make_bags(
            test,
            split,
            seed=seed,
            num_bags=settings.num_bags,
            dim=settings.dim,
            background_size=settings.background_size,
            control=control,
        )

    train = bags("train")
    if test == FALSE_FREQUENCY:
        train_auc, (test_auc, control_test) = _fit_and_score(
            factory, train, [bags("test"), bags("test", control=True)], settings, seed=seed, device=device
        )
        return SeedRun(seed, train_auc, test_auc, train_auc, control_test)
    train_auc, (test_auc,) = _fit_and_score(factory, train, [bags("test")], settings, seed=seed, device=device)
    if test == THRESHOLD_POISONED or single_concept_control:
        control_train, (control_test,) = _fit_and_score(
            factory, bags("train", True), [bags("test", True)], settings, seed=seed, device=device
        )
        return SeedRun(seed, train_auc, test_auc, control_train, control_test)
    return SeedRun(seed, train_auc, test_auc)


def compact_model_kwargs(name: str) -> dict[str, Any]:
    """Options that shrink a registered model to the checks' tiny inputs (D = 8).

    Every integer `*_dim` option above 64 becomes 64 and `num_landmarks` above 16 becomes 16
    (TransMIL at 256 landmarks spends ~14 s per batch of 16 small bags on 1 CPU core).
    """
    compact: dict[str, Any] = {}
    for option, default in model_entry(name).defaults.items():
        if not isinstance(default, int) or isinstance(default, bool):
            continue
        if option.endswith("_dim") and default > COMPACT_WIDTH:
            compact[option] = COMPACT_WIDTH
        elif option == "num_landmarks" and default > COMPACT_LANDMARKS:
            compact[option] = COMPACT_LANDMARKS
    return compact


def _resolve_factory(
    model: str | ModelFactory, dim: int, model_kwargs: Mapping[str, Any] | None, *, compact: bool
) -> tuple[str, ModelFactory]:
    if isinstance(model, str):
        kwargs = {**(compact_model_kwargs(model) if compact else {}), **(model_kwargs or {})}
        name = model

        def build() -> nn.Module:
            return create_model(name, in_dim=dim, num_classes=2, **kwargs)

        with torch.random.fork_rng(devices=[]):
            build()  # fail fast on unknown names and options, before any training
        return name, build
    if model_kwargs or compact:
        raise MilCheckError("model_kwargs and compact only apply to registered model names; pass them to your factory")
    if not callable(model):
        raise MilCheckError(f"model must be a registered name or a zero-argument factory, got {model!r}")
    return getattr(model, "__name__", type(model).__name__), model


def run_mil_check(
    model: str | ModelFactory,
    *,
    tests: str | Sequence[str] = "all",
    seeds: int | Sequence[int] = 5,
    dim: int = DEFAULT_DIM,
    epochs: int = DEFAULT_EPOCHS,
    num_bags: int = DEFAULT_NUM_BAGS,
    background_size: int = DEFAULT_BACKGROUND_SIZE,
    batch_size: int = 32,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    model_kwargs: Mapping[str, Any] | None = None,
    compact: bool = False,
    single_concept_control: bool = False,
    device: torch.device | str = "cpu",
    progress: Callable[[str], None] | None = None,
) -> CheckReport:
    """Train `model` on each MIL check over several seeds and judge it (see the module docstring).

    `model` is a registered name (built with `create_model(name, in_dim=dim, num_classes=2,
    **model_kwargs)`) or a zero-argument factory returning a fresh contract `nn.Module` whose
    input width is `dim`. `compact=True` shrinks a registered model's widths first
    (`compact_model_kwargs`; explicit `model_kwargs` win). `seeds` is a count (seeds 0..n-1)
    or explicit seeds. Results are deterministic for given seeds on the same machine; the global
    torch RNG is left untouched.
    """
    names = resolve_check_names(tests)
    seed_list = tuple(range(seeds)) if isinstance(seeds, int) else tuple(seeds)
    if not seed_list:
        raise MilCheckError("seeds must be a positive count or a non-empty list; set --seeds / seeds=")
    settings = CheckSettings(
        dim=dim,
        num_bags=num_bags,
        background_size=background_size,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
    )
    model_name, factory = _resolve_factory(model, dim, model_kwargs, compact=compact)
    started = time.perf_counter()
    results = []
    for test in names:
        runs = []
        for seed in seed_list:
            if progress is not None:
                progress(f"{model_name}: {test}, seed {seed}")
            runs.append(
                _run_seed(
                    factory,
                    test,
                    settings,
                    seed=seed,
                    single_concept_control=single_concept_control,
                    device=device,
                )
            )
        verdict, reason = judge(test, runs)
        results.append(CheckResult(test, tuple(runs), verdict, reason))
    return CheckReport(
        model=model_name,
        settings=settings,
        seeds=seed_list,
        results=tuple(results),
        seconds=time.perf_counter() - started,
    )
