"""R²T-MIL: grid folding, EPEG, masking of the grid padding, padded batches, large-bag regions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import wsi_mil.models.r2t_mil as r2t
from wsi_mil.errors import ModelConfigError
from wsi_mil.models import create_model
from wsi_mil.models.r2t_mil import (
    R2TMIL,
    CrossRegionAttention,
    RegionAttention,
    grid_layout,
)

IN_DIM = 24
SMALL = {"hidden_dim": 16, "attention_dim": 8, "num_heads": 4, "crmsa_heads": 2, "epeg_kernel": 3}


def build(**options: object) -> R2TMIL:
    torch.manual_seed(0)
    return create_model("r2t_mil", IN_DIM, 3, **{**SMALL, **options})


@pytest.mark.parametrize(
    ("length", "side", "region_side"),
    [(1, 8, 1), (100, 16, 2), (9000, 96, 12), (200_000, 448, 56)],  # the spec's worked sizes
)
def test_grid_layout_follows_the_official_padding(length: int, side: int, region_side: int) -> None:
    layout = grid_layout(length, region_num=8, region_size=0)
    assert (layout.side, layout.region_side, layout.regions_per_side) == (side, region_side, 8)


def test_fixed_region_size_layout() -> None:
    layout = grid_layout(200_000, region_num=8, region_size=12)
    assert (layout.side, layout.region_side, layout.regions_per_side) == (456, 12, 38)


def test_regions_are_row_major_windows_and_fold_back() -> None:
    layout = grid_layout(100, region_num=8, region_size=0)  # 16 x 16 grid, 2 x 2 regions
    tokens = torch.arange(100, dtype=torch.float32).unsqueeze(-1)
    regions = layout.to_regions(tokens)
    assert regions.shape == (64, 4, 1)
    assert regions[0, :, 0].tolist() == [0, 1, 16, 17]
    assert regions[1, :, 0].tolist() == [2, 3, 18, 19]
    torch.testing.assert_close(layout.from_regions(regions), tokens)
    valid = layout.valid_cells(torch.device("cpu"))
    assert valid.sum() == 100 and valid[0].all() and not valid[-1].any()


def test_epeg_on_queries_equals_the_official_convolution_of_the_logits() -> None:
    """softmax(A + conv(A) + b) v with A = q kᵀ/√d == attention with queries q + conv(q)."""
    torch.manual_seed(0)
    attention = RegionAttention(16, num_heads=4, epeg_kernel=5, dropout=0.0)
    regions = torch.randn(3, 9, 16)
    bias = torch.randn(4)  # the official conv has a bias; it is constant along each softmax row
    with torch.no_grad():
        q, k, v = attention.qkv(regions).view(3, 9, 3, 4, 4).permute(2, 0, 3, 1, 4)
        logits = (q * 4**-0.5) @ k.transpose(-2, -1)
        logits = logits + F.conv2d(logits, attention.epeg.weight, bias, padding=(2, 0), groups=4)
        expected = (logits.softmax(dim=-1) @ v).transpose(1, 2).reshape(3, 9, 16)
        torch.testing.assert_close(attention(regions, None), attention.proj(expected), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("module", ["rmsa", "crmsa"])
def test_grid_padding_cells_cannot_influence_valid_tokens(module: str) -> None:
    torch.manual_seed(0)
    if module == "rmsa":
        attention = RegionAttention(16, num_heads=4, epeg_kernel=5, dropout=0.0)
    else:
        attention = CrossRegionAttention(16, num_heads=2, num_slots=3, slot_mlp=False, dropout=0.0)
    layout = grid_layout(70, region_num=4, region_size=0)  # 12 x 12 grid, 74 padding cells
    valid = layout.valid_cells(torch.device("cpu"))
    regions = layout.to_regions(torch.randn(70, 16))
    noisy = torch.where(valid.unsqueeze(-1), regions, 100.0 * torch.randn_like(regions))
    with torch.no_grad():
        clean, dirty = attention(regions, valid), attention(noisy, valid)
        torch.testing.assert_close(dirty[valid], clean[valid], atol=1e-5, rtol=1e-5)
        unmasked = attention(regions, None)  # the official computation attends to the padding
    assert (unmasked[valid] - clean[valid]).abs().max() > 1e-4


def test_region_chunking_does_not_change_the_result(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    attention = RegionAttention(16, num_heads=4, epeg_kernel=5, dropout=0.0)
    regions = torch.randn(10, 9, 16)
    valid = torch.rand(10, 9) > 0.3
    with torch.no_grad():
        whole = attention(regions, valid)
        monkeypatch.setattr(r2t, "_LOGITS_PER_CHUNK", 4 * 81 * 3)  # 3 regions per chunk
        torch.testing.assert_close(attention(regions, valid), whole, atol=1e-6, rtol=1e-6)


def test_padded_batch_equals_bags_alone(padded_batch) -> None:
    model = build().eval()
    bags, x, mask = padded_batch([7, 1, 12, 90], IN_DIM)
    with torch.no_grad():
        batched = model(x, mask)
        for i, bag in enumerate(bags):
            alone = model(bag.unsqueeze(0))
            n = len(bag)
            torch.testing.assert_close(batched.logits[i], alone.logits[0], atol=1e-5, rtol=0)
            torch.testing.assert_close(batched.attention[i, :n], alone.attention[0], atol=1e-5, rtol=0)
            assert (batched.attention[i, n:] == 0).all()
            assert (batched.maps["attention_logits"][i, :, n:] == 0).all()


def test_padding_between_instances_is_skipped_in_stored_order() -> None:
    model = build(region_num=2).eval()
    bag = torch.randn(6, IN_DIM)
    positions = torch.tensor([0, 2, 3, 6, 8, 9])
    x = 100.0 * torch.randn(1, 10, IN_DIM)
    x[0, positions] = bag
    mask = torch.zeros(1, 10, dtype=torch.bool)
    mask[0, positions] = True
    with torch.no_grad():
        holes, alone = model(x, mask), model(bag.unsqueeze(0))
    torch.testing.assert_close(holes.logits, alone.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(holes.attention[0, positions], alone.attention[0], atol=1e-5, rtol=0)


def test_masking_changes_small_bags_and_can_be_turned_off() -> None:
    """Small bags are mostly grid padding: the official unmasked computation gives other logits."""
    bag = torch.randn(1, 100, IN_DIM)  # 16 x 16 grid: 156 padding cells
    with torch.no_grad():
        masked = build().eval()(bag).logits
        official = build(mask_grid_padding=False).eval()(bag).logits
    assert (masked - official).abs().max() > 1e-4


def test_instance_order_changes_the_output_once_regions_hold_several_instances() -> None:
    model = build().eval()
    bag = torch.randn(1, 100, IN_DIM)  # 2 x 2 regions
    order = torch.randperm(100, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out, shuffled = model(bag), model(bag[:, order])
    assert not model.permutation_invariant
    assert (out.logits - shuffled.logits).abs().max() > 1e-4


def test_tiny_bags_are_permutation_invariant_as_documented() -> None:
    """N ≤ 64 with 8 x 8 regions: one instance per region, no neighbour to see."""
    model = build().eval()
    bag = torch.randn(1, 9, IN_DIM)
    order = torch.randperm(9, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out, shuffled = model(bag), model(bag[:, order])
    torch.testing.assert_close(out.logits, shuffled.logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("length", [1, 2, 10, 70])
def test_single_and_non_square_bags(length: int) -> None:
    model = build().eval()
    with torch.no_grad():
        out = model(torch.randn(2, length, IN_DIM))
    assert out.logits.shape == (2, 3) and torch.isfinite(out.logits).all()
    torch.testing.assert_close(out.attention.sum(dim=1), torch.ones(2))


def test_large_bags_switch_to_fixed_region_size(padded_batch) -> None:
    model = build(large_bag_threshold=2000, large_bag_region_size=12).eval()
    assert model.encoder.rmsa_layout(2000).regions_per_side == 8
    layout = model.encoder.rmsa_layout(3000)
    assert (layout.side, layout.region_side) == (60, 12)
    bags, x, mask = padded_batch([3000, 1500], IN_DIM)
    with torch.no_grad():
        out = model(x, mask)
        alone = model(bags[0].unsqueeze(0))
    assert torch.isfinite(out.logits).all()
    torch.testing.assert_close(out.attention.sum(dim=1), torch.ones(2))
    torch.testing.assert_close(out.logits[0], alone.logits[0], atol=1e-5, rtol=0)


def test_training_step_reaches_every_parameter_and_bf16_forward_is_finite(padded_batch) -> None:
    for options in ({}, {"crmsa_mlp": True, "all_shortcut": True, "crmsa_k": 1}):
        model = build(**options).train()
        _, x, mask = padded_batch([30, 3], IN_DIM)
        model(x, mask).logits.sum().backward()
        for name, param in model.named_parameters():
            assert param.grad is not None and torch.isfinite(param.grad).all(), name
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, mask)
    assert torch.isfinite(out.logits.float()).all() and torch.isfinite(out.attention.float()).all()
    with torch.no_grad():
        first, second = model(x, mask), model(x, mask)
    assert torch.equal(first.logits, second.logits)


def test_official_parameter_count() -> None:
    """D = 1024, C = 2: the official 2 697 474 parameters minus the 8 EPEG conv biases."""
    model = create_model("r2t_mil", 1024, 2)
    assert sum(p.numel() for p in model.parameters()) == 2_697_474 - 8


@pytest.mark.parametrize(
    ("option", "value"),
    [("num_heads", 5), ("epeg_kernel", 4), ("attention_activation", "softplus"), ("crmsa_k", 0)],
)
def test_bad_options_name_the_option(option: str, value: object) -> None:
    with pytest.raises(ModelConfigError, match=option):
        build(**{option: value})
