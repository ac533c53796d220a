"""MHIM-MIL: frozen EMA teacher, hard-instance masks through the padding mask, recycling, losses."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file, save_model

from wsi_mil.errors import TrainingConfigError
from wsi_mil.models import MILModel, MILOutput, create_model
from wsi_mil.models.base import resolve_mask
from wsi_mil.models.layers import masked_softmax
from wsi_mil.training.bag import Bag
from wsi_mil.training.batching import pad_bags
from wsi_mil.training.config import TrainConfig, load_config
from wsi_mil.training.methods import create_method
from wsi_mil.training.methods.base import Batch
from wsi_mil.training.methods.mhim import (
    MHIMMethod,
    RecycleNetwork,
    class_aware_scores,
    consistency_loss,
    high_score_mask,
    select_ranked,
)
from wsi_mil.training.trainer import fit

SMALL = {
    "abmil": {"hidden_dim": 32, "attention_dim": 16, "dropout": 0.0, "attention_dropout": 0.0},
    "acmil": {"hidden_dim": 16, "attention_dim": 8, "num_branches": 3, "mask_top_k": 3},
    "dsmil": {"query_dim": 8},
    "transmil": {"hidden_dim": 16, "num_heads": 4, "num_landmarks": 8},
}
DIM = 12


def _model(name: str = "abmil", num_classes: int = 3, seed: int = 0) -> MILModel:
    torch.manual_seed(seed)
    return create_model(name, DIM, num_classes, **SMALL[name])


def _batch(sizes: tuple[int, ...] = (40, 17, 2, 9), seed: int = 0, num_classes: int = 3) -> Batch:
    generator = torch.Generator().manual_seed(seed)
    bags = [Bag(torch.randn(n, DIM, generator=generator), i % num_classes, f"s{i}") for i, n in enumerate(sizes)]
    return pad_bags(bags)


def _state_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_teacher_is_a_frozen_copy_and_inference_uses_the_student():
    model = _model()
    method = MHIMMethod("v2")
    method.attach(model, total_steps=10)
    assert method.teacher is not None and method.teacher is not model
    assert all(not p.requires_grad for p in method.teacher.parameters())
    assert all(p.requires_grad for p in model.parameters())
    assert _state_equal(method.teacher, model)
    assert method.inference_model(model) is model
    assert [type(m) for m in method.extra_modules()] == [RecycleNetwork]


@pytest.mark.parametrize("momentum", [0.0, 0.5])
def test_ema_after_one_step(momentum):
    model = _model()
    method = MHIMMethod("v2", high_mask_ratio=0.1, momentum=momentum)
    method.attach(model, total_steps=10)
    assert method.teacher is not None
    before = {k: v.clone() for k, v in method.teacher.state_dict().items()}
    params = list(model.parameters()) + [p for m in method.extra_modules() for p in m.parameters()]
    optimizer = torch.optim.Adam(params, lr=1e-2)
    result = method.compute_loss(model, _batch(), progress=0.0)
    optimizer.zero_grad()
    result.loss.backward()
    optimizer.step()
    method.after_optimizer_step(model, progress=0.1)
    student = model.state_dict()
    assert not torch.equal(student["classifier.weight"], before["classifier.weight"])
    for name, value in method.teacher.state_dict().items():
        torch.testing.assert_close(value, momentum * before[name] + (1 - momentum) * student[name], rtol=0, atol=1e-7)
    if momentum == 0.0:
        assert _state_equal(method.teacher, model)


def test_momentum_and_mask_ratio_schedules():
    method = MHIMMethod("v1", high_mask_ratio=0.02, high_mask_schedule="cosine", momentum=0.99, momentum_schedule="cosine")
    assert method.momentum_at(0.0) == pytest.approx(0.99) and method.momentum_at(1.0) == pytest.approx(1.0)
    assert method.momentum_at(0.5) == pytest.approx(0.995)
    assert method.high_mask_ratio_at(0.0) == pytest.approx(0.02) and method.high_mask_ratio_at(1.0) == pytest.approx(0.0)
    assert MHIMMethod("v2").momentum == 0.9997 and MHIMMethod("v1").momentum == 0.9999


@pytest.mark.parametrize("ratio", [0.01, 0.07, 0.3])
def test_high_score_mask_takes_the_top_ceil_n_r_and_never_padding(ratio):
    batch = _batch(sizes=(100, 37, 2, 5))
    scores = torch.rand(batch.mask.shape).masked_fill(~batch.mask, 5.0)  # padding scores high on purpose
    masked = high_score_mask(scores, batch.mask, ratio)
    for b, n in enumerate(batch.mask.sum(dim=1).tolist()):
        expected = 0 if n < 3 else min(math.ceil(n * ratio), n - 1)
        assert int(masked[b].sum()) == expected
        assert not masked[b, n:].any()
        if expected:
            assert scores[b, :n][masked[b, :n]].min() >= scores[b, :n][~masked[b, :n]].max()


def test_high_score_mask_with_candidates_masks_a_random_part_of_the_top():
    torch.manual_seed(0)
    mask = torch.ones(1, 200, dtype=torch.bool)
    scores = torch.arange(200.0).unsqueeze(0)
    draws = [high_score_mask(scores, mask, 0.05, candidate_fraction=0.5) for _ in range(5)]
    candidates = math.ceil(200 * 0.05 / 0.5)  # 20 candidates, half masked
    for masked in draws:
        assert int(masked.sum()) == math.ceil(candidates * 0.5)
        assert masked[0, : 200 - candidates].sum() == 0
    assert len({tuple(m.nonzero()[:, 1].tolist()) for m in draws}) > 1


def test_select_ranked_counts_per_bag_and_direction():
    keys = torch.tensor([[3.0, 1.0, 2.0, 0.0], [0.0, 5.0, 4.0, 9.0]])
    eligible = torch.tensor([[True, True, True, False], [True, True, True, True]])
    top = select_ranked(keys, eligible, torch.tensor([2, 1]))
    assert top.tolist() == [[True, False, True, False], [False, False, False, True]]
    low = select_ranked(keys, eligible, torch.tensor([1, 2]), largest=False)
    assert low.tolist() == [[False, True, False, False], [True, False, True, False]]


def test_v2_student_input_length_and_layout():
    torch.manual_seed(1)
    model, batch = _model(), _batch()
    method = MHIMMethod("v2", high_mask_ratio=0.07, random_keep_ratio=0.5, recycle_tokens=3)
    method.attach(model, total_steps=10)
    scores = torch.rand(batch.mask.shape)
    visible = method.visible_mask(scores, batch.mask, progress=0.0)
    features, mask = method.student_input(batch.features, visible)
    num = batch.mask.shape[1]
    assert features.shape == (4, num + 3, DIM) and mask.shape == (4, num + 3)
    for b, n in enumerate(batch.mask.sum(dim=1).tolist()):
        high = math.ceil(n * 0.07) if n >= 3 else 0
        assert int(visible[b].sum()) == n - high
        assert int(mask[b].sum()) == math.floor((n - high) * 0.5) + 3
        assert mask[b, num:].all()  # recycled tokens are valid slots after the bag
        assert not mask[b, n:num].any()  # padding stays padding
        assert not (mask[b, :num] & ~visible[b]).any()  # masked instances are never shown
        assert (features[b, :num][~mask[b, :num]] == 0).all()
        kept = mask[b, :num]
        torch.testing.assert_close(features[b, :num][kept], batch.features[b][kept])


def test_v1_random_and_low_masks():
    torch.manual_seed(2)
    batch = _batch(sizes=(50, 20))
    scores = torch.rand(batch.mask.shape)
    low_only = MHIMMethod("v1", high_mask_ratio=0.0, low_mask_ratio=0.2)
    visible = low_only.visible_mask(scores, batch.mask, progress=0.0)
    for b, n in enumerate([50, 20]):
        hidden = batch.mask[b] & ~visible[b]
        assert int(hidden.sum()) == math.ceil(n * 0.2)
        assert scores[b][hidden].max() <= scores[b, :n][visible[b, :n]].min()
    random_only = MHIMMethod("v1", high_mask_ratio=0.0, random_mask_ratio=0.5)
    visible = random_only.visible_mask(scores, batch.mask, progress=0.0)
    assert (batch.mask & ~visible).sum(dim=1).tolist() == [25, 10]
    union = MHIMMethod("v1", high_mask_ratio=0.1, random_mask_ratio=0.5, low_mask_ratio=0.2)
    visible = union.visible_mask(scores, batch.mask, progress=0.0)
    high = high_score_mask(scores, batch.mask, 0.1)
    low = select_ranked(scores, batch.mask, torch.tensor([10, 4]), largest=False)
    assert not (visible & (high | low)).any()
    assert ((batch.mask & ~visible).sum(dim=1) >= torch.tensor([25, 10])).all()
    everything = MHIMMethod("v1", high_mask_ratio=0.5, random_mask_ratio=0.9, low_mask_ratio=0.9)
    assert (everything.visible_mask(scores, batch.mask, progress=0.0).sum(dim=1) >= 1).all()


def test_recycle_network_attends_only_to_its_source_and_moves_its_queries():
    torch.manual_seed(3)
    net = RecycleNetwork(DIM, num_tokens=2, heads=2, head_dim=4, dropout=0.0, momentum=0.9)
    x = torch.randn(2, 6, DIM)
    source = torch.tensor([[True, True, False, False, False, False], [False, True, True, True, False, False]])
    net.eval()
    reference = net(x, source)
    changed = x.clone()
    changed[~source] = torch.randn(int((~source).sum()), DIM)
    torch.testing.assert_close(net(changed, source), reference)
    queries = net.queries.clone()
    net.train()
    tokens = net(x, source)
    tokens.sum().backward()  # the in-place query update must not break backward
    torch.testing.assert_close(net.queries, 0.9 * queries + 0.1 * tokens.detach().mean(dim=0))
    assert net.to_q.weight.grad is not None and net.to_q.weight.grad.abs().sum() > 0


def _official_class_aware_score(classifier: torch.nn.Linear, h: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    """MHIM `get_pseudo_score`: `max_c softmax_c(W (a_n h_n) + b_0)` for `h` `[B, N, H]`, `attention` `[B, N]`."""
    weighted = attention.unsqueeze(-1) * h
    return torch.softmax(weighted @ classifier.weight.T + classifier.bias[0], dim=-1).amax(-1)


def test_class_aware_score_matches_the_official_formula_for_abmil():
    torch.manual_seed(0)
    model = create_model("abmil", DIM, 4, hidden_dim=32, attention_dim=16, dropout=0.25)
    model.train()  # the teacher's pass: dropout on, so the score must use this very pass's features
    batch = _batch(num_classes=4)
    captured: list[torch.Tensor] = []
    model.projection.register_forward_hook(lambda _m, _i, out: captured.append(out))
    with torch.no_grad():
        output = model(batch.features, batch.mask)
        scores = class_aware_scores(output, batch.mask)
    official = _official_class_aware_score(model.classifier, captured[0], output.attention)
    torch.testing.assert_close(scores, official.masked_fill(~batch.mask, 0.0))


def test_v2_masks_from_the_one_train_mode_teacher_pass():
    """The hidden set is the top of the official score of the teacher pass that made the consistency
    target (its dropout-ed features and attention); no second teacher forward runs."""
    torch.manual_seed(0)
    model = create_model("abmil", DIM, 3, hidden_dim=32, attention_dim=16, dropout=0.25, attention_dropout=0.25)
    batch = _batch()
    method = MHIMMethod("v2", high_mask_ratio=0.2, random_keep_ratio=1.0, recycle_tokens=0)
    method.attach(model, total_steps=10)
    teacher = method.teacher
    teacher_outputs: list[MILOutput] = []
    teacher_features: list[torch.Tensor] = []
    student_masks: list[torch.Tensor] = []
    teacher.register_forward_hook(lambda _m, _i, out: teacher_outputs.append(out))
    teacher.projection.register_forward_hook(lambda _m, _i, out: teacher_features.append(out))
    model.register_forward_pre_hook(lambda _m, args: student_masks.append(args[1]))
    method.compute_loss(model, batch, progress=0.0)
    assert len(teacher_outputs) == 1 and len(teacher_features) == 1  # one teacher pass, nothing re-run
    official = _official_class_aware_score(teacher.classifier, teacher_features[0], teacher_outputs[0].attention)
    expected_hidden = high_score_mask(official.masked_fill(~batch.mask, 0.0), batch.mask, 0.2)
    assert expected_hidden.sum() > 0
    torch.testing.assert_close(student_masks[0], batch.mask & ~expected_hidden, rtol=0, atol=0)


def test_class_aware_score_of_dsmil_is_its_max_instance_logit():
    model = _model("dsmil")
    batch = _batch()
    with torch.no_grad():
        output = model(batch.features, batch.mask)
        scores = class_aware_scores(output, batch.mask)
    assert output.instance_logits is not None and output.instance_contributions is None
    torch.testing.assert_close(scores, output.instance_logits.amax(-1).masked_fill(~batch.mask, 0.0))


@pytest.mark.parametrize("name", ["abmil", "acmil"])
def test_class_aware_score_reads_the_instance_contributions(name):
    model, batch = _model(name), _batch()
    with torch.no_grad():
        output = model(batch.features, batch.mask)
        scores = class_aware_scores(output, batch.mask)
    assert output.instance_contributions is not None
    expected = torch.softmax(output.instance_contributions, dim=-1).amax(-1)
    torch.testing.assert_close(scores, expected.masked_fill(~batch.mask, 0.0))


def test_consistency_loss_is_soft_cross_entropy_over_the_embedding():
    student, teacher = torch.randn(3, 8, requires_grad=True), torch.randn(3, 8)
    loss = consistency_loss(student, teacher, teacher_temperature=0.1, student_temperature=1.0)
    expected = -(torch.softmax(teacher / 0.1, -1) * torch.log_softmax(student, -1)).sum(-1).mean()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert student.grad is not None


@pytest.mark.parametrize("name", ["abmil", "acmil", "dsmil", "transmil"])
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_a_step_runs_with_several_models(name, version):
    model, batch = _model(name), _batch()
    options = {"random_mask_ratio": 0.3} if version == "v1" else {}
    method = MHIMMethod(version, high_mask_ratio=0.1, **options)
    method.attach(model, total_steps=5)
    result = method.compute_loss(model, batch, progress=0.2)
    result.loss.backward()
    assert torch.isfinite(result.loss)
    assert {"bag", "consistency"} <= set(result.terms)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert all(p.grad is None for p in method.teacher.parameters())
    for module in method.extra_modules():
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
    method.after_optimizer_step(model, progress=0.4)


class NoEmbedding(MILModel):
    """Mean pooling + linear head that returns no bag embedding."""

    def __init__(self) -> None:
        super().__init__(DIM, 2)
        self.head = torch.nn.Linear(DIM, 2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> MILOutput:
        mask = resolve_mask(x, mask)
        attention = masked_softmax(torch.zeros(mask.shape), mask)
        return MILOutput(logits=self.head((attention.unsqueeze(-1) * x).sum(1)), attention=attention)


class NoClassEvidence(NoEmbedding):
    """Mean pooling + linear head with an embedding but no per-instance class evidence."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> MILOutput:
        out = super().forward(x, mask)
        return MILOutput(logits=out.logits, attention=out.attention, embedding=out.logits)


def test_class_aware_score_needs_per_instance_class_evidence():
    with pytest.raises(TrainingConfigError, match="instance_score: attention"):
        MHIMMethod("v2").attach(NoClassEvidence(), total_steps=1)
    MHIMMethod("v2", instance_score="attention").attach(NoClassEvidence(), total_steps=1)


def test_a_model_without_embedding_is_refused_at_attach():
    with pytest.raises(TrainingConfigError, match="embedding"):
        MHIMMethod("v2").attach(NoEmbedding(), total_steps=1)


def test_teacher_init_loads_a_baseline_and_fails_loudly_on_missing_keys(tmp_path):
    baseline, student = _model(seed=1), _model(seed=2)
    path = tmp_path / "baseline.safetensors"
    save_model(baseline, str(path))
    method = MHIMMethod("v2", teacher_init=str(path), student_init_prefixes=["projection."])
    method.attach(student, total_steps=1)
    assert _state_equal(method.teacher, baseline)
    assert torch.equal(student.projection[0].weight, baseline.projection[0].weight)
    assert not torch.equal(student.classifier.weight, baseline.classifier.weight)

    state = {k: v.clone() for k, v in baseline.state_dict().items()}
    missing = dict(state)
    del missing["classifier.weight"]
    save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(TrainingConfigError, match=r"missing keys \['classifier.weight'\]"):
        MHIMMethod("v2", teacher_init=str(tmp_path / "missing.safetensors")).attach(_model(), total_steps=1)
    save_file({**state, "extra.weight": torch.zeros(2)}, str(tmp_path / "extra.safetensors"))
    with pytest.raises(TrainingConfigError, match="unexpected keys"):
        MHIMMethod("v2", teacher_init=str(tmp_path / "extra.safetensors")).attach(_model(), total_steps=1)
    save_file({**state, "classifier.bias": torch.zeros(5)}, str(tmp_path / "shape.safetensors"))
    with pytest.raises(TrainingConfigError, match="shape mismatches"):
        MHIMMethod("v2", teacher_init=str(tmp_path / "shape.safetensors")).attach(_model(), total_steps=1)
    with pytest.raises(TrainingConfigError, match="does not exist"):
        MHIMMethod("v2", teacher_init=str(tmp_path / "nope.safetensors")).attach(_model(), total_steps=1)


def test_bad_options_name_the_setting():
    with pytest.raises(TrainingConfigError, match=r"method_kwargs\.version"):
        MHIMMethod("v3")  # type: ignore[arg-type]
    with pytest.raises(TrainingConfigError, match="belong to v1"):
        MHIMMethod("v2", low_mask_ratio=0.2)
    with pytest.raises(TrainingConfigError, match="belong to v2"):
        MHIMMethod("v1", recycle_tokens=5)
    with pytest.raises(TrainingConfigError, match="high_mask_ratio"):
        MHIMMethod("v2", high_mask_ratio=1.0)
    with pytest.raises(TrainingConfigError, match="bad method_kwargs"):
        create_method("mhim", no_such_option=1)
    assert isinstance(create_method("mhim", version="v1"), MHIMMethod)


def test_fit_resumes_to_the_same_result(tmp_path, bag_factory):
    bags = bag_factory(24, dim=DIM, seed=7)
    train, val = bags[:16], bags[16:]
    config = TrainConfig.model_validate({"epochs": 3, "lr": 2e-3, "device": "cpu", "patience": None, "batch_size": 2})

    def run(**kwargs):
        model = _model(num_classes=2, seed=0)
        method = create_method("mhim", version="v2", high_mask_ratio=0.1, random_keep_ratio=0.5, momentum=0.9)
        return fit(model, method, train, val, config=config, num_classes=2, **kwargs), method

    (reference, method) = run()
    assert method.teacher is not None and not _state_equal(method.teacher, _model(num_classes=2, seed=0))

    def stop_after_first(report):
        if report.epoch == 1:
            raise KeyboardInterrupt

    checkpoint = tmp_path / "last.pt"
    with pytest.raises(KeyboardInterrupt):
        run(checkpoint_path=checkpoint, on_epoch_end=stop_after_first)
    assert set(torch.load(checkpoint, weights_only=True)["method"]) == {"teacher"}
    resumed, _ = run(checkpoint_path=checkpoint)
    assert resumed.history == reference.history
    for name, tensor in reference.best_state.items():
        assert torch.equal(tensor, resumed.best_state[name]), name


def test_example_config_builds_the_method():
    config = load_config(Path(__file__).resolve().parents[2] / "configs" / "train" / "mhim.yaml")
    assert config.method == "mhim"
    assert isinstance(create_method(config.method, **config.method_kwargs), MHIMMethod)
