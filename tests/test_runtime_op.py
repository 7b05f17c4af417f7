"""The op as a PyTorch citizen (opcheck, torch.compile), its block plan, and its errors."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import ringfx
from ringfx.runtime.blocks import EMPTY, FULL, PARTIAL, MaskSpec, classify, plan_step, step_count
from ringfx.runtime.layout import chunk_ranges

RING = ringfx.LoopbackRing(3)


def _qkv(b=2, hq=4, hkv=2, s=12, d=8, dtype=torch.float32, requires_grad=True):
    return [torch.randn(b, h, s, d, dtype=dtype, requires_grad=requires_grad) for h in (hq, hkv, hkv)]


# -- torch.library -------------------------------------------------------------------


@pytest.mark.parametrize("causal,layout", [(False, "contiguous"), (True, "zigzag")])
def test_opcheck(causal, layout):
    q, k, v = _qkv(dtype=torch.float64)
    pad = torch.ones(2, 12, dtype=torch.bool)
    pad[0, 5] = False
    for extras in ((None, None), (pad, None)):
        torch.library.opcheck(
            torch.ops.ringfx.ring_attention.default,
            (q, k, v, extras[0], extras[1], None, RING.group_name, layout, causal, 0.3, 0, "auto"),
        )


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiles_fullgraph_as_one_opaque_node(backend):
    torch.compiler.reset()

    def attn(q, k, v):
        return ringfx.ring_attention(q * 2, k, v, group=RING, causal=True, layout="zigzag").sin()

    q, k, v = _qkv()
    compiled = torch.compile(attn, backend=backend, fullgraph=True)
    out = compiled(q, k, v)
    out.sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    ref = attn(q, k, v)
    ref.sum().backward()
    torch.testing.assert_close(out, ref)
    for g, t in zip(grads, (q, k, v)):
        torch.testing.assert_close(g, t.grad)


def test_graph_holds_one_ring_attention_node():
    from torch._dynamo.testing import EagerAndRecordGraphs

    torch.compiler.reset()
    rec = EagerAndRecordGraphs()
    q, k, v = _qkv(requires_grad=False)
    torch.compile(lambda q, k, v: ringfx.ring_attention(q, k, v, group=RING), backend=rec, fullgraph=True)(q, k, v)
    targets = [n.target for g in rec.graphs for n in g.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.ringfx.ring_attention) == 1


# -- the block plan ------------------------------------------------------------------


def test_causal_contiguous_skips_future_blocks():
    spec = MaskSpec(True, 0, False)
    for rank in range(4):
        computed = [t for t in range(4) if plan_step("contiguous", rank, (rank - t) % 4, 4, 8, spec)]
        assert computed == list(range(rank + 1))  # rank r sees blocks r, r-1, ..., 0


def test_zigzag_balances_causal_work():
    spec = MaskSpec(True, 0, False)
    work = []
    for rank in range(4):
        cells = 0
        for t in range(4):
            for call in plan_step("zigzag", rank, (rank - t) % 4, 4, 8, spec):
                cells += (call.q[1] - call.q[0]) * (call.k[1] - call.k[0]) // (2 if call.is_causal else 1)
        work.append(cells)
    assert len(set(work)) == 1, work


def test_sliding_window_stops_ring_early():
    assert step_count("contiguous", 8, 16, MaskSpec(True, 16, False)) == 2
    assert step_count("contiguous", 8, 16, MaskSpec(True, 17, False)) == 2
    assert step_count("contiguous", 8, 16, MaskSpec(True, 18, False)) == 3
    assert step_count("contiguous", 8, 16, MaskSpec(True, 0, False)) == 8


def test_disjoint_documents_are_skipped():
    spec = MaskSpec(False, 0, True)
    ranges = (((0, 1),), ((2, 3),), ((3, 3),))
    assert plan_step("contiguous", 0, 1, 3, 4, spec, ranges) == ()
    assert plan_step("contiguous", 2, 1, 3, 4, spec, ranges) != ()


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 30), st.integers(1, 8), st.integers(0, 30), st.integers(1, 8), st.booleans(),
       st.integers(0, 12))
def test_classify_matches_brute_force(qa, qn, ka, kn, causal, window):
    spec = MaskSpec(causal, window, False)
    vis = [(not causal or i >= j) and (not window or i - j < window)
           for i in range(qa, qa + qn) for j in range(ka, ka + kn)]
    expected = EMPTY if not any(vis) else FULL if all(vis) else PARTIAL
    assert classify((qa, qa + qn), (ka, ka + kn), spec) == expected


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(["contiguous", "zigzag"]), st.integers(1, 6), st.booleans(), st.integers(0, 20))
def test_plan_covers_every_visible_pair_exactly_once(layout, world, causal, window):
    """Over all steps, the calls cover each visible (query, key) pair once and skip none."""
    s_local = 6
    spec = MaskSpec(causal, window, False)
    for rank in range(world):
        qpos = [p for a, b in chunk_ranges(layout, rank, world, s_local) for p in range(a, b)]
        covered = {}
        for t in range(step_count(layout, world, s_local, spec)):
            src = (rank - t) % world
            kpos = [p for a, b in chunk_ranges(layout, src, world, s_local) for p in range(a, b)]
            for call in plan_step(layout, rank, src, world, s_local, spec):
                for i in range(*call.q):
                    for j in range(*call.k):
                        if call.is_causal and kpos[j] > qpos[i]:
                            continue
                        covered[(qpos[i], kpos[j])] = covered.get((qpos[i], kpos[j]), 0) + 1
        for i in qpos:
            for j in range(world * s_local):
                if (not causal or i >= j) and (not window or i - j < window):
                    assert covered.get((i, j)) == 1, (rank, i, j)


# -- bad input -----------------------------------------------------------------------


@pytest.mark.parametrize("mutate,error,match", [
    (lambda q, k, v: (q, k[:, :, :6], v[:, :, :6]), ValueError, "local sequence length"),
    (lambda q, k, v: (q, k.double(), v), TypeError, "dtypes differ"),
    (lambda q, k, v: (q[:, :3], k, v), ValueError, "not a multiple"),
    (lambda q, k, v: (q, k, v[..., :4]), ValueError, "same shape"),
    (lambda q, k, v: (q[0], k, v), ValueError, "4-D"),
    (lambda q, k, v: (q.long(), k, v), TypeError, "floating"),
])
def test_bad_shapes_and_dtypes(mutate, error, match):
    q, k, v = _qkv(requires_grad=False)
    with pytest.raises(error, match=match):
        ringfx.ring_attention(*mutate(q, k, v), group=RING)


@pytest.mark.parametrize("kwargs,error,match", [
    ({"dropout_p": 0.1}, ValueError, "dropout_p"),
    ({"layout": "striped"}, ValueError, "layout"),
    ({"window": 0}, ValueError, "window"),
    ({"kernel": "fast"}, ValueError, "kernel"),
    ({"key_padding_mask": torch.ones(2, 5, dtype=torch.bool)}, ValueError, "key_padding_mask"),
    ({"key_padding_mask": torch.ones(2, 12)}, TypeError, "bool"),
    ({"segment_ids": torch.ones(2, 12)}, TypeError, "integer"),
    ({"attn_bias": torch.zeros(2, 4, 12, 7)}, ValueError, "attn_bias"),
    ({"group": "no-such-group"}, ValueError, "no process group"),
    ({"group": 3}, TypeError, "group must be"),
])
def test_bad_options(kwargs, error, match):
    q, k, v = _qkv(requires_grad=False)
    kwargs = {"group": RING, **kwargs}
    with pytest.raises(error, match=match):
        ringfx.ring_attention(q, k, v, **kwargs)


def test_loopback_sequence_not_divisible():
    q, k, v = _qkv(s=10, requires_grad=False)
    with pytest.raises(ValueError, match="divisible"):
        ringfx.ring_attention(q, k, v, group=RING)


def test_zigzag_needs_even_chunks():
    with pytest.raises(ValueError, match="divisible by 6"):
        ringfx.shard(torch.zeros(1, 9), 1, layout="zigzag", group=RING)


def test_no_default_group_says_how_to_get_one():
    q, k, v = _qkv(requires_grad=False)
    with pytest.raises(ValueError, match="LoopbackRing"):
        ringfx.ring_attention(q, k, v)


def test_bias_requiring_grad_is_refused():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="constant"):
        ringfx.ring_attention(q, k, v, group=RING, attn_bias=torch.zeros(1, 1, 12, 12, requires_grad=True))


def test_shard_unshard_roundtrip_and_positions():
    x = torch.arange(24).reshape(1, 24)
    for layout in ("contiguous", "zigzag"):
        for world in (1, 2, 3, 4):
            ring = ringfx.LoopbackRing(world)
            sh = ringfx.shard(x, 1, layout=layout, group=ring)
            assert torch.equal(sh[0], ringfx.positions(24, layout=layout, group=ring))
            assert torch.equal(ringfx.unshard(sh, 1, layout=layout, group=ring), x)
    zz = ringfx.shard(x, 1, layout="zigzag", group=ringfx.LoopbackRing(2))[0].tolist()
    assert zz == [0, 1, 2, 3, 4, 5, 18, 19, 20, 21, 22, 23, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17]


def test_exports_as_one_node():
    class Attn(torch.nn.Module):
        def forward(self, q, k, v):
            return ringfx.ring_attention(q, k, v, group=RING, causal=True, layout="zigzag")

    q, k, v = _qkv(requires_grad=False)
    exported = torch.export.export(Attn(), (q, k, v))
    targets = [n.target for n in exported.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.ringfx.ring_attention.default) == 1
    torch.testing.assert_close(exported.module()(q, k, v), Attn()(q, k, v))


@settings(max_examples=25, deadline=None)
@given(world=st.integers(1, 6), layout=st.sampled_from(["contiguous", "zigzag"]), causal=st.booleans(),
       window=st.sampled_from([None, 1, 3, 8]), groups=st.sampled_from([(4, 4), (4, 2), (4, 1)]),
       masks=st.sampled_from(["none", "padding", "segments", "bias"]), seed=st.integers(0, 2**16))
def test_random_rings_match_sdpa(world, layout, causal, window, groups, masks, seed):
    """Any combination of ring size, layout, mask kinds and GQA: exact against SDPA."""
    from ring_cases import Case, run_case

    case = Case(layout=layout, causal=causal, window=window, hq=groups[0], hkv=groups[1], chunk=2,
                padding=masks == "padding", segments=masks == "segments", bias=masks == "bias")
    assert max(run_case(case, ringfx.LoopbackRing(world), torch.float64, seed=seed)) < 1e-10
