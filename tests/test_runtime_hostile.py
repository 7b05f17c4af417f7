"""Hostile inputs to the ring attention op: learned biases, malformed masks, ranks that
disagree, values that would change meaning, degenerate sizes, large offsets. Every
check runs on a loopback ring; the ones where communication matters also run on one
real gloo ring of 2 processes (a single spawn runs all of them)."""

import math

import pytest
import torch
import torch.nn.functional as F

import ringfx
from ringfx.testing import spawn_gloo
from ring_cases import TOLERANCE, Case, run_case

RING = ringfx.LoopbackRing(2)
B, H, S, D = 2, 4, 12, 8
F64 = torch.float64


def _qkv(b=B, h=H, s=S, d=D, hkv=None, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, s, d, generator=g, dtype=dtype)
    k, v = (torch.randn(b, hkv or h, s, d, generator=g, dtype=dtype) for _ in range(2))
    return q, k, v


def _grads(fn, tensors, dout):
    leaves = [t.clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    return (out, *torch.autograd.grad(out, leaves, dout))


def _op(q, k, v, pad=None, seg=None, bias=None, *, group="loopback:2", layout="contiguous", causal=False,
        scale=None, window=0, kernel="auto"):
    """The custom op itself, as the graph rewrite calls it (no wrapper checks)."""
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    return torch.ops.ringfx.ring_attention(q, k, v, pad, seg, bias, group, layout, causal, scale, window,
                                           kernel)


# -- a bias that requires grad is refused on every path --------------------------------


@pytest.mark.parametrize("shape", [(B, 1, 1, S), (B, H, S, S)], ids=["per-key", "dense"])
def test_op_refuses_a_bias_that_requires_grad(shape):
    q, k, v = (t.requires_grad_() for t in _qkv())
    bias = torch.randn(shape, dtype=F64, requires_grad=True)
    with pytest.raises(ValueError, match="learned attention biases are not supported"):
        _op(q, k, v, bias=bias)
    # a constant bias, or no autograd at all, still runs
    _op(q, k, v, bias=bias.detach())
    with torch.no_grad():
        _op(q, k, v, bias=bias)


def test_compiled_op_refuses_a_bias_that_requires_grad():
    # the path of a rewritten graph under AOTAutograd: the op's autograd formula refuses it
    q, k, v = (t.requires_grad_() for t in _qkv())
    bias = torch.randn(B, 1, 1, S, dtype=F64, requires_grad=True)
    compiled = torch.compile(lambda *t: _op(*t)[0], backend="aot_eager", fullgraph=True)
    # dynamo raises it from fake-tensor propagation wrapped in its TorchRuntimeError, a RuntimeError
    with pytest.raises(RuntimeError, match="learned attention biases are not supported"):
        compiled(q, k, v, None, None, bias)


# -- every input is checked before the first transfer ---------------------------------


BAD_INPUTS = [
    ({"attn_bias": torch.zeros(3, 1, 1, S, dtype=F64)}, ValueError, "attn_bias"),  # batch 3 for B=2
    ({"attn_bias": torch.zeros(1, 3, 1, S, dtype=F64)}, ValueError, "attn_bias"),  # 3 heads for 4
    ({"attn_bias": torch.zeros(1, 1, 5, S, dtype=F64)}, ValueError, "attn_bias"),
    ({"attn_bias": torch.zeros(1, S + 1, dtype=F64)}, ValueError, "attn_bias"),
    ({"attn_bias": torch.zeros(S, dtype=F64)}, ValueError, "attn_bias"),  # SDPA takes 2 to 4 dims
    ({"attn_bias": torch.zeros((), dtype=F64)}, ValueError, "attn_bias"),
    ({"attn_bias": torch.zeros(1, 1, 1, 1, S, dtype=F64)}, ValueError, "attn_bias"),
    ({"attn_bias": torch.ones(1, 1, 1, S, dtype=torch.int64)}, TypeError, "bool .*float"),
    ({"attn_bias": torch.ones(1, 1, 1, S, dtype=torch.uint8)}, TypeError, "bool .*float"),
    ({"key_padding_mask": torch.ones(3, S, dtype=torch.bool)}, ValueError, "key_padding_mask"),
    ({"key_padding_mask": torch.ones(B, S, dtype=torch.int64)}, TypeError, "key_padding_mask"),
    ({"segment_ids": torch.ones(B, S - 1, dtype=torch.int64)}, ValueError, "segment_ids"),
    ({"segment_ids": torch.ones(B, S, dtype=F64)}, TypeError, "segment_ids"),
    ({"window": 2**63}, ValueError, "window"),
    ({"window": -3}, ValueError, "window"),
]


@pytest.mark.parametrize("kwargs,error,match", BAD_INPUTS)
def test_bad_inputs_raise_clearly_from_the_wrapper(kwargs, error, match):
    q, k, v = _qkv()
    with pytest.raises(error, match=match):
        ringfx.ring_attention(q, k, v, group=RING, **kwargs)


@pytest.mark.parametrize("kwargs,error,match", BAD_INPUTS)
def test_bad_inputs_raise_clearly_from_the_op(kwargs, error, match):
    q, k, v = _qkv()
    pad, seg, bias = (kwargs.get(n) for n in ("key_padding_mask", "segment_ids", "attn_bias"))
    window = kwargs.get("window", 0)
    if window == 2**63:
        window = 2**63 - 1  # the schema's int64 cannot carry more; a huge window is fine
        _op(q, k, v, window=window)
        return
    with pytest.raises(error, match=match):
        _op(q, k, v, pad, seg, bias, window=window)


# SDPA broadcasts attn_mask to (B, H, Sq, Sk) with the usual rules: so does the ring
# (rows: this rank's queries, columns: every key in global order)
BROADCAST_BIASES = [(1, S), (S, S), (S, 1), (H, S, S), (1, H, 1, S), (B, 1, 1, S), (B, H, S, S),
                    (B, 1, S, 1), (1, 1, 1, 1)]


@pytest.mark.parametrize("shape", BROADCAST_BIASES, ids=str)
@pytest.mark.parametrize("kind", ["float", "bool"])
def test_broadcastable_bias_shapes_match_sdpa(shape, kind):
    q, k, v = _qkv()
    g = torch.Generator().manual_seed(1)
    bias = torch.randn(shape, generator=g, dtype=F64)
    if kind == "bool":
        bias = bias > -0.5
        if bias.shape[-1] > 1:
            bias[..., 0] = True  # every query sees a key (SDPA gives NaN for rows that see none)
        else:
            bias = torch.ones_like(bias)
    dout = torch.randn(q.shape, generator=g, dtype=F64)
    got = _grads(lambda *t: ringfx.ring_attention(*t, group=ringfx.LoopbackRing(3), attn_bias=bias),
                 (q, k, v), dout)
    ref = _grads(lambda *t: F.scaled_dot_product_attention(*t, attn_mask=bias), (q, k, v), dout)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


def test_sparse_inputs_are_refused():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="sparse|strided"):
        ringfx.ring_attention(q.to_sparse(), k, v, group=RING)
    with pytest.raises(TypeError, match="attn_bias.*(sparse|strided)"):
        _op(q, k, v, bias=torch.zeros(B, 1, S, S, dtype=F64).to_sparse())


# -- values keep their meaning ---------------------------------------------------------


@pytest.mark.parametrize("kernel", ["auto", "math"])
@pytest.mark.parametrize("causal", [False, True])
def test_nan_in_a_query_row_propagates_like_sdpa(kernel, causal):
    q, k, v = _qkv()
    q[0, 1, 5, 2] = float("nan")
    dout = torch.randn(q.shape, dtype=F64)
    got = _grads(lambda *t: ringfx.ring_attention(*t, group=ringfx.LoopbackRing(3), causal=causal,
                                                  kernel=kernel), (q, k, v), dout)
    ref = _grads(lambda *t: F.scaled_dot_product_attention(*t, is_causal=causal), (q, k, v), dout)
    for name, a, b in zip(("out", "dq"), got, ref):
        assert torch.equal(a.isnan(), b.isnan()), name
    # dK/dV: NaN for every key the NaN query sees (under causal SDPA also spreads it to
    # keys it does not see, and the ring to the rest of the query's block)
    seen = slice(None, 6 if causal else None)
    for name, a, b in zip(("dk", "dv"), got[2:], ref[2:]):
        assert a[0, 1, seen].isnan().all(), name
        a[0, 1], b[0, 1] = 0.0, 0.0
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
        torch.testing.assert_close(a.nan_to_num(0.0), b.nan_to_num(0.0), atol=1e-10, rtol=0, msg=name)


def test_out_of_range_dims_are_refused_like_torch():
    x = torch.zeros(2, 3, 12, 4)
    for fn in (ringfx.shard, ringfx.unshard):
        with pytest.raises(IndexError, match="out of range"):
            fn(x, 4, group=RING)
        with pytest.raises(IndexError, match="out of range"):
            fn(x, -5, group=RING)
    torch.testing.assert_close(ringfx.shard(x, -2, layout="zigzag", group=RING),
                               ringfx.shard(x, 2, layout="zigzag", group=RING))


# -- degenerate sizes --------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(B, H, 0, D), (B, 0, S, D), (0, H, S, D)], ids=["S=0", "H=0", "B=0"])
@pytest.mark.parametrize("kernel", ["auto", "math"])
def test_empty_inputs_give_empty_results_like_sdpa(shape, kernel):
    q = torch.randn(shape, dtype=F64)
    dout = torch.randn(shape, dtype=F64)
    got = _grads(lambda *t: ringfx.ring_attention(*t, group=RING, causal=True, kernel=kernel), (q, q, q), dout)
    ref = _grads(lambda *t: F.scaled_dot_product_attention(*t, is_causal=True), (q, q, q), dout)
    for a, b in zip(got, ref):
        assert a.shape == b.shape and a.dtype == b.dtype
    out, lse = _op(q, q, q, causal=True, kernel=kernel)
    assert out.shape == shape and lse.shape == shape[:-1]


def test_zero_head_dim_is_refused():
    q = torch.randn(B, H, S, 0, dtype=F64)
    with pytest.raises(ValueError, match="head dim"):
        ringfx.ring_attention(q, q, q, group=RING)
    with pytest.raises(ValueError, match="head dim"):
        _op(q, q, q, scale=1.0)


# -- the math kernel stays accurate under a large common offset -------------------------


@pytest.mark.parametrize("causal", [False, True])
def test_math_kernel_is_stable_under_a_large_key_offset(causal):
    q, k, v = _qkv(s=16, seed=3)
    k, v = k + 1e4, v + 1e4
    dout = torch.randn(q.shape, dtype=F64, generator=torch.Generator().manual_seed(4))
    ref = _grads(lambda *t: F.scaled_dot_product_attention(*t, is_causal=causal), (q, k, v), dout)
    errors = {}
    for kernel in ("auto", "math"):
        got = _grads(lambda *t: ringfx.ring_attention(*t, group=RING, causal=causal, kernel=kernel), (q, k, v),
                     dout)
        errors[kernel] = [(a - b).abs().max().item() for a, b in zip(got, ref)]
    # as accurate as the default kernel (within 4x), which is at the reference's own noise
    for i, name in enumerate(("out", "dq", "dk", "dv")):
        assert errors["math"][i] <= 4 * errors["auto"][i] + 1e-11, (name, errors)


# -- one real gloo ring of 2: disagreement and failures leave the ring usable -----------


def _outcome(fn):
    try:
        return ("ok", fn())
    except Exception as e:  # noqa: BLE001 - the test inspects what each rank raised
        return (type(e).__name__, str(e))


def _hostile_on_ring(rank, world):
    import torch.distributed as dist

    from ringfx.runtime.kernels import MathKernel

    group = dist.group.WORLD
    s_local = 6
    q, k, v = _qkv(s=s_local, seed=rank)
    results = {}

    def valid(name, seed):
        # a valid call right after: exact forward and backward on every rank
        results[name + " then valid"] = _outcome(
            lambda: max(run_case(Case(bias=True, padding=True, causal=True), group, F64, seed=seed)))

    def attempt(name, **kwargs):
        results[name] = _outcome(lambda: ringfx.ring_attention(q, k, v, group=group, **kwargs).shape)
        valid(name, len(results))

    attempt("bias batch 3", attn_bias=torch.zeros(3, 1, 1, s_local * world, dtype=F64))
    attempt("bias 3 heads", attn_bias=torch.zeros(1, 3, s_local, s_local * world, dtype=F64))
    attempt("bias batch 3 on rank 0 only",
            attn_bias=torch.zeros(3 if rank == 0 else 1, 1, 1, s_local * world, dtype=F64))
    attempt("int bias on rank 1 only",
            attn_bias=torch.zeros(1, 1, 1, s_local * world, dtype=torch.int64 if rank == 1 else F64))
    attempt("scale per rank", scale=0.5 + rank)
    attempt("kernel per rank", kernel="math" if rank else "auto")
    attempt("window per rank", window=3 + rank)
    attempt("bias on rank 0 only", attn_bias=torch.zeros(1, 1, 1, s_local * world, dtype=F64) if rank == 0 else None)
    results["S=0 on every rank"] = _outcome(
        lambda: ringfx.ring_attention(*(t[:, :, :0] for t in (q, k, v)), group=group, causal=True).shape)

    # a failure inside a block kernel, after the first transfer was posted
    def failing_forward(self, *args, **kwargs):
        raise RuntimeError("injected kernel failure")

    for who in ((0, 1), (0,)):
        name = f"kernel fails mid-ring on ranks {who}"
        original = MathKernel.forward
        if rank in who:
            MathKernel.forward = failing_forward
        try:
            results[name] = _outcome(lambda: ringfx.ring_attention(q, k, v, group=group, kernel="math").shape)
        finally:
            MathKernel.forward = original
        valid(name, len(results))

    x = torch.arange(4 + 2 * rank, dtype=F64)[None].expand(3, -1)
    results["unshard lengths per rank"] = _outcome(lambda: ringfx.unshard(x, 1, group=group).shape)
    y = torch.arange(4, dtype=F64)[None] + 4 * rank
    results["unshard then valid"] = _outcome(lambda: ringfx.unshard(y, -1, group=group).tolist())
    return results


@pytest.fixture(scope="module")
def gloo_ring_of_2():
    return spawn_gloo(2, _hostile_on_ring, timeout=30)


EXPECTED_ERRORS = {
    "bias batch 3": ("ValueError", "attn_bias"),
    "bias 3 heads": ("ValueError", "attn_bias"),
    "scale per rank": ("ValueError", "disagree on the scale"),
    "kernel per rank": ("ValueError", "disagree on the kernel"),
    "window per rank": ("ValueError", "disagree on the window"),
    "bias on rank 0 only": ("ValueError", "disagree on the attn bias"),
    "unshard lengths per rank": ("ValueError", "unshard"),
}


@pytest.mark.gloo
@pytest.mark.parametrize("name", sorted(EXPECTED_ERRORS))
def test_gloo_disagreement_raises_on_every_rank(gloo_ring_of_2, name):
    kind, match = EXPECTED_ERRORS[name]
    for rank, results in enumerate(gloo_ring_of_2):
        got = results[name]
        assert got[0] == kind and match in got[1], (rank, got)


@pytest.mark.gloo
@pytest.mark.parametrize("name,bad_rank,kind,match", [
    ("bias batch 3 on rank 0 only", 0, "ValueError", "attn_bias"),
    ("int bias on rank 1 only", 1, "TypeError", "attn_bias"),
])
def test_gloo_bad_input_on_one_rank_raises_on_every_rank(gloo_ring_of_2, name, bad_rank, kind, match):
    for rank, results in enumerate(gloo_ring_of_2):
        got = results[name]
        if rank == bad_rank:
            assert got[0] == kind and match in got[1], (rank, got)
        else:
            assert got[0] == "ValueError" and f"rank {bad_rank}" in got[1] and "refused" in got[1], (rank, got)


@pytest.mark.gloo
def test_gloo_every_valid_call_after_a_failure_is_exact(gloo_ring_of_2):
    for rank, results in enumerate(gloo_ring_of_2):
        for name, (kind, value) in results.items():
            if name.endswith("then valid") and not name.startswith("unshard"):
                assert kind == "ok" and value < TOLERANCE[F64], (rank, name, kind, value)
        assert results["unshard then valid"] == ("ok", [list(range(8))]), rank


@pytest.mark.gloo
def test_gloo_empty_and_failing_calls(gloo_ring_of_2):
    for rank, results in enumerate(gloo_ring_of_2):
        assert results["S=0 on every rank"] == ("ok", torch.Size([B, H, 0, D])), rank
        kind, message = results["kernel fails mid-ring on ranks (0, 1)"]
        assert kind == "RuntimeError" and "injected kernel failure" in message, rank
    assert gloo_ring_of_2[0]["kernel fails mid-ring on ranks (0,)"][0] == "RuntimeError"
