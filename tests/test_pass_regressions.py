"""Regressions of the attention passes and the backend: chained attention, dead code
hanging off the scores, fused fast paths, strict=False, where warnings point, and what is
logged when nothing is found."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ringfx
from ringfx.api import transform
from ringfx.errors import RingfxWarning, UnsupportedError


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch.compiler.reset()


def _qkv(s=8):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, 2, s, 4, generator=g, dtype=torch.float64) for _ in range(3)]


def chained_sdpa(q, k, v):
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return F.scaled_dot_product_attention(o, o, o, is_causal=True)


def softmax_then_sdpa(q, k, v):
    o = torch.softmax(q @ k.transpose(-2, -1) / 2.0, -1) @ v
    return F.scaled_dot_product_attention(o, k, o)


@pytest.mark.parametrize("fn", [chained_sdpa, softmax_then_sdpa])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_attention_feeding_attention_is_rewritten_and_exact(fn, world):
    ring = ringfx.LoopbackRing(world)
    q, k, v = _qkv(12)
    model = transform(fn, mesh=ring, inputs="sharded")
    shard = lambda t: ringfx.shard(t, 2, group=ring)
    out = model(shard(q), shard(k), shard(v))
    assert [s.decision for s in model.sites] == ["rewritten"] * 2
    torch.testing.assert_close(out, shard(fn(q, k, v)))


def scores_kept_for_later(q, k, v, keep=None):
    s = q @ k.transpose(-2, -1) / 2.0
    saved = s.clone() if keep is None else None  # an optional intermediate nobody reads  # noqa: F841
    return torch.softmax(s, -1) @ v


def test_unused_clone_of_the_scores_does_not_block_the_rewrite():
    ring = ringfx.LoopbackRing(2)
    q, k, v = _qkv()
    model = transform(scores_kept_for_later, mesh=ring, inputs="sharded")
    shard = lambda t: ringfx.shard(t, 2, group=ring)
    out = model(shard(q), shard(k), shard(v))
    assert [s.decision for s in model.sites] == ["rewritten"]
    torch.testing.assert_close(out, shard(scores_kept_for_later(q, k, v)))


def scores_returned(q, k, v):
    s = q @ k.transpose(-2, -1)
    return torch.softmax(s, -1) @ v, s.clone()


def test_a_clone_of_the_scores_that_is_returned_still_blocks_it():
    report = ringfx.explain(scores_returned, *_qkv())
    assert [s.decision for s in report.sites] == ["left alone"]
    assert "clone" in report.sites[0].reason


class EscapingProbs(nn.Module):
    def forward(self, x):
        p = torch.softmax(x @ x.transpose(-2, -1), -1)
        return p @ x, p


def test_strict_false_warns_per_left_alone_site_at_the_users_line():
    model = transform(EscapingProbs(), mesh=ringfx.LoopbackRing(2), strict=False, inputs="sharded")
    with pytest.warns(RingfxWarning, match="left alone.*shard only") as caught:
        model(torch.randn(2, 8, 4, dtype=torch.float64))
    assert [w.filename for w in caught if issubclass(w.category, RingfxWarning)] == [__file__]


def test_strict_false_on_a_ring_of_one_says_nothing():
    model = transform(EscapingProbs(), mesh=ringfx.LoopbackRing(1), strict=False, inputs="sharded")
    model(torch.randn(2, 8, 4, dtype=torch.float64))


class Positions(nn.Module):
    def forward(self, x):
        pos = torch.arange(x.shape[1])
        x = x + pos[None, :, None].to(x.dtype)
        q = x.view(2, x.shape[1], 2, 4).transpose(1, 2)
        return F.scaled_dot_product_attention(q, q, q)


def test_guard_notes_point_at_the_users_line():
    ring = ringfx.LoopbackRing(2)
    model = transform(Positions(), mesh=ring, inputs="sharded")
    with pytest.warns(RingfxWarning, match="torch.arange") as caught:
        model(ringfx.shard(torch.randn(2, 8, 8, dtype=torch.float64), 1, group=ring))
    assert {w.filename for w in caught if issubclass(w.category, RingfxWarning)} == {__file__}


@pytest.fixture
def encoder_layer():
    return nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True).eval()


def test_transformer_encoder_fast_path_is_captured_unfused_and_rewritten(encoder_layer):
    """In eval under no_grad the layer would run one fused op; transform captures it with the
    fast path off, so the attention inside is rewritten and exact on a ring."""
    x = torch.randn(2, 9, 16)
    model = transform(encoder_layer, mesh=ringfx.LoopbackRing(3), layout="zigzag")
    with torch.no_grad():
        out, ref = model(x), encoder_layer(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert [s.decision for s in model.sites] == ["rewritten"]
    assert torch.backends.mha.get_fastpath_enabled()  # restored for the rest of the program


def test_transformer_encoder_fast_path_is_explained_as_rewritten(encoder_layer):
    with torch.no_grad():
        report = ringfx.explain(encoder_layer, torch.randn(2, 8, 16))
    assert [s.decision for s in report.sites] == ["rewritten"]


def test_a_fused_attention_op_in_a_graph_is_not_silent_on_a_ring():
    """The fused op itself (called directly, as a traced graph may hold it) stays reported."""
    def fused(x, w, b, ow, ob):
        return torch._native_multi_head_attention(x, x, x, 16, 4, w, b, ow, ob, need_weights=False)[0]

    args = (torch.randn(2, 8, 16), torch.randn(48, 16), torch.randn(48), torch.randn(16, 16), torch.randn(16))
    with torch.no_grad(), pytest.raises(UnsupportedError, match="fused"):
        transform(fused, mesh=ringfx.LoopbackRing(2), inputs="sharded")(*args)


def test_compile_backend_logs_when_it_finds_no_attention(caplog):
    with caplog.at_level(logging.WARNING, logger="ringfx.backend"):
        torch.compile(nn.Linear(4, 4), backend="ringfx", options={"inner": "eager"})(torch.randn(2, 4))
    assert any("no attention found" in r.getMessage() for r in caplog.records)


def test_default_group_without_torch_distributed_is_logged_once(caplog, monkeypatch):
    import ringfx.backend as backend

    monkeypatch.setattr(backend, "_warned_no_group", False)
    with caplog.at_level(logging.WARNING, logger="ringfx.backend"):
        backend.resolve_group_name(None)
        backend.resolve_group_name(None)
    assert sum("not initialised" in r.getMessage() for r in caplog.records) == 1


def test_mask_pattern_is_checked_on_the_masks_device():
    from ringfx.passes.classify_masks import _pattern_of

    seen = []

    class Recorder(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is torch.arange:
                seen.append((kwargs or {}).get("device"))
            return func(*args, **(kwargs or {}))

    keep = torch.ones(5, 5, dtype=torch.bool).tril()
    with Recorder():
        assert _pattern_of(keep) == ("causal", 0)
    assert seen and all(d == keep.device for d in seen)
