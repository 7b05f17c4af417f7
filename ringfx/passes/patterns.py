"""The attention spellings ringfx recognises, one plain PyTorch function each.

The matcher (``find_attention.py``) anchors at softmax and walks to the two products, so
it is not driven by exact subgraphs; this table is the list of spellings it must cover,
each with where it comes from. Each entry is traced with dynamo (the tracer the models
go through) by the tests, which check that it is found, rewritten as ``check`` says and
numerically exact. ``explain`` uses the table to name what it found.

    AttentionPattern(name, fn, example_inputs, check)

``example_inputs(S)`` builds inputs at sequence length S (float64, B=2, H=4, D=8);
``check(site) -> bool`` is the semantic condition the match must meet (the mask kind, the
GQA look-through, the scale absorbed into one number) beyond being found.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

B, H, HKV, D = 2, 4, 2, 8


@dataclass(frozen=True)
class AttentionPattern:
    name: str
    fn: Callable
    example_inputs: Callable[[int], tuple]
    check: Callable[[object], bool]


def _qkv(s: int, hkv: int = H):
    g = torch.Generator().manual_seed(s)
    return (torch.randn(B, H, s, D, generator=g, dtype=torch.float64),
            torch.randn(B, hkv, s, D, generator=g, dtype=torch.float64),
            torch.randn(B, hkv, s, D, generator=g, dtype=torch.float64))


def _pad(s: int):
    keep = torch.ones(B, s, dtype=torch.bool)
    keep[0, s - max(1, s // 4):] = False
    return keep


# --- patterns -------------------------------------------------------------------------

# torch SDPA, as called by HF "sdpa" attention and most new models
def sdpa_causal(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


# the textbook spelling (Annotated Transformer, nanoGPT's slow path)
def matmul_div(q, k, v):
    s = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(q.size(-1))
    return torch.softmax(s, dim=-1) @ v


# scale split over q and k (Stable Diffusion / xformers reference: q * d**-0.25)
def matmul_scale_qk_causal(q, k, v):
    d = q.shape[-1]
    s = (q * d ** -0.25) @ (k * d ** -0.25).transpose(-1, -2)
    S = q.shape[-2]
    mask = torch.tril(torch.ones(S, S, dtype=torch.bool))
    s = s.masked_fill(~mask, float("-inf"))
    return s.softmax(-1) @ v


# fairseq / MBart: heads folded into the batch, bmm, additive causal from triu(-inf)
def bmm_additive_causal(q, k, v):
    b, h, s_len, d = q.shape
    q3, k3, v3 = (t.reshape(b * h, s_len, d) for t in (q, k, v))
    s = torch.bmm(q3 * d ** -0.5, k3.transpose(1, 2))
    s = s + torch.triu(torch.full((s_len, s_len), float("-inf")), diagonal=1)
    p = F.softmax(s, dim=-1)
    return torch.bmm(p, v3).reshape(b, h, s_len, d)


# einsum with heads split by the equation (x-transformers, lucidrains style), arange window
def einsum_window(q, k, v):
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))  # (B, S, H, D)
    s = torch.einsum("bqhd,bkhd->bhqk", qh, kh) * q.shape[-1] ** -0.5
    i = torch.arange(q.shape[-2]).unsqueeze(1)
    j = torch.arange(q.shape[-2]).unsqueeze(0)
    keep = (j <= i) & (j > i - 3)
    s = torch.where(keep, s, torch.finfo(s.dtype).min)
    return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), vh).transpose(1, 2)


# Bloom: baddbmm with alpha as the scale, beta=0 on an empty buffer
def baddbmm_scale(q, k, v):
    b, h, s_len, d = q.shape
    q3, k3, v3 = (t.reshape(b * h, s_len, d) for t in (q, k, v))
    s = torch.baddbmm(torch.empty(b * h, s_len, s_len, dtype=q.dtype), q3, k3.transpose(1, 2),
                      beta=0.0, alpha=1.0 / math.sqrt(d))
    return torch.bmm(s.softmax(-1), v3).reshape(b, h, s_len, d)


# HF BERT eager: extended additive mask (1 - mask) * finfo.min, dropout in eval
def bert_additive_padding(q, k, v, keep):
    ext = (1.0 - keep[:, None, None, :].to(q.dtype)) * torch.finfo(q.dtype).min
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + ext
    p = F.dropout(F.softmax(s, dim=-1), p=0.1, training=False)
    return p @ v


# HF LLaMA eager: repeat_kv (expand + reshape), fp32 softmax cast back
def llama_repeat_kv_causal(q, k, v):
    def repeat_kv(x, n):
        b, h, s_len, d = x.shape
        return x[:, :, None, :, :].expand(b, h, n, s_len, d).reshape(b, h * n, s_len, d)

    n = q.shape[1] // k.shape[1]
    s = q @ repeat_kv(k, n).transpose(2, 3) / math.sqrt(q.shape[-1])
    S = q.shape[-2]
    causal = torch.full((S, S), torch.finfo(torch.float32).min, dtype=s.dtype).triu(1)
    p = F.softmax(s + causal, dim=-1, dtype=torch.float32).to(q.dtype)
    return p @ repeat_kv(v, n)


# GQA by repeat_interleave (Mistral reference / many ports), masked_fill(mask == 0, -inf)
def repeat_interleave_padding(q, k, v, keep):
    n = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(n, dim=1), v.repeat_interleave(n, dim=1)
    s = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
    s = s.masked_fill(keep[:, None, None, :] == 0, float("-inf"))
    return s.softmax(dim=-1) @ v


# packed documents: SDPA with a segment-id equality mask (FlashAttention varlen, packing)
def sdpa_segment_ids(q, k, v, seg):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=seg[:, None, :, None] == seg[:, None, None, :])


def _seg(s: int):
    return (torch.arange(s) * 3 // s).expand(B, s).contiguous()


PATTERNS: list[AttentionPattern] = [
    AttentionPattern("sdpa", sdpa_causal, lambda s: _qkv(s), lambda site: site.causal),
    AttentionPattern("matmul-div", matmul_div, lambda s: _qkv(s), lambda site: site.mask_kind == "none"),
    AttentionPattern("matmul-scale-qk-causal", matmul_scale_qk_causal, lambda s: _qkv(s),
                     lambda site: site.causal and abs(site.scale - D ** -0.5) < 1e-12),
    AttentionPattern("bmm-additive-causal", bmm_additive_causal, lambda s: _qkv(s), lambda site: site.causal),
    AttentionPattern("einsum-window", einsum_window, lambda s: _qkv(s),
                     lambda site: site.causal and site.window == 3),
    AttentionPattern("baddbmm", baddbmm_scale, lambda s: _qkv(s), lambda site: site.mask_kind == "none"),
    AttentionPattern("bert-additive-padding", bert_additive_padding, lambda s: (*_qkv(s), _pad(s)),
                     lambda site: site.mask_kind == "key_padding"),
    AttentionPattern("llama-repeat-kv", llama_repeat_kv_causal, lambda s: _qkv(s, HKV),
                     lambda site: site.causal and site.gqa == "repeat_kv"),
    AttentionPattern("repeat-interleave-padding", repeat_interleave_padding, lambda s: (*_qkv(s, HKV), _pad(s)),
                     lambda site: site.gqa == "repeat_interleave" and site.mask_kind == "key_padding"),
    AttentionPattern("sdpa-segment-ids", sdpa_segment_ids, lambda s: (*_qkv(s), _seg(s)),
                     lambda site: site.mask_kind == "segment_ids"),
]
