"""``ringfx.explain`` next to other compiled models, and the command line
(``python -m ringfx demo`` / ``plan``): argument errors name the flags."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ringfx


class TwoGraphs(nn.Module):
    """Two causal attentions with a graph break between them."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8, dtype=torch.float64), nn.Linear(8, 8, dtype=torch.float64)

    def attend(self, lin, x):
        q = lin(x).view(2, -1, 2, 4).transpose(1, 2)
        return F.scaled_dot_product_attention(q, q, q, is_causal=True).transpose(1, 2).reshape(x.shape)

    def forward(self, x):
        x = self.attend(self.a, x)
        torch._dynamo.graph_break()
        return self.attend(self.b, x)


class OneAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8, dtype=torch.float64)

    def forward(self, x):
        q = self.proj(x).view(2, -1, 2, 4).transpose(1, 2)
        return torch.softmax(q @ q.transpose(-2, -1) / 2.0, dim=-1) @ q


def _x(s=8):
    return torch.randn(2, s, 8, dtype=torch.float64)


# --------------------------------------------------------------------- explain

def test_explain_leaves_other_compiled_models_alone():
    """A transformed model keeps its compiled graphs across explain calls of other
    models and of itself: its reports do not grow and its backend is not called again."""
    torch.manual_seed(0)
    x = _x()
    model_a = TwoGraphs()
    ring_a = ringfx.transform(model_a, mesh=ringfx.LoopbackRing(1))
    ref = ring_a(x)
    assert len(ring_a.reports) == 2 and len(ring_a.sites) == 2

    report_b = ringfx.explain(OneAttention(), x)
    report_a = ringfx.explain(ring_a, x)
    report_a_plain = ringfx.explain(model_a, x)
    assert len(report_b.sites) == 1
    assert len(report_a.sites) == len(report_a_plain.sites) == 2
    assert report_a.graph_breaks and report_a_plain.graph_breaks

    with torch._dynamo.config.patch(error_on_recompile=True):  # a recompile of A raises
        torch.testing.assert_close(ring_a(x), ref)
    assert len(ring_a.reports) == 2 and len(ring_a.sites) == 2


def test_explain_twice_reports_the_same_and_leaves_no_cache_entries():
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    class Fresh(TwoGraphs):  # code objects no other test compiles
        def forward(self, x):
            x = self.attend(self.a, x)
            torch._dynamo.graph_break()
            return self.attend(self.b, x)

    m = Fresh()
    x = _x()
    first, second = ringfx.explain(m, x), ringfx.explain(m, x)
    assert str(first) == str(second) and len(first.rewritten) == 2 and len(first.graph_breaks) == 1
    assert _debug_get_cache_entry_list(Fresh.forward.__code__) == []


def test_explain_many_times_stays_within_the_recompile_limit():
    m = OneAttention()
    for _ in range(torch._dynamo.config.recompile_limit + 2):
        assert len(ringfx.explain(m, _x()).rewritten) == 1


@pytest.mark.parametrize("model", [42, "model", None])
def test_explain_rejects_a_model_that_is_not_callable(model):
    with pytest.raises(TypeError, match=r"explain\(model=\.\.\.\).*" + type(model).__name__):
        ringfx.explain(model, _x())
