"""PackMIL: per-slide split, packs that keep slides apart, token budget, hyperslides, downsampler."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from wsi_mil.errors import TrainingConfigError
from wsi_mil.inference import load_model, predict_features, read_model_card
from wsi_mil.models import create_model
from wsi_mil.models.packmil_ads import AttentionDownsampler, PackMILDownsampled
from wsi_mil.training import train_cohort
from wsi_mil.training.bag import Bag
from wsi_mil.training.config import TrainConfig, load_config
from wsi_mil.training.methods import create_method
from wsi_mil.training.methods.base import Batch
from wsi_mil.training.methods.packmil import (
    PackedBatch,
    PackMILMethod,
    adaptive_pack_len,
    greedy_packs,
    hyperslide_targets,
    keep_top_attention,
    pack_hyperslides,
    residual_loss,
)
from wsi_mil.training.trainer import fit

SMALL_ABMIL = {"hidden_dim": 32, "attention_dim": 16, "dropout": 0.0, "attention_dropout": 0.0}


def _tagged_bags(sizes: list[int], num_classes: int = 3) -> list[Bag]:
    """Bags whose instance features are (slide number, instance index, 1): every token says where it came from."""
    return [
        Bag(torch.stack([torch.full((n,), float(s)), torch.arange(n, dtype=torch.float32), torch.ones(n)], dim=1),
            s % num_classes, f"slide{s}")
        for s, n in enumerate(sizes)
    ]


def _tokens(features: torch.Tensor, mask: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per row, the (slide, instance) tags of its valid tokens."""
    return [[(int(t[0]), int(t[1])) for t in row[m]] for row, m in zip(features, mask, strict=True)]


def _one_batch(method: PackMILMethod, bags: list[Bag], seed: int = 0) -> PackedBatch:
    batches = list(method.make_batches(bags, batch_size=len(bags), generator=torch.Generator().manual_seed(seed)))
    assert len(batches) == 1 and isinstance(batches[0], PackedBatch)
    return batches[0]


def test_rows_never_mix_slides_and_every_instance_is_kept_or_discarded_once():
    sizes = [30, 7, 64, 1, 15, 40]
    method = PackMILMethod(main_fraction=0.4, pack_len=100, min_len=0)
    batch = _one_batch(method, _tagged_bags(sizes))
    assert batch.residual is not None
    kept, discarded = _tokens(batch.features, batch.mask), _tokens(batch.residual.features, batch.residual.mask)
    for s, n in enumerate(sizes):
        assert {slide for slide, _ in kept[s]} == {s} and {slide for slide, _ in discarded[s]} <= {s}
        kept_ids, discarded_ids = [i for _, i in kept[s]], [i for _, i in discarded[s]]
        assert sorted(kept_ids + discarded_ids) == list(range(n))  # each instance exactly once
        assert len(kept_ids) == max(1, int(n * 0.4))
        assert kept_ids == sorted(kept_ids)  # original order kept
    assert batch.labels.tolist() == [s % 3 for s in range(len(sizes))]
    assert batch.slide_ids == [f"slide{s}" for s in range(len(sizes))]


def test_small_slides_are_used_whole_in_both_parts_and_long_parts_are_capped():
    method = PackMILMethod(main_fraction=0.5, pack_len=20, min_len=10, adaptive_pack_len=False)
    batch = _one_batch(method, _tagged_bags([8, 100]))
    assert batch.residual is not None
    kept, discarded = _tokens(batch.features, batch.mask), _tokens(batch.residual.features, batch.residual.mask)
    assert [i for _, i in kept[0]] == list(range(8)) == [i for _, i in discarded[0]]
    assert len(kept[1]) == len(discarded[1]) == 20  # 50 each, capped at pack_len
    assert not {i for _, i in kept[1]} & {i for _, i in discarded[1]}


def test_packs_respect_the_token_budget_in_batch_order():
    sizes = [40, 90, 10, 70, 120, 5, 60, 200]
    method = PackMILMethod(main_fraction=0.5, pack_len=100, min_len=8, adaptive_pack_len=False)
    batch = _one_batch(method, _tagged_bags(sizes))
    assert batch.pack_index is not None and batch.hyperslide_index is not None
    for index, rows_mask in ((batch.pack_index, batch.mask), (batch.hyperslide_index, batch.residual.mask)):
        assert index.tolist() == sorted(index.tolist())  # sequential packing in batch order
        lengths = rows_mask.sum(dim=1)
        for pack in set(index.tolist()):
            assert int(lengths[index == pack].sum()) <= 100
        totals = [int(lengths[index == p].sum()) for p in sorted(set(index.tolist()))]
        firsts = [int(lengths[index == p][0]) for p in sorted(set(index.tolist()))]
        assert all(t + f > 100 for t, f in zip(totals, firsts[1:], strict=False))  # a pack opens only on overflow
    assert greedy_packs([50, 50, 1, 0, 3], pack_len=100, min_len=4) == [0, 0, 1, -1, 1]
    assert greedy_packs([2, 2, 2], pack_len=10, min_len=4) == [0, 0, 0]


def test_adaptive_pack_length_doubles_for_long_slides():
    assert adaptive_pack_len(1000, main_fraction=0.5, ratio=1, pack_len=600) == 600
    assert adaptive_pack_len(1300, main_fraction=0.5, ratio=1, pack_len=600) == 1200
    assert adaptive_pack_len(1300, main_fraction=0.5, ratio=4, pack_len=600) == 600
    official = PackMILMethod(main_fraction=0.5, pack_len=50, min_len=0)  # divides by downsample_ratio 4
    assert official.step_pack_len([30, 402]) == 50 and official.step_pack_len([30, 408]) == 100
    applied = PackMILMethod(main_fraction=0.5, pack_len=50, min_len=0, adaptive_rule="applied_ratio")
    assert applied.step_pack_len([30, 102]) == 100 and applied.step_pack_len([30, 101]) == 50
    with_ads = PackMILMethod(main_fraction=0.5, pack_len=50, min_len=0, downsample="ads", adaptive_rule="applied_ratio")
    assert with_ads.step_pack_len([408]) == official.step_pack_len([408]) == 100


def test_default_pack_length_doubles_from_19208_instances_as_officially():
    method = PackMILMethod()
    assert method.step_pack_len([19_207]) == 2400 and method.step_pack_len([19_208]) == 4800
    assert PackMILMethod(adaptive_rule="applied_ratio").step_pack_len([4_802]) == 4800


def test_hyperslide_soft_labels_are_the_label_mixture():
    labels, ones = torch.tensor([0, 0, 1, 3]), torch.ones(4)
    torch.testing.assert_close(hyperslide_targets(labels, ones, num_classes=4, normalize="sum"), torch.tensor([0.5, 0.25, 0.0, 0.25]))
    torch.testing.assert_close(hyperslide_targets(labels, ones, num_classes=4, normalize="max"), torch.tensor([1.0, 0.5, 0.0, 0.5]))
    weighted = hyperslide_targets(labels, torch.tensor([1.0, 1.0, 6.0, 2.0]), num_classes=4, normalize="sum")
    torch.testing.assert_close(weighted, torch.tensor([0.2, 0.6, 0.0, 0.2]))


def test_pack_hyperslides_concatenates_each_group_with_its_mixed_label():
    bags = _tagged_bags([4, 6, 3, 5], num_classes=2)
    features = torch.zeros(4, 6, 3)
    mask = torch.zeros(4, 6, dtype=torch.bool)
    for i, bag in enumerate(bags):
        features[i, : len(bag.features)] = bag.features
        mask[i, : len(bag.features)] = True
    parts = Batch(features, mask, torch.tensor([b.label for b in bags]), [b.slide_id for b in bags])
    hyper = pack_hyperslides(parts, torch.tensor([0, 0, 1, -1]), num_classes=2, token_weighted=True)
    assert hyper is not None and hyper.soft_labels is not None
    assert _tokens(hyper.features, hyper.mask) == [[(0, i) for i in range(4)] + [(1, i) for i in range(6)],
                                                   [(2, i) for i in range(3)]]
    torch.testing.assert_close(hyper.soft_labels, torch.tensor([[0.4, 0.6], [1.0, 0.0]]))
    assert hyper.labels.tolist() == [1, 0] and hyper.slide_ids == ["slide0+slide1", "slide2"]
    assert pack_hyperslides(parts, torch.tensor([-1, -1, -1, -1]), num_classes=2) is None


def test_attention_downsampler_keeps_the_top_attention_instances():
    torch.manual_seed(0)
    model = create_model("abmil", 3, 2, **SMALL_ABMIL)
    bags = _tagged_bags([40, 9, 25])
    features = torch.zeros(3, 40, 3)
    mask = torch.zeros(3, 40, dtype=torch.bool)
    for i, bag in enumerate(bags):
        features[i, : len(bag.features)] = bag.features
        mask[i, : len(bag.features)] = True
    parts = Batch(features, mask, torch.tensor([0, 1, 0]), ["a", "b", "c"])
    model.train()
    out = keep_top_attention(model, parts, ratio=4, min_len=3)
    assert model.training  # mode restored
    model.eval()
    with torch.no_grad():
        attention = model(features, mask).attention
    kept = _tokens(out.features, out.mask)
    for b, n in enumerate([40, 9, 25]):
        target = n if n <= 12 else math.ceil(n / 4)
        expected = attention[b, :n].argsort(descending=True)[:target].sort().values.tolist()
        assert [i for _, i in kept[b]] == expected


def test_residual_losses():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 0.0, 0.0]])
    targets = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    ce = -(targets * torch.log_softmax(logits, -1)).sum(-1).mean()
    torch.testing.assert_close(residual_loss(logits, targets, "ce"), ce)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    torch.testing.assert_close(residual_loss(logits, targets, "focal"), (0.25 * (1 - torch.exp(-bce)) ** 2 * bce).mean())
    p = torch.softmax(logits, -1)
    picked = torch.stack([p[0, 0], p[1, 2]])
    torch.testing.assert_close(residual_loss(logits, targets, "asl_single"), (-(1 - picked) * picked.log()).mean())


def test_training_steps_reduce_the_loss_on_a_toy_problem(bag_factory):
    bags = bag_factory(32, dim=8, seed=3, min_size=20, max_size=60)
    torch.manual_seed(0)
    model = create_model("abmil", 8, 2, **SMALL_ABMIL)
    method = PackMILMethod(main_fraction=0.5, pack_len=64, min_len=4, downsample="attention", downsample_ratio=2)
    method.attach(model, total_steps=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-2)
    generator = torch.Generator().manual_seed(0)
    epoch_losses = []
    for _ in range(8):
        losses = []
        for batch in method.make_batches(bags, batch_size=8, generator=generator):
            result = method.compute_loss(model, batch, progress=0.0)
            assert "residual" in result.terms and result.terms["hyperslides"] >= 1
            optimizer.zero_grad()
            result.loss.backward()
            optimizer.step()
            losses.append(result.terms["bag"])
        epoch_losses.append(sum(losses) / len(losses))
    assert sum(epoch_losses[-2:]) / 2 < 0.6 * epoch_losses[0]  # measured: 0.71 -> 0.29
    assert method.inference_model(model) is model


def test_fit_runs_with_packmil_and_is_reproducible(bag_factory):
    bags = bag_factory(30, dim=8, seed=4, min_size=10, max_size=40)
    config = TrainConfig.model_validate({"epochs": 2, "lr": 2e-3, "device": "cpu", "patience": None, "batch_size": 4})

    def run():
        torch.manual_seed(0)
        model = create_model("abmil", 8, 2, **SMALL_ABMIL)
        method = create_method("packmil", pack_len=32, min_len=4, residual_loss="focal")
        return fit(model, method, bags[:20], bags[20:], config=config, num_classes=2)

    first, second = run(), run()
    assert first.history == second.history and len(first.history) == 2


def test_packed_batch_moves_with_its_residual():
    batch = _one_batch(PackMILMethod(pack_len=50, min_len=0), _tagged_bags([10, 20]))
    moved = batch.to("cpu")
    assert isinstance(moved, PackedBatch) and moved.residual is not None
    assert torch.equal(moved.pack_index, batch.pack_index) and torch.equal(moved.hyperslide_index, batch.hyperslide_index)


def test_bad_options_name_the_setting():
    with pytest.raises(TrainingConfigError, match="main_fraction"):
        PackMILMethod(main_fraction=1.0)
    with pytest.raises(TrainingConfigError, match="downsample"):
        PackMILMethod(downsample="learned")  # type: ignore[arg-type]
    with pytest.raises(TrainingConfigError, match="residual_loss"):
        PackMILMethod(residual_loss="nll")  # type: ignore[arg-type]
    with pytest.raises(TrainingConfigError, match="min_len"):
        PackMILMethod(pack_len=10, min_len=20)
    with pytest.raises(TrainingConfigError, match="adaptive_rule"):
        PackMILMethod(adaptive_rule="doubled")  # type: ignore[arg-type]
    assert isinstance(create_method("packmil"), PackMILMethod)


def test_example_config_builds_the_method():
    config = load_config(Path(__file__).resolve().parents[2] / "configs" / "train" / "packmil.yaml")
    assert config.method == "packmil"
    assert isinstance(create_method(config.method, **config.method_kwargs), PackMILMethod)


def test_learned_downsampler_groups_r_shuffled_tokens_into_one():
    torch.manual_seed(0)
    ads = AttentionDownsampler(6)
    tokens = torch.randn(10, 6, requires_grad=True)
    out = ads.grouped(tokens, 4)
    assert out.shape == (3, 6)  # ceil(10 / 4) mixed tokens
    out.sum().backward()
    assert tokens.grad is not None and all(p.grad is not None for p in ads.parameters())
    # the shuffle and the kept positions are random: same seed, same tokens; another seed, others
    torch.manual_seed(1)
    first = ads.grouped(tokens.detach(), 4)
    torch.manual_seed(1)
    again = ads.grouped(tokens.detach(), 4)
    torch.manual_seed(2)
    other = ads.grouped(tokens.detach(), 4)
    assert torch.equal(first, again) and not torch.allclose(first, other)
    per_token = ads(tokens.detach().unsqueeze(0))
    assert per_token.shape == (1, 10, 6)


def test_ads_steps_train_the_downsampler_and_serve_it(bag_factory):
    bags = bag_factory(12, dim=8, seed=2, min_size=20, max_size=40)
    torch.manual_seed(0)
    model = create_model("abmil", 8, 2, **SMALL_ABMIL)
    method = create_method("packmil", pack_len=64, min_len=2, downsample="ads", downsample_ratio=4)
    method.attach(model, total_steps=1)
    (downsampler,) = method.extra_modules()
    batch = next(iter(method.make_batches(bags, batch_size=4, generator=torch.Generator().manual_seed(0))))
    result = method.compute_loss(model.train(), batch, progress=0.0)
    # long kept parts shrink by r before the model sees them
    assert result.terms["main_tokens"] <= sum(math.ceil(len(b.features) * 0.5 / 4) for b in bags[:4])
    result.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in downsampler.parameters())
    served = method.inference_model(model)
    assert isinstance(served, PackMILDownsampled) and served.downsampler is downsampler
    name, kwargs = method.served_model_spec("abmil", SMALL_ABMIL)
    rebuilt = create_model(name, 8, 2, **kwargs)
    rebuilt.load_state_dict(served.state_dict())
    x = bags[0].features.unsqueeze(0)
    torch.testing.assert_close(rebuilt.eval()(x).logits, served.eval()(x).logits)


def test_train_cohort_with_ads_writes_a_card_that_rebuilds_the_served_model(write_cohort, tmp_path):
    cohort = write_cohort(num_bags=16)
    config = cohort.config(method="packmil", batch_size=4,
                           method_kwargs={"pack_len": 64, "min_len": 2, "downsample": "ads", "downsample_ratio": 2})
    run = tmp_path / "run"
    train_cohort(config, run)
    card = read_model_card(run / "fold_0" / "model_card.json")
    assert card.model_name == "packmil_ads" and card.model_kwargs["base"] == "abmil"
    loaded = load_model(run, fold=0)
    assert isinstance(loaded.model, PackMILDownsampled)
    prediction = predict_features(next(cohort.features_dir.iterdir()), loaded).prediction
    assert prediction.num_tiles > 0
