"""A learned relative-position bias (T5) on the ring: the op's ``rel_bias`` table over the
distances ``j - i``, its gradient, and the rewrite that builds it from a model's own
bucketing and embedding.

* the op against a plain single-process reference (the bias gathered into an S x S tensor),
  loopback rings P = 1..4, both layouts, causal or not, GQA, forward and backward (q, k, v
  and the table) in float64; with the other variants at once; real gloo rings of 2, 3 and 4
  (one spawn per ring size);
* a hand-written T5-style attention (bucketed distances, an ``nn.Embedding`` table shared by
  two layers) rewritten zero-touch and exact, with the embedding weight's gradient; spellings
  that are not a function of ``j - i`` left alone;
* transformers' ``T5EncoderModel`` (eager and sdpa) rewritten and exact on loopback rings.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ringfx
from ringfx.testing import spawn_gloo
from test_variants import _zero_touch, shard_errors  # the same width E: one helper for both files

TOL = 1e-10  # float64
SCALE = 0.3


def reference(q, k, v, table, *, causal=False, window=0, pad=None, softcap=0.0, sinks=None, slopes=None):
    """Attention with the table gathered into a dense (H, S, S) bias: ``table[h, j - i + S - 1]``."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    n = q.shape[2]
    i = torch.arange(n)
    s = q @ k.transpose(-2, -1) * SCALE
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    s = s + table[:, i[None, :] - i[:, None] + n - 1][None]
    if slopes is not None:
        s = s + slopes[:, None, None] * (i[None, :] - i[:, None]).to(s.dtype)
    keep = torch.ones(n, n, dtype=torch.bool)
    if causal:
        keep &= i[:, None] >= i[None, :]
    if window:
        keep &= i[:, None] - i[None, :] < window
    keep = keep[None, None] if pad is None else keep[None, None] & pad[:, None, None, :]
    s = s.masked_fill(~keep, float("-inf"))
    if sinks is not None:
        s = torch.cat([s, sinks.reshape(1, -1, 1, 1).expand(q.shape[0], -1, n, 1)], dim=-1)
    p = torch.softmax(s, dim=-1)
    return (p[..., :-1] if sinks is not None else p) @ v


def check_table(group, layout, causal, *, seed=0, hq=4, hkv=2, per_rank=3, window=0, padding=False, softcap=0.0,
                sinks=False, alibi=False, learned=True):
    """Max abs errors of this rank's out, dq, dk, dv and of the table's gradient (summed over
    a real ring, each rank holding its own queries' part), against ``reference``."""
    world = ringfx.runtime.ring_size(group)
    g = torch.Generator().manual_seed(seed)
    s = per_rank * world * (2 if layout == "zigzag" else 1)
    q = 3 * torch.randn(2, hq, s, 8, generator=g, dtype=torch.float64)
    k = 3 * torch.randn(2, hkv, s, 8, generator=g, dtype=torch.float64)
    v = torch.randn(2, hkv, s, 8, generator=g, dtype=torch.float64)
    table = 2 * torch.randn(hq, 2 * s - 1, generator=g, dtype=torch.float64)
    dout = torch.randn(2, hq, s, 8, generator=g, dtype=torch.float64)
    sink = torch.randn(hq, generator=g, dtype=torch.float64) if sinks else None
    pad = None
    if padding:
        pad = torch.rand(2, s, generator=g) > 0.3
        pad[:, ::2] = True
    slopes = torch.tensor([2.0 ** (-8.0 * (h + 1) / hq) for h in range(hq)], dtype=torch.float64) if alibi else None
    leaves = [t.clone().requires_grad_() for t in (q, k, v)] + [table.clone().requires_grad_(learned)]
    ref = reference(*leaves, causal=causal, window=window, pad=pad, softcap=softcap, sinks=sink, slopes=slopes)
    ref_grads = torch.autograd.grad(ref, leaves[:4 if learned else 3], dout)

    def shard(x, dim=2):
        return ringfx.shard(x, dim, layout=layout, group=group)

    local = [shard(t).detach().requires_grad_() for t in (q, k, v)] + [table.clone().requires_grad_(learned)]
    out = ringfx.ring_attention(*local[:3], group=group, causal=causal, layout=layout, scale=SCALE,
                                relative_bias=local[3], window=window or None, softcap=softcap or None,
                                key_padding_mask=shard(pad, 1) if padding else None, sinks=sink,
                                alibi_slopes=slopes)
    grads = torch.autograd.grad(out, local[:4 if learned else 3], shard(dout))
    return shard_errors(group, shard, out, ref, grads, ref_grads)


LAYOUTS = list(itertools.product(("contiguous", "zigzag"), (False, True)))


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("layout,causal", LAYOUTS)
def test_table_matches_reference_float64(layout, causal, world):
    errors = check_table(ringfx.LoopbackRing(world), layout, causal, seed=world, per_rank=5)
    assert max(errors) < TOL, errors


@pytest.mark.parametrize("world", [2, 3])
def test_table_with_the_other_variants(world):
    """With a window, key padding, MQA, soft-capping, sinks and ALiBi at once; and a table
    that requires no grad (the backward keeps its fused kernel)."""
    for layout, causal in LAYOUTS:
        errors = check_table(ringfx.LoopbackRing(world), layout, causal, seed=7, hq=4, hkv=1, per_rank=4, window=3,
                             padding=True, softcap=2.0, sinks=True, alibi=True)
        assert max(errors) < TOL, (layout, causal, errors)
        errors = check_table(ringfx.LoopbackRing(world), layout, causal, seed=8, learned=False)
        assert max(errors) < TOL, (layout, causal, "constant table", errors)


def test_bad_tables_are_refused():
    ring = ringfx.LoopbackRing(2)
    q = torch.randn(1, 4, 6, 8)
    with pytest.raises(ValueError, match=r"shape \(Hq, 2S - 1\) = \(4, 11\)"):
        ringfx.ring_attention(q, q, q, group=ring, relative_bias=torch.zeros(4, 6))
    with pytest.raises(ValueError, match=r"\(4, 11\), got \(2, 11\)"):
        ringfx.ring_attention(q, q, q, group=ring, relative_bias=torch.zeros(2, 11))
    with pytest.raises(TypeError, match="relative_bias has dtype torch.int64"):
        ringfx.ring_attention(q, q, q, group=ring, relative_bias=torch.zeros(4, 11, dtype=torch.long))


def test_opcheck_with_a_table():
    ring = ringfx.LoopbackRing(3)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 6, 8, generator=g, dtype=torch.float64) for _ in range(3))
    table = torch.randn(4, 11, generator=g, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(
        torch.ops.ringfx.ring_attention.default,
        (q, k, v, None, None, None, ring.group_name, "zigzag", True, SCALE, 0, "auto"),
        {"rel_bias": table},
    )


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_table_compiles_as_one_opaque_node(backend):
    """The op with a learned table under AOTAutograd / inductor: its fake backward (four
    results) traced, the table's gradient the eager one's."""
    torch.compiler.reset()
    ring = ringfx.LoopbackRing(2)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 4, 8, 8, generator=g, requires_grad=True) for _ in range(3))
    table = torch.randn(4, 15, generator=g, requires_grad=True)

    def attn(q, k, v, table):
        return ringfx.ring_attention(q * 2, k, v, group=ring, causal=True, layout="zigzag",
                                     relative_bias=table * 1.5).sin()

    leaves = (q, k, v, table)
    out = torch.compile(attn, backend=backend, fullgraph=True)(*leaves)
    grads = torch.autograd.grad(out.sum(), leaves)
    ref = attn(*leaves)
    ref_grads = torch.autograd.grad(ref.sum(), leaves)
    torch.testing.assert_close(out, ref)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)


def _tables_on_gloo_ring(rank, world):
    results = []
    for layout, causal in LAYOUTS:
        results.append(((layout, causal), check_table(None, layout, causal, seed=11, per_rank=3)))
    results.append((("variants",), check_table(None, "zigzag", True, seed=12, hq=4, hkv=1, per_rank=4, window=5,
                                               padding=True, softcap=2.0, sinks=True)))
    # zero-touch: the T5-style model's embedding weight, its gradient averaged by the hooks
    torch.manual_seed(0)
    _, ref, got = _zero_touch(T5Style(), world, "zigzag", 13)
    errors = [(got[0] - ref[0]).abs().max().item()]
    errors += [(got[2][n] - g).abs().max().item() for n, g in ref[2].items()]
    results.append((("zero-touch", "T5-style"), errors))
    return results


@pytest.mark.gloo
@pytest.mark.parametrize("world", [2, 3, 4])
def test_tables_on_gloo_ring(world):
    failures = [(rank, case, errors) for rank, results in enumerate(spawn_gloo(world, _tables_on_gloo_ring))
                for case, errors in results if not max(errors) < TOL]
    assert not failures, failures


# ------------------------------------------------------ a T5-style model, written by hand

E, H, D = 16, 4, 4
BUCKETS, MAX_DISTANCE = 8, 16


def t5_bucket(relative_position, bidirectional=True, num_buckets=BUCKETS, max_distance=MAX_DISTANCE):
    """T5's ``_relative_position_bucket`` (Mesh TensorFlow's): exact buckets near, log-spaced far."""
    buckets = 0
    if bidirectional:
        num_buckets //= 2
        buckets += (relative_position > 0).to(torch.long) * num_buckets
        relative_position = torch.abs(relative_position)
    else:
        relative_position = -torch.min(relative_position, torch.zeros_like(relative_position))
    max_exact = num_buckets // 2
    is_small = relative_position < max_exact
    large = max_exact + (torch.log(relative_position.float() / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).to(torch.long)
    large = torch.min(large, torch.full_like(large, num_buckets - 1))
    buckets += torch.where(is_small, relative_position, large)
    return buckets


class T5Style(nn.Module):
    """Two layers of T5 attention (unscaled scores, no causal mask, float64): the first
    layer's bucketed relative-position bias, an ``nn.Embedding`` over the buckets, added to
    the scores of both layers; ``causal`` = T5's decoder (unidirectional buckets, causal mask)."""

    causal = False

    def __init__(self):
        super().__init__()
        f64 = dict(dtype=torch.float64)
        self.relative_attention_bias = nn.Embedding(BUCKETS, H, **f64)
        nn.init.normal_(self.relative_attention_bias.weight, std=2.0)
        self.layers = nn.ModuleList(nn.ModuleDict({n: nn.Linear(E, H * D, **f64) for n in "qkv"}) for _ in range(2))
        self.out = nn.Linear(H * D, E, **f64)

    def position_bias(self, s):
        context = torch.arange(s, dtype=torch.long)[:, None] + 0  # + past_seen_tokens
        memory = torch.arange(s, dtype=torch.long)[None, :]
        buckets = t5_bucket(memory - context, bidirectional=not self.causal)
        return self.relative_attention_bias(buckets).permute([2, 0, 1]).unsqueeze(0)  # (1, H, S, S)

    def forward(self, x):
        b, s, _ = x.shape
        bias = self.position_bias(s)
        if self.causal:
            bias = bias + torch.full((s, s), float("-inf"), dtype=x.dtype).triu(1)
        for layer in self.layers:
            q, k, v = (layer[n](x).view(b, s, H, D).transpose(1, 2) for n in "qkv")
            w = torch.matmul(q, k.transpose(2, 3)) + bias
            w = F.softmax(w.double(), dim=-1).type_as(w)  # T5: softmax(scores.float()); float64 here
            x = x + self.out(torch.matmul(w, v).transpose(1, 2).reshape(b, s, H * D))
        return x


class T5StyleDecoder(T5Style):
    causal = True


class T5StyleSdpa(T5Style):
    """transformers' SDPA path: ``where(keep, position_bias, finfo.min).contiguous()`` as SDPA's
    float mask (here with a causal keep)."""

    def keep(self, b, s):
        return torch.ones(s, s, dtype=torch.bool).tril()[None, None]

    def forward(self, x):
        b, s, _ = x.shape
        mask = torch.where(self.keep(b, s), self.position_bias(s), torch.finfo(x.dtype).min).contiguous()
        for layer in self.layers:
            q, k, v = (layer[n](x).view(b, s, H, D).transpose(1, 2) for n in "qkv")
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)
            x = x + self.out(o.transpose(1, 2).reshape(b, s, H * D))
        return x


class KeepWrittenInPlace(T5StyleSdpa):
    """The keep mask written in place after it was made: not what its own subgraph computes."""

    def keep(self, b, s):
        keep = torch.ones(b, 1, s, s, dtype=torch.bool)
        keep[1, :, :, -2:] = False  # row 1's last two keys are padding
        return keep


class KeyPositionBias(T5Style):
    """Not relative: a learned bias of the key's absolute position."""

    def position_bias(self, s):
        memory = torch.arange(s)[None, :].expand(s, s) % BUCKETS
        return self.relative_attention_bias(memory).permute([2, 0, 1]).unsqueeze(0)


class DistanceTimesQueryPosition(T5Style):
    """Not relative: the bucketed bias scaled by the query's position."""

    def position_bias(self, s):
        return super().position_bias(s) * torch.arange(s, dtype=torch.float64)[:, None] / s


class SumOfPositions(T5Style):
    """Not relative: buckets of ``j + i``."""

    def position_bias(self, s):
        i = torch.arange(s)
        return self.relative_attention_bias(t5_bucket(i[None, :] + i[:, None])).permute([2, 0, 1]).unsqueeze(0)


@pytest.mark.parametrize("make,world,layout,mask_kind", [
    (T5Style, 1, "contiguous", "relative"), (T5Style, 2, "zigzag", "relative"), (T5Style, 3, "contiguous", "relative"),
    (T5Style, 4, "zigzag", "relative"), (T5StyleDecoder, 3, "zigzag", "causal+relative"),
    (T5StyleSdpa, 2, "contiguous", "causal+relative"),
], ids=["P1", "P2-zigzag", "P3", "P4-zigzag", "decoder-P3", "sdpa-mask-P2"])
def test_t5_style_rewritten_and_exact(make, world, layout, mask_kind):
    torch.manual_seed(0)
    model = make()
    ring, ref, got = _zero_touch(model, world, layout, 13)
    assert [(s.decision, s.mask_kind) for s in ring.sites] == [("rewritten", mask_kind)] * 2, ring.sites
    (out, dx, grads), (ref_out, ref_dx, ref_grads) = got, ref
    torch.testing.assert_close(out, ref_out, atol=TOL, rtol=0)
    torch.testing.assert_close(dx, ref_dx, atol=TOL, rtol=0)
    for n, g in ref_grads.items():
        torch.testing.assert_close(grads[n], g, atol=TOL, rtol=0, msg=lambda m: f"{n}: {m}")
    assert ref_grads["relative_attention_bias.weight"].abs().max() > 1e-3  # the table's gradient: there, and right
    # the graph: both ring ops take one table (H, 2S - 1), built by one embedding lookup of the
    # distances of one query row (no S x S bias left)
    (gm,) = [g.graph_module for g in ring.reports]
    ops = [n for n in gm.graph.nodes if n.target == torch.ops.ringfx.ring_attention.default]
    assert len(ops) == 2 and ops[0].args[16] is ops[1].args[16] and ops[0].args[5] is None
    padded = 13 if world == 1 else -(-13 // (world * (2 if layout == "zigzag" else 1))) * world * (
        2 if layout == "zigzag" else 1)
    lookups = [n for n in gm.graph.nodes if n.target is F.embedding and n.args[1].op == "placeholder"
               and "relative_attention_bias" in n.args[1].name]
    assert [tuple(n.args[0].meta["ringfx_value"].shape) for n in lookups] == [(1, 2 * padded - 1)]


@pytest.mark.parametrize("make", [KeyPositionBias, DistanceTimesQueryPosition, SumOfPositions],
                         ids=["key-position", "distance-times-query-position", "sum-of-positions"])
def test_biases_not_of_the_distance_are_left_alone(make):
    torch.manual_seed(0)
    report = ringfx.explain(make(), torch.randn(2, 9, E, dtype=torch.float64))
    assert not report.rewritten and len(report.left_alone) == 2, str(report)
    assert all("learned bias" in s.reason and "not proven a function of j - i" in s.reason
               for s in report.left_alone), str(report)


def test_mask_written_in_place_is_left_alone():
    """Not a relative-bias case as such: a mask the model writes into after making it
    (``keep[1, :, :, -2:] = False``) is not classified from its own subgraph (that would
    see all-ones); the site is left alone, the write named."""
    torch.manual_seed(0)
    report = ringfx.explain(KeepWrittenInPlace(), torch.randn(2, 9, E, dtype=torch.float64))
    assert not report.rewritten and all("written in place by 'setitem'" in s.reason for s in report.left_alone), \
        str(report)


# --------------------------------------------------------- transformers' T5 encoder

def _t5_encoder(attn):
    transformers = pytest.importorskip("transformers", reason="needs transformers")
    cfg = transformers.T5Config(vocab_size=96, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                relative_attention_num_buckets=BUCKETS, relative_attention_max_distance=MAX_DISTANCE,
                                dropout_rate=0.0, is_encoder_decoder=False)
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    model = transformers.T5EncoderModel(cfg).double().eval()
    with torch.no_grad():  # a bias that matters beside the scores
        model.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.mul_(5.0)
    ids = torch.randint(3, 96, (2, 13), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 13, dtype=torch.long)
    mask[1, 10:] = 0
    return model, dict(input_ids=ids, attention_mask=mask)


@pytest.mark.parametrize("attn,world,layout", [("eager", 2, "zigzag"), ("sdpa", 3, "contiguous")])
def test_transformers_t5_encoder_rewritten_and_exact(attn, world, layout):
    """transformers' T5 encoder: the first layer's position bias (bucketed distances looked up
    in a learned embedding) shared by both layers, padded keys; every output and gradient
    exact, the bias table's included."""
    torch._dynamo.reset()
    model, inputs = _t5_encoder(attn)
    w = torch.randn(2, 13, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

    def run(m):
        out = m(**inputs).last_hidden_state
        (out * w).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        return out.detach(), grads

    ref_out, ref_grads = run(model)
    ring = ringfx.transform(model, mesh=ringfx.LoopbackRing(world), layout=layout)
    out, grads = run(ring)
    assert [(s.decision, s.mask_kind) for s in ring.sites] == [("rewritten", "key_padding+relative")] * 2, ring.sites
    torch.testing.assert_close(out, ref_out, atol=TOL, rtol=0)
    for n, g in ref_grads.items():
        torch.testing.assert_close(grads[n], g, atol=TOL, rtol=0, msg=lambda m: f"{n}: {m}")
    assert ref_grads["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].abs().max() > 1e-3


def test_learned_table_backward_in_row_parts(monkeypatch):
    """The math-kernel backward of a learned table takes a block's query rows in parts (its
    float32 tensors bounded); forced here to parts of one or a few rows: exact all the same."""
    from ringfx.runtime import algorithm

    for elements in (1, 2 * 4 * 7 * 3):
        monkeypatch.setattr(algorithm, "MATERIALISED_ELEMENTS", elements)
        for world, layout, causal in ((1, "contiguous", True), (2, "zigzag", False), (3, "zigzag", True)):
            errors = check_table(ringfx.LoopbackRing(world), layout, causal, seed=5, per_rank=4, window=5,
                                 padding=True)
            assert max(errors) < TOL, (elements, world, layout, causal, errors)
