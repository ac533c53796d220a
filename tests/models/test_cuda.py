"""Every registered model on CUDA: same outputs as on CPU in fp32, finite under bf16 autocast, and
padded batches equal to their bags one by one. Marked `gpu` (CI has no GPU; see docs/models.md)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from tests.models.test_contract import IN_DIM, MODEL_NAMES, build, targets_for

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _need_cuda_without_tf32() -> Iterator[None]:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_cuda_fp32_matches_cpu(name: str, padded_batch) -> None:
    model = build(name).eval()
    _, x, mask = padded_batch([9, 40, 23], IN_DIM)
    with torch.no_grad():
        cpu = model(x, mask)
        gpu = model.cuda()(x.cuda(), mask.cuda())
    torch.testing.assert_close(gpu.logits.cpu(), cpu.logits, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(gpu.attention.cpu(), cpu.attention, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_cuda_bf16_training_step_is_finite_and_padding_safe(name: str, padded_batch) -> None:
    model = build(name).cuda().train()
    bags, x, mask = padded_batch([9, 40, 23], IN_DIM)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        output = model(x.cuda(), mask.cuda())
        loss = torch.nn.functional.cross_entropy(output.logits.float(), targets_for(3).cuda())
        loss = loss + sum((v.float() for v in model.aux_losses(output, targets_for(3).cuda()).values()), torch.zeros((), device="cuda"))
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    model.eval()
    with torch.no_grad():
        batched = model(x.cuda(), mask.cuda())
        for i, bag in enumerate(bags):
            single = model(bag.unsqueeze(0).cuda(), None)
            torch.testing.assert_close(batched.logits[i], single.logits[0], rtol=1e-4, atol=1e-4)
