"""The forward contract, checked for every registered model (parametrised over `list_models()`)."""

from __future__ import annotations

import pytest
import torch

from wsi_mil.models import MILModel, MILOutput, create_model, list_models, model_entry

IN_DIM = 32
NUM_CLASSES = 2
TOLERANCE = 1e-5

#: Small sizes per model so that the whole contract suite stays fast on CPU.
SMALL_OVERRIDES: dict[str, dict[str, object]] = {
    "abmil": {"hidden_dim": 16, "attention_dim": 8},
    "abmil_plain": {"hidden_dim": 16, "attention_dim": 8},
    "abmil_ilse": {"hidden_dim": 16, "attention_dim": 8},
    "clam_sb": {"hidden_dim": 16, "attention_dim": 8, "k_sample": 3, "subtyping": True},
    "clam_mb": {"hidden_dim": 16, "attention_dim": 8, "k_sample": 3, "subtyping": True},
    "dsmil": {"query_dim": 8, "passing_v": True},
    "transmil": {"hidden_dim": 16, "num_heads": 4, "num_landmarks": 8},
    # region_num=2: with 8x8 regions a 9-instance bag has one instance per region and R2T would be
    # permutation invariant, so the order-dependence check could not see the order
    "r2t_mil": {"hidden_dim": 16, "attention_dim": 8, "num_heads": 4, "crmsa_heads": 2, "epeg_kernel": 3, "region_num": 2},
    "mamba_mil": {"hidden_dim": 16, "attention_dim": 8, "state_dim": 4},
    "acmil": {"hidden_dim": 16, "attention_dim": 8, "num_branches": 3, "mask_top_k": 4},
    "ins": {"hidden_dim": 16},
}

#: Parameters that may legitimately get no gradient from one training step on a batch whose
#: labels cover every class, with the reason. Keys: model name -> parameter-name prefix -> reason.
#: Every other trainable parameter must receive a finite gradient.
PARAMETERS_WITHOUT_GRADIENT: dict[str, dict[str, str]] = {}

MODEL_NAMES = list_models()


def build(name: str, **overrides: object) -> MILModel:
    torch.manual_seed(0)
    options = {**SMALL_OVERRIDES.get(name, {}), **overrides}
    return create_model(name, IN_DIM, NUM_CLASSES, **options)




def targets_for(batch: int) -> torch.Tensor:
    """Labels that cover every class: 0, 1, ..., C-1, 0, ..."""
    return torch.arange(batch) % NUM_CLASSES


def is_softmax_attention(model: MILModel) -> bool:
    return model.softmax_attention


def instance_maps(output: MILOutput) -> dict[str, torch.Tensor]:
    """Every per-instance tensor of an output, instance axis last: attention, maps, instance logits."""
    maps = {"attention": output.attention, **{f"maps.{k}": v for k, v in output.maps.items()}}
    if output.instance_logits is not None:
        maps["instance_logits"] = output.instance_logits.transpose(1, 2)  # [B, C, N]
    if output.instance_scores is not None:
        maps["instance_scores"] = output.instance_scores
    if output.instance_contributions is not None:
        maps["instance_contributions"] = output.instance_contributions.transpose(1, 2)  # [B, C, N]
    return maps


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_entrypoint_has_summary_and_keyword_defaults(name: str) -> None:
    entry = model_entry(name)
    assert entry.summary, f"{name}: entrypoint needs a docstring whose first line is the summary"
    assert all(isinstance(v, (int, float, str, bool, type(None))) for v in entry.defaults.values())


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_output_types_and_shapes(name: str, padded_batch) -> None:
    model = build(name).eval()
    _, x, mask = padded_batch([7, 4], IN_DIM)
    with torch.no_grad():
        out = model(x, mask)
    batch, num_instances = mask.shape
    assert isinstance(out, MILOutput)
    assert out.logits.shape == (batch, NUM_CLASSES)
    assert out.attention.shape == (batch, num_instances)
    assert (out.attention >= 0).all()
    for key, value in out.maps.items():
        assert value.shape[0] == batch and value.shape[-1] == num_instances, key
        assert value.dim() in (2, 3), key
    if out.embedding is not None:
        assert out.embedding.dim() == 2 and out.embedding.shape[0] == batch
    if out.instance_logits is not None:
        assert out.instance_logits.shape == (batch, num_instances, NUM_CLASSES)
    if out.instance_contributions is not None:
        assert out.instance_contributions.shape == (batch, num_instances, NUM_CLASSES)
    if out.instance_scores is not None:
        assert out.instance_scores.shape == (batch, num_instances)
        assert ((out.instance_scores >= 0) & (out.instance_scores <= 1)).all()
    for key, value in out.extras.items():
        assert value.shape[0] == batch, key
    losses = {**out.aux_losses, **model.aux_losses(out, targets_for(batch))}
    for key, value in losses.items():
        assert value.dim() == 0 and torch.isfinite(value), key


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_padding_invariance(name: str, padded_batch) -> None:
    model = build(name).eval()
    bags, x, mask = padded_batch([7, 1, 12], IN_DIM)
    with torch.no_grad():
        batched = model(x, mask)
        for i, bag in enumerate(bags):
            alone = model(bag.unsqueeze(0))
            n = len(bag)
            torch.testing.assert_close(
                batched.logits[i], alone.logits[0], atol=TOLERANCE, rtol=0, msg=f"{name} logits"
            )
            if batched.embedding is not None and alone.embedding is not None:
                torch.testing.assert_close(
                    batched.embedding[i], alone.embedding[0], atol=TOLERANCE, rtol=0
                )
            alone_maps = instance_maps(alone)
            for key, value in instance_maps(batched).items():
                torch.testing.assert_close(
                    value[i, ..., :n], alone_maps[key][0], atol=TOLERANCE, rtol=0, msg=key
                )
                padding = value[i, ..., n:]
                assert (padding == 0).all(), f"{name}: {key} is not zero on padding"


#: models that pool by attention into a linear head: their `instance_contributions` split the
#: logits exactly, `logits = Σ_n instance_contributions + classifier bias`
ADDITIVE_CONTRIBUTIONS = ["abmil", "abmil_plain", "abmil_ilse", "clam_sb", "clam_mb", "acmil", "r2t_mil", "mamba_mil"]


@pytest.mark.parametrize("name", ADDITIVE_CONTRIBUTIONS)
def test_instance_contributions_add_up_to_the_logits(name: str, padded_batch) -> None:
    model = build(name).train()  # train mode: the split must hold for the pass that made it (dropout on)
    _, x, mask = padded_batch([7, 1, 12], IN_DIM)
    with torch.no_grad():
        out = model(x, mask)
    assert out.instance_contributions is not None
    total = out.instance_contributions.sum(dim=1) + model.classifier.bias
    torch.testing.assert_close(total, out.logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_permutation_invariance_or_documented_order_dependence(name: str) -> None:
    model = build(name).eval()
    bag = torch.randn(1, 9, IN_DIM, generator=torch.Generator().manual_seed(3))
    order = torch.randperm(9, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = model(bag)
        shuffled = model(bag[:, order])
    if model.permutation_invariant:
        torch.testing.assert_close(shuffled.logits, out.logits, atol=TOLERANCE, rtol=0)
        torch.testing.assert_close(
            shuffled.attention, out.attention[:, order], atol=TOLERANCE, rtol=0
        )
    else:
        # Order-dependent by design (positional layers): reordering the bag changes the output.
        assert (shuffled.logits - out.logits).abs().max() > 1e-4


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_single_instance_bag(name: str) -> None:
    model = build(name).eval()
    x = torch.randn(2, 1, IN_DIM)
    with torch.no_grad():
        out = model(x)
    assert torch.isfinite(out.logits).all()
    if is_softmax_attention(model):
        torch.testing.assert_close(out.attention, torch.ones(2, 1))
    losses = {**out.aux_losses, **model.aux_losses(out, targets_for(2))}
    assert all(torch.isfinite(v) for v in losses.values())


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_gradients_reach_every_trainable_parameter(name: str, padded_batch) -> None:
    model = build(name).train()
    _, x, mask = padded_batch([9, 3, 6], IN_DIM)
    torch.manual_seed(1)
    out = model(x, mask)
    loss = out.logits.sum() + sum(out.aux_losses.values(), torch.zeros(()))
    loss = loss + sum(model.aux_losses(out, targets_for(3)).values(), torch.zeros(()))
    loss.backward()
    allowed = PARAMETERS_WITHOUT_GRADIENT.get(name, {})
    for param_name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        exempt = [prefix for prefix in allowed if param_name.startswith(prefix)]
        if param.grad is None:
            assert exempt, f"{name}: {param_name} got no gradient and is not listed as exempt"
            continue
        assert torch.isfinite(param.grad).all(), f"{name}: non-finite gradient in {param_name}"


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_eval_is_deterministic(name: str, padded_batch) -> None:
    model = build(name).eval()
    _, x, mask = padded_batch([8, 5], IN_DIM)
    with torch.no_grad():
        first, second = model(x, mask), model(x, mask)
    assert torch.equal(first.logits, second.logits)
    assert torch.equal(first.attention, second.attention)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_bf16_autocast_forward_is_finite(name: str, padded_batch) -> None:
    model = build(name).eval()
    _, x, mask = padded_batch([10, 3], IN_DIM)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, mask)
        losses = {**out.aux_losses, **model.aux_losses(out, targets_for(2))}
    assert torch.isfinite(out.logits.float()).all()
    assert torch.isfinite(out.attention.float()).all()
    assert all(torch.isfinite(v.float()) for v in losses.values())


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_softmax_attention_sums_to_one_over_valid_instances(name: str, padded_batch) -> None:
    model = build(name)
    if not is_softmax_attention(model):
        pytest.skip(f"{name} declares softmax_attention = False")
    _, x, mask = padded_batch([11, 2, 6], IN_DIM)
    for training in (False, True):
        model.train(training)
        with torch.no_grad():
            out = model(x, mask)
        torch.testing.assert_close(out.attention.sum(dim=1), torch.ones(3), atol=1e-5, rtol=0)
        assert (out.attention[~mask] == 0).all()
