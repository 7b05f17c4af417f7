"""Graph-level tests of the attention passes: what is found, how masks are classified,
what the rewritten graph contains, and what must be left alone (with the reason)."""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ringfx.passes import PassOptions, find_attention_pass, run_passes, sites_of
from ringfx.passes.pipeline import PASSES
from ringfx.passes.node_facts import op_name
from ringfx.passes.patterns import PATTERNS
from zoo import ZOO, Heads, hidden

LOOPBACK2 = PassOptions(group_name="loopback:2", ring_size=2, loopback=True)


def capture(fn, *args, then=None):
    """The single graph dynamo captures for ``fn(*args)`` (static shapes), or what
    ``then(gm, example_inputs)`` makes of it inside the backend (where dynamo's
    placeholder metadata is still present)."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(then(gm, example_inputs) if then else gm)
        return gm.forward

    torch.compiler.reset()
    torch.compile(fn, backend=backend, dynamic=False, fullgraph=True)(*args)
    assert len(graphs) == 1
    return graphs[0]


def op_counts(gm: fx.GraphModule) -> dict:
    counts = {}
    for n in gm.graph.nodes:
        name = "ring_attention" if n.target is torch.ops.ringfx.ring_attention.default else op_name(n)
        if name:
            counts[name] = counts.get(name, 0) + 1
    return counts


def assert_op_counts(gm: fx.GraphModule, expected: dict) -> None:
    counts = op_counts(gm)
    got = {k: counts.get(k, 0) for k in expected}
    assert got == expected, f"op counts {got} != {expected}\n{gm.code}"


def rewrite(fn, *args, options=LOOPBACK2, passes=None):
    gm, reports = capture(fn, *args, then=lambda gm, ex: run_passes(gm, options=options, passes=passes))
    gm.graph.lint()
    return gm, next((r for r in reports if r.name == "rewrite_attention"), reports[-1])


# ------------------------------------------------------------ graph inspection

@pytest.mark.parametrize("entry", ZOO, ids=[e.name for e in ZOO])
def test_zoo_graph_has_one_ring_op_per_site_and_no_leftover_softmax(entry):
    torch.manual_seed(0)
    gm, report = rewrite(entry.make_module().eval(), *[i.value for i in entry.make_inputs(16, 0)])
    assert_op_counts(gm, {"ring_attention": entry.sites, "softmax": 0, "sdpa": 0,
                          "multi_head_attention_forward": 0, "dropout": 0})
    assert [s.mask_kind for s in report.sites] == [entry.mask_kind] * entry.sites
    assert all(s.decision == "rewritten" for s in report.sites)


@pytest.mark.parametrize("pattern", PATTERNS, ids=[p.name for p in PATTERNS])
def test_pattern_table_entry_is_found_checked_and_exact(pattern):
    import ringfx
    from ringfx.api import transform

    from ringfx.passes import classify_masks_pass
    from ringfx.passes.normalise import normalise_pass

    inputs = pattern.example_inputs(8)
    gm, _ = rewrite(pattern.fn, *inputs)
    assert_op_counts(gm, {"ring_attention": 1, "softmax": 0, "sdpa": 0})
    # the analysis result that the check reads (on the normalised graph, as in the pipeline)
    analysed, _ = rewrite(pattern.fn, *inputs, passes=[normalise_pass, find_attention_pass,
                                                        classify_masks_pass])
    (site,) = sites_of(analysed)
    assert pattern.check(site), site

    ring = ringfx.LoopbackRing(4)
    leaves = [x.clone().requires_grad_(x.is_floating_point()) for x in inputs]
    ref = pattern.fn(*leaves)
    ref.sum().backward()
    torch.compiler.reset()
    sharded = [ringfx.shard(x.detach(), 2 if x.dim() == 4 else 1, layout="zigzag", group=ring)
               .requires_grad_(x.is_floating_point()) for x in inputs]
    out = transform(pattern.fn, mesh=ring, layout="zigzag", inputs="sharded")(*sharded)
    out.sum().backward()
    tol = 1e-5 if "upcast" in site.pattern or "llama" in pattern.name else 1e-10
    torch.testing.assert_close(out, ringfx.shard(ref.detach(), 2, layout="zigzag", group=ring), atol=tol, rtol=tol)
    for x, s in zip(leaves, sharded):
        if x.is_floating_point():
            torch.testing.assert_close(s.grad, ringfx.shard(x.grad, 2 if x.dim() == 4 else 1, layout="zigzag",
                                                            group=ring), atol=tol, rtol=tol)


def test_rewrite_passes_unrepeated_kv_heads():
    from zoo import TinyLlama, tokens

    gm, _ = rewrite(TinyLlama().eval(), *[i.value for i in tokens(8, 0)])
    rings = [n for n in gm.graph.nodes if n.target is torch.ops.ringfx.ring_attention.default]
    assert len(rings) == 2
    for n in rings:
        q, k, v = (a.meta.get("example_value", a.meta.get("ringfx_value")) for a in n.args[:3])
        assert q.shape[1] == 4 and k.shape[1] == 2 and v.shape[1] == 2
    assert_op_counts(gm, {"expand": 0, "repeat_interleave": 0})


def test_untouched_when_no_attention():
    model = nn.Sequential(nn.Linear(8, 8), nn.Softmax(dim=-1))
    x = torch.randn(2, 5, 8)
    before = capture(model, x).code
    gm, report = rewrite(model, x)
    assert gm.code == before and report.sites == [] and report.rewritten == 0


def test_one_info_line_per_pass(caplog):
    from zoo import MatmulDiv

    with caplog.at_level(logging.INFO, logger="ringfx.passes"):
        rewrite(MatmulDiv(), hidden(8, 0)[0].value)
    lines = [r.getMessage() for r in caplog.records if r.name == "ringfx.passes"]
    assert len(lines) == len(PASSES) and any("rewrote 1 attention ops, skipped 0" in line for line in lines)


# ------------------------------------------------------------- mask analysis

class WideWindow(Heads):
    """A causal sliding window, possibly as wide as or wider than the traced (local) length."""

    def __init__(self, window):
        super().__init__()
        self.window = window

    def forward(self, x):
        q, k, v = self.split(x)
        n = x.shape[1]
        i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
        s = q @ k.transpose(-2, -1) / math.sqrt(4)
        s = s.masked_fill((j > i) | (i - j >= self.window), float("-inf"))
        return self.merge(s.softmax(-1) @ v)


@pytest.mark.parametrize("window", [3, 8, 20])
def test_window_as_wide_as_the_shard_is_not_mistaken_for_causal(window):
    gm, report = rewrite(WideWindow(window), hidden(8, 0)[0].value)  # traced length 8
    assert report.sites[0].mask_kind == f"causal+window({window})"
    (ring,) = [n for n in gm.graph.nodes if n.target is torch.ops.ringfx.ring_attention.default]
    assert ring.args[8] is True and ring.args[10] == window


def test_window_too_wide_to_check_is_left_alone():
    gm, report = rewrite(WideWindow(10_000), hidden(8, 0)[0].value)
    assert report.sites[0].decision == "left alone" and "10000" in report.sites[0].reason


def test_padding_mask_becomes_key_padding_descriptor_not_dense():
    from zoo import SdpaBoolPadding, hidden_pad

    gm, report = rewrite(SdpaBoolPadding(), *[i.value for i in hidden_pad(8, 0)])
    (ring,) = [n for n in gm.graph.nodes if n.target is torch.ops.ringfx.ring_attention.default]
    assert ring.args[3] is not None and ring.args[5] is None  # key_padding_mask, no attn_bias


def test_dense_mask_refused_on_a_real_ring():
    from zoo import DenseUserMask, hidden_dense

    options = PassOptions(group_name="some-group", ring_size=4, loopback=False)
    gm, report = rewrite(DenseUserMask(), *[i.value for i in hidden_dense(8, 0)], options=options)
    (site,) = report.sites
    assert site.decision == "left alone" and "key columns" in site.reason
    assert_op_counts(gm, {"ring_attention": 0, "softmax": 1})


# ------------------------------------------------------------- negative cases

class Attn(Heads):
    """Decomposed attention with one deliberate defect, chosen by ``variant``."""

    def __init__(self, variant):
        super().__init__()
        self.variant = variant
        self.alibi = nn.Parameter(torch.zeros(1, 4, 1, 1, dtype=torch.float64))

    def forward(self, x):
        q, k, v = self.split(x)
        s = q @ k.transpose(-2, -1) / 2.0
        n = x.shape[1]
        if self.variant == "escaping_probs":
            p = s.softmax(-1)
            return self.merge(p @ v), p
        if self.variant == "softmax_query_axis":
            return self.merge(s.softmax(-2) @ v)
        if self.variant == "scores_reused":
            return self.merge(s.softmax(-1) @ v) + s.mean()
        if self.variant == "dropout_training":
            return self.merge(F.dropout(s.softmax(-1), 0.1, training=True) @ v)
        if self.variant == "sdpa_dropout":
            return self.merge(F.scaled_dot_product_attention(q, k, v, dropout_p=0.1))
        if self.variant == "probs_on_the_right":
            return self.merge((v.transpose(-2, -1) @ s.softmax(-1)).transpose(-2, -1))
        if self.variant == "position_bias":  # built from local positions, not a function of j - i
            pos = torch.arange(n, dtype=x.dtype)
            return self.merge((s - pos[:, None] * pos[None, :] / n).softmax(-1) @ v)
        if self.variant == "learned_bias":
            return self.merge((s + self.alibi * torch.ones(n, n, dtype=x.dtype)).softmax(-1) @ v)
        if self.variant == "scale_after_mask":
            return self.merge(((s + x.new_zeros(n, n)) * 0.5).softmax(-1) @ v)
        if self.variant == "unrecognised_op":  # a temperature clamp: not a spelling ringfx can prove
            return self.merge(s.clamp(min=-5.0).softmax(-1) @ v)
        if self.variant == "head_mask":  # HF head_mask: probabilities scaled per head
            return self.merge((s.softmax(-1) * self.alibi) @ v)
        if self.variant == "cross_attention":
            k2 = k[:, :, : n // 2]
            return self.merge((q @ k2.transpose(-2, -1)).softmax(-1) @ v[:, :, : n // 2])
        raise AssertionError(self.variant)


NEGATIVE = {
    "escaping_probs": "escape",
    "softmax_query_axis": "not the key axis",
    "scores_reused": "scores are also used",
    "dropout_training": "dropout active",
    "sdpa_dropout": "dropout active",
    "probs_on_the_right": None,  # vᵀ @ softmax(s): not attention, so no site at all
    "position_bias": "built from sizes",
    "learned_bias": "learned bias",
    "scale_after_mask": "scaled after",
    "cross_attention": "differs from key length",
    "unrecognised_op": "not a recognised",
    "head_mask": "not a recognised",
}


@pytest.mark.parametrize("variant", sorted(NEGATIVE))
def test_not_rewritten_and_reported(variant):
    gm, report = rewrite(Attn(variant), hidden(8, 0)[0].value)
    assert_op_counts(gm, {"ring_attention": 0, "softmax": 0 if variant == "sdpa_dropout" else 1})
    if NEGATIVE[variant] is None:
        assert report.sites == []
        return
    (site,) = report.sites
    assert site.decision == "left alone"
    assert NEGATIVE[variant] in site.reason, site.reason
    assert "test_passes.py" in site.source_line


def test_softmax_classifier_is_not_attention():
    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Linear(8, 8)

        def forward(self, x):
            return torch.softmax(self.w(x) @ x.transpose(-2, -1), dim=-1).sum(-1)

    gm, report = rewrite(Classifier(), torch.randn(2, 4, 8))
    assert report.sites == [] and op_counts(gm)["softmax"] == 1


def test_mha_with_returned_weights_is_left_alone():
    class Mha(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x):
            return self.mha(x, x, x)  # (out, averaged weights)

    gm, report = rewrite(Mha().eval(), torch.randn(2, 4, 8))
    (site,) = report.sites
    assert site.decision == "left alone" and "weights are used" in site.reason


def test_a_crash_inside_a_pass_names_the_pass():
    def broken(gm, *, options):
        raise ValueError("boom")

    # the pass's own exception type, its message prefixed with the pass name
    with pytest.raises(ValueError, match="ringfx pass broken failed: boom"):
        run_passes(torch.fx.symbolic_trace(lambda x: x + 1), options=LOOPBACK2, passes=[broken])
    # through torch.compile, dynamo wraps it
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match="ringfx pass broken failed: boom") as info:
        rewrite(lambda x: x + 1, torch.ones(2), passes=[broken])
    assert isinstance(info.value.inner_exception, ValueError)


def test_pass_options_validate():
    with pytest.raises(ValueError, match="layout"):
        PassOptions(layout="diagonal")
    with pytest.raises(ValueError, match="ring_size"):
        PassOptions(ring_size=0)


class IndexedPadding(Heads):  # transformers 5: mask[(batch_idx, kv_idx)] & (q_idx >= 0), expanded to (B, 1, S, S)
    def forward(self, x, keep):
        q, k, v = self.split(x)
        b, _, s_len, _ = q.shape
        batch_idx = torch.arange(b)[:, None, None, None]
        q_idx = torch.arange(s_len)[None, None, :, None]
        kv_idx = torch.arange(s_len)[None, None, None, :]
        mask = (q_idx >= 0) & keep.bool()[(batch_idx, kv_idx)]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.expand(b, -1, s_len, s_len))


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_expanded_indexed_padding_is_key_padding(layout):
    import ringfx
    from zoo import hidden_pad

    x, keep = (i.value for i in hidden_pad(16, 0))
    gm, report = rewrite(IndexedPadding(), x, keep)
    assert [s.mask_kind for s in report.sites] == ["key_padding"]
    ring = ringfx.LoopbackRing(2)
    model = IndexedPadding()
    out = ringfx.transform(model, ring, layout=layout, inputs="sharded")(*(ringfx.shard(t, 1, layout=layout, group=ring)
                                                          for t in (x, keep)))
    torch.testing.assert_close(ringfx.unshard(out, 2, layout=layout, group=ring), model(x, keep))
