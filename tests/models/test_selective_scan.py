"""The chunked CPU selective scan against the float64 step-by-step reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from wsi_mil.models.selective_scan import (
    cuda_kernel_available,
    selective_scan,
    selective_scan_reference,
)

RELATIVE_TOLERANCE = 1e-4


def scan_inputs(
    batch: int, length: int, channels: int, states: int, *, delta_scale: float, seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, ...]:
    """Random inputs like MambaMIL's: Δ = softplus(N(-2, 1)) · scale, S4D-real A = -(1..N)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, length, channels, generator=g)
    delta = F.softplus(torch.randn(batch, length, channels, generator=g) - 2.0) * delta_scale
    A = -torch.arange(1, states + 1, dtype=torch.float32).repeat(channels, 1)
    A = A * torch.exp(0.3 * torch.randn(channels, states, generator=g))  # not just integers
    B = torch.randn(batch, length, states, generator=g)
    C = torch.randn(batch, length, states, generator=g)
    D = torch.randn(channels, generator=g)
    return tuple(t.to(dtype) for t in (u, delta, A, B, C, D))


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (a normwise error; elementwise ratios near 0 mean nothing)."""
    return ((actual.double() - expected).abs().max() / expected.abs().max()).item()


@pytest.mark.parametrize(
    ("batch", "length", "channels", "states", "chunk_size"),
    [
        (1, 1, 4, 2, 64),
        (2, 3, 8, 4, 2),  # chunk boundary inside a short sequence
        (1, 63, 16, 16, 64),
        (1, 64, 16, 16, 64),  # exactly one chunk
        (2, 65, 8, 16, 64),  # one step into a second chunk
        (3, 257, 8, 4, 100),  # chunk does not divide L
        (1, 1000, 32, 16, 64),
    ],
)
@pytest.mark.parametrize("delta_scale", [0.01, 1.0, 50.0])
def test_scan_matches_float64_reference(
    batch: int, length: int, channels: int, states: int, chunk_size: int, delta_scale: float
) -> None:
    inputs = scan_inputs(batch, length, channels, states, delta_scale=delta_scale)
    expected = selective_scan_reference(*inputs)
    actual = selective_scan(*inputs, chunk_size=chunk_size)
    assert actual.dtype == torch.float32 and actual.shape == (batch, length, channels)
    assert torch.isfinite(actual).all()
    assert relative_error(actual, expected) <= RELATIVE_TOLERANCE


def test_extreme_step_sizes_stay_finite_and_exact() -> None:
    """Δ·A down to about -5e5: most decays underflow to 0 while the inputs Δ·u grow 1e4-fold."""
    u, delta, A, B, C, D = scan_inputs(2, 300, 8, 16, delta_scale=1.0)
    delta = delta * 1e4
    expected = selective_scan_reference(u, delta, A, B, C, D)
    actual = selective_scan(u, delta, A, B, C, D, chunk_size=7)
    assert torch.isfinite(actual).all()
    assert relative_error(actual, expected) <= RELATIVE_TOLERANCE


def test_mixed_tiny_and_huge_steps_in_one_sequence() -> None:
    """A long-memory channel next to channels that forget at every step, with Δ spanning 1e-4..1e3."""
    u, delta, A, B, C, D = scan_inputs(1, 500, 16, 16, delta_scale=1.0, seed=3)
    spread = torch.logspace(-4, 3, 16)  # per channel
    delta = delta / delta.mean() * spread
    expected = selective_scan_reference(u, delta, A, B, C, D)
    assert relative_error(selective_scan(u, delta, A, B, C, D, chunk_size=64), expected) <= RELATIVE_TOLERANCE


def test_chunk_size_does_not_change_the_result() -> None:
    inputs = scan_inputs(2, 130, 8, 4, delta_scale=1.0)
    results = [selective_scan(*inputs, chunk_size=size) for size in (1, 7, 64, 130, 1000)]
    for result in results[1:]:
        torch.testing.assert_close(result, results[0], rtol=1e-5, atol=1e-5)


def test_without_skip_term() -> None:
    u, delta, A, B, C, _ = scan_inputs(1, 50, 4, 4, delta_scale=1.0)
    expected = selective_scan_reference(u, delta, A, B, C)
    assert relative_error(selective_scan(u, delta, A, B, C, chunk_size=16), expected) <= RELATIVE_TOLERANCE


def test_half_precision_inputs_are_scanned_in_float32() -> None:
    inputs = scan_inputs(1, 40, 8, 4, delta_scale=1.0, dtype=torch.bfloat16)
    actual = selective_scan(*inputs, chunk_size=16)
    assert actual.dtype == torch.float32
    assert relative_error(actual, selective_scan_reference(*inputs)) <= RELATIVE_TOLERANCE


def test_gradients_match_finite_differences() -> None:
    """gradcheck in float64 across a chunk boundary (the grad path runs under checkpointing)."""
    inputs = tuple(
        t.requires_grad_() for t in scan_inputs(2, 5, 3, 2, delta_scale=1.0, dtype=torch.float64)
    )
    assert torch.autograd.gradcheck(lambda *x: selective_scan(*x, chunk_size=2), inputs)


def test_float32_gradients_match_the_reference_gradients() -> None:
    inputs = scan_inputs(1, 70, 8, 4, delta_scale=1.0)
    grads = []
    for scan in (selective_scan, selective_scan_reference):
        leaves = [t.double().requires_grad_() for t in inputs]
        kwargs = {"chunk_size": 32} if scan is selective_scan else {}
        scan(*[leaf.float() for leaf in leaves], **kwargs).double().square().sum().backward()
        grads.append([leaf.grad for leaf in leaves])
    for actual, expected in zip(*grads, strict=True):
        assert relative_error(actual, expected) <= 1e-4


def test_shape_errors_name_the_expected_shapes() -> None:
    u, delta, A, B, C, D = scan_inputs(1, 10, 4, 2, delta_scale=1.0)
    with pytest.raises(ValueError, match=r"A must be \[E, N\]"):
        selective_scan(u, delta, A[:2], B, C, D)
    with pytest.raises(ValueError, match=r"B and C must be \[B, L, N\]"):
        selective_scan(u, delta, A, B[:, :5], C, D)
    with pytest.raises(ValueError, match="chunk_size"):
        selective_scan(u, delta, A, B, C, D, chunk_size=0)


@pytest.mark.gpu
def test_cuda_scan_matches_reference() -> None:
    """On CUDA: the fused mamba-ssm kernel (when installed) and the PyTorch scan, vs the reference."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    inputs = scan_inputs(2, 3000, 64, 16, delta_scale=1.0)
    expected = selective_scan_reference(*inputs)
    cuda_inputs = [t.cuda() for t in inputs]
    torch_scan = selective_scan(*cuda_inputs, backend="torch").cpu()
    assert relative_error(torch_scan, expected) <= RELATIVE_TOLERANCE
    if cuda_kernel_available():
        fused = selective_scan(*cuda_inputs).cpu()
        torch.testing.assert_close(fused, torch_scan, rtol=6e-4, atol=2e-3)
