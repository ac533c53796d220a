"""TransMIL: masked Nyström attention, the official square fill + PPEG layout, the cls attention."""

from __future__ import annotations

import math

import pytest
import torch

from wsi_mil.models import create_model
from wsi_mil.models.transmil import MaskedNystromAttention, TransMIL, newton_schulz_pinv

HIDDEN = 16


def small_transmil(**options: object) -> TransMIL:
    torch.manual_seed(0)
    defaults: dict[str, object] = {"hidden_dim": HIDDEN, "num_heads": 4, "num_landmarks": 8}
    return TransMIL(12, 3, **{**defaults, **options}).eval()  # type: ignore[arg-type]


def official_forward(model: TransMIL, x: torch.Tensor) -> torch.Tensor:
    """The official single-bag forward (wrap-around fill, cls first, row-major PPEG grid)."""
    h = model.projection(x)  # [1, N, E]
    num_instances = h.shape[1]
    side = math.ceil(math.sqrt(num_instances))
    h = torch.cat([h, h[:, : side * side - num_instances]], dim=1)
    h = torch.cat([model.cls_token, h], dim=1)
    everything = torch.ones(h.shape[:2], dtype=torch.bool)
    h = h + model.layer1.attention(model.layer1.norm(h), everything)[0]
    cls, tokens = h[:, :1], h[:, 1:]
    grid = tokens.transpose(1, 2).reshape(1, HIDDEN, side, side)
    ppeg = model.ppeg
    grid = ppeg.conv7(grid) + grid + ppeg.conv5(grid) + ppeg.conv3(grid)
    h = torch.cat([cls, grid.flatten(2).transpose(1, 2)], dim=1)
    h = h + model.layer2.attention(model.layer2.norm(h), everything)[0]
    return model.classifier(model.norm(h)[:, 0])


def test_default_parameter_count_equals_the_official_model() -> None:
    model = create_model("transmil", 1024, 2)
    # fc1 524,800 + cls 512 + 2 layers × (LN 1,024 + qkv 786,432 + out 262,656 + value conv 264)
    # + PPEG (25,600 + 13,312 + 5,120) + LN 1,024 + fc2 1,026
    assert sum(p.numel() for p in model.parameters()) == 2_672_146
    assert model.layer1.attention.num_landmarks == 256 and model.layer1.attention.num_heads == 8


def test_pseudo_inverse_converges_and_is_computed_per_bag() -> None:
    torch.manual_seed(0)
    matrix = torch.softmax(3.0 * torch.randn(2, 3, 6, 6), dim=-1)
    inverse = newton_schulz_pinv(matrix, 30)
    torch.testing.assert_close(inverse, torch.linalg.pinv(matrix), atol=1e-4, rtol=1e-4)
    one_at_a_time = torch.cat([newton_schulz_pinv(matrix[i : i + 1], 6) for i in range(2)])
    torch.testing.assert_close(newton_schulz_pinv(matrix, 6), one_at_a_time, atol=1e-6, rtol=0)


def test_nystrom_with_one_token_per_landmark_is_exact_masked_attention() -> None:
    torch.manual_seed(0)
    # 16 landmarks for at most 10 tokens: every landmark is one token, so Nyström is exact once
    # the pseudo-inverse has converged (more iterations than the default 6).
    attention = MaskedNystromAttention(
        HIDDEN, num_heads=4, num_landmarks=16, pinv_iterations=30, dropout=0.0
    )
    with torch.no_grad():
        attention.to_qkv.weight.mul_(2.0)  # less uniform softmax: a better-conditioned kernel
    x = torch.randn(2, 10, HIDDEN)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 7:] = False
    with torch.no_grad():
        out, _ = attention(x, mask)
        q, k, v = (
            t.view(2, 10, 4, 4).transpose(1, 2) for t in attention.to_qkv(x).chunk(3, dim=-1)
        )
        v = v * mask[:, None, :, None]
        scores = (q @ k.transpose(-1, -2)) / 2.0  # head dim 4
        weights = torch.softmax(scores.masked_fill(~mask[:, None, None, :], -torch.inf), dim=-1)
        exact = weights @ v + attention.value_conv(v)
        exact = attention.to_out(exact.transpose(1, 2).reshape(2, 10, HIDDEN))
    torch.testing.assert_close(out[0], exact[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(out[1, :7], exact[1, :7], atol=1e-4, rtol=0)


@pytest.mark.parametrize("num_instances", [1, 2, 5, 9, 14])
def test_forward_matches_the_official_single_bag_layout(num_instances: int) -> None:
    model = small_transmil()
    x = torch.randn(1, num_instances, 12)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, official_forward(model, x))


def test_padded_batch_matches_the_official_layout_per_bag() -> None:
    model = small_transmil()
    lengths = [14, 3, 9]
    bags = [torch.randn(1, n, 12) for n in lengths]
    x = torch.zeros(3, 14, 12)
    mask = torch.zeros(3, 14, dtype=torch.bool)
    for i, bag in enumerate(bags):
        x[i, : lengths[i]], mask[i, : lengths[i]] = bag[0], True
    with torch.no_grad():
        batched = model(x, mask).logits
        expected = torch.cat([official_forward(model, bag) for bag in bags])
    torch.testing.assert_close(batched, expected, atol=1e-5, rtol=0)


def test_attention_is_the_last_layer_class_token_softmax_with_copies_folded() -> None:
    model = small_transmil()
    x = torch.randn(1, 5, 12)  # S = 3: the first 4 instances appear twice on the grid
    captured: list[torch.Tensor] = []
    handle = model.layer2.norm.register_forward_hook(lambda _m, _i, out: captured.append(out))
    with torch.no_grad():
        out = model(x)
        handle.remove()
        normed = captured[0]  # [1, 1 + 9, E]
        q, k, _ = model.layer2.attention.to_qkv(normed).chunk(3, dim=-1)
        q, k = (t.view(1, 10, 4, 4).transpose(1, 2) for t in (q, k))
        cls_row = torch.softmax((q[:, :, :1] @ k.transpose(-1, -2)) / 2.0, dim=-1)  # [1, H, 1, 10]
        slots = cls_row[0, :, 0, 1:]  # [H, 9] grid slots
        folded = slots[:, :5].clone()
        folded[:, :4] += slots[:, 5:]
        folded = folded / folded.sum(dim=-1, keepdim=True)
    torch.testing.assert_close(out.maps["head_attention"][0], folded)
    torch.testing.assert_close(out.attention[0], folded.mean(dim=0))