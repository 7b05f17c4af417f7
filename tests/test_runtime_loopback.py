"""Ring attention on loopback rings (P virtual ranks in one process): numerics against
full-sequence SDPA, forward and backward, for ring sizes 1..8."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import ringfx
from ringfx.runtime.algorithm import merge_partial
from ring_cases import TOLERANCE, Case, matrix, run_case

CASES = matrix()


def _id(case: Case) -> str:
    fields = [case.layout, "causal" if case.causal else "full", f"h{case.hq}-{case.hkv}", f"d{case.d}"]
    fields += [f"{f.name}={getattr(case, f.name)}" for f in dataclasses.fields(Case)
               if f.name in ("window", "padding", "segments", "bias", "kernel", "batch")
               and getattr(case, f.name) != f.default]
    return "-".join(fields)


@pytest.mark.parametrize("world", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_matches_sdpa_float64(case, world):
    errors = run_case(case, ringfx.LoopbackRing(world), torch.float64, seed=world)
    assert max(errors) < TOLERANCE[torch.float64], errors


@pytest.mark.parametrize("world", [3, 8])
@pytest.mark.parametrize("case", matrix(quick=True), ids=_id)
def test_matches_sdpa_float32(case, world):
    errors = run_case(case, ringfx.LoopbackRing(world), torch.float32, seed=100 + world)
    assert max(errors) < TOLERANCE[torch.float32], errors


@pytest.mark.parametrize("world", [3, 8])
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_grouped_folds_match_sdpa(case, world, monkeypatch):
    # on CUDA the folds take several blocks per accumulator pass (fused); here the same
    # bookkeeping runs with the eager folds
    from ringfx.runtime import algorithm

    monkeypatch.setattr(algorithm, "fold_groups", lambda q: (algorithm.MERGE_GROUP, algorithm.DQ_GROUP))
    errors = run_case(case, ringfx.LoopbackRing(world), torch.float64, seed=world + 100)
    assert max(errors) < TOLERANCE[torch.float64], errors


@pytest.mark.parametrize("world", [6, 7])
def test_odd_and_large_rings(world):
    for case in (Case(causal=True, layout="zigzag", hq=8, hkv=2), Case(window=5, causal=True), Case(segments=True)):
        assert max(run_case(case, ringfx.LoopbackRing(world), torch.float64, seed=world)) < 1e-10


def test_bf16_error_does_not_grow_with_ring_size():
    """bf16 at P=8: error vs a float64 reference no worse than 2x single-device bf16 SDPA."""
    torch.manual_seed(0)
    b, h, s, d = 1, 4, 2048, 64
    q, k, v = (torch.randn(b, h, s, d, dtype=torch.float64) for _ in range(3))
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    single = F.scaled_dot_product_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), is_causal=True)
    ring = ringfx.LoopbackRing(8)
    qs, ks, vs = (ringfx.shard(t.bfloat16(), 2, layout="zigzag", group=ring) for t in (q, k, v))
    out = ringfx.unshard(ringfx.ring_attention(qs, ks, vs, group=ring, causal=True, layout="zigzag"), 2,
                         layout="zigzag", group=ring)
    err_single = ((single.double() - ref).norm() / ref.norm()).item()
    err_ring = ((out.double() - ref).norm() / ref.norm()).item()
    assert err_ring <= 2 * err_single, (err_ring, err_single)


def test_merge_partial_equals_joint_softmax():
    torch.manual_seed(1)
    s = torch.randn(2, 3, 5, 16, dtype=torch.float64)
    v = torch.randn(2, 3, 16, 4, dtype=torch.float64)
    full = torch.softmax(s, -1) @ v

    def part(a, b):
        lse = torch.logsumexp(s[..., a:b], -1)
        return torch.softmax(s[..., a:b], -1) @ v[..., a:b, :], lse

    out, lse = part(0, 7)
    for a, b in ((7, 9), (9, 16)):
        merge_partial(out, lse, *part(a, b))
    torch.testing.assert_close(out, full)
    torch.testing.assert_close(lse, torch.logsumexp(s, -1))


def test_merge_partial_ignores_rows_nobody_saw():
    # row 0 sees keys 0..4 in two blocks; row 1 sees no key in either: its lse stays -inf
    # and its output 0, and row 0 equals a float64 softmax over its keys
    torch.manual_seed(0)
    s = torch.randn(1, 1, 2, 5, dtype=torch.float64)
    v = torch.randn(1, 1, 5, 3, dtype=torch.float64)
    s[..., 1, :] = float("-inf")

    def part(a, b):
        lse = torch.logsumexp(s[..., a:b], -1)
        p = torch.exp(s[..., a:b] - lse[..., None]).nan_to_num(0.0)  # a row that sees nothing: 0
        return p @ v[..., a:b, :], lse

    out = torch.zeros(1, 1, 2, 3, dtype=torch.float64)
    lse = torch.full((1, 1, 2), float("-inf"), dtype=torch.float64)
    for a, b in ((0, 2), (2, 5)):
        merge_partial(out, lse, *part(a, b))
    assert (out[..., 1, :] == 0).all() and (lse[..., 1] == float("-inf")).all()
    torch.testing.assert_close(out[..., 0, :], torch.softmax(s[..., 0, :], -1) @ v[0, 0])
    torch.testing.assert_close(lse[..., 0], torch.logsumexp(s[..., 0, :], -1))


def test_fully_masked_queries_give_zero_output_and_gradient():
    # every key of batch 1 is padding: its queries see nothing; output and gradients are 0,
    # never NaN; batch 0's output and gradients equal float64 SDPA's
    torch.manual_seed(0)
    ring = ringfx.LoopbackRing(3)
    q, k, v = (torch.randn(2, 2, 12, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    pad = torch.ones(2, 12, dtype=torch.bool)
    pad[1] = False
    out = ringfx.ring_attention(q, k, v, group=ring, key_padding_mask=pad)
    w = torch.randn_like(out)  # a weighted sum: every output element gets its own gradient
    (out * w).sum().backward()
    assert (out[1] == 0).all()
    assert all((t.grad[1] == 0).all() for t in (q, k, v))
    q0, k0, v0 = (t.detach()[:1].requires_grad_() for t in (q, k, v))
    ref = F.scaled_dot_product_attention(q0, k0, v0)
    (ref * w[:1]).sum().backward()
    torch.testing.assert_close(out[:1], ref)
    for t, t0 in ((q, q0), (k, k0), (v, v0)):
        torch.testing.assert_close(t.grad[:1], t0.grad)
