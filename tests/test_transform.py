"""End-to-end: ringfx.transform / explain / the compile backend on the attention zoo.

Numerical equality of the forward and of parameter gradients with the untransformed
model, with inputs sharded by ``ringfx.shard``: on loopback rings (fast, in-process) and
on real gloo rings of 2 and 4 ranks (one spawn per ring size running the whole zoo, each
spelling in one layout, the other on the other ring).
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ringfx
from ringfx.api import explain, transform
from ringfx.errors import UnsupportedError
from zoo import ZOO, TwoGraphs, compare_case, gloo_zoo_worker

ZOO_IDS = [e.name for e in ZOO]


def _check(result: dict, entry, tol=None) -> None:
    tol = tol or entry.tol
    assert result["sites"] == entry.sites, result
    assert result["rewritten"] == entry.sites, result
    assert result["mask_kinds"] == [entry.mask_kind], result
    assert result["out_err"] < tol, result
    assert result["grad_err"] < tol * 10, result


# per-dtype tolerance of the output (gradients: 10x); float64 uses the entry's own
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 3e-2}
DTYPE_CASES = ["matmul_scale_qk_tril", "gpt2_attention", "einsum_window", "tiny_llama", "tiny_bert"]


@pytest.fixture(params=[torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def low_precision(request):
    return request.param


@pytest.mark.parametrize("name", DTYPE_CASES)
def test_zoo_low_precision(name, low_precision):
    entry = {e.name: e for e in ZOO}[name]
    _check(compare_case(entry, ringfx.LoopbackRing(2), "zigzag", dtype=low_precision), entry,
           tol=TOLERANCE[low_precision])


@pytest.mark.parametrize("entry", [e for e in ZOO if e.real_ring], ids=[e.name for e in ZOO if e.real_ring])
def test_zoo_loopback_odd_ring(entry):
    _check(compare_case(entry, ringfx.LoopbackRing(3), "zigzag", seq_len=12), entry)


@pytest.mark.parametrize("entry", ZOO, ids=ZOO_IDS)
def test_zoo_loopback_contiguous(entry):
    _check(compare_case(entry, ringfx.LoopbackRing(2), "contiguous"), entry)


@pytest.mark.parametrize("entry", [e for e in ZOO if e.real_ring], ids=[e.name for e in ZOO if e.real_ring])
def test_zoo_loopback_zigzag(entry):
    _check(compare_case(entry, ringfx.LoopbackRing(4), "zigzag"), entry)


@pytest.mark.gloo
@pytest.mark.parametrize("world", [2, 4])
def test_zoo_gloo_ring(world):
    from ringfx.testing import spawn_gloo

    # every spelling once per ring, the layout alternating (the other one on the other
    # ring): the spellings are rewritten alike on any ring (test_zoo_loopback_*); what a
    # real ring adds, its transfers and the gradients' all-reduce, every case exercises
    entries = [e for e in ZOO if e.real_ring]
    cases = [(e.name, ("contiguous", "zigzag")[(i + world // 2) % 2]) for i, e in enumerate(entries)]
    results = spawn_gloo(world, gloo_zoo_worker, cases, timeout=300)
    by_name = {e.name: e for e in entries}
    for rank_results in results:
        assert len(rank_results) == len(cases) + 1  # + one run given a DeviceMesh
        for r in rank_results:
            _check(r, by_name[r["name"]])


# ----------------------------------------------------------------- strictness

class EscapingProbs(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8, dtype=torch.float64)

    def forward(self, x):
        q = self.proj(x).view(2, -1, 2, 4).transpose(1, 2)
        p = torch.softmax(q @ q.transpose(-2, -1), dim=-1)
        return p @ q, p  # output_attentions=True


def _x(s=8):
    return torch.randn(2, s, 8, dtype=torch.float64)


def test_strict_refuses_unrewritable_attention_on_a_ring():
    torch.compiler.reset()
    model = transform(EscapingProbs(), mesh=ringfx.LoopbackRing(2))
    with pytest.raises(UnsupportedError, match=r"test_transform\.py:\d+") as info:
        model(_x())
    assert "escape" in str(info.value)


def test_strict_false_runs_unrewritten():
    """strict=False: attention that cannot be rewritten runs as the model wrote it. On a
    ring of 1 that is the model itself; on P > 1 the site is reported left alone (and
    warned about) and no ring op replaces it."""
    torch.compiler.reset()
    m = EscapingProbs()
    x = _x()
    ref_out, ref_p = m(x)
    one = transform(m, mesh=ringfx.LoopbackRing(1), strict=False)
    out, p = one(x)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(p, ref_p)
    assert [s.decision for s in one.sites] == ["left alone"]

    two = transform(m, mesh=ringfx.LoopbackRing(2), strict=False)
    with pytest.warns(ringfx.RingfxWarning, match="left alone: attention probabilities escape"):
        two(x)
    assert [s.decision for s in two.sites] == ["left alone"] and "escape" in two.sites[0].reason
    ring_op = torch.ops.ringfx.ring_attention.default
    assert not any(n.target is ring_op for g in two.reports for n in g.graph_module.graph.nodes)


def test_transform_rejects_bad_options():
    with pytest.raises(ValueError, match="layout"):
        transform(nn.Linear(2, 2), mesh=ringfx.LoopbackRing(2), layout="striped")
    with pytest.raises(ValueError, match="unknown ringfx option"):
        transform(nn.Linear(2, 2), mesh=ringfx.LoopbackRing(2), blocksize=3)
    with pytest.raises(ValueError, match="inner"):
        transform(nn.Linear(2, 2), mesh=ringfx.LoopbackRing(2), inner="tvm")
    with pytest.raises(TypeError):
        transform(3, mesh=ringfx.LoopbackRing(2))


def test_transform_keeps_call_signature():
    import inspect

    from zoo import SdpaBoolPadding

    m = SdpaBoolPadding()
    assert inspect.signature(transform(m, mesh=ringfx.LoopbackRing(1))) == inspect.signature(m.forward)


# --------------------------------------------------------------------- explain

def test_explain_reports_sites_graphs_and_breaks():
    report = explain(TwoGraphs(), _x())
    assert len(report.sites) == 2 and len(report.rewritten) == 2
    assert len(report.graph_modules) == 2
    assert report.graph_breaks, report
    for gm in report.graph_modules:
        assert sum(n.target is torch.ops.ringfx.ring_attention.default for n in gm.graph.nodes) == 1
    text = str(report)
    assert "zoo.py" in text and "causal" in text and "rewritten" in text and "graph break" in text


def test_explain_names_the_reason_for_left_alone_sites():
    report = explain(EscapingProbs(), _x())
    assert len(report.left_alone) == 1
    assert "escape" in report.left_alone[0].reason
    assert "left alone" in str(report)


def test_transform_handles_attention_in_every_graph():
    x = _x()
    ref = TwoGraphs()
    out = transform(ref, mesh=ringfx.LoopbackRing(2))
    torch.testing.assert_close(out(x), ref(x))
    assert len(out.reports) == 2 and all(len(g.sites) == 1 for g in out.reports)


# --------------------------------------------------------------------- backend

def test_backend_with_aot_eager_inner_is_exact():
    from ringfx.backend import ringfx_backend
    from zoo import TinyLlama, tokens

    torch.compiler.reset()
    torch.manual_seed(0)
    m = TinyLlama().eval()
    ids, pos = (i.value for i in tokens(8, 0))
    compiled = torch.compile(m, backend=ringfx_backend, options={"inner": "aot_eager"})
    out = compiled(ids, pos)
    out.sum().backward()
    g = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    ref = m(ids, pos)
    ref.sum().backward()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for n, p in m.named_parameters():
        torch.testing.assert_close(g[n], p.grad, atol=1e-5, rtol=1e-5)


def _entry_point_installed() -> bool:
    return any(e.name == "ringfx" for e in importlib.metadata.entry_points(group="torch_dynamo_backends"))


@pytest.mark.skipif(not _entry_point_installed(), reason="ringfx is not installed (pip install -e .)")
def test_backend_name_resolves_without_importing_ringfx():
    code = textwrap.dedent("""
        import sys, torch, torch.nn.functional as F
        def f(q):
            return F.scaled_dot_product_attention(q, q, q, is_causal=True)
        q = torch.randn(1, 2, 8, 4)
        out = torch.compile(f, backend="ringfx", options={"inner": "eager"})(q)
        assert "ringfx" in sys.modules
        torch.testing.assert_close(out, f(q))
        print("ok")
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


@pytest.mark.parametrize("name", ["tiny_gpt2", "tiny_llama", "einsum_window", "tiny_bert"])
def test_dynamic_sequence_length(name):
    """With symbolic shapes the masks are still proven causal / windowed (by evaluation
    at the example length and past it) and the scale may be a symbolic expression."""
    import copy

    from zoo import ZOO

    entry = {e.name: e for e in ZOO}[name]
    torch.compiler.reset()
    torch.manual_seed(0)
    model = entry.make_module().eval()
    ref = copy.deepcopy(model)
    ring = transform(model, mesh=ringfx.LoopbackRing(2), dynamic=True, inputs="sharded")
    for seq_len in (16, 24):
        inputs = [i.value for i in entry.make_inputs(seq_len, 0)]
        torch.testing.assert_close(ring(*inputs), ref(*inputs), atol=entry.tol, rtol=entry.tol)
    assert ring.sites and all(s.decision == "rewritten" and s.mask_kind == entry.mask_kind for s in ring.sites)


def test_backend_hands_the_rest_to_inductor_by_default():
    from ringfx.backend import ringfx_backend

    graphs = []

    def f(q):
        return F.scaled_dot_product_attention(q, q, q, is_causal=True).sum(-1) * 2

    torch.compiler.reset()
    q = torch.randn(1, 2, 8, 4)
    out = torch.compile(f, backend=ringfx_backend, options={"collector": graphs})(q)
    torch.testing.assert_close(out, f(q))
    (graph,) = graphs
    assert [s.decision for s in graph.sites] == ["rewritten"]
    assert any(n.target is torch.ops.ringfx.ring_attention.default for n in graph.graph_module.graph.nodes)


def test_backend_rejects_unknown_options():
    from ringfx.backend import ringfx_backend

    torch.compiler.reset()
    # torch.compile wraps what a backend raises; the backend's own error is a ValueError
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match=r"unknown ringfx option\(s\) \['innr'\]") as info:
        torch.compile(lambda x: x.sin(), backend=ringfx_backend, options={"innr": "eager"})(torch.ones(2))
    assert isinstance(info.value.inner_exception, ValueError)


def test_dense_mask_on_a_zigzag_loopback_ring():
    """A dense (B, 1, S, S) mask follows the tokens on both axes; its key columns are put
    back in global order for the ring op."""
    import copy

    from zoo import DenseUserMask, hidden_dense

    torch.compiler.reset()
    torch.manual_seed(0)
    model = DenseUserMask()
    ref = copy.deepcopy(model)
    x, bias = (i.value for i in hidden_dense(16, 0))
    ring = ringfx.LoopbackRing(4)
    shard = lambda t, d: ringfx.shard(t, d, layout="zigzag", group=ring)
    out = transform(model, mesh=ring, layout="zigzag", inputs="sharded")(shard(x, 1), shard(shard(bias, 2), 3))
    torch.testing.assert_close(out, shard(ref(x, bias), 1))


@pytest.mark.gloo
def test_readme_main_job_passes(capsys):
    """`python -m ringfx demo` (the README's main job), smaller: exit status 0 and its verdict."""
    from ringfx.__main__ import main

    assert main(["demo", "--ranks", "2", "--seq-len", "32"]) == 0
    assert "OK: matches the untransformed model" in capsys.readouterr().out
