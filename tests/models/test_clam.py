"""CLAM-SB/MB: bag heads, instance selection with k clamped to the bag, the clustering loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from wsi_mil.errors import ModelConfigError
from wsi_mil.models import create_model
from wsi_mil.models.clam import CLAM, smooth_top1_svm_loss


def small_clam(multi_branch: bool, **options: object) -> CLAM:
    torch.manual_seed(0)
    defaults: dict[str, object] = {"hidden_dim": 12, "attention_dim": 6, "k_sample": 4}
    return CLAM(10, 3, multi_branch=multi_branch, **{**defaults, **options}).eval()  # type: ignore[arg-type]


def projected(model: CLAM, x: torch.Tensor) -> torch.Tensor:
    return model.projection(x)


def instance_classifier(model: CLAM, c: int, h: torch.Tensor) -> torch.Tensor:
    """Logits of the official `instance_classifiers[c]` (Linear(H→2)) for instances `h`."""
    weight = model.instance_classifiers.weight[2 * c : 2 * c + 2]
    bias = model.instance_classifiers.bias[2 * c : 2 * c + 2]
    return h @ weight.T + bias


def test_registered_defaults_follow_clam() -> None:
    sb = create_model("clam_sb", 1024, 2)
    mb = create_model("clam_mb", 1024, 4)
    assert sb.k_sample == 8 and sb.bag_weight == 0.7 and sb.instance_loss == "ce"
    assert sb.attention.score.out_features == 1 and mb.attention.score.out_features == 4
    assert sb.attention.value[0].out_features == 256 and sb.attention.gate is not None
    assert mb.instance_classifiers.out_features == 2 * 4


def test_multi_branch_logit_c_classifies_the_feature_pooled_by_branch_c() -> None:
    model = small_clam(True)
    x = torch.randn(1, 9, 10)
    with torch.no_grad():
        out = model(x)
        h = projected(model, x)[0]
        weights = out.maps["branch_attention"][0]  # [C, N]
        expected = torch.stack(
            [
                weights[c] @ h @ model.classifier.weight[c] + model.classifier.bias[c]
                for c in range(3)
            ]
        )
    torch.testing.assert_close(out.logits[0], expected)
    torch.testing.assert_close(weights, torch.softmax(out.maps["attention_logits"][0], dim=-1))
    torch.testing.assert_close(out.attention[0], weights[out.logits[0].argmax()])


@pytest.mark.parametrize(
    ("num_instances", "k_top", "k_bottom"),
    [(20, 4, 4), (6, 3, 3), (5, 3, 2), (3, 2, 1), (1, 1, 0)],
)
def test_top_and_bottom_sets_are_clamped_and_disjoint(
    num_instances: int, k_top: int, k_bottom: int
) -> None:
    model = small_clam(False)  # k_sample = 4
    x = torch.randn(1, num_instances, 10)
    with torch.no_grad():
        out = model(x)
        h = projected(model, x)[0]
    assert int(out.extras["instance_top_valid"].sum()) == k_top
    assert int(out.extras["instance_bottom_valid"].sum()) == k_bottom
    order = out.maps["attention_logits"][0, 0].argsort(descending=True)
    top_ids, bottom_ids = order[:k_top], order.flip(0)[:k_bottom]
    assert not set(top_ids.tolist()) & set(bottom_ids.tolist())
    for c in range(3):
        torch.testing.assert_close(
            out.extras["instance_top_logits"][0, c, :k_top],
            instance_classifier(model, c, h[top_ids]),
        )
        torch.testing.assert_close(
            out.extras["instance_bottom_logits"][0, c, :k_bottom],
            instance_classifier(model, c, h[bottom_ids]),
        )


def official_instance_loss(
    model: CLAM, x: torch.Tensor, label: int, *, subtyping: bool
) -> torch.Tensor:
    """CLAM's `inst_eval` / `inst_eval_out` for one bag with N ≥ 2·k_sample (no clamping needed)."""
    h = projected(model, x)[0]
    scores = model.attention(h.unsqueeze(0))[0]  # [K, N]
    k = model.k_sample
    total = torch.zeros(())
    for c in range(model.num_classes):
        branch = scores[c] if model.multi_branch else scores[0]
        top = h[branch.topk(k).indices]
        if c == label:
            bottom = h[(-branch).topk(k).indices]
            logits = instance_classifier(model, c, torch.cat([top, bottom]))
            targets = torch.cat([torch.ones(k), torch.zeros(k)]).long()
            total = total + F.cross_entropy(logits, targets)
        elif subtyping:
            total = total + F.cross_entropy(
                instance_classifier(model, c, top), torch.zeros(k).long()
            )
    return total / model.num_classes if subtyping else total


@pytest.mark.parametrize("multi_branch", [False, True])
@pytest.mark.parametrize("subtyping", [False, True])
def test_instance_loss_matches_the_official_formula(multi_branch: bool, subtyping: bool) -> None:
    model = small_clam(multi_branch, subtyping=subtyping)
    x = torch.randn(1, 15, 10)
    with torch.no_grad():
        loss = model.aux_losses(model(x), torch.tensor([2]))["instance_clustering"]
        expected = official_instance_loss(model, x, 2, subtyping=subtyping)
    torch.testing.assert_close(loss, (0.3 / 0.7) * expected)


@pytest.mark.parametrize("num_instances", [1, 2, 5])
def test_instance_loss_with_k_larger_than_the_bag(num_instances: int) -> None:
    model = small_clam(False, k_sample=8)
    x = torch.randn(1, num_instances, 10)
    with torch.no_grad():
        out = model(x)
        loss = model.aux_losses(out, torch.tensor([1]))["instance_clustering"]
        h = projected(model, x)[0]
        order = out.maps["attention_logits"][0, 0].argsort(descending=True)
        k_top, k_bottom = (num_instances + 1) // 2, num_instances // 2
        logits = instance_classifier(
            model, 1, torch.cat([h[order[:k_top]], h[order.flip(0)[:k_bottom]]])
        )
        targets = torch.cat([torch.ones(k_top), torch.zeros(k_bottom)]).long()
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, (0.3 / 0.7) * F.cross_entropy(logits, targets))


def test_instance_loss_of_a_padded_batch_is_the_mean_over_bags() -> None:
    model = small_clam(True, subtyping=True)
    lengths, labels = [12, 3, 7], torch.tensor([0, 2, 1])
    bags = [torch.randn(n, 10) for n in lengths]
    x = torch.full((3, 12, 10), 30.0)
    mask = torch.zeros(3, 12, dtype=torch.bool)
    for i, bag in enumerate(bags):
        x[i, : len(bag)], mask[i, : len(bag)] = bag, True
    with torch.no_grad():
        batched = model.aux_losses(model(x, mask), labels)["instance_clustering"]
        alone = [
            model.aux_losses(model(bag[None]), labels[i : i + 1])["instance_clustering"]
            for i, bag in enumerate(bags)
        ]
    torch.testing.assert_close(batched, torch.stack(alone).mean())


def test_without_subtyping_only_the_true_class_instance_classifier_learns() -> None:
    model = small_clam(False).train()
    out = model(torch.randn(2, 10, 10))
    model.aux_losses(out, torch.tensor([1, 1]))["instance_clustering"].backward()
    grad = model.instance_classifiers.weight.grad.view(3, 2, -1)  # classifier c = rows 2c, 2c+1
    assert grad[1].abs().sum() > 0
    assert grad[0].abs().sum() == 0 and grad[2].abs().sum() == 0


def test_smooth_top1_svm_loss() -> None:
    logits = torch.tensor([[2.0, -1.0], [0.3, 0.1], [-50.0, 50.0]])
    target = torch.tensor([0, 1, 0])
    loss = smooth_top1_svm_loss(logits, target)
    margin = 1.0 - F.one_hot(target, 2).float()
    expected = torch.logsumexp(logits + margin, dim=1) - logits.gather(1, target[:, None])[:, 0]
    torch.testing.assert_close(loss, expected)
    hard = (logits + margin).max(dim=1).values - logits.gather(1, target[:, None])[:, 0]
    assert (loss >= hard).all() and (loss - hard <= torch.log(torch.tensor(2.0))).all()


def test_svm_instance_loss_option() -> None:
    model = small_clam(False, instance_loss="svm")
    with torch.no_grad():
        loss = model.aux_losses(model(torch.randn(1, 9, 10)), torch.tensor([0]))
    assert torch.isfinite(loss["instance_clustering"]) and loss["instance_clustering"] > 0


def test_bag_weight_one_switches_the_instance_loss_off() -> None:
    model = small_clam(False, bag_weight=1.0)
    with torch.no_grad():
        loss = model.aux_losses(model(torch.randn(1, 9, 10)), torch.tensor([0]))
    assert loss["instance_clustering"] == 0


@pytest.mark.parametrize(
    "options", [{"k_sample": 0}, {"bag_weight": 0.0}, {"instance_loss": "hinge"}]
)
def test_invalid_options_raise_a_config_error_naming_the_option(options: dict[str, object]) -> None:
    with pytest.raises(ModelConfigError, match=next(iter(options))):
        create_model("clam_sb", 8, 2, **options)
