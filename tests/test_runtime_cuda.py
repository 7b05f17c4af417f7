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


@pytest.mark.parametrize("world", [5, 8])
def test_fused_folds_on_cuda(world):
    """Head dims that are multiples of 16 take the fused Triton folds (several blocks per
    accumulator pass); the matrix at float32 on odd and large rings."""
    failures = []
    for i, case in enumerate(matrix()):
        case = dataclasses.replace(case, d=case.d if case.d % 16 == 0 else 64)
        errors = _on_cuda(case, world, torch.float32, seed=50 + i)
        if not max(errors) < 2e-5:
            failures.append((case, errors))
    assert not failures, failures


@pytest.mark.parametrize("causal,layout", [(False, "contiguous"), (True, "zigzag")])
def test_bf16_forward_and_backward_error_at_p8(causal, layout):
    """bf16 at P=8 (fused folds): output and gradient errors vs a float64 reference no
    worse than 2x those of single-device bf16 SDPA."""
    torch.manual_seed(0)
    q, k, v, dout = (torch.randn(1, 8, 4096, 128, device="cuda", dtype=torch.float64) for _ in range(4))

    def run(fn, dtype):
        leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        out = fn(*leaves)
        return (out, *torch.autograd.grad(out, leaves, dout.to(dtype)))

    sdpa = lambda *t: torch.nn.functional.scaled_dot_product_attention(*t, is_causal=causal)  # noqa: E731
    ring = ringfx.LoopbackRing(8)

    def ring_attention(*t):
        local = [ringfx.shard(x, 2, layout=layout, group=ring) for x in t]
        out = ringfx.ring_attention(*local, group=ring, causal=causal, layout=layout)
        return ringfx.unshard(out, 2, layout=layout, group=ring)

    ref = run(sdpa, torch.float64)
    single, ringed = run(sdpa, torch.bfloat16), run(ring_attention, torch.bfloat16)
    for name, r, s1, s8 in zip(("out", "dq", "dk", "dv"), ref, single, ringed):
        err_single = ((s1.double() - r).norm() / r.norm()).item()
        err_ring = ((s8.double() - r).norm() / r.norm()).item()
        assert err_ring <= 2 * err_single, (name, err_ring, err_single)


@pytest.mark.parametrize("world", [3, 8])
def test_two_compute_streams(world, monkeypatch):
    """Large blocks alternate their kernels between two CUDA streams; forced on here for
    small ones: the matrix (float32 and bf16 kernels) must not change."""
    from ringfx.runtime import algorithm

    monkeypatch.setattr(algorithm, "TWO_STREAMS_MIN_WORK", 0)
    failures = []
    for i, case in enumerate(matrix(quick=True)):
        case = dataclasses.replace(case, d=case.d if case.d % 16 == 0 else 64, chunk=32)
        errors = _on_cuda(case, world, torch.float32, seed=90 + i)
        if not max(errors) < 2e-5:
            failures.append((case, errors))
    assert not failures, failures


def test_two_compute_streams_without_a_side_stream(monkeypatch):
    """RINGFX_SIDE_STREAM=0 with two compute streams: the folds run on the main stream,
    which must wait for the kernels that made the blocks."""
    from ringfx.runtime import algorithm

    monkeypatch.setattr(algorithm, "TWO_STREAMS_MIN_WORK", 0)
    monkeypatch.setenv("RINGFX_SIDE_STREAM", "0")
    for i, case in enumerate(matrix(quick=True)[:8]):
        case = dataclasses.replace(case, d=case.d if case.d % 16 == 0 else 64, chunk=32)
        assert max(_on_cuda(case, 5, torch.float32, seed=200 + i)) < 2e-5, case


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 0.06)])
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("fill", ["dtype_min", "-inf"])
def test_dense_mask_filled_with_the_dtype_minimum(dtype, tol, world, fill):
    """transformers' eager masks hide keys with ``torch.finfo(dtype).min``. A block whose
    row is hidden entirely came back wrong from the efficient and cuDNN kernels (errors of
    1.9, the kernels overflow scaling the bias to -inf); compared with SDPA on the whole
    sequence, forward and backward, causal + right padding as a dense bias."""
    torch.manual_seed(world)
    b, hq, hkv, s, d = 2, 4, 2, 24, 64
    q, k, v, g = (torch.randn(b, h, s, d, device="cuda", dtype=torch.float64)
                  for h in (hq, hkv, hkv, hq))
    keep = torch.ones(s, s, dtype=torch.bool, device="cuda").tril()[None, None].repeat(b, 1, 1, 1)
    keep[1, ..., -4:] = False
    low = torch.finfo(dtype).min if fill == "dtype_min" else float("-inf")
    bias = torch.zeros(keep.shape, device="cuda", dtype=dtype).masked_fill(~keep, low)

    def grads(out, leaves):
        return (out, *torch.autograd.grad(out, leaves, g.to(out.dtype)))

    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = grads(torch.nn.functional.scaled_dot_product_attention(
        ref_leaves[0], *(t.repeat_interleave(hq // hkv, 1) for t in ref_leaves[1:]),
        attn_mask=keep), ref_leaves)
    leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    got = grads(ringfx.ring_attention(*leaves, group=ringfx.LoopbackRing(world), attn_bias=bias), leaves)
    for name, r, x in zip(("out", "dq", "dk", "dv"), ref, got):
        err = (x.double() - r).abs().max().item()
        assert err < tol * (1 if dtype == torch.float32 else r.abs().max().item()), (name, err)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 5e-5), (torch.bfloat16, 0.08)])
@pytest.mark.parametrize("world,layout,causal", [(1, "contiguous", False), (3, "zigzag", True),
                                                 (4, "contiguous", True), (2, "zigzag", False)])
@pytest.mark.parametrize("learned", [True, False], ids=["learned", "constant"])
def test_relative_bias_table_on_cuda(dtype, tol, world, layout, causal, learned):
    """T5's relative-position table (op argument ``rel_bias``): each block gathers its bias on
    the GPU (the fused kernels take it as a mask in the forward; a learned table's backward
    runs the math kernel for dS), against the float64 CPU reference of
    ``test_relative_bias``; errors relative to each result's size. The table's gradient too."""
    from test_relative_bias import SCALE, reference

    g = torch.Generator().manual_seed(world)
    s = 5 * world * (2 if layout == "zigzag" else 1)
    q = 3 * torch.randn(2, 8, s, 64, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 2, s, 64, generator=g, dtype=torch.float64) for _ in range(2))
    table = 2 * torch.randn(8, 2 * s - 1, generator=g, dtype=torch.float64).to(dtype).double()
    dout = torch.randn(2, 8, s, 64, generator=g, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, table)]
    ref = reference(*leaves, causal=causal)
    ref_grads = torch.autograd.grad(ref, leaves, dout)
    group = ringfx.LoopbackRing(world)

    def shard(x):
        return ringfx.shard(x, 2, layout=layout, group=group)

    cuda = [shard(t).to("cuda", dtype).requires_grad_() for t in (q, k, v)]
    cuda.append(table.to("cuda", dtype).requires_grad_(learned))
    out = ringfx.ring_attention(*cuda[:3], group=group, causal=causal, layout=layout, scale=SCALE,
                                relative_bias=cuda[3])
    wanted = cuda if learned else cuda[:3]
    grads = torch.autograd.grad(out, wanted, shard(dout).to("cuda", dtype))
    results = [(out, shard(ref))] + [(a, shard(b)) for a, b in zip(grads[:3], ref_grads[:3])]
    if learned:
        results.append((grads[3], ref_grads[3]))
    for name, (got, want) in zip(("out", "dq", "dk", "dv", "dtable"), results):
        err = ((got.double().cpu() - want).abs().max() / want.abs().max()).item()
        assert err < tol, (name, err)
