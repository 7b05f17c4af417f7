"""The sequence-axis guard: attention that contracts over the sequence ("channel
attention") is left alone on a ring, never rewritten into a wrong ring op."""

import pytest
import torch
import torch.nn as nn

import ringfx
from ringfx import UnsupportedError


class ChannelAttention(nn.Module):  # SE/"channel attention": C x C scores summed over tokens
    def forward(self, x):  # x: (B, S, C)
        q = x.transpose(1, 2)
        return torch.softmax(q @ q.transpose(-2, -1) / 8, dim=-1) @ q


class ChannelAttentionHeads(nn.Module):  # the same, per head, with the sequence reshaped into the head dim
    def forward(self, x):  # x: (B, S, C)
        b, s, c = x.shape
        q = x.permute(0, 2, 1).reshape(b, 2, c // 2, s)
        return torch.nn.functional.scaled_dot_product_attention(q, q, q)


class TokenAttention(nn.Module):  # ordinary attention over tokens, its input channels-first
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(6, 6, dtype=torch.float64)

    def forward(self, x):  # x: (B, C, S)
        h = self.proj(x.transpose(1, 2))
        return torch.nn.functional.scaled_dot_product_attention(h, h, h, is_causal=True)


@pytest.mark.parametrize("model", [ChannelAttention(), ChannelAttentionHeads()], ids=["matmul", "sdpa-heads"])
def test_channel_attention_is_refused_on_a_ring(model):
    x = torch.randn(2, 12, 6, dtype=torch.float64)
    with pytest.raises(UnsupportedError, match="non-sequence axis"):
        ringfx.transform(model, ringfx.LoopbackRing(2), inputs="sharded")(x)
    with pytest.warns(ringfx.RingfxWarning, match="left alone"):
        out = ringfx.transform(model, ringfx.LoopbackRing(2), strict=False, inputs="sharded")(x)
    torch.testing.assert_close(out, model(x))  # left as it was


def test_channel_attention_on_one_rank_is_harmless():
    x = torch.randn(2, 12, 6, dtype=torch.float64)
    torch.testing.assert_close(ringfx.transform(ChannelAttention(), ringfx.LoopbackRing(1))(x), ChannelAttention()(x))


def test_token_attention_with_channels_first_input_is_rewritten():
    model, ring = TokenAttention(), ringfx.LoopbackRing(3)
    x = torch.randn(2, 6, 12, dtype=torch.float64)
    ring_model = ringfx.transform(model, ring, inputs="sharded")
    out = ringfx.unshard(ring_model(ringfx.shard(x, 2, group=ring)), 1, group=ring)
    torch.testing.assert_close(out, model(x))
    assert [s.decision for g in ring_model.reports for s in g.sites] == ["rewritten"]
