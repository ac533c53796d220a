"""TransMIL: masked and official Nyström attention, the official square fill + PPEG layout, the cls attention."""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from wsi_mil.errors import ModelConfigError
from wsi_mil.models import create_model
from wsi_mil.models.base import MILOutput
from wsi_mil.models.transmil import MaskedNystromAttention, TransLayer, TransMIL, newton_schulz_pinv

HIDDEN = 16


def small_transmil(**options: object) -> TransMIL:
    torch.manual_seed(0)
    defaults: dict[str, object] = {"hidden_dim": HIDDEN, "num_heads": 4, "num_landmarks": 8}
    return TransMIL(12, 3, **{**defaults, **options}).eval()  # type: ignore[arg-type]


Attend = Callable[[MaskedNystromAttention, torch.Tensor], torch.Tensor]


def our_attention(attention: MaskedNystromAttention, x: torch.Tensor) -> torch.Tensor:
    """Our attention layer on one whole bag `[1, n, E]` (no padding)."""
    return attention(x, torch.ones(x.shape[:2], dtype=torch.bool))[0]


def official_nystrom(attention: MaskedNystromAttention, x: torch.Tensor) -> torch.Tensor:
    """The official Nyström layer (lucidrains' `NystromAttention`, no mask) on one bag `[1, n, E]`,
    written out independently: zero left-padding to a multiple of m, landmarks = segment sums / l
    (padding included), plain softmaxes, a pseudo-inverse scaled by the global maxima."""
    _, n, dim = x.shape
    m, heads = attention.num_landmarks, attention.num_heads
    pad = (-n) % m
    x = torch.cat([x.new_zeros(1, pad, dim), x], dim=1)
    total = n + pad
    q, k, v = (
        t.reshape(1, total, heads, dim // heads).transpose(1, 2)
        for t in attention.to_qkv(x).chunk(3, dim=-1)
    )
    q = q * (dim // heads) ** -0.5
    length = math.ceil(n / m)
    q_landmarks = q.reshape(1, heads, m, length, -1).sum(dim=3) / length
    k_landmarks = k.reshape(1, heads, m, length, -1).sum(dim=3) / length
    to_landmarks = torch.softmax(q @ k_landmarks.transpose(-1, -2), dim=-1)
    kernel = torch.softmax(q_landmarks @ k_landmarks.transpose(-1, -2), dim=-1)
    from_landmarks = torch.softmax(q_landmarks @ k.transpose(-1, -2), dim=-1)
    inverse = kernel.transpose(-1, -2) / (kernel.abs().sum(-1).max() * kernel.abs().sum(-2).max())
    eye = torch.eye(m)
    for _ in range(attention.pinv_iterations):
        product = kernel @ inverse
        inverse = 0.25 * inverse @ (13 * eye - product @ (15 * eye - product @ (7 * eye - product)))
    out = to_landmarks @ inverse @ (from_landmarks @ v) + attention.value_conv(v)
    out = attention.to_out(out.transpose(1, 2).reshape(1, total, dim))
    return out[:, -n:]


def official_forward(model: TransMIL, x: torch.Tensor, attend: Attend = our_attention) -> torch.Tensor:
    """The official single-bag forward (wrap-around fill, cls first, row-major PPEG grid)."""
    h = model.projection(x)  # [1, N, E]
    num_instances, hidden = h.shape[1], h.shape[2]
    side = math.ceil(math.sqrt(num_instances))
    h = torch.cat([h, h[:, : side * side - num_instances]], dim=1)
    h = torch.cat([model.cls_token, h], dim=1)
    h = h + attend(model.layer1.attention, model.layer1.norm(h))
    cls, tokens = h[:, :1], h[:, 1:]
    grid = tokens.transpose(1, 2).reshape(1, hidden, side, side)
    ppeg = model.ppeg
    grid = ppeg.conv7(grid) + grid + ppeg.conv5(grid) + ppeg.conv3(grid)
    h = torch.cat([cls, grid.flatten(2).transpose(1, 2)], dim=1)
    h = h + attend(model.layer2.attention, model.layer2.norm(h))
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
        out, _, _ = attention(x, mask)
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


def class_token_row(model: TransMIL, layer: TransLayer, x: torch.Tensor) -> tuple[MILOutput, torch.Tensor, torch.Tensor]:
    """Run `model` on a 5-instance bag (S = 3: the first 4 instances appear twice on the grid) and
    recompute `layer`'s exact class-token softmax over the 9 grid slots `[H, 9]` and its values
    `[H, 10, d]` from the layer's normalised input."""
    captured: list[torch.Tensor] = []
    handle = layer.norm.register_forward_hook(lambda _m, _i, out: captured.append(out))
    with torch.no_grad():
        out = model(x)
        handle.remove()
        q, k, v = (t.view(1, 10, 4, 4).transpose(1, 2) for t in layer.attention.to_qkv(captured[0]).chunk(3, -1))
        cls_row = torch.softmax((q[:, :, :1] @ k.transpose(-1, -2)) / 2.0, dim=-1)  # [1, H, 1, 10]
    return out, cls_row[0, :, 0, 1:], v[0]


def test_attention_is_the_last_layer_class_token_softmax_with_copies_folded() -> None:
    model = small_transmil()
    out, slots, _ = class_token_row(model, model.layer2, torch.randn(1, 5, 12))
    folded = slots[:, :5].clone()
    folded[:, :4] += slots[:, 5:]
    folded = folded / folded.sum(dim=-1, keepdim=True)
    torch.testing.assert_close(out.maps["head_attention"][0], folded)
    torch.testing.assert_close(out.attention[0], folded.mean(dim=0))


def test_instance_contributions_follow_mhim_transmil_scoring() -> None:
    model = small_transmil()
    out, slots, values = class_token_row(model, model.layer1, torch.randn(1, 5, 12))
    folded = slots[:, :5].clone()
    folded[:, :4] += slots[:, 5:]  # a copy has the same values as its instance
    weighted = folded.unsqueeze(-1) * values[:, 1:6]  # [H, 5, d]
    with torch.no_grad():
        features = model.layer1.attention.to_out[0](weighted.transpose(0, 1).reshape(5, HIDDEN))
    expected = features @ model.classifier.weight.T  # [5, C], no classifier bias
    torch.testing.assert_close(out.instance_contributions[0], expected)


def _padded(bags: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(bag.shape[1] for bag in bags)
    x = torch.randn(len(bags), longest, bags[0].shape[2]) * 50.0  # padding filled with large noise
    mask = torch.zeros(len(bags), longest, dtype=torch.bool)
    for i, bag in enumerate(bags):
        x[i, : bag.shape[1]], mask[i, : bag.shape[1]] = bag[0], True
    return x, mask


@pytest.mark.parametrize("num_instances", [1, 5, 14, 50])
def test_official_padding_reproduces_the_official_nystrom_computation(num_instances: int) -> None:
    model = small_transmil(nystrom_padding="official")
    x = torch.randn(1, num_instances, 12)
    with torch.no_grad():
        expected = official_forward(model, x, official_nystrom)
        torch.testing.assert_close(model(x).logits, expected, atol=1e-6, rtol=0)
        masked = small_transmil()  # same seed: same weights, our masked default
        assert not torch.allclose(masked(x).logits, expected, atol=1e-3)


def test_official_padding_at_the_default_size_and_in_a_padded_batch() -> None:
    torch.manual_seed(0)
    model = TransMIL(32, 2, nystrom_padding="official").eval()  # 512-d, 8 heads, 256 landmarks
    bags = [torch.randn(1, n, 32) for n in (300, 40, 700)]  # left-padding 187, 215, 30
    x, mask = _padded(bags)
    with torch.no_grad():
        batched = model(x, mask).logits
        expected = torch.cat([official_forward(model, bag, official_nystrom) for bag in bags])
    torch.testing.assert_close(batched, expected, atol=2e-6, rtol=0)


def test_unknown_nystrom_padding_is_refused() -> None:
    with pytest.raises(ModelConfigError, match="nystrom_padding"):
        small_transmil(nystrom_padding="zeros")


def _package_attention(ours: MaskedNystromAttention, dim: int) -> torch.nn.Module:
    """lucidrains' `NystromAttention` as TransMIL builds it, holding our layer's weights."""
    package = pytest.importorskip("nystrom_attention", reason="nystrom-attention is not installed")
    official = package.NystromAttention(
        dim=dim, dim_head=dim // ours.num_heads, heads=ours.num_heads, num_landmarks=ours.num_landmarks,
        pinv_iterations=ours.pinv_iterations, residual=True, dropout=0.1,
    )
    state = {k.replace("value_conv", "res_conv"): v for k, v in ours.state_dict().items()}
    official.load_state_dict(state)
    return official.eval()


def test_official_padding_matches_the_nystrom_attention_package() -> None:
    torch.manual_seed(0)
    ours = MaskedNystromAttention(64, num_heads=8, num_landmarks=32, padding="official").eval()
    official = _package_attention(ours, 64)
    x = torch.randn(1, 101, 64)
    with torch.no_grad():
        torch.testing.assert_close(our_attention(ours, x), official(x), atol=1e-6, rtol=0)


OFFICIAL_TRANSMIL = os.environ.get("WSI_MIL_OFFICIAL_TRANSMIL")


@pytest.mark.skipif(
    not OFFICIAL_TRANSMIL,
    reason="set WSI_MIL_OFFICIAL_TRANSMIL to models/TransMIL.py of szc19990412/TransMIL (not shipped)",
)
@pytest.mark.parametrize("num_instances", [100, 1500])
def test_official_padding_matches_the_official_transmil_module(
    num_instances: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("nystrom_attention", reason="nystrom-attention is not installed")
    spec = importlib.util.spec_from_file_location("official_transmil", Path(str(OFFICIAL_TRANSMIL)))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *args, **kwargs: self)  # its forward calls .cuda()
    torch.manual_seed(0)
    official = module.TransMIL(n_classes=2).eval()
    renamed = {"_fc1.": "projection.", "_fc2.": "classifier.", "pos_layer.proj1.": "ppeg.conv5.",
               "pos_layer.proj2.": "ppeg.conv3.", "pos_layer.proj.": "ppeg.conv7.", ".attn.": ".attention.",
               "res_conv": "value_conv"}
    state = {}
    for key, value in official.state_dict().items():
        for old, new in renamed.items():
            key = key.replace(old, new)
        state[key] = value
    ours = TransMIL(1024, 2, nystrom_padding="official").eval()
    ours.load_state_dict(state)
    x = torch.randn(1, num_instances, 1024)
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, official(data=x)["logits"], atol=1e-5, rtol=0)
