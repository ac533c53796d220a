"""The blocked CPU selective scan (fused and eager) against the float64 step-by-step reference."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from wsi_mil.models.selective_scan import (
    SCAN_BLOCK,
    _BlockKernel,
    causal_conv1d_silu,
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
    ("batch", "length", "channels", "states"),
    [
        (1, 1, 4, 2),
        (2, 3, 8, 4),  # shorter than one block: the eager tail only
        (1, SCAN_BLOCK - 1, 16, 16),
        (1, SCAN_BLOCK, 16, 16),  # exactly one fused block
        (2, SCAN_BLOCK + 1, 8, 16),  # one step into a second block
        (3, 257, 8, 4),  # the block does not divide L
        (1, 1000, 32, 16),
    ],
)
@pytest.mark.parametrize("delta_scale", [0.01, 1.0, 50.0])
@pytest.mark.parametrize("backend", ["torch", "eager"])
def test_scan_matches_float64_reference(
    batch: int, length: int, channels: int, states: int, delta_scale: float, backend: str
) -> None:
    inputs = scan_inputs(batch, length, channels, states, delta_scale=delta_scale)
    expected = selective_scan_reference(*inputs)
    actual = selective_scan(*inputs, backend=backend)
    assert actual.dtype == torch.float32 and actual.shape == (batch, length, channels)
    assert torch.isfinite(actual).all()
    assert relative_error(actual, expected) <= RELATIVE_TOLERANCE


def test_padded_bags_scan_their_valid_steps_exactly() -> None:
    """A right-padded batch (as MambaMIL scans it) with huge padding values and large Δ: every bag's
    valid steps equal the float64 reference of that bag alone."""
    lengths = [3 * SCAN_BLOCK + 5, SCAN_BLOCK + 1, 3]
    u, delta, A, B, C, D = scan_inputs(3, lengths[0], 8, 16, delta_scale=50.0, seed=7)
    for b, length in enumerate(lengths):
        u[b, length:] = 1e4
        delta[b, length:] = 1e3
    actual = selective_scan(u, delta, A, B, C, D)
    for b, length in enumerate(lengths):
        alone = [t[b : b + 1, :length] for t in (u, delta)] + [A] + [t[b : b + 1, :length] for t in (B, C)] + [D]
        expected = selective_scan_reference(*alone)
        assert relative_error(actual[b : b + 1, :length], expected) <= RELATIVE_TOLERANCE


def test_softplus_inside_the_scan_matches_the_reference() -> None:
    """Raw step sizes from -30 to 40, across F.softplus's linear threshold of 20."""
    u, _, A, B, C, D = scan_inputs(2, 100, 8, 16, delta_scale=1.0)
    raw_delta = torch.linspace(-30.0, 40.0, 2 * 100 * 8).reshape(2, 100, 8)
    raw_delta = raw_delta[:, torch.randperm(100, generator=torch.Generator().manual_seed(0))]
    expected = selective_scan_reference(u, raw_delta, A, B, C, D, delta_softplus=True)
    actual = selective_scan(u, raw_delta, A, B, C, D, delta_softplus=True)
    assert relative_error(actual, expected) <= RELATIVE_TOLERANCE


def test_extreme_step_sizes_stay_finite_and_exact() -> None:
    """Δ·A down to about -5e5: most decays underflow to 0 while the inputs Δ·u grow 1e4-fold."""
    u, delta, A, B, C, D = scan_inputs(2, 300, 8, 16, delta_scale=1.0)
    delta = delta * 1e4
    expected = selective_scan_reference(u, delta, A, B, C, D)
    actual = selective_scan(u, delta, A, B, C, D)
    assert torch.isfinite(actual).all()
    assert relative_error(actual, expected) <= RELATIVE_TOLERANCE


def test_mixed_tiny_and_huge_steps_in_one_sequence() -> None:
    """A long-memory channel next to channels that forget at every step, with Δ spanning 1e-4..1e3."""
    u, delta, A, B, C, D = scan_inputs(1, 500, 16, 16, delta_scale=1.0, seed=3)
    spread = torch.logspace(-4, 3, 16)  # per channel
    delta = delta / delta.mean() * spread
    expected = selective_scan_reference(u, delta, A, B, C, D)
    assert relative_error(selective_scan(u, delta, A, B, C, D), expected) <= RELATIVE_TOLERANCE


def test_a_50k_instance_bag_with_large_steps_matches_the_reference() -> None:
    """A MambaMIL-sized sequence (50,000 steps) in float32 against the float64 loop, on few channels:
    Δ·A from about -1e-4 (memory over the whole bag) to -5e4 (decay underflows to 0)."""
    u, delta, A, B, C, D = scan_inputs(1, 50_000, 6, 16, delta_scale=1.0, seed=5)
    delta = delta / delta.mean() * torch.logspace(-4, 3, 6)
    expected = selective_scan_reference(u, delta, A, B, C, D)
    actual = selective_scan(u, delta, A, B, C, D)
    assert torch.isfinite(actual).all()
    assert relative_error(actual, expected) <= RELATIVE_TOLERANCE
    for channel in range(6):  # each channel on its own scale, the slow ones included
        assert relative_error(actual[..., channel], expected[..., channel]) <= RELATIVE_TOLERANCE


def test_fused_and_eager_kernels_agree() -> None:
    inputs = scan_inputs(2, 130, 8, 4, delta_scale=1.0)
    fused = selective_scan(*inputs, delta_softplus=True)
    eager = selective_scan(*inputs, delta_softplus=True, backend="eager")
    torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-5)


def test_without_skip_term() -> None:
    u, delta, A, B, C, _ = scan_inputs(1, 50, 4, 4, delta_scale=1.0)
    expected = selective_scan_reference(u, delta, A, B, C)
    assert relative_error(selective_scan(u, delta, A, B, C), expected) <= RELATIVE_TOLERANCE


def test_half_precision_inputs_are_scanned_in_float32() -> None:
    inputs = scan_inputs(1, 40, 8, 4, delta_scale=1.0, dtype=torch.bfloat16)
    actual = selective_scan(*inputs)
    assert actual.dtype == torch.float32
    assert relative_error(actual, selective_scan_reference(*inputs)) <= RELATIVE_TOLERANCE


@pytest.mark.parametrize("delta_softplus", [False, True])
def test_gradients_match_finite_differences(delta_softplus: bool) -> None:
    """gradcheck in float64 over three blocks (the hand-written backward and its block carry)."""
    inputs = tuple(
        t.requires_grad_()
        for t in scan_inputs(1, 2 * SCAN_BLOCK + 3, 3, 2, delta_scale=1.0, dtype=torch.float64)
    )
    assert torch.autograd.gradcheck(
        lambda *x: selective_scan(*x, delta_softplus=delta_softplus), inputs
    )


@pytest.mark.parametrize("delta_softplus", [False, True])
@pytest.mark.parametrize("delta_scale", [1.0, 50.0])
def test_float32_gradients_match_the_reference_gradients(delta_softplus: bool, delta_scale: float) -> None:
    """The fused backward kernel (float32) against autograd through the float64 loop."""
    inputs = scan_inputs(2, 4 * SCAN_BLOCK + 6, 8, 4, delta_scale=delta_scale)
    grads = []
    for scan in (selective_scan, selective_scan_reference):
        leaves = [t.double().requires_grad_() for t in inputs]
        output = scan(*[leaf.float() for leaf in leaves], delta_softplus=delta_softplus)
        output.double().square().sum().backward()
        grads.append([leaf.grad for leaf in leaves])
    for actual, expected in zip(*grads, strict=True):
        assert relative_error(actual, expected) <= 1e-4


def test_a_failed_compilation_falls_back_to_eager_with_one_warning() -> None:
    """Without a working C++ compiler torch.compile fails; the kernel warns once and runs eagerly."""
    kernel = _BlockKernel(lambda x: torch.exp(x) * 2)
    broken = {"cpp.cxx": ("/nonexistent/c++",), "force_disable_caches": True}
    x = torch.linspace(-1, 1, 5)
    with torch._inductor.config.patch(broken), pytest.warns(RuntimeWarning, match="torch.compile failed"):
        first = kernel(x, compiled=True)
    assert kernel.compile_failed
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no second warning, no second attempt
        second = kernel(x, compiled=True)
    torch.testing.assert_close(first, torch.exp(x) * 2)
    torch.testing.assert_close(second, first)


@pytest.mark.parametrize("backend", ["torch", "eager"])
def test_causal_conv_matches_conv1d_with_gradients(backend: str) -> None:
    """`causal_conv1d_silu` against nn.Conv1d(padding=K-1) + SiLU, outputs and gradients."""
    torch.manual_seed(0)
    conv = torch.nn.Conv1d(8, 8, 4, groups=8, padding=3)
    x = torch.randn(2, 37, 8, requires_grad=True)
    expected = F.silu(conv(x.transpose(1, 2))[..., :37]).transpose(1, 2)
    expected_grads = torch.autograd.grad(expected.square().sum(), (x, conv.weight, conv.bias))
    actual = causal_conv1d_silu(x, conv.weight, conv.bias, backend=backend)
    actual_grads = torch.autograd.grad(actual.square().sum(), (x, conv.weight, conv.bias))
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    for grad, expected_grad in zip(actual_grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-5)


def test_shape_errors_name_the_expected_shapes() -> None:
    u, delta, A, B, C, D = scan_inputs(1, 10, 4, 2, delta_scale=1.0)
    with pytest.raises(ValueError, match=r"A must be \[E, N\]"):
        selective_scan(u, delta, A[:2], B, C, D)
    with pytest.raises(ValueError, match=r"B and C must be \[B, L, N\]"):
        selective_scan(u, delta, A, B[:, :5], C, D)


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
