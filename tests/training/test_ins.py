"""The INS method: candidate sets, the MIL constraint under adversarial scores, prototype and
confidence updates by hand, the key encoder and queue, instance identity through the cap and
padding, phases, resume bit for bit, and a small end-to-end run scored at the instance level."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch.nn import functional as F

from wsi_mil.errors import TrainingConfigError
from wsi_mil.models import create_model
from wsi_mil.models.layers_targets import bag_cross_entropy
from wsi_mil.training.bag import Bag
from wsi_mil.training.batching import EpochBags, pad_bags
from wsi_mil.training.benchmarks_data import gaussian_witness_bags
from wsi_mil.training.config import TrainConfig
from wsi_mil.training.methods import create_method
from wsi_mil.training.methods import ins as ins_module
from wsi_mil.training.methods.base import Batch
from wsi_mil.training.methods.ins import (
    INSMethod,
    candidate_sets,
    update_confidence,
    update_prototypes,
)
from wsi_mil.training.trainer import fit

DIM = 6
MAIN = 0.9  # a progress inside the main phase (warm-up ends at 0.2 by default)


class Interrupted(Exception):
    """Raised from the epoch callback to simulate a run killed after an epoch."""


def _attached(*, num_classes: int = 2, model_options: dict | None = None, **options) -> tuple[torch.nn.Module, INSMethod]:
    torch.manual_seed(0)
    model = create_model("ins", DIM, num_classes, hidden_dim=16, **(model_options or {}))
    method = create_method("ins", queue_size=options.pop("queue_size", 32), **options)
    assert isinstance(method, INSMethod)
    method.attach(model, total_steps=100)
    return model, method


def _bag(size: int, label: int, slide_id: str, seed: int = 0) -> Bag:
    return Bag(torch.randn(size, DIM, generator=torch.Generator().manual_seed(seed)), label, slide_id)


# -- candidate sets and the MIL constraint --------------------------------------------------------


def test_candidate_sets_follow_the_bag_label_and_start_uniform_inside_them():
    binary = candidate_sets(torch.tensor([0, 1]), 2, 0)
    assert binary.tolist() == [[1, 0], [1, 1]]
    three = candidate_sets(torch.tensor([0, 1, 2]), 3, 0)
    assert three.tolist() == [[1, 0, 0], [1, 1, 0], [1, 0, 1]]
    background = candidate_sets(torch.tensor([0, 1]), 3, None)  # the background class is the last
    assert background.tolist() == [[1, 0, 1], [0, 1, 1]]
    model, method = _attached()
    method.compute_loss(model, pad_bags([_bag(3, 0, "neg"), _bag(2, 1, "pos")]), progress=MAIN)
    _, fresh = _attached()
    assert fresh._table("pos", 1, 2).tolist() == [[0.5, 0.5]] * 2
    assert fresh._table("neg", 0, 1).tolist() == [[1.0, 0.0]]


class PseudoLabelSpy:
    """Records every call of `pseudo_labels` (the real function runs)."""

    def __init__(self) -> None:
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def __call__(self, logits, queries, prototypes, candidates):
        result = ins_module.__dict__["_real_pseudo_labels"](logits, queries, prototypes, candidates)
        unmasked = (logits.argmax(dim=1), (queries @ prototypes.T).argmax(dim=1))
        self.calls.append((prototypes.clone(), *result, *unmasked))
        return result


@pytest.fixture
def pseudo_label_spy(monkeypatch) -> PseudoLabelSpy:
    spy = PseudoLabelSpy()
    monkeypatch.setitem(ins_module.__dict__, "_real_pseudo_labels", ins_module.pseudo_labels)
    monkeypatch.setattr(ins_module, "pseudo_labels", spy)
    return spy


@pytest.mark.parametrize("capped", [False, True])
def test_negative_bag_instances_never_become_positive_under_adversarial_scores(pseudo_label_spy, capped):
    """Classifier and prototypes both favour the positive class for every instance, for 50 steps."""
    model, method = _attached(queue_size=24, proto_momentum=1.0)  # prototypes stay adversarial
    with torch.no_grad():
        model.classifier.bias.copy_(torch.tensor([-20.0, 20.0]))
    method.prototypes = torch.tensor([[-1.0] + [0.0] * 127, [1.0] + [0.0] * 127])
    method.head[2].weight.data.zero_()
    method.head[2].bias.data.copy_(torch.tensor([5.0] + [0.0] * 127))  # every q points at the positive prototype
    optimizer = torch.optim.SGD([p for p in model.parameters()] + list(method.head.parameters()), lr=0.01)
    bags = [_bag(40, 0, "neg", 1), _bag(25, 1, "pos", 2), _bag(9, 0, "neg2", 3)]
    generator = torch.Generator().manual_seed(0)
    for step in range(50):
        chosen = EpochBags(bags, [0, 1, 2], max_instances=12 if capped else None, generator=generator)
        batch = pad_bags([chosen[i] for i in range(3)])
        negative_only = pad_bags([chosen[0]])
        for current in (batch, negative_only):
            before = method.queue_pointer
            optimizer.zero_grad()
            method.compute_loss(model, current, progress=MAIN).loss.backward()
            optimizer.step()
            method.after_optimizer_step(model, progress=MAIN)
            for slide in ("neg", "neg2"):
                if slide in method.confidence:
                    table = method.confidence[slide]
                    assert torch.equal(table, F.one_hot(torch.zeros(len(table), dtype=torch.long), 2).float()), step
            _, classifier_labels, prototype_labels, classifier_favours, prototypes_favour = pseudo_label_spy.calls[-1]
            assert (classifier_favours == 1).all() and (prototypes_favour == 1).all()  # really adversarial
            negative = current.labels.repeat_interleave(current.mask.sum(dim=1)) == 0
            assert (classifier_labels[negative] == 0).all() and (prototype_labels[negative] == 0).all()
            assert (classifier_labels[~negative] == 1).all() and (prototype_labels[~negative] == 1).all()
            if current is negative_only:
                written = (before + torch.arange(12 if capped else 40)) % 24
                assert (method.queue_labels[written] == 0).all()  # what negative bags enqueue is negative
    assert method.confidence["pos"][:, 1].min() > 0.5  # positive-bag instances did move


def test_the_method_reads_bag_labels_only():
    class NoInstanceLabels(Batch):
        @property
        def instance_labels(self):
            raise AssertionError("INS read instance labels")

    model, method = _attached()
    batch = pad_bags([_bag(4, 0, "a"), _bag(5, 1, "b")])
    guarded = NoInstanceLabels(batch.features, batch.mask, batch.labels, batch.slide_ids, instance_index=batch.instance_index)
    for progress in (0.0, 0.5, MAIN):
        method.compute_loss(model, guarded, progress=progress).loss.backward()


# -- updates by hand ------------------------------------------------------------------------------


def test_confidence_update_by_hand_and_its_schedule():
    rows = update_confidence(torch.tensor([[0.5, 0.5], [1.0, 0.0]]), torch.tensor([1, 1]),
                             torch.tensor([False, True]), momentum=0.9, negative_class=0)
    torch.testing.assert_close(rows, torch.tensor([[0.45, 0.55], [1.0, 0.0]]))
    _, method = _attached()
    assert [method.conf_momentum_at(p) for p in (0.0, 0.5, 1.0)] == pytest.approx([0.95, 0.875, 0.8])


def test_no_confidence_changes_before_the_main_phase():
    model, method = _attached(bag_label_warmstart_fraction=0.1)
    batch = pad_bags([_bag(4, 0, "a"), _bag(5, 1, "b")])
    for progress in (0.0, 0.15):
        method.compute_loss(model, batch, progress=progress)
    assert method.confidence == {}
    method.compute_loss(model, batch, progress=MAIN)
    assert set(method.confidence) == {"a", "b"}


def test_partial_cross_entropy_by_hand():
    loss = bag_cross_entropy(torch.tensor([[0.2, 1.0]]), torch.tensor([[0.45, 0.55]]))
    assert float(loss) == pytest.approx(0.731101, abs=1e-6)
    logits = torch.randn(5, 3)
    one_hot = F.one_hot(torch.tensor([0, 2, 1, 1, 0]), 3).float()
    torch.testing.assert_close(bag_cross_entropy(logits, one_hot), F.cross_entropy(logits, one_hot.argmax(1)))


def test_prototype_updates_by_hand():
    zero = torch.zeros(2, 2)
    two = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([1, 1])
    sequential = update_prototypes(zero, two, labels, momentum=0.9, mode="sequential")
    torch.testing.assert_close(sequential[1], torch.tensor([0.668965, 0.743294]), atol=1e-6, rtol=0)
    mean = update_prototypes(zero, two, labels, momentum=0.9, mode="batch_mean")
    torch.testing.assert_close(mean[1], torch.tensor([0.707107, 0.707107]), atol=1e-6, rtol=0)
    assert (sequential[0] == 0).all() and (mean[0] == 0).all()  # an absent class keeps its row
    start = torch.tensor([[0.0, 1.0], [0.6, 0.8]])
    for mode in ("sequential", "batch_mean"):
        second = update_prototypes(start, torch.tensor([[1.0, 0.0]]), torch.tensor([1]), momentum=0.9, mode=mode)
        torch.testing.assert_close(second[1], torch.tensor([0.664364, 0.747409]), atol=1e-6, rtol=0)
        assert torch.equal(second[0], start[0])


def test_sequential_prototypes_equal_the_official_per_instance_loop():
    generator = torch.Generator().manual_seed(4)
    prototypes = F.normalize(torch.randn(3, 8, generator=generator), dim=1)
    embeddings = F.normalize(torch.randn(37, 8, generator=generator), dim=1)
    labels = torch.randint(0, 3, (37,), generator=generator)
    expected = prototypes.clone()
    for embedding, label in zip(embeddings, labels, strict=True):
        expected[label] = 0.9 * expected[label] + 0.1 * embedding
    expected = F.normalize(expected, dim=1)
    got = update_prototypes(prototypes, embeddings, labels, momentum=0.9, mode="sequential")
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(got.norm(dim=1), torch.ones(3))


def test_prototype_scores_use_the_prototypes_before_the_step(pseudo_label_spy):
    model, method = _attached()
    batch = pad_bags([_bag(4, 0, "a"), _bag(5, 1, "b")])
    for _ in range(2):
        method.compute_loss(model, batch, progress=MAIN)
    first, second = (call[:3] for call in pseudo_label_spy.calls)
    assert (first[0] == 0).all()  # step 1 scores against the zero prototypes (uniform scores) ...
    assert (first[2] == 0).all()  # ... so the masked argmax is the first candidate, the negative class
    assert not (second[0] == 0).all()  # step 2 against step 1's update


# -- key encoder and queue ------------------------------------------------------------------------


def test_key_encoder_follows_the_query_side_by_ema_and_is_never_optimised():
    model, method = _attached()
    key_encoder = method.key_encoder
    trainable = [p for module in (model, *method.extra_modules()) for p in module.parameters() if p.requires_grad]
    assert not any(p.requires_grad for p in key_encoder.parameters())
    optimizer = torch.optim.SGD(trainable, lr=0.5)
    old = [p.clone() for p in key_encoder.parameters()]
    method.compute_loss(model, pad_bags([_bag(6, 0, "a"), _bag(5, 1, "b")]), progress=MAIN).loss.backward()
    assert all(p.grad is None for p in key_encoder.parameters())
    optimizer.step()
    method.after_optimizer_step(model, progress=MAIN)
    query = [*model.encoder.parameters(), *method.head.parameters()]
    assert any(not torch.equal(q, o) for q, o in zip(query, old, strict=True))  # the query side moved
    for key, before, new in zip(key_encoder.parameters(), old, query, strict=True):
        torch.testing.assert_close(key, 0.999 * before + 0.001 * new, atol=1e-7, rtol=0)
    assert all(id(p) not in {id(q) for g in optimizer.param_groups for q in g["params"]} for p in key_encoder.parameters())


def test_queue_is_a_ring_that_fills_slot_by_slot_and_overwrites_the_oldest():
    _, method = _attached(queue_size=5)
    keys = F.normalize(torch.randn(7, 128), dim=1)
    method.enqueue(keys[:3], torch.tensor([0, 1, 0]))
    assert method.queue_valid.tolist() == [True, True, True, False, False] and method.queue_pointer == 3
    method.enqueue(keys[3:7], torch.tensor([1, 1, 0, 1]))  # wraps: 5 ∤ 4
    assert method.queue_valid.all() and method.queue_pointer == 2
    torch.testing.assert_close(method.queue, torch.cat([keys[5:7], keys[2:5]]))
    assert method.queue_labels.tolist() == [0, 1, 0, 1, 1]


# -- instance identity and phases -----------------------------------------------------------------


def test_only_the_kept_instances_confidence_rows_move_and_padding_touches_none():
    model, method = _attached()
    big, small = _bag(100, 1, "big", 5), _bag(3, 1, "small", 6)
    epoch = EpochBags([big, small], [0, 1], max_instances=10, generator=torch.Generator().manual_seed(3))
    cut = epoch[0]
    method.compute_loss(model, pad_bags([cut, epoch[1]]), progress=MAIN)
    moved = torch.nonzero((method.confidence["big"] != 0.5).any(dim=1)).squeeze(1)
    assert moved.tolist() == cut.instance_index.tolist()
    assert method.confidence["small"].shape == (3, 2) and (method.confidence["small"] != 0.5).any(dim=1).all()


def test_phases_bag_label_warm_start_then_moco_warm_up_then_supcon(monkeypatch):
    model, method = _attached(bag_label_warmstart_fraction=0.1, warmup_instances="positive_bags", view_aug="none")
    used: list[str] = []
    for name in ("moco_infonce_loss", "supervised_contrastive_loss"):
        real = getattr(ins_module, name)
        monkeypatch.setattr(ins_module, name, lambda *a, _n=name, _r=real, **k: used.append(_n) or _r(*a, **k))
    batch = pad_bags([_bag(4, 0, "a"), _bag(5, 1, "b")])
    with torch.no_grad():
        logits = model.instance_logits_from(model.instance_features(batch.features[batch.mask]))
    warm_start = method.compute_loss(model, batch, progress=0.05)
    expected = F.cross_entropy(logits, torch.tensor([0] * 4 + [1] * 5))
    assert warm_start.terms["ins_cls"] == pytest.approx(float(expected), rel=1e-5)
    warm_up = method.compute_loss(model, batch, progress=0.15)
    assert warm_up.terms["ins_cls"] == pytest.approx(float(bag_cross_entropy(logits[4:], torch.full((5, 2), 0.5))), rel=1e-5)
    negatives_only = method.compute_loss(model, pad_bags([_bag(4, 0, "a")]), progress=0.15)
    assert negatives_only.terms["ins_cls"] == 0.0 and negatives_only.terms["ins_cont"] == 0.0
    negatives_only.loss.backward()  # still attached to the graph: the trainer always calls backward
    method.compute_loss(model, batch, progress=MAIN)
    assert used == ["moco_infonce_loss", "moco_infonce_loss", "supervised_contrastive_loss"]
    assert [r.terms["ins_phase"] for r in (warm_start, warm_up)] == [0.0, 1.0]


def test_other_models_and_bad_options_are_refused():
    with pytest.raises(TrainingConfigError, match="--model ins"):
        create_method("ins").attach(create_model("abmil", DIM, 2), total_steps=1)
    with pytest.raises(TrainingConfigError, match="warmup_fraction"):
        create_method("ins", bag_label_warmstart_fraction=0.5, warmup_fraction=0.2)
    with pytest.raises(TrainingConfigError, match="method_kwargs"):
        create_method("ins", proto_update="sometimes")


# -- through the trainer --------------------------------------------------------------------------


def _config(**overrides) -> TrainConfig:
    values = {"epochs": 4, "lr": 2e-3, "device": "cpu", "patience": None, "batch_size": 4, "max_instances": 12}
    values.update(overrides)
    return TrainConfig.model_validate(values)


def _fit_ins(train, val, config, **kwargs):
    torch.manual_seed(config.seed)
    model = create_model("ins", train[0].features.shape[1], 2, hidden_dim=16, dropout=0.25)
    method = create_method("ins", queue_size=64, warmup_fraction=0.3)
    return model, method, fit(model, method, train, val, config=config, num_classes=2, **kwargs)


def test_resume_reproduces_weights_prototypes_queue_and_confidences_bit_for_bit(tmp_path, bag_factory):
    bags = bag_factory(36, dim=DIM, seed=3, min_size=8, max_size=30)
    train, val = bags[:28], bags[28:]
    config = _config()
    _, reference_method, reference = _fit_ins(train, val, config)

    def kill_after_epoch_2(report):
        if report.epoch == 2:
            raise Interrupted

    checkpoint = tmp_path / "last.pt"
    with pytest.raises(Interrupted):
        _fit_ins(train, val, config, checkpoint_path=checkpoint, on_epoch_end=kill_after_epoch_2)
    model, method, resumed = _fit_ins(train, val, config, checkpoint_path=checkpoint)
    assert resumed.history == reference.history
    for name, tensor in reference.best_state.items():
        assert torch.equal(tensor, resumed.best_state[name]), name
    state, reference_state = method.state_dict(), reference_method.state_dict()
    for key in ("prototypes", "queue", "queue_labels", "queue_valid"):
        assert torch.equal(state[key], reference_state[key]), key
    assert state["queue_pointer"] == reference_state["queue_pointer"]
    assert state["confidence"].keys() == reference_state["confidence"].keys()
    assert all(torch.equal(state["confidence"][k], reference_state["confidence"][k]) for k in state["confidence"])
    for got, want in zip(method.key_encoder.state_dict().values(), reference_method.key_encoder.state_dict().values(), strict=True):
        assert torch.equal(got, want)
    assert set(resumed.best_state) == set(model.state_dict())  # what is served: the ins model alone


def test_a_small_witness_cohort_is_learnt_at_the_instance_level():
    """Gaussian witness bags (10% witnesses, |μ| = 3): instance AUC of the served model on test bags."""
    train = gaussian_witness_bags(40, witness_rate=0.1, seed=0)
    val = gaussian_witness_bags(20, witness_rate=0.1, seed=1, prefix="val")
    test = gaussian_witness_bags(20, witness_rate=0.1, seed=2, prefix="test")
    torch.manual_seed(0)
    model = create_model("ins", 64, 2)
    method = create_method("ins", queue_size=1024)
    config = TrainConfig(epochs=10, lr=3e-3, batch_size=4, device="cpu", patience=None)
    result = fit(model, method, train.bags, val.bags, config=config, num_classes=2)
    model.load_state_dict(result.best_state)
    model.eval()
    with torch.no_grad():
        scores = [model(bag.features.unsqueeze(0)).instance_scores[0].numpy() for bag in test.bags]
    instance_auc = roc_auc_score(np.concatenate(test.instance_labels), np.concatenate(scores))
    assert instance_auc > 0.85
    negatives = [bag.slide_id for bag in train.bags if bag.label == 0]
    assert all(torch.equal(method.confidence[s], torch.tensor([[1.0, 0.0]]).expand(100, 2)) for s in negatives)
