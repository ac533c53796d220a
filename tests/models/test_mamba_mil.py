"""MambaMIL: SR-Mamba reordering, padding handling, order dependence, official sizes and init."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from wsi_mil.errors import ModelConfigError
from wsi_mil.models import create_model
from wsi_mil.models.mamba_mil import MambaMIL, ScanBranch, SRMamba, reorder_indices

IN_DIM = 24
SMALL = {"hidden_dim": 16, "attention_dim": 8, "state_dim": 4}


def build(**options: object) -> MambaMIL:
    torch.manual_seed(0)
    return create_model("mamba_mil", IN_DIM, 3, **{**SMALL, **options})


def official_reorder(sequence: torch.Tensor, rate: int) -> torch.Tensor:
    """The official SR transpose: zero-pad `[L, C]` to a multiple of R, `(k w) -> (w k)`."""
    length = sequence.shape[0]
    rows = -(-length // rate)
    padded = F.pad(sequence, (0, 0, 0, rows * rate - length))
    return padded.view(rows, rate, -1).transpose(0, 1).reshape(rows * rate, -1)


@pytest.mark.parametrize("length", [1, 4, 5, 6, 23, 25])
@pytest.mark.parametrize("rate", [1, 5, 10])
def test_reorder_indices_match_the_official_transpose(length: int, rate: int) -> None:
    sequence = torch.arange(1, length + 1, dtype=torch.float32).unsqueeze(-1)  # 0 = padding
    expected = official_reorder(sequence, rate)
    gather, inverse = reorder_indices(torch.tensor([length]), length, rate)
    padded = torch.cat([sequence, torch.zeros(1, 1)])
    torch.testing.assert_close(padded[gather[0]], expected)
    torch.testing.assert_close(expected[inverse[0]], sequence)  # inverse puts every instance back


def test_reorder_indices_of_a_batch_pad_each_bag_with_its_own_length() -> None:
    lengths = torch.tensor([7, 10, 1])
    gather, inverse = reorder_indices(lengths, 10, 5)
    for b, length in enumerate(lengths.tolist()):
        sequence = torch.arange(1, length + 1, dtype=torch.float32).unsqueeze(-1)
        expected = official_reorder(sequence, 5)
        padded = torch.cat([sequence, torch.zeros(10 - length + 1, 1)])
        reordered = padded[gather[b]]
        torch.testing.assert_close(reordered[: len(expected)], expected)
        assert (reordered[len(expected) :] == 0).all()  # identity padding after the bag's own
        assert (inverse[b, length:] == 0).all()


def test_srmamba_equals_the_official_single_bag_computation() -> None:
    torch.manual_seed(0)
    mixer = SRMamba(8, rate=3, state_dim=4)
    h = torch.randn(1, 11, 8)
    with torch.no_grad():
        x, z = mixer.in_proj(h).chunk(2, dim=-1)
        y_forward = mixer.forward_branch(x)
        reordered = official_reorder(torch.cat([x, z], dim=-1)[0], 3)  # zeros AFTER in_proj
        x_r, z_r = reordered.chunk(2, dim=-1)
        y_r = mixer.reordered_branch(x_r.unsqueeze(0))[0] * F.silu(z_r)
        rows = y_r.shape[0] // 3
        y_r = y_r.view(3, rows, -1).transpose(0, 1).reshape(-1, y_r.shape[-1])[:11]
        expected = mixer.out_proj(y_forward * F.silu(z) + y_r)
        actual = mixer(h, torch.tensor([11]))
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-5)


def test_scan_branch_is_causal() -> None:
    """Changing later positions never changes earlier outputs (why right padding is harmless)."""
    torch.manual_seed(0)
    branch = ScanBranch(8, state_dim=4, conv_kernel=4, dt_rank=2)
    x = torch.randn(1, 20, 8)
    changed = x.clone()
    changed[:, 12:] = 1e3 * torch.randn(1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(branch(changed)[:, :12], branch(x)[:, :12])
        assert (branch(changed)[:, 12:] - branch(x)[:, 12:]).abs().max() > 1e-3


def test_padding_between_instances_is_skipped_in_stored_order() -> None:
    """A mask with holes: the valid instances, in their order, form the bag."""
    model = build(rate=2).eval()
    bag = torch.randn(6, IN_DIM)
    positions = torch.tensor([1, 2, 5, 6, 8, 9])
    x = 100.0 * torch.randn(1, 10, IN_DIM)
    x[0, positions] = bag
    mask = torch.zeros(1, 10, dtype=torch.bool)
    mask[0, positions] = True
    with torch.no_grad():
        holes, alone = model(x, mask), model(bag.unsqueeze(0))
    torch.testing.assert_close(holes.logits, alone.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(holes.attention[0, positions], alone.attention[0], atol=1e-5, rtol=0)
    assert (holes.attention[0, ~mask[0]] == 0).all()


def test_both_branches_shape_the_output() -> None:
    """The reordered branch is live: zeroing its skip and input changes the logits."""
    model = build(rate=4).eval()
    bag = torch.randn(1, 17, IN_DIM)
    with torch.no_grad():
        before = model(bag).logits
        for block in model.blocks:
            block.mixer.reordered_branch.D.zero_()
            block.mixer.reordered_branch.x_proj.weight.zero_()
        assert (model(bag).logits - before).abs().max() > 1e-4


def test_official_parameter_count_and_init() -> None:
    """D = 1024, C = 2: 4 227 843 parameters, as the official model; dt bias zeroed by xavier re-init."""
    torch.manual_seed(0)
    model = create_model("mamba_mil", 1024, 2)
    assert sum(p.numel() for p in model.parameters()) == 4_227_843
    branch = model.blocks[0].mixer.forward_branch
    assert (branch.dt_proj.bias == 0).all()
    torch.testing.assert_close(-torch.exp(branch.A_log[0]), -torch.arange(1.0, 17.0))
    assert (branch.D == 1).all()


def test_mamba_init_keeps_the_mamba_step_size_range() -> None:
    model = build(mamba_init=True)
    dt = F.softplus(model.blocks[0].mixer.forward_branch.dt_proj.bias)
    assert dt.min() >= 1e-4 - 1e-7 and dt.max() <= 0.1 + 1e-6


@pytest.mark.parametrize(("option", "value"), [("activation", "swish"), ("rate", 0)])
def test_bad_options_name_the_option(option: str, value: object) -> None:
    with pytest.raises(ModelConfigError, match=option):
        build(**{option: value})
