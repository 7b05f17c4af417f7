"""Example attention spellings, one plain PyTorch function each, and the rules of
``spellings.py`` (the tables the matcher walks) that each one exercises.

The matcher (``find_attention.py``) anchors at a normaliser and walks to the two products
through the tables of ``spellings.py``; this list is the examples those tables are tested
on, each with where it comes from and ``rules``: the names of the rules that finding it
fires (exactly those: ``tests/test_recognition_table.py`` traces each entry and compares,
and fails for a rule that no entry names). Each entry is traced with dynamo (the tracer
the models go through) by the tests, which check that it is found, rewritten as ``check``
says and numerically exact. ``explain`` uses the table to name what it found.

    AttentionPattern(name, fn, example_inputs, check, rules)

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
    rules: tuple[str, ...] = ()  # the spellings.py rules that finding it fires (SDPA: none)


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


# GPT-NeoX / Pythia before transformers 4.40: baddbmm on a zeros buffer (beta=0), the scores
# viewed back to (B, H, S, S), torch.where(causal, scores, finfo.min), probabilities cast
def neox_baddbmm_where(q, k, v):
    b, h, s_len, d = q.shape
    q3, k3 = q.reshape(b * h, s_len, d), k.reshape(b * h, s_len, d)
    s = torch.baddbmm(torch.zeros(b * h, s_len, s_len, dtype=q.dtype), q3, k3.transpose(1, 2),
                      beta=0.0, alpha=1.0 / math.sqrt(d))
    s = s.view(b, h, s_len, s_len)
    causal = torch.ones(s_len, s_len, dtype=torch.bool).tril()
    s = torch.where(causal, s, torch.finfo(s.dtype).min)
    return torch.matmul(F.softmax(s, dim=-1).to(v.dtype), v)


# BLOOM: heads folded into the batch for baddbmm, the mask and softmax in (B, H, S, S), the
# probabilities folded again for bmm with (B*H, S, D) values
def bloom_heads_folded(q, k, v):
    b, h, s_len, d = q.shape
    q3, k3, v3 = (t.reshape(b * h, s_len, d) for t in (q, k, v))
    s = torch.baddbmm(torch.empty(b * h, s_len, s_len, dtype=q.dtype), q3, k3.transpose(1, 2),
                      beta=0.0, alpha=1.0 / math.sqrt(d))
    s = s.view(b, h, s_len, s_len)
    keep = torch.ones(s_len, s_len, dtype=torch.bool).tril()
    s = s.masked_fill(~keep, torch.finfo(s.dtype).min)
    p = F.softmax(s, dim=-1).view(b * h, s_len, s_len)
    return torch.bmm(p, v3).view(b, h, s_len, d)


# transformers' Gemma 2 eager attention: scale, soft-cap (cap * tanh(s / cap)), then the mask
def gemma2_softcap(q, k, v):
    cap = 0.5
    s = torch.matmul(q, k.transpose(2, 3)) * q.shape[-1] ** -0.5
    s = torch.tanh(s / cap) * cap
    S = q.shape[-2]
    s = s + torch.full((S, S), torch.finfo(q.dtype).min, dtype=q.dtype).triu(1)
    return torch.matmul(F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype), v)


# transformers' GPT-OSS eager attention: a sink logit per head joined as one more column, the
# row max subtracted, softmax, the column dropped
def gpt_oss_sinks(q, k, v):
    b, h, s_len, d = q.shape
    sinks = torch.linspace(-1.0, 1.0, h, dtype=q.dtype)
    s = torch.matmul(q, k.transpose(2, 3)) * d ** -0.5
    s = s + torch.full((s_len, s_len), torch.finfo(q.dtype).min, dtype=q.dtype).triu(1)
    s = torch.cat([s, sinks.reshape(1, -1, 1, 1).expand(b, -1, s_len, -1)], dim=-1)
    s = s - s.max(dim=-1, keepdim=True).values
    p = F.softmax(s, dim=-1)
    return torch.matmul(p[..., :-1], v)


# T5: unscaled scores, the bias added in place (scores += position_bias), softmax in float32
# cast back with type_as
def t5_inplace_bias(q, k, v):
    s = torch.matmul(q, k.transpose(3, 2))
    S = q.shape[2]
    s += torch.full((S, S), torch.finfo(q.dtype).min, dtype=q.dtype).triu(1)
    return F.softmax(s.float(), dim=-1).type_as(s) @ v


# the mask as a penalty subtracted from the scores (the additive mask negated)
def subtracted_penalty(q, k, v):
    S = q.shape[-2]
    penalty = torch.triu(torch.full((S, S), float("inf"), dtype=q.dtype), diagonal=1)
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) - penalty
    return s.softmax(-1) @ v


def _seg(s: int):
    return (torch.arange(s) * 3 // s).expand(B, s).contiguous()


PATTERNS: list[AttentionPattern] = [
    AttentionPattern("sdpa", sdpa_causal, lambda s: _qkv(s), lambda site: site.causal),
    AttentionPattern("matmul-div", matmul_div, lambda s: _qkv(s), lambda site: site.mask_kind == "none",
                     ("matmul-qk", "scale", "softmax", "matmul-pv")),
    AttentionPattern("matmul-scale-qk-causal", matmul_scale_qk_causal, lambda s: _qkv(s),
                     lambda site: site.causal and abs(site.scale - D ** -0.5) < 1e-12,
                     ("matmul-qk", "masked-fill", "softmax", "matmul-pv")),
    AttentionPattern("bmm-additive-causal", bmm_additive_causal, lambda s: _qkv(s), lambda site: site.causal,
                     ("matmul-qk", "additive-mask", "softmax", "matmul-pv")),
    AttentionPattern("einsum-window", einsum_window, lambda s: _qkv(s),
                     lambda site: site.causal and site.window == 3,
                     ("einsum-qk", "scale", "where", "softmax", "einsum-pv")),
    AttentionPattern("baddbmm", baddbmm_scale, lambda s: _qkv(s), lambda site: site.mask_kind == "none",
                     ("baddbmm-qk", "softmax", "matmul-pv")),
    AttentionPattern("bert-additive-padding", bert_additive_padding, lambda s: (*_qkv(s), _pad(s)),
                     lambda site: site.mask_kind == "key_padding",
                     ("matmul-qk", "scale", "additive-mask", "softmax", "dropout", "matmul-pv")),
    AttentionPattern("llama-repeat-kv", llama_repeat_kv_causal, lambda s: _qkv(s, HKV),
                     lambda site: site.causal and site.gqa == "repeat_kv",
                     ("matmul-qk", "scale", "additive-mask", "softmax", "probs-cast", "matmul-pv", "repeat_kv")),
    AttentionPattern("repeat-interleave-padding", repeat_interleave_padding, lambda s: (*_qkv(s, HKV), _pad(s)),
                     lambda site: site.gqa == "repeat_interleave" and site.mask_kind == "key_padding",
                     ("matmul-qk", "scale", "masked-fill", "softmax", "matmul-pv", "repeat_interleave")),
    AttentionPattern("sdpa-segment-ids", sdpa_segment_ids, lambda s: (*_qkv(s), _seg(s)),
                     lambda site: site.mask_kind == "segment_ids"),
    AttentionPattern("neox-baddbmm-where", neox_baddbmm_where, lambda s: _qkv(s),
                     lambda site: site.causal and abs(site.scale - D ** -0.5) < 1e-12,
                     ("baddbmm-qk", "heads-split", "where", "softmax", "probs-cast", "matmul-pv")),
    AttentionPattern("bloom-heads-folded", bloom_heads_folded, lambda s: _qkv(s),
                     lambda site: site.causal and site.out_fold_heads,
                     ("baddbmm-qk", "heads-split", "masked-fill", "softmax", "heads-merge", "matmul-pv")),
    AttentionPattern("gemma2-softcap", gemma2_softcap, lambda s: _qkv(s),
                     lambda site: site.causal and site.softcap == 0.5,
                     ("matmul-qk", "scale", "softcap", "additive-mask", "softmax", "probs-cast", "matmul-pv")),
    AttentionPattern("gpt-oss-sinks", gpt_oss_sinks, lambda s: _qkv(s),
                     lambda site: site.causal and site.sinks is not None,
                     ("matmul-qk", "scale", "additive-mask", "sinks", "row-max", "softmax", "drop-sink", "matmul-pv")),
    AttentionPattern("t5-inplace-bias", t5_inplace_bias, lambda s: _qkv(s),
                     lambda site: site.causal and site.scale == 1.0,
                     ("matmul-qk", "additive-mask", "scores-cast", "softmax", "probs-cast", "matmul-pv")),
    AttentionPattern("subtracted-penalty", subtracted_penalty, lambda s: _qkv(s), lambda site: site.causal,
                     ("matmul-qk", "scale", "subtracted-mask", "softmax", "matmul-pv")),
]
