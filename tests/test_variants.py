"""Attention variants computed natively by the ring op: logit soft-capping (Gemma 2),
attention sinks (GPT-OSS), chunked local attention (Llama 4) and ALiBi (BLOOM / MPT).
Forward and backward (q, k, v and the sinks) against a plain single-process reference
written here, on loopback rings P = 1..4 and one real gloo ring of 2; the spellings found,
rewritten and exact under ``ringfx.transform`` (and look-alikes not rewritten); then the
whole pipeline on transformers' own Gemma 2, GPT-OSS and Llama 4.
"""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ringfx
from ringfx.testing import spawn_gloo

TOL = 1e-10  # float64
SCALE = 0.3
SOFTCAP = 2.0  # small against the scores (|q kᵀ| * SCALE reaches ~10): tanh saturates


def reference(q, k, v, *, causal=False, softcap=0.0, sinks=None, window=0, pad=None, chunk=0, slopes=None):
    """Attention as the models write it, on the full sequence: scores, soft-cap, ALiBi
    bias, mask, the sink column joined to the softmax and dropped after it."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = q @ k.transpose(-2, -1) * SCALE
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    n = q.shape[2]
    i = torch.arange(n)
    if slopes is not None:
        s = s + slopes[:, None, None] * (i[None, :] - i[:, None]).to(s.dtype)
    keep = torch.ones(n, n, dtype=torch.bool)
    if causal:
        keep &= i[:, None] >= i[None, :]
    if window:
        keep &= i[:, None] - i[None, :] < window
    if chunk:
        keep &= i[:, None] // chunk == i[None, :] // chunk
    keep = keep[None, None]
    if pad is not None:
        keep = keep & pad[:, None, None, :]
    s = s.masked_fill(~keep, float("-inf"))
    if sinks is not None:
        s = torch.cat([s, sinks.reshape(1, -1, 1, 1).expand(q.shape[0], -1, n, 1)], dim=-1)
    p = torch.softmax(s, dim=-1)
    if sinks is not None:
        p = p[..., :-1]
    return p @ v


def _inputs(world, layout, *, hq=4, hkv=2, seed=0, with_sinks=True, padding=False, per_rank=3):
    g = torch.Generator().manual_seed(seed)
    s = per_rank * world * (2 if layout == "zigzag" else 1)
    q = 3 * torch.randn(2, hq, s, 8, generator=g, dtype=torch.float64)
    k = 3 * torch.randn(2, hkv, s, 8, generator=g, dtype=torch.float64)
    v = torch.randn(2, hkv, s, 8, generator=g, dtype=torch.float64)
    sinks = torch.randn(hq, generator=g, dtype=torch.float64) if with_sinks else None
    pad = None
    if padding:
        pad = torch.rand(2, s, generator=g) > 0.3
        pad[:, ::2] = True  # a real key among any two neighbours: every row sees one (window >= 2)
    dout = torch.randn(2, hq, s, 8, generator=g, dtype=torch.float64)
    return q, k, v, sinks, pad, dout


def _slopes(hq):
    """ALiBi's slopes for ``hq`` heads (BLOOM's geometric sequence, 2^(-8 h / H))."""
    return torch.tensor([2.0 ** (-8.0 * (h + 1) / hq) for h in range(hq)], dtype=torch.float64)


def check_variant(group, layout, causal, softcap, with_sinks, *, seed=0, window=0, padding=False, hq=4, hkv=2,
                  chunk=0, alibi=False, per_rank=3, kernel="auto"):
    """Max abs error of this rank's out, dq, dk, dv (shards) and of the sinks' gradient.
    On a real ring the sinks' gradient is this rank's part: summed over the ring here."""
    world = ringfx.runtime.ring_size(group)
    q, k, v, sinks, pad, dout = _inputs(world, layout, hq=hq, hkv=hkv, seed=seed, with_sinks=with_sinks,
                                        padding=padding, per_rank=per_rank)
    slopes = _slopes(hq) if alibi else None
    leaves = [t.clone().requires_grad_() for t in (q, k, v)] + ([sinks.clone().requires_grad_()] if with_sinks else [])
    ref = reference(*leaves[:3], causal=causal, softcap=softcap, sinks=leaves[3] if with_sinks else None,
                    window=window, pad=pad, chunk=chunk, slopes=slopes)
    ref_grads = torch.autograd.grad(ref, leaves, dout)

    def shard(x, dim=2):
        return ringfx.shard(x, dim, layout=layout, group=group)

    local = [shard(t).detach().requires_grad_() for t in (q, k, v)]
    local_sinks = sinks.clone().requires_grad_() if with_sinks else None
    out = ringfx.ring_attention(*local, group=group, causal=causal, layout=layout, scale=SCALE,
                                softcap=softcap or None, sinks=local_sinks, window=window or None,
                                key_padding_mask=shard(pad, 1) if padding else None, chunk=chunk or None,
                                alibi_slopes=slopes, kernel=kernel)
    grads = torch.autograd.grad(out, local + ([local_sinks] if with_sinks else []), shard(dout))
    return shard_errors(group, shard, out, ref, grads, ref_grads)


def shard_errors(group, shard, out, ref, grads, ref_grads):
    """Max abs errors of this rank's out, dq, dk, dv (shards of the full references) and of
    a fourth, replicated gradient if any (sinks, a relative table): on a real ring each
    rank holds its part of it, summed over the ring here."""
    errors = [(out - shard(ref)).abs().max().item()]
    errors += [(a - shard(b)).abs().max().item() for a, b in zip(grads[:3], ref_grads[:3])]
    if len(grads) > 3:
        replicated = grads[3].clone()
        if not isinstance(group, ringfx.LoopbackRing):
            torch.distributed.all_reduce(replicated, group=group)
        errors.append((replicated - ref_grads[3]).abs().max().item())
    return errors


VARIANTS = [(SOFTCAP, False), (0.0, True), (SOFTCAP, True)]  # softcap, sinks


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("layout,causal", list(itertools.product(("contiguous", "zigzag"), (False, True))))
@pytest.mark.parametrize("softcap,sinks", VARIANTS, ids=["softcap", "sinks", "softcap+sinks"])
def test_variant_matches_reference_float64(softcap, sinks, layout, causal, world):
    errors = check_variant(ringfx.LoopbackRing(world), layout, causal, softcap, sinks, seed=world)
    assert max(errors) < TOL, errors


@pytest.mark.parametrize("world", [2, 3])
def test_variants_with_window_padding_and_mqa(world):
    for layout, (softcap, sinks) in itertools.product(("contiguous", "zigzag"), VARIANTS):
        errors = check_variant(ringfx.LoopbackRing(world), layout, True, softcap, sinks, seed=7, window=4,
                               padding=True, hq=4, hkv=1)
        assert max(errors) < TOL, (layout, softcap, sinks, errors)


POSITIONAL = [(4, False), (0, True), (4, True)]  # chunk, ALiBi: masks and biases from global positions


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("layout,causal", list(itertools.product(("contiguous", "zigzag"), (False, True))))
@pytest.mark.parametrize("chunk,alibi", POSITIONAL, ids=["chunk", "alibi", "chunk+alibi"])
def test_chunk_and_alibi_match_reference_float64(chunk, alibi, layout, causal, world):
    # 5 tokens a rank (10 in zigzag): chunks of 4 straddle the ranks' boundaries
    errors = check_variant(ringfx.LoopbackRing(world), layout, causal, 0.0, False, seed=world, chunk=chunk,
                           alibi=alibi, per_rank=5)
    assert max(errors) < TOL, errors


@pytest.mark.parametrize("world", [2, 3])
def test_chunk_and_alibi_with_the_other_variants(world):
    """With a window, key padding, MQA, soft-capping and sinks at once."""
    for layout, (softcap, sinks), (chunk, alibi) in itertools.product(("contiguous", "zigzag"), VARIANTS[1:],
                                                                      POSITIONAL[1:]):
        errors = check_variant(ringfx.LoopbackRing(world), layout, True, softcap, sinks, seed=7, window=3,
                               padding=True, hq=4, hkv=1, chunk=chunk, alibi=alibi, per_rank=4)
        assert max(errors) < TOL, (layout, softcap, sinks, chunk, alibi, errors)


def test_blocks_outside_every_chunk_are_skipped():
    from ringfx.runtime.blocks import BlockCall, MaskSpec, plan_step, step_count

    # chunks of one rank's tokens: every rank sees only its own block, the ring stops after one step
    assert step_count("contiguous", 8, 16, MaskSpec(False, 0, False, chunk=16)) == 1
    assert step_count("contiguous", 8, 16, MaskSpec(True, 0, False, chunk=32)) == 2
    # not causal: rank 0 meets rank 1's keys only at the last step (t = 7), every other block is skipped
    assert step_count("contiguous", 8, 16, MaskSpec(False, 0, False, chunk=32)) == 8
    assert [plan_step("contiguous", 0, src, 8, 16, MaskSpec(False, 0, False, chunk=32)) != ()
            for src in range(8)] == [True, True] + [False] * 6
    # a rank's own block under causal: one is_causal call unless a chunk boundary crosses it
    (call,) = plan_step("contiguous", 1, 1, 4, 8, MaskSpec(True, 0, False, chunk=8))
    assert call.is_causal and not call.masked
    # ... and a chunk boundary inside it cuts it into causal calls, one per chunk, with no mask
    assert plan_step("contiguous", 1, 1, 4, 8, MaskSpec(True, 0, False, chunk=4)) == (
        BlockCall((0, 4), (0, 4), True, False), BlockCall((4, 8), (4, 8), True, False))
    # a block that precedes the queries: plain calls on the keys of each query's chunk
    assert plan_step("contiguous", 1, 0, 4, 8, MaskSpec(True, 0, False, chunk=12)) == (
        BlockCall((0, 4), (0, 8), False, False),)
    # more than MAX_CHUNK_CALLS chunks in a block: one masked call instead of many small ones
    (call,) = plan_step("contiguous", 1, 1, 4, 80, MaskSpec(True, 0, False, chunk=2))
    assert call.masked and not call.is_causal
    # zigzag rank 0 holds chunks 0 and 7 of 8: with chunks of one layout chunk, it only meets itself
    assert [plan_step("zigzag", 0, src, 4, 8, MaskSpec(True, 0, False, chunk=4)) != () for src in range(4)] == \
        [True, False, False, False]


@pytest.mark.parametrize("world", [1, 3])
def test_calls_cut_into_row_parts_are_exact(monkeypatch, world):
    """A call whose mask or math-kernel scores would pass ``MATERIALISED_ELEMENTS`` takes its
    query rows in parts (a causal call: the keys before each part plain, the part's own
    causally); forced here to a few rows a part: exact all the same."""
    from ringfx.runtime import algorithm

    monkeypatch.setattr(algorithm, "MATERIALISED_ELEMENTS", 2 * 4 * 7 * 3)
    cases = [  # (causal, softcap, sinks, chunk, alibi, padding, hkv)
        (True, SOFTCAP, False, 0, False, False, 2),  # the math kernel's causal own block
        (True, 0.0, True, 0, True, False, 1),  # ALiBi's per-head mask, MQA
        (False, 0.0, False, 4, False, True, 2),  # key padding
        (True, SOFTCAP, True, 3, True, True, 4),
    ]
    for layout, (causal, softcap, sinks, chunk, alibi, padding, hkv) in itertools.product(
            ("contiguous", "zigzag"), cases):
        errors = check_variant(ringfx.LoopbackRing(world), layout, causal, softcap, sinks, seed=11, chunk=chunk,
                               alibi=alibi, padding=padding, hq=4, hkv=hkv, per_rank=6)
        assert max(errors) < TOL, (layout, causal, softcap, sinks, chunk, alibi, padding, errors)


def test_chunks_cut_at_their_boundaries_are_exact():
    """Chunked attention with chunk boundaries inside blocks runs as unmasked calls per
    chunk (checked above on the plan); long blocks with few chunks, P = 1-4, both layouts."""
    for world, layout, causal, chunk in itertools.product((1, 2, 3, 4), ("contiguous", "zigzag"), (True, False),
                                                          (5, 8)):
        errors = check_variant(ringfx.LoopbackRing(world), layout, causal, 0.0, False, seed=world, chunk=chunk,
                               per_rank=12 // (2 if layout == "zigzag" else 1) * 2)
        assert max(errors) < TOL, (world, layout, causal, chunk, errors)


def dense_flex(q, k, v, mask, is_causal, scale, softcap, alibi=None):
    """What ``kernels._flex_attend`` computes (out, natural lse), densely and differentiably:
    the stand-in for flex on CPU, where flex has no backward (and no lse when compiled)."""
    assert q.shape[1] == k.shape[1], "the flex kernel is handed K/V expanded to the query heads"
    s = torch.matmul(q, k.transpose(-2, -1)) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if alibi is not None:
        slopes, q_pos, k_pos = alibi
        s = s + slopes[:, None, None] * (k_pos[None, :] - q_pos[:, None]).to(slopes.dtype)
    if is_causal:
        s = s.masked_fill(~torch.ones(s.shape[-2:], dtype=torch.bool).tril(), float("-inf"))
    if mask is not None:
        s = s + mask
    lse = s.logsumexp(-1)
    p = torch.exp(s - lse.masked_fill(lse == float("-inf"), 0.0)[..., None])  # a row that sees nothing: 0
    return torch.matmul(p, v), lse


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_flex_kernel_backward_from_the_merged_lse(monkeypatch, world):
    """The flex block kernel differentiates its own block result, fed ``c * dout`` and the
    log-sum-exp gradient that turns its dS into the global one: exact against the
    reference with every variant a block mask or a soft-cap makes, ALiBi from the blocks'
    positions inside the kernel (no mask), GQA and MQA."""
    from ringfx.runtime import kernels

    monkeypatch.setattr(kernels, "_flex_attend", dense_flex)
    cases = [  # (causal, softcap, sinks, window, padding, chunk, alibi, hkv)
        (False, SOFTCAP, False, 0, False, 0, False, 2),
        (True, SOFTCAP, True, 0, False, 0, False, 4),
        (True, SOFTCAP, False, 4, True, 0, False, 1),
        (True, 0.0, False, 0, False, 3, True, 2),  # ALiBi in the kernel, chunks
        (False, SOFTCAP, True, 0, True, 5, False, 2),
        (True, 0.0, True, 0, False, 0, True, 1),  # ALiBi in the kernel, MQA, sinks
        (False, SOFTCAP, False, 4, True, 0, True, 4),  # ALiBi with key padding
    ]
    for layout, (causal, softcap, sinks, window, padding, chunk, alibi, hkv) in itertools.product(
            ("contiguous", "zigzag"), cases):
        errors = check_variant(ringfx.LoopbackRing(world), layout, causal, softcap, sinks, seed=world, window=window,
                               padding=padding, hq=4, hkv=hkv, chunk=chunk, alibi=alibi, per_rank=6, kernel="flex")
        assert max(errors) < TOL, (layout, causal, softcap, sinks, window, padding, chunk, alibi, errors)


def test_alibi_slopes_that_require_grad_are_refused_by_the_op_itself():
    q, k, v, _, _, _ = _inputs(2, "contiguous")
    ring = ringfx.LoopbackRing(2)
    slopes = _slopes(4).requires_grad_()
    with pytest.raises(ValueError, match="alibi slopes require grad.*ringfx.ring_attention"):
        torch.ops.ringfx.ring_attention(q, k, v, None, None, None, ring.group_name, "contiguous", False, SCALE, 0,
                                        "auto", None, 0.0, 0, slopes)
    with torch.no_grad():  # no gradient asked for: a constant
        ringfx.ring_attention(q, k, v, group=ring, alibi_slopes=slopes)
    with pytest.raises(ValueError, match=r"one slope per query head, shape \(4,\)"):
        ringfx.ring_attention(q, k, v, group=ring, alibi_slopes=_slopes(2))
    with pytest.raises(ValueError, match="chunk=-2"):
        ringfx.ring_attention(q, k, v, group=ring, chunk=-2)


def check_learned_slopes(group, layout, causal, *, seed=0, window=0, padding=False, hkv=2, softcap=0.0):
    """Max abs errors of out, dq, dk, dv and the slopes' gradient (summed over a real ring)
    with ALiBi slopes that require grad, against the reference's autograd."""
    world = ringfx.runtime.ring_size(group)
    q, k, v, _, pad, dout = _inputs(world, layout, hq=4, hkv=hkv, seed=seed, padding=padding, per_rank=4)
    slopes = _slopes(4) * (1.0 + torch.arange(4, dtype=torch.float64) / 3)  # not BLOOM's exact sequence
    leaves = [t.clone().requires_grad_() for t in (q, k, v, slopes)]
    ref = reference(*leaves[:3], causal=causal, window=window, pad=pad, slopes=leaves[3], softcap=softcap)
    ref_grads = torch.autograd.grad(ref, leaves, dout)

    def shard(x, dim=2):
        return ringfx.shard(x, dim, layout=layout, group=group)

    local = [shard(t).detach().requires_grad_() for t in (q, k, v)] + [slopes.clone().requires_grad_()]
    out = ringfx.ring_attention(*local[:3], group=group, causal=causal, layout=layout, scale=SCALE,
                                window=window or None, key_padding_mask=shard(pad, 1) if padding else None,
                                alibi_slopes=local[3], softcap=softcap or None)
    grads = torch.autograd.grad(out, local, shard(dout))
    return shard_errors(group, shard, out, ref, grads, ref_grads)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_learned_alibi_slopes_get_their_gradient(world):
    """Slopes that require grad become the relative table slope_h * (j - i), whose gradient
    the op computes: out, dq, dk, dv and d(slopes) exact in float64, both layouts."""
    for layout, (causal, window, padding, hkv, softcap) in itertools.product(
            ("contiguous", "zigzag"), ((True, 0, False, 2, 0.0), (False, 3, True, 1, SOFTCAP))):
        errors = check_learned_slopes(ringfx.LoopbackRing(world), layout, causal, seed=world, window=window,
                                      padding=padding, hkv=hkv, softcap=softcap)
        assert max(errors) < TOL, (layout, causal, window, padding, errors)
        assert len(errors) == 5


class LearnedAlibi(nn.Module):
    """ALiBi whose slopes are a parameter, added to the scores by hand (a causal LM's eager
    spelling)."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(16, 48)
        self.slopes = nn.Parameter(torch.tensor([0.5, 0.25, 0.125, 0.0625]))

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, 4, 4).permute(2, 0, 3, 1, 4)
        i = torch.arange(s)
        scores = q @ k.transpose(-1, -2) / 2 + self.slopes[:, None, None] * (i[None, :] - i[:, None])
        scores = scores.masked_fill(~torch.ones(s, s, dtype=torch.bool).tril(), float("-inf"))
        return (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, 16)


@pytest.mark.parametrize("world,layout", [(2, "contiguous"), (3, "zigzag")])
def test_learned_alibi_slopes_in_a_model(world, layout):
    """Zero-touch: the parameter's bias is proven a function of j - i and rides the op's
    relative table, so the slopes get their gradient (and every other parameter)."""
    torch.manual_seed(world)
    model = LearnedAlibi().double()
    x = torch.randn(2, 12, 16, dtype=torch.float64)
    params = dict(model.named_parameters())
    ref = model(x)
    ref_grads = dict(zip(params, torch.autograd.grad(ref.square().sum(), list(params.values()))))
    ring = ringfx.transform(model, mesh=ringfx.LoopbackRing(world), layout=layout)
    out = ring(x)
    grads = dict(zip(params, torch.autograd.grad(out.square().sum(), list(params.values()))))
    assert [(s.decision, s.mask_kind) for s in ring.sites] == [("rewritten", "causal+relative")]
    assert (out - ref).abs().max() < TOL
    for n, g in ref_grads.items():
        assert (grads[n] - g).abs().max() < TOL, n
    assert ref_grads["slopes"].abs().max() > 1e-3


def test_sinks_row_that_sees_no_key():
    """A query row with every key padded out: all its weight is on the sink (output 0),
    and the gradients stay finite."""
    ring = ringfx.LoopbackRing(2)
    q, k, v, sinks, _, dout = _inputs(2, "contiguous")
    pad = torch.ones(2, q.shape[2], dtype=torch.bool)
    pad[1] = False
    local = [t.clone().requires_grad_() for t in (q, k, v, sinks)]
    out = ringfx.ring_attention(*local[:3], group=ring, scale=SCALE, sinks=local[3], key_padding_mask=pad)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    grads = torch.autograd.grad(out, local, dout)
    assert all(torch.isfinite(g).all() for g in grads)


def test_opcheck_with_variants():
    ring = ringfx.LoopbackRing(3)
    q, k, v, sinks, _, _ = _inputs(3, "zigzag")
    torch.library.opcheck(
        torch.ops.ringfx.ring_attention.default,
        (q, k, v, None, None, None, ring.group_name, "zigzag", True, SCALE, 0, "auto"),
        {"sinks": sinks.requires_grad_(), "softcap": SOFTCAP, "chunk": 2, "alibi": _slopes(4)},
    )


def test_bad_variant_arguments_are_refused():
    q, k, v, sinks, _, _ = _inputs(2, "contiguous")
    ring = ringfx.LoopbackRing(2)
    with pytest.raises(ValueError, match="cannot soft-cap"):
        ringfx.ring_attention(q, k, v, group=ring, softcap=SOFTCAP, kernel="flash")
    with pytest.raises(ValueError, match="softcap=-1.0"):
        ringfx.ring_attention(q, k, v, group=ring, softcap=-1.0)
    with pytest.raises(ValueError, match=r"one logit per query head, shape \(4,\)"):
        ringfx.ring_attention(q, k, v, group=ring, sinks=sinks[:2])


# ------------------------------------------------------------------ a real gloo ring

def _variants_on_gloo_ring(rank, world):
    results = []
    for layout, causal, (softcap, sinks) in itertools.product(("contiguous", "zigzag"), (False, True), VARIANTS):
        results.append(((layout, causal, softcap, sinks),
                        check_variant(None, layout, causal, softcap, sinks, seed=11)))
    for layout, causal, (chunk, alibi) in itertools.product(("contiguous", "zigzag"), (False, True), POSITIONAL):
        results.append(((layout, causal, chunk, alibi),
                        check_variant(None, layout, causal, 0.0, False, seed=12, chunk=chunk, alibi=alibi, per_rank=5)))
    # calls cut into row parts (their block gradients summed before the dK/dV buffer travels),
    # and the flex kernel's backward (the dense stand-in: no flex backward on CPU)
    from ringfx.runtime import algorithm, kernels

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(algorithm, "MATERIALISED_ELEMENTS", 2 * 4 * 7 * 3)
        # an even chunk starts at a real key (``_inputs`` keeps every even position): no empty row
        for layout, (softcap, chunk, alibi) in itertools.product(("contiguous", "zigzag"),
                                                                 ((SOFTCAP, 0, False), (0.0, 4, True))):
            results.append(((layout, "row parts", softcap, chunk, alibi),
                            check_variant(None, layout, True, softcap, False, seed=13, chunk=chunk, alibi=alibi,
                                          padding=True, per_rank=6)))
        patch.setattr(kernels, "_flex_attend", dense_flex)
        for layout, (softcap, alibi, hkv) in itertools.product(("contiguous", "zigzag"),
                                                               ((SOFTCAP, False, 2), (0.0, True, 1))):
            results.append(((layout, "flex", softcap, alibi),
                            check_variant(None, layout, True, softcap, False, seed=14, alibi=alibi, hkv=hkv,
                                          per_rank=6, kernel="flex")))
    for layout in ("contiguous", "zigzag"):  # learned ALiBi slopes: each rank's part of their gradient, summed
        results.append(((layout, "learned slopes"), check_learned_slopes(None, layout, True, seed=15, padding=True)))
    # zero-touch on the real ring: the sinks' gradient, a per-rank part, averaged by the hooks
    torch.manual_seed(0)
    _, ref, got = _zero_touch(SinkColumn(), world, "zigzag", 13)
    errors = [(got[0] - ref[0]).abs().max().item()]  # the output; the input's gradient is per rank
    errors += [(got[2][n] - g).abs().max().item() for n, g in ref[2].items()]
    results.append((("zero-touch", "sinks"), errors))
    return results


@pytest.mark.gloo
def test_variants_on_gloo_ring():
    failures = [(rank, case, errors) for rank, results in enumerate(spawn_gloo(2, _variants_on_gloo_ring))
                for case, errors in results if not max(errors) < TOL]
    assert not failures, failures


# ------------------------------------------------- the spellings, found and rewritten

E, H, HKV, D = 16, 4, 2, 4


class _Attn(nn.Module):
    """Projections in and out (float64) around an ``attend`` spelled as a model writes it."""

    def __init__(self):
        super().__init__()
        self.q = nn.Linear(E, H * D, dtype=torch.float64)
        self.kv = nn.Linear(E, 2 * HKV * D, dtype=torch.float64)
        self.out = nn.Linear(H * D, E, dtype=torch.float64)

    def forward(self, x):
        b, s, _ = x.shape
        q = self.q(x).view(b, s, H, D).transpose(1, 2)
        k, v = (t.view(b, s, HKV, D).transpose(1, 2) for t in self.kv(x).split(HKV * D, dim=-1))
        k, v = (t.repeat_interleave(H // HKV, dim=1) for t in (k, v))
        causal = torch.full((s, s), torch.finfo(x.dtype).min, dtype=x.dtype).triu(1)
        return self.out(self.attend(q, k, v, causal).transpose(1, 2).reshape(b, s, H * D))


class SoftcapThenMask(_Attn):
    """transformers' Gemma 2 eager attention: scale, soft-cap, then the mask."""

    cap = 0.5

    def attend(self, q, k, v, mask):
        w = torch.matmul(q, k.transpose(2, 3)) * D ** -0.5
        w = w / self.cap
        w = torch.tanh(w)
        w = w * self.cap
        w = w + mask
        p = F.softmax(w, dim=-1, dtype=torch.float64).to(q.dtype)  # Gemma 2: float32, an upcast for bf16
        return torch.matmul(p, v)


class SinkColumn(_Attn):
    """transformers' GPT-OSS eager attention: the sink column joined, the row max
    subtracted, softmax, the column dropped."""

    def __init__(self):
        super().__init__()
        self.sinks = nn.Parameter(torch.randn(H, dtype=torch.float64))

    def attend(self, q, k, v, mask):
        w = torch.matmul(q, k.transpose(2, 3)) * D ** -0.5 + mask
        sinks = self.sinks.reshape(1, -1, 1, 1).expand(q.shape[0], -1, q.shape[-2], -1)
        combined = torch.cat([w, sinks], dim=-1)
        combined = combined - combined.max(dim=-1, keepdim=True).values
        p = F.softmax(combined, dim=-1, dtype=combined.dtype)
        return torch.matmul(F.dropout(p[..., :-1], p=0.0, training=False).to(v.dtype), v)


class SoftcapAndSinks(SinkColumn):
    """Both: soft-capped scores, then the mask, then the (uncapped) sink column."""

    def attend(self, q, k, v, mask):
        w = torch.matmul(q, k.transpose(2, 3)) * D ** -0.5
        w = torch.tanh(w / SoftcapThenMask.cap) * SoftcapThenMask.cap + mask
        sinks = self.sinks.reshape(1, -1, 1, 1).expand(q.shape[0], -1, q.shape[-2], -1)
        p = F.softmax(torch.cat([w, sinks], dim=-1), dim=-1)
        return torch.matmul(p[..., :-1], v)


class MaskThenSoftcap(SoftcapThenMask):
    """The mask before the tanh: tanh turns -inf into -cap, so masked keys still count."""

    def attend(self, q, k, v, mask):
        w = torch.matmul(q, k.transpose(2, 3)) * D ** -0.5 + mask
        w = torch.tanh(w / self.cap) * self.cap
        return torch.matmul(F.softmax(w, dim=-1), v)


class SinkColumnKept(SinkColumn):
    """The first column dropped instead of the sink's: not attention with a sink."""

    def attend(self, q, k, v, mask):
        w = torch.matmul(q, k.transpose(2, 3)) * D ** -0.5 + mask
        sinks = self.sinks.reshape(1, -1, 1, 1).expand(q.shape[0], -1, q.shape[-2], -1)
        p = F.softmax(torch.cat([sinks, w], dim=-1), dim=-1)
        return torch.matmul(p[..., 1:], v)


class RowMaxBeforeSinkColumn(SinkColumn):
    """The scores' own row max subtracted before the sink column is joined: that shifts the
    scores against the sink, so it is no longer attention with that sink."""

    def attend(self, q, k, v, mask):
        w = torch.matmul(q, k.transpose(2, 3)) * D ** -0.5 + mask
        w = w - w.amax(dim=-1, keepdim=True)
        sinks = self.sinks.reshape(1, -1, 1, 1).expand(q.shape[0], -1, q.shape[-2], -1)
        p = F.softmax(torch.cat([w, sinks], dim=-1), dim=-1)
        return torch.matmul(p[..., :-1], v)


def _zero_touch(model, world, layout, seq_len):
    """Output, input gradient and parameter gradients of ``model`` and of its transform
    (on a loopback ring of ``world``, or the default group when one is initialised)."""
    torch._dynamo.reset()
    x = torch.randn(2, seq_len, E, dtype=torch.float64, generator=torch.Generator().manual_seed(seq_len))
    weights = torch.linspace(-1, 1, 2 * seq_len * E, dtype=torch.float64).view(2, seq_len, E)

    def run(m):
        xi = x.clone().requires_grad_(True)
        out = m(xi)
        (out * weights).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        return out.detach(), xi.grad, grads

    ref = run(model)
    mesh = None if torch.distributed.is_initialized() else ringfx.LoopbackRing(world)
    ring = ringfx.transform(model, mesh=mesh, layout=layout)
    return ring, ref, run(ring)


@pytest.mark.parametrize("spelling,world,layout,seq_len", [
    (SoftcapThenMask, 3, "zigzag", 13), (SinkColumn, 2, "contiguous", 11), (SoftcapAndSinks, 2, "zigzag", 11),
], ids=["gemma2-softcap", "gpt-oss-sinks", "softcap-and-sinks"])
def test_spelling_rewritten_and_exact(spelling, world, layout, seq_len):
    torch.manual_seed(0)
    model = spelling()
    ring, ref, got = _zero_touch(model, world, layout, seq_len)
    (site,) = ring.sites
    assert site.decision == "rewritten" and site.mask_kind == "causal", site
    assert_lm_close(got, ref, TOL)
    # the graph: one ring op taking the variant; the tanh, or the cat and the softmax, gone
    (gm,) = [g.graph_module for g in ring.reports]
    (op,) = [n for n in gm.graph.nodes if n.target == torch.ops.ringfx.ring_attention.default]
    sinks, softcap = op.args[12:14]
    capped, with_sinks = spelling is not SinkColumn, spelling is not SoftcapThenMask
    assert ("softcap" in site.pattern) == capped and softcap == (SoftcapThenMask.cap if capped else 0.0)
    assert ("sinks" in site.pattern) == with_sinks and (sinks is None) != with_sinks
    assert not [n for n in gm.graph.nodes if n.target in (torch.tanh, "tanh", torch.cat, F.softmax)]
    if with_sinks:
        assert "sinks" in sinks.name and got[2]["sinks"].abs().max() > 1e-3  # its gradient: there, and right


@pytest.mark.parametrize("spelling,reason", [
    (MaskThenSoftcap, "mask"),  # left alone, the mask named
    (SinkColumnKept, None),  # a softmax over S + 1 columns: not taken for attention, runs unchanged
    (RowMaxBeforeSinkColumn, None),
], ids=["mask-before-tanh", "first-column-dropped", "row-max-before-sink-column"])
def test_look_alikes_are_not_rewritten(spelling, reason):
    torch.manual_seed(0)
    report = ringfx.explain(spelling(), torch.randn(2, 9, E, dtype=torch.float64))
    assert not report.rewritten, str(report)
    if reason is not None:
        assert report.left_alone and all(reason in s.reason for s in report.left_alone), str(report)


class ChunkedCausal(_Attn):
    """Llama 4's chunked attention written by hand: a key in the query's chunk of 4, not in
    its future (transformers' ``chunked_overlay``: ``kv_idx // chunk == q_idx // chunk``)."""

    chunk = 4

    def attend(self, q, k, v, mask):
        i = torch.arange(q.shape[-2])
        keep = (i[None, :] // self.chunk == i[:, None] // self.chunk) & (i[None, :] <= i[:, None])
        w = (torch.matmul(q, k.transpose(2, 3)) * D ** -0.5).masked_fill(~keep, float("-inf"))
        return torch.matmul(F.softmax(w, dim=-1), v)


class AlibiInSdpaMask(_Attn):
    """ALiBi folded into SDPA's float mask (MPT / Falcon style): per-head slopes times
    ``j - i``, plus the causal mask."""

    def attend(self, q, k, v, mask):
        i = torch.arange(q.shape[-2])
        bias = _slopes(H).to(q.dtype)[:, None, None] * (i[None, :] - i[:, None])
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias + mask)


class ChunkedAlibiNoncausal(_Attn):
    """Both, non-causal: ALiBi slopes as a buffer, a bool chunk mask (chunks of 3)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("slopes", _slopes(H), persistent=False)

    def attend(self, q, k, v, mask):
        i = torch.arange(q.shape[-2])
        bias = self.slopes[:, None, None] * (i[None, :] - i[:, None]).to(q.dtype)
        keep = (i[:, None] // 3) == (i[None, :] // 3)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.masked_fill(~keep, float("-inf")))


class SquaredDistanceBias(AlibiInSdpaMask):
    """Not ALiBi: a bias in (j - i)²; a function of j - i all the same, so passed as the op's
    relative-position table (Hq, 2S - 1), not as a dense bias."""

    def attend(self, q, k, v, mask):
        i = torch.arange(q.shape[-2])
        bias = -_slopes(H).to(q.dtype)[:, None, None] * (i[None, :] - i[:, None]) ** 2
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias + mask)


class ShiftedChunks(ChunkedCausal):
    """Not chunked attention from position 0: chunks start at position 1; a dense mask."""

    def attend(self, q, k, v, mask):
        i = torch.arange(q.shape[-2]) + 1
        keep = (i[None, :] // self.chunk == i[:, None] // self.chunk) & (i[None, :] <= i[:, None])
        w = (torch.matmul(q, k.transpose(2, 3)) * D ** -0.5).masked_fill(~keep, float("-inf"))
        return torch.matmul(F.softmax(w, dim=-1), v)


def _alibi_zoo():
    """tests/mixing_zoo.py's AlibiBias: a buffer of slopes, the distances from aranges, the causal
    triu filled with -inf, through SDPA's attn_mask."""
    import mixing_zoo

    return mixing_zoo.AlibiBias()


@pytest.mark.parametrize("make,world,layout,seq_len,mask_kind", [
    (ChunkedCausal, 2, "zigzag", 13, "causal+chunk(4)"),
    (AlibiInSdpaMask, 3, "contiguous", 13, "causal+alibi"),
    (ChunkedAlibiNoncausal, 2, "contiguous", 11, "chunk(3)+alibi"),
    (_alibi_zoo, 2, "zigzag", 11, "causal+alibi"),
    (SquaredDistanceBias, 2, "zigzag", 11, "causal+relative"),
    (ShiftedChunks, 2, "contiguous", 11, "causal+dense"),
], ids=["chunked-causal", "alibi-sdpa-mask", "chunked-alibi-noncausal", "mixing-zoo-alibi", "not-alibi-relative",
        "shifted-chunks-dense"])
def test_positional_spelling_rewritten_and_exact(make, world, layout, seq_len, mask_kind):
    torch.manual_seed(0)
    model = make()
    ring, ref, got = _zero_touch(model, world, layout, seq_len)
    (site,) = ring.sites
    assert site.decision == "rewritten" and site.mask_kind == mask_kind, site
    assert_lm_close(got, ref, TOL)
    (gm,) = [g.graph_module for g in ring.reports]
    (op,) = [n for n in gm.graph.nodes if n.target == torch.ops.ringfx.ring_attention.default]
    chunk, slopes = (op.args[14:16] + (0, None))[:2]
    assert chunk == (int(mask_kind.split("chunk(")[1][0]) if "chunk(" in mask_kind else 0)
    if "alibi" in mask_kind:  # the slopes, read off the model's mask; the bias gone from the graph
        assert op.args[5] is None and op.args[0:3]
        held = getattr(gm, slopes.target)
        want = model.slopes if hasattr(model, "slopes") else _slopes(H)
        assert torch.equal(held, want.to(held.dtype)), (held, want)
    else:
        assert slopes is None


# ------------------------------------------- transformers' Gemma 2 and GPT-OSS, zero-touch

def _tiny_lm(name, head_dim=8):
    """A tiny random transformers LM in float64 with the variant's eager attention: Gemma 2
    (a sliding-window and a full layer, soft-capped scores) or GPT-OSS (one sliding-window
    layer with sinks, two experts)."""
    transformers = pytest.importorskip("transformers", reason="needs transformers")
    common = dict(vocab_size=96, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim,
                  max_position_embeddings=128, sliding_window=5, attn_implementation="eager", pad_token_id=0)
    torch.manual_seed(0)
    if name == "gemma2":
        if not hasattr(transformers, "Gemma2ForCausalLM"):
            pytest.skip("transformers has no Gemma 2")
        cfg = transformers.Gemma2Config(intermediate_size=64, num_hidden_layers=2, query_pre_attn_scalar=head_dim,
                                        attn_logit_softcapping=1.0, final_logit_softcapping=None, **common)
        model = transformers.Gemma2ForCausalLM(cfg)
    else:
        if not hasattr(transformers, "GptOssForCausalLM"):
            pytest.skip("transformers has no GPT-OSS")
        # batched experts: the grouped-matmul ones take no float64, the eager ones break the graph
        cfg = transformers.GptOssConfig(intermediate_size=32, num_hidden_layers=1, num_local_experts=2,
                                        num_experts_per_tok=1, experts_implementation="batched_mm", **common)
        model = transformers.GptOssForCausalLM(cfg)
    model = model.double().eval()
    with torch.no_grad():  # scores large enough for tanh to bend them; sinks away from 0
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(30.0)
            if name == "gpt_oss":
                layer.self_attn.sinks.normal_()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 96, (2, 13), generator=g)
    mask = torch.ones(2, 13, dtype=torch.long)
    mask[1, 9:] = 0
    ids[1, 9:] = 0
    return model, dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100), use_cache=False)


def _lm_run(model, params, inputs):
    out = model(**inputs)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in params}
    for _, p in params:
        p.grad = None
    return out.logits.detach(), out.loss.detach(), grads


def assert_lm_close(got, ref, tol):
    """Two tensors (logits and loss of ``_lm_run``; output and input gradient of
    ``_zero_touch``) and every parameter gradient within ``tol``."""
    (logits, loss, grads), (ref_logits, ref_loss, ref_grads) = got, ref
    torch.testing.assert_close(logits, ref_logits, atol=tol, rtol=tol)
    torch.testing.assert_close(loss, ref_loss, atol=tol, rtol=tol)
    for n, g in ref_grads.items():
        torch.testing.assert_close(grads[n], g, atol=tol, rtol=tol, msg=lambda m: f"{n}: {m}")


# Gemma 2's eager attention takes its softmax in float32 (an upcast for bf16, a rounding for
# this float64 model); the ring op keeps float64, so the two agree to float32's precision
LM_TOL = {"gemma2": 1e-6, "gpt_oss": TOL}


@pytest.mark.parametrize("name", ["gemma2", "gpt_oss"])
def test_transformers_model_rewritten_and_exact(name):
    torch._dynamo.reset()
    model, inputs = _tiny_lm(name)
    params = list(model.named_parameters())
    ref_logits, ref_loss, ref_grads = _lm_run(model, params, inputs)
    ring = ringfx.transform(model, mesh=ringfx.LoopbackRing(2), layout="zigzag")
    with warnings.catch_warnings():
        # GPT-OSS's expert routing (top-k over the flattened tokens) runs all-gathered: warned
        warnings.simplefilter("ignore", ringfx.RingfxWarning)
        logits, loss, grads = _lm_run(ring, params, inputs)
    assert ring.sites and all(s.decision == "rewritten" for s in ring.sites), [
        (s.pattern, s.decision, s.reason) for s in ring.sites]
    assert all(("softcap" if name == "gemma2" else "sinks") in s.pattern for s in ring.sites)
    tol = LM_TOL[name]
    assert_lm_close((logits, loss, grads), (ref_logits, ref_loss, ref_grads), tol)
    if name == "gpt_oss":
        assert ref_grads["model.layers.0.self_attn.sinks"].abs().max() > 1e-4


def test_transformers_llama4_chunked_attention_rewritten_and_exact():
    """transformers' Llama 4 text model (a chunked-attention layer and a full one, no MoE
    layer): the chunked mask (``masking_utils.chunked_overlay`` and causal) becomes the
    op's ``chunk``. Called without an attention mask: with one, transformers offsets the
    chunks by each row's left padding (data, not sizes), and the mask is passed whole as a
    dense bias instead (exact too, not native)."""
    transformers = pytest.importorskip("transformers", reason="needs transformers")
    if not hasattr(transformers, "Llama4ForCausalLM"):
        pytest.skip("transformers has no Llama 4")
    torch._dynamo.reset()
    cfg = transformers.Llama4TextConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, intermediate_size_mlp=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128, attention_chunk_size=4,
        num_local_experts=1, interleave_moe_layer_step=3, no_rope_layers=[1, 0], pad_token_id=0,
        attn_implementation="sdpa")
    torch.manual_seed(0)
    model = transformers.Llama4ForCausalLM(cfg).double().eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(30.0)
    ids = torch.randint(3, 96, (2, 13), generator=torch.Generator().manual_seed(1))
    inputs = dict(input_ids=ids, labels=ids, use_cache=False)
    params = list(model.named_parameters())
    ref_logits, ref_loss, ref_grads = _lm_run(model, params, inputs)
    ring = ringfx.transform(model, mesh=ringfx.LoopbackRing(2), layout="zigzag")
    # its complex RoPE (torch.polar, view_as_complex) is per token: sharded, no all-gather, no warning
    logits, loss, grads = _lm_run(ring, params, inputs)
    assert not ring.reports[0].sharding.costly_fallbacks, ring.reports[0].sharding.costly_fallbacks
    assert [(s.decision, s.mask_kind) for s in ring.sites] == [("rewritten", "causal+chunk(4)"),
                                                                ("rewritten", "causal")]
    assert_lm_close((logits, loss, grads), (ref_logits, ref_loss, ref_grads), TOL)


def test_transformers_mpt_alibi_rewritten_natively():
    """transformers' MPT adds its ALiBi bias (``slopes[h] * (j - (S - 1))``: a constant per
    query row away from ``slopes[h] * (j - i)``) to the eager scores: the op's slopes."""
    transformers = pytest.importorskip("transformers", reason="needs transformers")
    torch._dynamo.reset()
    cfg = transformers.MptConfig(vocab_size=96, d_model=32, n_heads=4, n_layers=2, max_seq_len=64,
                                 attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.MptForCausalLM(cfg).double().eval()
    ids = torch.randint(3, 96, (2, 13), generator=torch.Generator().manual_seed(1))
    inputs = dict(input_ids=ids, labels=ids, use_cache=False)
    params = list(model.named_parameters())
    ref_logits, ref_loss, ref_grads = _lm_run(model, params, inputs)
    ring = ringfx.transform(model, mesh=ringfx.LoopbackRing(3), layout="contiguous")
    logits, loss, grads = _lm_run(ring, params, inputs)
    assert [(s.decision, s.mask_kind) for s in ring.sites] == [("rewritten", "causal+alibi")] * 2
    tol = 1e-6  # MPT takes its softmax in float32 (a rounding for this float64 model); the op keeps float64
    assert_lm_close((logits, loss, grads), (ref_logits, ref_loss, ref_grads), tol)


# -- MLA: a value head dim unlike the query/key head dim (DeepSeek-V2/V3) ---------------------------


class _Mla(torch.nn.Module):
    def __init__(self, d_qk, d_v, heads=4, kv_heads=2, e=16):
        super().__init__()
        f64 = dict(dtype=torch.float64)
        self.q = torch.nn.Linear(e, heads * d_qk, **f64)
        self.k = torch.nn.Linear(e, kv_heads * d_qk, **f64)
        self.v = torch.nn.Linear(e, kv_heads * d_v, **f64)
        self.o = torch.nn.Linear(heads * d_v, e, **f64)
        self.shape = (heads, kv_heads, d_qk, d_v)

    def forward(self, x):
        b, s, _ = x.shape
        h, hkv, d_qk, d_v = self.shape
        q = self.q(x).view(b, s, h, d_qk).transpose(1, 2)
        k = self.k(x).view(b, s, hkv, d_qk).transpose(1, 2)
        v = self.v(x).view(b, s, hkv, d_v).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.o(o.transpose(1, 2).reshape(b, s, h * d_v))


@pytest.mark.parametrize("d_qk,d_v", [(12, 8), (8, 12)], ids=["v-narrower", "v-wider"])
@pytest.mark.parametrize("world,layout", [(1, "contiguous"), (2, "contiguous"), (3, "zigzag"), (4, "zigzag")])
def test_mla_value_head_dim_differs(d_qk, d_v, world, layout):
    """The value head dim differs from the query/key one: the narrower side is zero-padded
    for the block kernels and the output cut back (exact, forward and backward; an odd
    length, padded inside)."""
    import copy

    torch.compiler.reset()
    torch.manual_seed(0)
    model = _Mla(d_qk, d_v)
    ref = copy.deepcopy(model)
    x = torch.randn(2, 13, 16, dtype=torch.float64)
    w = torch.randn(2, 13, 16, dtype=torch.float64)
    (ref(x) * w).sum().backward()
    ring = ringfx.transform(model, mesh=ringfx.LoopbackRing(world), layout=layout)
    out = ring(x)
    (out * w).sum().backward()
    assert [s.decision for s in ring.sites] == ["rewritten"]
    torch.testing.assert_close(out, ref(x), atol=1e-10, rtol=0)
    for p, r in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, r.grad, atol=1e-10, rtol=0)


# -- BLOOM: ALiBi as the bias of a baddbmm on the heads folded into the batch -----------------


def _bloom_alibi(attention_mask, heads, dtype):
    """transformers' ``build_alibi_tensor``: per-key positions from the mask's cumsum, times
    the slopes, as ``(B*H, 1, S)``."""
    b, s = attention_mask.shape
    slopes = torch.pow(torch.full((), 2.0 ** (-8.0 / heads)), torch.arange(1, heads + 1, dtype=torch.int32))
    positions = ((attention_mask.cumsum(dim=-1) - 1) * attention_mask)[:, None, :]
    return (slopes[..., None] * positions).reshape(b * heads, 1, s).to(dtype)


class BloomAttention(_Attn):
    """BLOOM's eager attention: ``alibi.baddbmm(q, kᵀ)`` on ``(B*H, S, D)``, the scores viewed
    as ``(B, H, S, S)`` for the mask and the float32 softmax, the probabilities viewed back
    as ``(B*H, S, S)`` for ``bmm`` with v (here every token real: the ALiBi of sizes)."""

    def attend(self, q, k, v, mask):
        b, h, s, d = q.shape
        alibi = _bloom_alibi(torch.ones(b, s, dtype=torch.long), h, q.dtype)
        scores = alibi.baddbmm(batch1=q.reshape(b * h, -1, d), batch2=k.reshape(b * h, -1, d).transpose(-1, -2),
                               beta=1.0, alpha=d ** -0.5)
        w = scores.view(b, h, s, -1) + mask
        p = F.softmax(w, dim=-1, dtype=torch.float64).to(q.dtype)
        out = torch.bmm(F.dropout(p, 0.0, False).view(b * h, s, -1), v.reshape(b * h, -1, d))
        return out.view(b, h, s, d)


def test_bloom_spelling_rewritten_and_exact():
    torch.manual_seed(0)
    ring, ref, got = _zero_touch(BloomAttention(), 3, "zigzag", 13)
    (site,) = ring.sites
    assert site.decision == "rewritten" and site.mask_kind == "causal+alibi" and "merge-heads" in site.pattern, site
    assert_lm_close(got, ref, TOL)
    (gm,) = [g.graph_module for g in ring.reports]
    (op,) = [n for n in gm.graph.nodes if n.target == torch.ops.ringfx.ring_attention.default]
    held = getattr(gm, op.args[15].target)  # the slopes, one per head (read off the folded bias)
    torch.testing.assert_close(held, torch.tensor([2.0 ** (-8.0 * (i + 1) / H) for i in range(H)],
                                                  dtype=held.dtype))


def test_transformers_bloom_rewritten_and_exact():
    """transformers' BLOOM (eager: its only implementation): ALiBi from the padding mask's
    cumsum (data, per key: gathered along the ring as a per-key bias), baddbmm on folded
    heads; right padding; logits, loss and every gradient."""
    transformers = pytest.importorskip("transformers", reason="needs transformers")
    torch._dynamo.reset()
    cfg = transformers.BloomConfig(vocab_size=96, hidden_size=32, n_head=4, n_layer=2, attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.BloomForCausalLM(cfg).double().eval()
    ids = torch.randint(3, 96, (2, 13), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 13, dtype=torch.long)
    mask[1, 10:] = 0
    inputs = dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100), use_cache=False)
    params = list(model.named_parameters())
    ref_logits, ref_loss, ref_grads = _lm_run(model, params, inputs)
    ring = ringfx.transform(model, mesh=ringfx.LoopbackRing(2), layout="zigzag")
    with warnings.catch_warnings():
        # its GeLU is an autograd.Function (GeLUFunction.apply), which ringfx runs all-gathered: warned
        warnings.simplefilter("ignore", ringfx.RingfxWarning)
        logits, loss, grads = _lm_run(ring, params, inputs)
    assert [(s.decision, s.mask_kind) for s in ring.sites] == [("rewritten", "causal+key_padding")] * 2, ring.sites
    fallbacks = ring.reports[0].sharding.costly_fallbacks
    assert fallbacks and all("GeLUFunction" in f for f in fallbacks), fallbacks
    tol = 1e-6  # BLOOM takes its softmax in float32 (a rounding for this float64 model); the op keeps float64
    assert_lm_close((logits, loss, grads), (ref_logits, ref_loss, ref_grads), tol)
