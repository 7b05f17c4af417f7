"""The CUDA kernels (cuDNN, flash, memory-efficient, math) inside the ring, on a loopback
ring of one GPU. Skipped without CUDA; run them on a GPU machine."""

import dataclasses

import pytest
import torch

import ringfx
from ring_cases import Case, matrix, run_case

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _on_cuda(case, world, dtype, seed):
    torch.set_default_device("cuda")
    try:
        return run_case(case, ringfx.LoopbackRing(world), dtype, seed=seed)
    finally:
        torch.set_default_device(None)


@pytest.mark.parametrize("world", [1, 3, 4])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
def test_matrix_on_cuda(world, dtype, tol):
    failures = []
    for i, case in enumerate(matrix()):
        errors = _on_cuda(case, world, dtype, seed=i)
        if not max(errors) < tol:
            failures.append((case, errors))
    assert not failures, failures


@pytest.mark.parametrize("kernel", ["auto", "cudnn", "flash"])
@pytest.mark.parametrize("case", [
    Case(), Case(causal=True, layout="zigzag"), Case(hq=8, hkv=2, causal=True), Case(window=5, causal=True),
    Case(padding=True), Case(d=72, hq=8, hkv=2, layout="zigzag", causal=True),
], ids=str)
def test_half_precision_kernels(kernel, case):
    """bf16 per kernel: error against a float64 reference within bf16 rounding."""
    case = dataclasses.replace(case, kernel=kernel, chunk=64, d=case.d if case.d != 8 else 64)
    errors = _on_cuda(case, 4, torch.bfloat16, seed=7)
    assert max(errors) < 0.06, errors


def test_efficient_kernel_refuses_half_precision():
    q = torch.randn(1, 2, 8, 64, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="float32 only"):
        ringfx.ring_attention(q, q, q, group=ringfx.LoopbackRing(2), kernel="efficient")


@pytest.mark.parametrize("case", [Case(d=64, chunk=64), Case(d=64, chunk=64, causal=True, hq=8, hkv=2),
                                  Case(d=64, chunk=64, padding=True, layout="zigzag")], ids=str)
def test_efficient_kernel_float32(case):
    errors = _on_cuda(dataclasses.replace(case, kernel="efficient"), 4, torch.float32, seed=3)
    assert max(errors) < 2e-5, errors
