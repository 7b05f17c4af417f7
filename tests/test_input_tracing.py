"""Sequence inputs traced back from the attention through a flatten and back: GPT-2's
Conv1D (``x.view(-1, E)``, ``addmm``, ``view(B, S, 3E)``) merges the batch and the
sequence into one axis and splits them again. The follower keeps the sequence as a factor
of the merged axis (``sequence_axis.follow_axis``), so the ids are found from the
attention, not by their size (before: "along dim 1" with no "traced back")."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ringfx
from ringfx.passes.sequence_axis import _view_factor

E, H, VOCAB = 16, 4, 50
TRACED = "(traced back from an attention)"


class Conv1DAttention(nn.Module):
    """GPT-2's spelling: ids -> embedding -> addmm on the flattened tokens -> heads."""

    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(VOCAB, E)
        self.weight = nn.Parameter(torch.randn(E, 3 * E) / E ** 0.5)
        self.bias = nn.Parameter(torch.randn(3 * E) / 10)

    def forward(self, ids):
        x = self.wte(ids)
        size_out = x.size()[:-1] + (3 * E,)
        qkv = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)
        q, k, v = (t.view(*t.shape[:2], H, E // H).transpose(1, 2) for t in qkv.split(E, dim=2))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return out.transpose(1, 2).reshape(ids.shape[0], ids.shape[1], E)


@pytest.mark.parametrize("world,layout", [(2, "zigzag"), (3, "contiguous")])
def test_ids_through_addmm_are_traced_back_from_the_attention(world, layout):
    torch.manual_seed(world)
    model = Conv1DAttention().double()
    ids = torch.randint(0, VOCAB, (2, 12))
    ref = model(ids)
    ref.square().sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    ring_model = copy.deepcopy(model)
    ring_model.zero_grad()
    torch.compiler.reset()
    ring = ringfx.transform(ring_model, mesh=ringfx.LoopbackRing(world), layout=layout)
    out = ring(ids)
    out.square().sum().backward()
    assert ring.reports[0].sharding.sharded_inputs == [f"L['ids'] (2, 12) along dim 1 {TRACED}"]
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)
    for n, p in ring_model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], atol=1e-10, rtol=0)


def test_transformers_gpt2_ids_are_traced_back():
    hf_zoo = pytest.importorskip("hf_zoo", reason="needs transformers")
    pytest.importorskip("transformers", reason="needs transformers")
    torch.compiler.reset()
    model, inputs, _ = hf_zoo.build("gpt2", "sdpa")
    ring = ringfx.transform(model, mesh=ringfx.LoopbackRing(2))
    ring(**inputs)
    lines = ring.reports[0].sharding.sharded_inputs
    assert any(line.startswith("L['input_ids']") and line.endswith(TRACED) for line in lines), lines


def test_view_factor():
    # (B*S, 3E) -> (B, S, 3E): S (length 5, inner 1) of output axis 1 lies in input axis 0, inner 1
    assert _view_factor((2 * 5, 48), (2, 5, 48), 1, (5, 1)) == (0, (5, 1))
    # (B, S, E) -> (B*S, E): that factor of the merged axis 0 is input axis 1, whole again
    assert _view_factor((2, 5, 16), (2 * 5, 16), 0, (5, 1)) == (1, (5, 1))
    # the batch factor of the merged axis (length 2, inner 5) is input axis 0
    assert _view_factor((2, 5, 16), (2 * 5, 16), 0, (2, 5)) == (0, (2, 1))
    # a factor spanning two input axes (the whole merged axis) has no single source axis
    assert _view_factor((2, 5, 16), (2 * 5, 16), 0, (10, 1)) is None
    # heads split off the features: (B, S, H*D) -> (B, S, H, D), the sequence axis unchanged
    assert _view_factor((2, 5, 16), (2, 5, 4, 4), 1, (5, 1)) == (1, (5, 1))
