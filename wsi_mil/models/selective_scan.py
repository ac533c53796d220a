"""Mamba's selective scan (S6) in PyTorch for CPU, with the mamba-ssm CUDA kernel when present.

Per channel e and state n, with `Ā_t = exp(Δ_t[e] · A[e, n])` (A < 0, Δ ≥ 0, so 0 < Ā ≤ 1):
`h_t = Ā_t ⊙ h_{t-1} + Δ_t[e] · B_t[n] · u_t[e]`, `h_0 = 0`, `y_t[e] = Σ_n C_t[n] h_t[e, n] + D[e] u_t[e]`.
With `delta_softplus=True` the step sizes are `Δ = softplus(delta)` (as in mamba-ssm), computed
inside the scan in float32.

CPU algorithm: every sequence is cut into blocks of `SCAN_BLOCK` steps. One block is one kernel
that `torch.compile` fuses (the Python loop over its steps is unrolled): for each state element it
computes the decay, the input term and the update, and accumulates the read-out `Σ_n C h`, with the
state `[N, E]` held in registers and cache; nothing of size `T·E·N` reaches memory. The state is
carried from block to block. Only products of decays in (0, 1] and additions occur: no logarithms,
no cumulative sums of `Δ·A`, no division, no exponential of a positive number, so nothing overflows
or underflows for any step size (a large `Δ·A` just gives `Ā = 0`).

Training: `_BlockScan` saves the state entering every block (`L / SCAN_BLOCK` states of `[N, E]`)
and its backward pass runs block by block in reverse: a second fused kernel recomputes the block's
states from the saved one and runs the reverse recurrence `g_t = C_t dy_t + Ā_{t+1} g_{t+1}` for the
gradients of u, Δ, A, B and C. Memory is `O(L·E + L·E·N / SCAN_BLOCK)` instead of `O(L·E·N)`.

Without a working C++ compiler (torch.compile's CPU backend needs one) the same block functions
run eagerly, with one warning; `backend="eager"` asks for that path. CPU scans run with one
intra-op thread (measured faster on a shared 2-core machine, see `_single_intra_op_thread`).
float64 inputs and CUDA tensors without mamba-ssm use the eager block functions.

`selective_scan_reference` is the float64 step-by-step loop used as ground truth in the tests.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
import torch.nn.functional as F

try:  # optional fused CUDA kernel (pip install mamba-ssm causal-conv1d); never a hard dependency
    from mamba_ssm.ops.selective_scan_interface import (
        selective_scan_fn as _cuda_selective_scan_fn,
    )
except (ImportError, OSError):  # not installed, or installed without a usable CUDA runtime
    _cuda_selective_scan_fn = None

ScanBackend = Literal["auto", "torch", "eager"]

#: steps per fused kernel call: longer blocks amortise the ~30 µs call overhead but make the
#: backward kernel's per-block buffers outgrow the L2 cache (backward measured at 1.2, 1.1 and
#: 1.6 ns per state element and step for 8, 16 and 32 steps; E = 1024, N = 16, one thread)
SCAN_BLOCK = 16


def cuda_kernel_available() -> bool:
    """Whether the mamba-ssm fused selective-scan kernel could be imported."""
    return _cuda_selective_scan_fn is not None


def _check_shapes(
    u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    D: torch.Tensor | None,
) -> None:
    if u.dim() != 3 or delta.shape != u.shape:
        raise ValueError(f"u and delta must both be [B, L, E], got {tuple(u.shape)} and {tuple(delta.shape)}")
    batch, length, channels = u.shape
    if A.dim() != 2 or A.shape[0] != channels:
        raise ValueError(f"A must be [E, N] with E = {channels}, got {tuple(A.shape)}")
    expected = (batch, length, A.shape[1])
    if B.shape != expected or C.shape != expected:
        raise ValueError(f"B and C must be [B, L, N] = {expected}, got {tuple(B.shape)} and {tuple(C.shape)}")
    if D is not None and D.shape != (channels,):
        raise ValueError(f"D must be [E] = ({channels},), got {tuple(D.shape)}")


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    *,
    delta_softplus: bool = False,
    backend: ScanBackend = "auto",
) -> torch.Tensor:
    """Selective scan of `u` `[B, L, E]` with step sizes `delta` `[B, L, E]`.

    `A` `[E, N]` (negative), `B`, `C` `[B, L, N]`, optional skip `D` `[E]`; `delta_softplus=True`
    scans with `softplus(delta)` instead of `delta` (which must then already be positive). Returns
    `y` `[B, L, E]` in float32 (float64 for float64 inputs; half-precision inputs are computed in
    float32). `backend="auto"` uses the mamba-ssm CUDA kernel for float32 CUDA tensors when it is
    importable, else the blocked PyTorch scan; `"torch"` always the PyTorch scan (fused by
    torch.compile on CPU); `"eager"` the PyTorch scan without torch.compile.
    """
    _check_shapes(u, delta, A, B, C, D)
    dtype = torch.promote_types(u.dtype, torch.float32)  # bf16/fp16 -> fp32, fp64 stays fp64
    u, delta, A, B, C = (t.to(dtype) for t in (u, delta, A, B, C))
    D = None if D is None else D.to(dtype)
    if backend == "auto" and u.is_cuda and dtype == torch.float32 and cuda_kernel_available():
        if delta_softplus:
            delta = F.softplus(delta)
        y = _cuda_selective_scan_fn(
            u.transpose(1, 2).contiguous(),
            delta.transpose(1, 2).contiguous(),
            A.contiguous(),
            B.transpose(1, 2).contiguous(),
            C.transpose(1, 2).contiguous(),
            D,
        )
        return y.transpose(1, 2)

    compiled = backend != "eager" and not u.is_cuda and dtype == torch.float32
    y = _blocked_scan(u, delta, A, B, C, delta_softplus=delta_softplus, compiled=compiled)
    if D is None:
        return y
    return y + u * D if torch.is_grad_enabled() else y.addcmul_(u, D)


@contextmanager
def _single_intra_op_thread(*, enabled: bool) -> Iterator[None]:
    """Run the CPU scan with one intra-op thread, restoring the setting afterwards.

    The scan is a long series of short, memory-bound kernels; with two threads on a loaded
    2-core machine every kernel waits on a descheduled worker (measured again for the fused
    blocks at load average 4: two threads cost 6× (forward) and 15× (backward) the CPU time of one).
    """
    threads = torch.get_num_threads()
    if not enabled or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _scan_block(
    state: torch.Tensor, A: torch.Tensor, delta: torch.Tensor, u: torch.Tensor,
    B: torch.Tensor, C: torch.Tensor, softplus: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """T steps of one sequence: state, A `[N, E]`; delta, u `[T, E]`; B, C `[T, N]` -> y `[T, E]`, state."""
    if softplus:
        delta = F.softplus(delta)
    drive = delta * u
    outputs = []
    for t in range(delta.shape[0]):
        state = torch.exp(delta[t] * A) * state + drive[t] * B[t, :, None]
        outputs.append((state * C[t, :, None]).sum(0))
    return torch.stack(outputs), state


def _scan_block_backward(
    state: torch.Tensor, A: torch.Tensor, delta: torch.Tensor, u: torch.Tensor,
    B: torch.Tensor, C: torch.Tensor, grad_y: torch.Tensor, grad_carry: torch.Tensor,
    grad_A: torch.Tensor, softplus: bool,
) -> tuple[torch.Tensor, ...]:
    """Gradients of one block from the state entering it. `grad_carry` `[N, E]` is `Ā_{t+1} g_{t+1}`
    from the next block and `grad_A` `[N, E]` the gradient of A accumulated so far. Returns the
    block's grads of u, delta, B, C, the updated grad of A and the carry for the previous block."""
    raw_delta = delta
    if softplus:
        delta = F.softplus(raw_delta)
    drive = delta * u
    decays, states = [], [state]  # states[t] = h_{t-1}
    for t in range(delta.shape[0]):
        decays.append(torch.exp(delta[t] * A))
        states.append(decays[t] * states[t] + drive[t] * B[t, :, None])
    grad_u, grad_delta, grad_B, grad_C = [], [], [], []
    for t in reversed(range(delta.shape[0])):
        grad_state = grad_carry + C[t, :, None] * grad_y[t]  # dL/dh_t
        grad_C.append((states[t + 1] * grad_y[t]).sum(1))
        grad_B.append((grad_state * drive[t]).sum(1))
        grad_drive = (grad_state * B[t, :, None]).sum(0)
        grad_exponent = grad_state * states[t] * decays[t]  # dL/d(Δ_t A)
        grad_delta.append(grad_drive * u[t] + (grad_exponent * A).sum(0))
        grad_u.append(grad_drive * delta[t])
        grad_A = grad_A + grad_exponent * delta[t]
        grad_carry = decays[t] * grad_state
    grad_u, grad_delta, grad_B, grad_C = (torch.stack(g[::-1]) for g in (grad_u, grad_delta, grad_B, grad_C))
    if softplus:  # softplus'(x) = sigmoid(x); 1 above F.softplus's threshold of 20
        grad_delta = grad_delta * torch.where(raw_delta > 20, 1.0, torch.sigmoid(raw_delta))
    return grad_u, grad_delta, grad_B, grad_C, grad_A, grad_carry


class _BlockKernel:
    """A block function, fused by torch.compile on first use, or eager where compiling fails."""

    def __init__(self, function: Callable[..., Any]) -> None:
        self.eager = function
        self.compile_failed = False

    @functools.cached_property
    def compiled(self) -> Callable[..., Any]:
        # dynamic sizes: one compilation serves every E and N; the unrolled block length is fixed
        return torch.compile(self.eager, dynamic=True, fullgraph=True)

    def __call__(self, *args: Any, compiled: bool) -> Any:
        if compiled and not self.compile_failed:
            try:
                return self.compiled(*args)
            except torch._dynamo.exc.BackendCompilerFailed as err:  # e.g. no C++ compiler
                self.compile_failed = True
                reason = str(err).splitlines()[0]
            except torch._dynamo.exc.FailOnRecompileLimitHit as err:  # too many input variants:
                reason = str(err).splitlines()[0]  # the ones compiled so far stay in use
            warnings.warn(
                f"selective scan: torch.compile failed ({reason}); running the unfused "
                "kernels, several times slower",
                RuntimeWarning,
                stacklevel=2,
            )
        return self.eager(*args)


def _causal_conv_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """`silu` of the causal depthwise convolution of `x` `[B, L, E]` along L (weight `[E, K]`)."""
    width, length = weight.shape[1], x.shape[1]
    padded = F.pad(x, (0, 0, width - 1, 0))
    out = bias + padded[:, width - 1 :] * weight[:, width - 1]
    for k in range(width - 1):
        out = out + padded[:, k : k + length] * weight[:, k]
    return F.silu(out)


_FORWARD_KERNEL = _BlockKernel(_scan_block)
_BACKWARD_KERNEL = _BlockKernel(_scan_block_backward)
_CONV_KERNEL = _BlockKernel(_causal_conv_silu)


def causal_conv1d_silu(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, *, backend: ScanBackend = "auto"
) -> torch.Tensor:
    """Mamba's input path before the scan: `silu(causal depthwise Conv1d(x))` on `x` `[B, L, E]`.

    `weight` `[E, 1, K]` and `bias` `[E]` are an `nn.Conv1d(E, E, K, groups=E)`'s parameters.
    On CPU (float32) one fused kernel works in the `[B, L, E]` layout (the Conv1d route transposes
    to `[B, E, L]` and back and measured 3-4× slower); on CUDA, with `backend="eager"` and for
    sequences shorter than a scan block (few compiled variants), `F.conv1d` as before.
    """
    length = x.shape[1]
    if backend != "eager" and not x.is_cuda and x.dtype == torch.float32 and length >= SCAN_BLOCK:
        return _CONV_KERNEL(x.contiguous(), weight[:, 0], bias, compiled=True)
    width = weight.shape[-1]
    out = F.conv1d(x.transpose(1, 2), weight, bias, padding=width - 1, groups=x.shape[-1])
    return F.silu(out[..., :length]).transpose(1, 2)


def _blocks(length: int) -> Iterator[tuple[int, int, bool]]:
    """`(start, stop, full)` of every block of a sequence; only full blocks use the fused kernel."""
    for start in range(0, length, SCAN_BLOCK):
        stop = min(length, start + SCAN_BLOCK)
        yield start, stop, stop - start == SCAN_BLOCK


def _block_of(tensors: tuple[torch.Tensor, ...], b: int, start: int, stop: int) -> list[torch.Tensor]:
    """Steps `start:stop` of sequence `b` of each tensor, as fresh contiguous tensors: views would
    make the compiled kernel guard on (and recompile for) their storage offsets and bases."""
    return [t[b, start:stop].clone(memory_format=torch.contiguous_format) for t in tensors]


def _scan_sequences(
    u: torch.Tensor, delta: torch.Tensor, A_t: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    *, softplus: bool, compiled: bool, saved_states: list[list[torch.Tensor]] | None,
) -> torch.Tensor:
    """The scan without skip term, sequence by sequence; appends every block's entry state to
    `saved_states` (one list per sequence) when given. `A_t` is `A` transposed, `[N, E]`."""
    y = torch.empty_like(u)
    for b in range(u.shape[0]):
        state = u.new_zeros(A_t.shape)
        if saved_states is not None:
            saved_states.append([])
        for start, stop, full in _blocks(u.shape[1]):
            if saved_states is not None:
                saved_states[b].append(state)
            y[b, start:stop], state = _FORWARD_KERNEL(
                state, A_t, *_block_of((delta, u, B, C), b, start, stop), softplus,
                compiled=compiled and full,
            )
    return y


class _BlockScan(torch.autograd.Function):
    """The blocked scan with its hand-written backward pass (saved block-entry states, reverse scan)."""

    @staticmethod
    def forward(
        ctx: Any, u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
        C: torch.Tensor, softplus: bool, compiled: bool,
    ) -> torch.Tensor:
        A_t = A.t().clone(memory_format=torch.contiguous_format)
        ctx.saved_states = []
        with _single_intra_op_thread(enabled=not u.is_cuda):
            y = _scan_sequences(
                u, delta, A_t, B, C, softplus=softplus, compiled=compiled, saved_states=ctx.saved_states
            )
        ctx.save_for_backward(u, delta, A_t, B, C)
        ctx.options = {"softplus": softplus, "compiled": compiled}
        return y

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        u, delta, A_t, B, C = ctx.saved_tensors
        softplus, compiled = ctx.options["softplus"], ctx.options["compiled"]
        grads = [torch.empty_like(t) for t in (u, delta, B, C)]
        grad_A = torch.zeros_like(A_t)
        with _single_intra_op_thread(enabled=not u.is_cuda):
            for b in range(u.shape[0]):
                carry = torch.zeros_like(A_t)
                for (start, stop, full), state in reversed(
                    list(zip(_blocks(u.shape[1]), ctx.saved_states[b], strict=True))
                ):
                    *block_grads, grad_A, carry = _BACKWARD_KERNEL(
                        state, A_t, *_block_of((delta, u, B, C, grad_y), b, start, stop), carry,
                        grad_A, softplus, compiled=compiled and full,
                    )
                    for grad, block_grad in zip(grads, block_grads, strict=True):
                        grad[b, start:stop] = block_grad
        grad_u, grad_delta, grad_B, grad_C = grads
        return grad_u, grad_delta, grad_A.t(), grad_B, grad_C, None, None


def _blocked_scan(
    u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    *, delta_softplus: bool, compiled: bool,
) -> torch.Tensor:
    """The PyTorch scan without skip term; autograd through `_BlockScan` only when it is needed."""
    u, delta, B, C = (t.contiguous() for t in (u, delta, B, C))  # blocks are cut along L
    if torch.is_grad_enabled() and any(t.requires_grad for t in (u, delta, A, B, C)):
        return _BlockScan.apply(u, delta, A, B, C, delta_softplus, compiled)
    A_t = A.t().clone(memory_format=torch.contiguous_format)
    with torch.no_grad(), _single_intra_op_thread(enabled=not u.is_cuda):  # one grad mode: one graph
        return _scan_sequences(
            u, delta, A_t, B, C, softplus=delta_softplus, compiled=compiled, saved_states=None
        )


def selective_scan_reference(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    *,
    delta_softplus: bool = False,
) -> torch.Tensor:
    """Ground truth: the recurrence step by step in float64 (slow; for tests with L ≤ a few 1000).

    Same arguments as `selective_scan`; returns `y` `[B, L, E]` in float64.
    """
    _check_shapes(u, delta, A, B, C, D)
    u, delta, A, B, C = (t.double() for t in (u, delta, A, B, C))
    if delta_softplus:
        delta = F.softplus(delta)
    state = u.new_zeros(u.shape[0], u.shape[2], A.shape[1])
    outputs = []
    for t in range(u.shape[1]):
        decay = torch.exp(delta[:, t, :, None] * A)
        state = decay * state + (delta[:, t] * u[:, t])[:, :, None] * B[:, t, None, :]
        outputs.append((state * C[:, t, None, :]).sum(dim=-1))
    y = torch.stack(outputs, dim=1)
    return y if D is None else y + u * D.double()
