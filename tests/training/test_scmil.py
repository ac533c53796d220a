"""SC-MIL: the β schedule, the two views, composition with plain and with the zoo, the queue,
resume, serving, and `wsi-mil train --method scmil` → predict → evaluate → the service."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file
from typer.testing import CliRunner

from wsi_mil.cli import _register_commands, app
from wsi_mil.errors import TrainingConfigError
from wsi_mil.inference import load_model, predict_features
from wsi_mil.models import create_model
from wsi_mil.service import ServiceSettings, create_app
from wsi_mil.training.batching import pad_bags
from wsi_mil.training.config import TrainConfig, load_config
from wsi_mil.training.methods import create_method
from wsi_mil.training.methods.scmil import SCMILMethod
from wsi_mil.training.metrics import classification_metrics
from wsi_mil.training.trainer import fit, predict_bags

ROOT = Path(__file__).resolve().parents[2]
DIM = 8
SMALL = {"hidden_dim": 32, "attention_dim": 16, "dropout": 0.0, "attention_dropout": 0.0}


def _abmil(seed: int = 0, **overrides: object):
    torch.manual_seed(seed)
    return create_model("abmil", DIM, 2, **{**SMALL, **overrides})


def _attached(method: SCMILMethod, model) -> SCMILMethod:
    method.attach(model, total_steps=10)
    return method


def _batch(bag_factory, num_bags: int = 6, seed: int = 0):
    return pad_bags(bag_factory(num_bags, dim=DIM, seed=seed))


def _config(**overrides: object) -> TrainConfig:
    values: dict[str, object] = {"epochs": 4, "lr": 2e-3, "device": "cpu", "patience": None, "batch_size": 8}
    values.update(overrides)
    return TrainConfig.model_validate(values)


# -- the schedule ------------------------------------------------------------------------------

PROGRESS = (0.0, 0.25, 0.5, 0.75, 1.0)


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        ("parabolic", (1.0, 0.9375, 0.75, 0.4375, 0.0)),  # 1 − p²
        ("linear", (1.0, 0.75, 0.5, 0.25, 0.0)),
        ("cosine", (1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4)), 0.0)),
        ("step", (1.0, 1.0, 0.0, 0.0, 0.0)),  # switch_at 0.5
        ("constant", (1.0, 1.0, 1.0, 1.0, 1.0)),
    ],
)
def test_beta_schedule_values(schedule, expected):
    method = SCMILMethod(schedule=schedule)
    assert [method.beta_at(p) for p in PROGRESS] == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("schedule", ["parabolic", "linear", "cosine", "step"])
def test_beta_moves_monotonically_from_start_to_end(schedule):
    method = SCMILMethod(schedule=schedule, beta_start=0.9, beta_end=0.3)
    values = [method.beta_at(i / 200) for i in range(201)]
    assert values[0] == pytest.approx(0.9) and values[-1] == pytest.approx(0.3)
    assert all(later <= earlier + 1e-12 for earlier, later in itertools.pairwise(values))
    assert method.beta_at(-1.0) == values[0] and method.beta_at(2.0) == values[-1]


# -- views -------------------------------------------------------------------------------------


def test_second_view_keeps_ceil_ratio_of_the_valid_instances_and_never_padding(bag_factory):
    batch = _batch(bag_factory, num_bags=6)
    method = SCMILMethod(view_keep_ratio=0.7)
    torch.manual_seed(0)
    kept = method.second_view(batch.mask)
    sizes = batch.mask.sum(dim=1)
    assert kept.sum(dim=1).tolist() == [math.ceil(0.7 * int(n)) for n in sizes]
    assert not (kept & ~batch.mask).any()
    assert (SCMILMethod(view_keep_ratio=0.01).second_view(batch.mask).sum(dim=1) == 1).all()
    again = method.second_view(batch.mask)
    assert not torch.equal(kept, again)  # a new draw every step
    torch.manual_seed(0)
    assert torch.equal(method.second_view(batch.mask), kept)  # reproducible under a seed
    same_size = pad_bags([bag for bag in bag_factory(12, dim=DIM) if len(bag.features) == len(batch.features[0])][:1] * 4)
    rows = method.second_view(same_size.mask)
    assert len({tuple(row.tolist()) for row in rows}) > 1  # bags draw independently


class Recorder(torch.nn.Module):
    """Wraps a model and records the (features, mask) of each forward."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model
        self.in_dim, self.num_classes = model.in_dim, model.num_classes
        self.calls: list[tuple[torch.Tensor, torch.Tensor | None]] = []

    def forward(self, features, mask=None):
        self.calls.append((features.clone(), None if mask is None else mask.clone()))
        return self.model(features, mask)

    def bag_loss(self, output, target, class_weights=None):
        return self.model.bag_loss(output, target, class_weights=class_weights)


@pytest.mark.parametrize("per_bag", [False, True])
def test_view_one_is_the_input_and_view_two_a_different_subset(bag_factory, per_bag):
    batch = _batch(bag_factory, num_bags=4)
    recorder = Recorder(_abmil())
    method = _attached(SCMILMethod(), recorder)
    method.per_bag = per_bag
    recorder.calls.clear()
    method.compute_loss(recorder, batch, progress=0.5)
    sizes = batch.mask.sum(dim=1).tolist()
    if per_bag:
        views_1, views_2 = recorder.calls[:4], recorder.calls[4:]
        for b, (features, mask) in enumerate(views_1):
            assert mask is None and torch.equal(features[0], batch.features[b, : sizes[b]])
        for b, (features, _) in enumerate(views_2):
            assert len(features[0]) == math.ceil(0.7 * sizes[b])
            rows = {tuple(r.tolist()) for r in batch.features[b, : sizes[b]]}
            assert {tuple(r.tolist()) for r in features[0]} < rows  # a proper subset of the bag's instances
    else:
        (features_1, mask_1), (features_2, mask_2) = recorder.calls
        assert torch.equal(features_1, batch.features) and torch.equal(mask_1, batch.mask)
        assert mask_2 is not None and (mask_2 <= batch.mask).all() and not torch.equal(mask_2, batch.mask)
        assert mask_2.sum(dim=1).tolist() == [math.ceil(0.7 * n) for n in sizes]
        assert (features_2[~mask_2] == 0).all() and torch.equal(features_2[mask_2], batch.features[mask_2])


def test_padded_and_per_bag_steps_give_the_same_loss_and_gradients(bag_factory):
    batch = _batch(bag_factory, num_bags=6)
    results, grads = [], []
    for per_bag in (False, True):
        model = _abmil()
        method = _attached(SCMILMethod(), model)
        method.per_bag = per_bag
        torch.manual_seed(5)  # the same second views
        result = method.compute_loss(model, batch, progress=0.3)
        result.loss.backward()
        results.append(result)
        grads.append([p.grad.clone() for p in [*model.parameters(), *method.head.parameters()]])
    assert float(results[0].loss.detach()) == pytest.approx(float(results[1].loss.detach()), rel=1e-5)
    assert results[0].terms["supcon"] == pytest.approx(results[1].terms["supcon"], rel=1e-5)
    for padded, per_bag in zip(*grads, strict=True):
        torch.testing.assert_close(per_bag, padded, atol=1e-5, rtol=1e-4)


# -- the loss ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["abmil", "clam_sb"])
def test_with_beta_zero_and_one_view_it_is_the_plain_method(bag_factory, name):
    batch = _batch(bag_factory, num_bags=6)
    gradients, losses = [], []
    for method in (create_method("plain"), SCMILMethod(beta_start=0.0, beta_end=0.0, views=1)):
        torch.manual_seed(0)
        model = create_model(name, DIM, 2).eval()  # no dropout: the two runs draw different random numbers
        method.attach(model, total_steps=10)
        result = method.compute_loss(model, batch, progress=0.4)
        result.loss.backward()
        losses.append(float(result.loss.detach()))
        gradients.append([p.grad.clone() for p in model.parameters()])
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)
    for plain, scmil in zip(*gradients, strict=True):
        torch.testing.assert_close(scmil, plain, atol=1e-6, rtol=0)


def test_at_progress_zero_the_classifier_gets_no_gradient(bag_factory):
    batch = _batch(bag_factory, num_bags=6)
    model = _abmil()
    method = _attached(SCMILMethod(), model)
    result = method.compute_loss(model, batch, progress=0.0)
    assert result.terms["scmil_beta"] == 1.0 and result.terms["supcon"] > 0
    result.loss.backward()
    assert torch.count_nonzero(model.classifier.weight.grad) == 0 and torch.count_nonzero(model.classifier.bias.grad) == 0
    assert torch.count_nonzero(model.attention.score.weight.grad) > 0 and torch.count_nonzero(model.projection[0].weight.grad) > 0
    assert all(torch.count_nonzero(p.grad) > 0 for p in method.head.parameters())


def test_loss_is_the_beta_mix_of_supcon_and_cross_entropy(bag_factory):
    batch = _batch(bag_factory, num_bags=6)
    model = _abmil()
    method = _attached(SCMILMethod(), model)
    result = method.compute_loss(model, batch, progress=0.5)
    beta = 0.75
    assert result.terms["scmil_beta"] == beta
    assert float(result.loss.detach()) == pytest.approx(beta * result.terms["supcon"] + (1 - beta) * result.terms["bag"], rel=1e-6)


def test_positive_rates_count_other_bags_and_the_rarest_class(bag_factory):
    bags = bag_factory(6, dim=DIM)
    batch = pad_bags([bags[0], bags[2], bags[4], bags[1]])  # classes 0, 0, 0, 1
    model = _abmil()
    method = _attached(SCMILMethod(), model)
    terms = method.compute_loss(model, batch, progress=0.5).terms
    assert terms["scmil_anchors_with_pos"] == 1.0  # every anchor has its own other view
    assert terms["scmil_cross_bag_pos"] == 0.75 and terms["scmil_minority_pos"] == 0.0
    one_view = _attached(SCMILMethod(views=1), model)
    assert one_view.compute_loss(model, batch, progress=0.5).terms["scmil_anchors_with_pos"] == 0.75


def test_bfloat16_autocast_step_gives_a_float32_supcon(bag_factory):
    batch = _batch(bag_factory, num_bags=6)
    model = _abmil()
    method = _attached(SCMILMethod(), model)
    captured = {}
    original = method.head.forward

    def spy(embedding):
        out = original(embedding)
        captured["dtype"] = out.dtype
        return out

    method.head.forward = spy
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = method.compute_loss(model, batch, progress=0.2)
    assert captured["dtype"] == torch.float32 and math.isfinite(result.terms["supcon"])
    assert result.loss.dtype == torch.float32 and torch.isfinite(result.loss)


# -- models ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["abmil", "clam_sb", "clam_mb", "acmil", "dsmil", "transmil"])
def test_one_step_trains_each_model_with_an_embedding(bag_factory, name):
    batch = _batch(bag_factory, num_bags=4)
    torch.manual_seed(0)
    model = create_model(name, DIM, 2)
    method = _attached(SCMILMethod(), model)
    optimizer = torch.optim.AdamW([*model.parameters(), *method.head.parameters()], lr=1e-3)
    result = method.compute_loss(model, batch, progress=0.1)
    result.loss.backward()
    optimizer.step()
    assert torch.isfinite(result.loss) and result.terms["supcon"] > 0


@pytest.mark.parametrize("name", ["mi_net", "multi_concept_mil"])
def test_models_without_an_embedding_are_refused_naming_those_that_qualify(name):
    model = create_model(name, DIM, 2)
    with pytest.raises(TrainingConfigError, match=r"embedding = None; choose a --model that returns one: .*abmil.*transmil") as err:
        SCMILMethod().attach(model, total_steps=1)
    assert "mi_net" not in str(err.value).split("returns one:")[1]


def test_a_batch_of_one_is_refused_unless_a_queue_supplies_positives(bag_factory):
    bags = bag_factory(4, dim=DIM)
    with pytest.raises(TrainingConfigError, match="batch_size"):
        SCMILMethod().make_batches(bags, batch_size=1, generator=torch.Generator())
    train, val = bag_factory(12, dim=DIM, seed=1), bag_factory(8, dim=DIM, seed=2)
    with pytest.raises(TrainingConfigError, match="batch_size"):
        fit(_abmil(), SCMILMethod(), train, val, config=_config(batch_size=1), num_classes=2)
    method = SCMILMethod(queue_size=4, views=1)
    result = fit(_abmil(), method, train, val, config=_config(batch_size=1, epochs=1), num_classes=2)
    assert result.epochs_run == 1 and bool(method.queue_valid.all())


def test_bad_options_name_the_setting():
    for kwargs, key in [({"temperature": 0.0}, "temperature"), ({"schedule": "exp"}, "schedule"),
                        ({"beta_start": 1.5}, "beta_start"), ({"views": 3}, "views"),
                        ({"view_keep_ratio": 0.0}, "view_keep_ratio"), ({"queue_size": -1}, "queue_size")]:
        with pytest.raises(TrainingConfigError, match=rf"method_kwargs\.{key}"):
            SCMILMethod(**kwargs)
    with pytest.raises(TrainingConfigError, match="bad method_kwargs"):
        create_method("scmil", tau=0.1)
    assert isinstance(create_method("scmil", temperature=0.5), SCMILMethod)


def test_example_config_builds_the_method_and_delays_early_stopping():
    config = load_config(ROOT / "configs" / "train" / "scmil.yaml")
    assert config.method == "scmil" and config.balance == "batches" and config.batch_size >= 8
    assert config.min_epochs >= config.epochs / 2
    assert isinstance(create_method(config.method, **config.method_kwargs), SCMILMethod)


# -- the queue ---------------------------------------------------------------------------------


def test_queue_is_a_ring_that_fills_slot_by_slot_and_overwrites_the_oldest():
    method = SCMILMethod(queue_size=5, projection_dim=2)
    method.attach(_abmil(), total_steps=1)
    for step in range(3):  # 3 entries per step: pointer 0 → 3 → 1 (wrapped) → 4
        z = torch.full((3, 2), float(step))
        method._pending = (z, torch.tensor([step, step, step]))
        method.after_optimizer_step(_abmil(), progress=0.0)
        if step == 0:
            assert method.queue_valid.tolist() == [True, True, True, False, False]
    assert method.queue_pointer == 4 and bool(method.queue_valid.all())
    assert method.queue[:, 0].tolist() == [1.0, 2.0, 2.0, 2.0, 1.0]  # slots 0 and 4 from step 1, 1..3 from step 2


# -- fit, resume, serving ----------------------------------------------------------------------


def test_fit_learns_a_separable_task(bag_factory):
    bags = bag_factory(72, dim=DIM, seed=5)
    train, val, test = bags[:40], bags[40:56], bags[56:]
    model = _abmil()
    terms = []
    result = fit(model, SCMILMethod(), train, val, config=_config(epochs=15, lr=5e-3), num_classes=2,
                 on_epoch_end=lambda r: terms.append(r.train_terms))
    model.load_state_dict(result.best_state)
    predictions = predict_bags(model, test)
    assert classification_metrics(predictions.labels, predictions.probs)["roc_auc_macro"] > 0.9
    assert {"supcon", "bag", "scmil_beta", "scmil_minority_pos"} <= set(terms[0])
    assert terms[0]["scmil_beta"] > terms[-1]["scmil_beta"]


def test_fit_resumes_bit_identically_with_the_head_and_the_queue(tmp_path, bag_factory):
    bags = bag_factory(40, dim=DIM, seed=7)
    train, val = bags[:28], bags[28:]
    config = _config(epochs=4, batch_size=6, max_instances=10, balance="batches")

    def run(**kwargs):
        model = _abmil(dropout=0.25)
        method = create_method("scmil", queue_size=8)
        return fit(model, method, train, val, config=config, num_classes=2, **kwargs), method

    reference, reference_method = run()

    def stop_after_second(report):
        if report.epoch == 2:
            raise KeyboardInterrupt

    checkpoint = tmp_path / "last.pt"
    with pytest.raises(KeyboardInterrupt):
        run(checkpoint_path=checkpoint, on_epoch_end=stop_after_second)
    state = torch.load(checkpoint, weights_only=True)
    assert set(state["method"]) == {"queue", "queue_labels", "queue_valid", "queue_pointer"}
    assert any(k.startswith("layers.") for k in state["method_modules"][0])
    resumed, resumed_method = run(checkpoint_path=checkpoint)
    assert resumed.history == reference.history
    for name, tensor in reference.best_state.items():
        assert torch.equal(tensor, resumed.best_state[name]), name
    assert torch.equal(resumed_method.queue, reference_method.queue)
    for mine, theirs in zip(resumed_method.head.parameters(), reference_method.head.parameters(), strict=True):
        assert torch.equal(mine, theirs)


@pytest.fixture(scope="module")
def scmil_run(tmp_path_factory, bag_factory, one_torch_thread) -> tuple[Path, Path]:
    """`wsi-mil train --method scmil` on a 24-slide cohort (2 folds), into a service models folder."""
    from wsi_mil.training.benchmarks_data import write_feature_cohort

    _register_commands()
    root = tmp_path_factory.mktemp("scmil_cli")
    write_feature_cohort(bag_factory(24, dim=DIM, seed=3), root / "features", root / "labels.csv",
                         class_names=["normal", "tumour"])
    (root / "config.yaml").write_text(
        "model_kwargs: {hidden_dim: 32, attention_dim: 16}\n"
        "method_kwargs: {temperature: 0.2, projection_dim: 16}\nbalance: batches\nmin_epochs: 2\n"
    )
    with one_torch_thread():
        result = CliRunner().invoke(app, [
            "train", "--features", str(root / "features"), "--labels", str(root / "labels.csv"), "--model", "abmil",
            "--method", "scmil", "--config", str(root / "config.yaml"), "--out", str(root / "models" / "scmil_run"),
            "--folds", "2", "--epochs", "4", "--batch-size", "8", "--lr", "0.002", "--device", "cpu",
        ])
    assert result.exit_code == 0, result.output
    return root / "models" / "scmil_run", root / "features"


def test_cli_run_serves_the_base_model_only(scmil_run):
    run, features = scmil_run
    for fold in (0, 1):
        card = json.loads((run / f"fold_{fold}" / "model_card.json").read_text())
        assert card["training_method"] == "scmil" and card["model_name"] == "abmil"
        assert card["method_kwargs"] == {"temperature": 0.2, "projection_dim": 16}
        keys = set(load_file(str(run / f"fold_{fold}" / "model.safetensors")))
        assert keys == set(create_model("abmil", DIM, 2, hidden_dim=32, attention_dim=16).state_dict())
    loaded = load_model(run)
    prediction = predict_features(features / "slide_001.h5", loaded)
    assert sum(prediction.prediction.probabilities) == pytest.approx(1.0, abs=1e-5)


def test_cli_predict_and_evaluate_the_scmil_run(scmil_run, tmp_path, one_torch_thread):
    run, features = scmil_run
    runner = CliRunner()
    with one_torch_thread():
        evaluated = runner.invoke(app, ["evaluate", str(run)])
        assert evaluated.exit_code == 0, evaluated.output
        assert "balanced_accuracy" in evaluated.output
        predicted = runner.invoke(app, ["predict", str(run), str(features / "slide_001.h5"), "--out", str(tmp_path / "p.json")])
    assert predicted.exit_code == 0, predicted.output
    payload = json.loads((tmp_path / "p.json").read_text())
    assert payload[0]["slide_id"] == "slide_001" and set(payload[0]["probabilities"]) == {"normal", "tumour"}


def test_the_service_serves_the_scmil_run(scmil_run, tmp_path):
    run, features = scmil_run
    settings = ServiceSettings(models_dir=run.parent, data_dir=tmp_path / "data", slide_root=tmp_path / "slides",
                               workers=0, device="cpu", purge_interval_s=3600)
    (tmp_path / "slides").mkdir()
    with TestClient(create_app(settings)) as client:
        names = [m["name"] for m in client.get("/v1/models").json()["data"]]
        assert names == ["scmil_run/fold_0", "scmil_run/fold_1"]
        response = client.post("/v1/predictions", data={"model": "scmil_run/fold_0"},
                               files={"file": ("slide_001.h5", (features / "slide_001.h5").read_bytes())})
    assert response.status_code == 200, response.text
    body = response.json()
    loaded = load_model(run, fold=0)
    expected = predict_features(features / "slide_001.h5", loaded).prediction.probabilities
    assert [body["probabilities"][c] for c in ("normal", "tumour")] == pytest.approx(list(expected), abs=1e-5)
