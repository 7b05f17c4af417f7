"""The position guard: a model that makes its positions with ``torch.arange`` over the
length it sees gets its shard's positions on a ring; ringfx warns (``RingfxWarning``)
with the source line, and passing positions as an input fixes it."""

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ringfx
from ringfx import RingfxWarning

E, H = 16, 2


class Rope(nn.Module):  # LLaMA-style rotary attention; positions from arange unless given
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.qkv = nn.Linear(E, 3 * E, dtype=torch.float64)
        d = E // H
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d),
                             persistent=False)

    def forward(self, x, pos=None):
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, H, E // H).permute(2, 0, 3, 1, 4)
        if pos is None:
            pos = torch.arange(s, device=x.device)  # the position generator the guard notes
        f = pos[:, None].to(x.dtype) * self.inv_freq[None]
        cos, sin = torch.cat([f.cos()] * 2, -1), torch.cat([f.sin()] * 2, -1)

        def rotate(t):
            half = t.shape[-1] // 2
            return torch.cat([-t[..., half:], t[..., :half]], -1)

        q, k = q * cos + rotate(q) * sin, k * cos + rotate(k) * sin
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


class ArangeOverHeads(nn.Module):  # an arange over another axis, of another length: not noted
    def forward(self, x):
        b, s, _ = x.shape
        q = x.view(b, s, H, E // H).transpose(1, 2) * torch.arange(1, H + 1, dtype=x.dtype)[:, None, None]
        return F.scaled_dot_product_attention(q, q, q, is_causal=True)


def _notes(model, ring, *inputs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = ringfx.transform(model, ring, inputs="sharded")(*inputs)
    return out, [str(w.message) for w in caught if issubclass(w.category, RingfxWarning)]


def test_arange_positions_are_noted_with_the_source_line():
    ring = ringfx.LoopbackRing(2)
    x = ringfx.shard(torch.randn(1, 12, E, dtype=torch.float64), 1, layout="zigzag", group=ring)
    ring_model = ringfx.transform(Rope(), ring, inputs="sharded")
    with pytest.warns(RingfxWarning) as caught:
        ring_model(x)
    notes = [str(w.message) for w in caught if issubclass(w.category, RingfxWarning)]
    assert len(notes) == 1
    assert "torch.arange(12)" in notes[0] and "test_positions.py" in notes[0] and "ringfx.positions" in notes[0]
    assert [n for g in ring_model.reports for n in g.notes] == [notes[0].removeprefix("ringfx: ")]
    assert ring_model.reports[0].graph_module.graph.find_nodes(op="call_function", target=torch.arange)  # unchanged


def test_noted_model_is_wrong_on_zigzag_and_right_with_positions_given():
    ring, model = ringfx.LoopbackRing(3), Rope()
    x = torch.randn(2, 18, E, dtype=torch.float64)
    ref = model(x)
    xs = ringfx.shard(x, 1, layout="zigzag", group=ring)
    ring_model = ringfx.transform(model, ring, layout="zigzag", inputs="sharded")
    with pytest.warns(RingfxWarning, match="arange"):
        wrong = ringfx.unshard(ring_model(xs), 2, layout="zigzag", group=ring)
    assert (wrong - ref).abs().max() > 1e-3  # what the warning is about: the shard's positions
    pos = ringfx.positions(18, layout="zigzag", group=ring)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RingfxWarning)
        right = ringfx.unshard(ringfx.transform(Rope(), ring, layout="zigzag", inputs="sharded")(xs, pos), 2, layout="zigzag",
                               group=ring)
    torch.testing.assert_close(right, ref)


def test_not_noted_on_one_rank_or_for_other_aranges():
    x = torch.randn(1, 12, E, dtype=torch.float64)
    assert _notes(Rope(), ringfx.LoopbackRing(1), x)[1] == []
    ring = ringfx.LoopbackRing(2)
    out, notes = _notes(ArangeOverHeads(), ring, ringfx.shard(x, 1, group=ring))
    assert notes == []
    torch.testing.assert_close(ringfx.unshard(out, 2, group=ring), ArangeOverHeads()(x))


def test_warning_can_be_made_an_error():
    ring = ringfx.LoopbackRing(2)
    x = ringfx.shard(torch.randn(1, 12, E, dtype=torch.float64), 1, group=ring)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RingfxWarning)
        with pytest.raises(RingfxWarning, match="arange"):
            ringfx.transform(Rope(), ring, inputs="sharded")(x)


def test_explain_of_a_transformed_model_reports_for_its_ring():
    ring = ringfx.LoopbackRing(2)
    ring_model = ringfx.transform(Rope(), ring, layout="zigzag", shard_inputs={"x": 1})
    report = ringfx.explain(ring_model, torch.randn(1, 12, E, dtype=torch.float64))
    assert [s.decision for s in report.sites] == ["rewritten"]
    assert len(report.notes) == 1 and "torch.arange(12)" in report.notes[0]
    assert "note: torch.arange(12)" in str(report)
    assert ringfx.explain(Rope(), torch.randn(1, 12, E, dtype=torch.float64)).notes == []  # one rank: nothing
