"""The one LLaMA-style decoder of the project: the demo's model, the planner's presets, the tests'.

    model = LlamaLike(ModelConfig("tiny", layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16, ffn=256,
                                  vocab=97, dtype="fp32"),
                      attention=Attention.MASKED_FILL, position_ids=True, fused_norm=False)
    logits = model(ids, positions)          # (B, S) ids, (B, S) position ids -> (B, S, vocab)

Embedding, then per layer RMSNorm -> attention (RoPE, GQA, causal) -> residual -> RMSNorm ->
SwiGLU MLP -> residual, then RMSNorm and the LM head. What differs between its users is an
option, nothing else:

* ``attention``: how the attention is spelled (``Attention``): PyTorch's SDPA with its own
  GQA (the planner's presets), transformers' sdpa and eager paths (the test zoo, which
  alternates them layer by layer), or softmax(q kᵀ) v written out with a mask from sizes
  (the demo: what ringfx's passes must find in code that never calls SDPA).
* ``position_ids``: RoPE from position ids the caller passes (a ring shards them with the
  tokens, so each rank's tokens keep their global positions: the demo and the tests), or
  from 0..S-1 made inside (the planner's presets, which only simulate one step).
* ``fused_norm``: RMSNorm as ``F.rms_norm`` (the presets: the planner models it as the fused
  kernel) or written out in pointwise ops (the demo and tests, as transformers writes it).
* ``lm_head``: the zoo's model stops at the final norm (hidden states), the others return logits.

It lives in a module of its own, not in the demo, the planner or the tests, because all
three use it and none of them owns it: the planner must not import the demo, the demo must
not import the tests, and the presets are numbers (``planner/presets.py``) fed to it.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A decoder-only transformer by its numbers."""

    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    dtype: str = "bf16"
    causal: bool = True
    tie_embeddings: bool = False

    def __post_init__(self):
        if self.heads % self.kv_heads:
            raise ValueError(f"{self.name}: heads={self.heads} must be a multiple of kv_heads={self.kv_heads}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"{self.name}: dtype={self.dtype!r}: use one of {', '.join(_DTYPES)}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def param_count(self) -> int:
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        block = h * q + 2 * h * kv + q * h + 3 * h * self.ffn + 2 * h
        embed = self.vocab * h * (1 if self.tie_embeddings else 2)
        return self.layers * block + embed + h


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}


class Attention(enum.Enum):
    """How a layer spells its attention (each is one of ``_ATTENTION``'s functions)."""

    SDPA = "sdpa"                # F.scaled_dot_product_attention(is_causal, enable_gqa): PyTorch's own GQA
    HF_SDPA = "hf_sdpa"          # transformers' sdpa path: repeat_kv, then SDPA is_causal
    HF_EAGER = "hf_eager"        # transformers' eager path: repeat_kv, additive triu(finfo.min), float32 softmax
    MASKED_FILL = "masked_fill"  # written out: repeat_kv, bool tril(ones) from sizes, masked_fill(-inf)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, Hkv, S, D) -> (B, Hkv * n_rep, S, D), each K/V head repeated for its query group
    (transformers' LLaMA)."""
    b, h, s, d = x.shape
    if n_rep == 1:
        return x
    return x[:, :, None, :, :].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


def _sdpa(q, k, v, causal: bool):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1])


def _hf_sdpa(q, k, v, causal: bool):
    n_rep = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), is_causal=causal)


def _hf_eager(q, k, v, causal: bool):
    n_rep = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    w = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(q.shape[-1])
    if causal:
        s = q.shape[2]
        w = w + torch.full((s, s), torch.finfo(w.dtype).min, dtype=w.dtype, device=w.device).triu(1)
    w = F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(w, v)


def _masked_fill(q, k, v, causal: bool):
    n_rep = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if causal:
        s = q.shape[2]
        keep = torch.ones(s, s, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


_ATTENTION = {Attention.SDPA: _sdpa, Attention.HF_SDPA: _hf_sdpa, Attention.HF_EAGER: _hf_eager,
              Attention.MASKED_FILL: _masked_fill}


class RMSNorm(nn.Module):
    """``F.rms_norm`` (``fused``, eps 1e-5) or written out as transformers' LLaMA writes it
    (eps 1e-6)."""

    def __init__(self, dim: int, dtype: torch.dtype, fused: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))
        self.fused = fused
        self.eps = 1e-5 if fused else 1e-6

    def forward(self, x):
        if self.fused:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


def rotate(x, cos, sin):
    """RoPE (Su et al. 2021) in the rotate-half form of the LLaMA reference code."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class SelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, spelling: Attention):
        super().__init__()
        self.cfg, self.spelling = cfg, spelling
        q, kv, dtype = cfg.heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim, cfg.torch_dtype
        self.q_proj = nn.Linear(cfg.hidden, q, bias=False, dtype=dtype)
        self.k_proj = nn.Linear(cfg.hidden, kv, bias=False, dtype=dtype)
        self.v_proj = nn.Linear(cfg.hidden, kv, bias=False, dtype=dtype)
        self.o_proj = nn.Linear(q, cfg.hidden, bias=False, dtype=dtype)

    def forward(self, x, cos, sin):
        cfg = self.cfg
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, cfg.heads, cfg.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, cfg.kv_heads, cfg.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, cfg.kv_heads, cfg.head_dim).transpose(1, 2)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        a = _ATTENTION[self.spelling](q, k, v, cfg.causal)
        return self.o_proj(a.transpose(1, 2).reshape(b, s, cfg.heads * cfg.head_dim))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, spelling: Attention, fused_norm: bool):
        super().__init__()
        dtype = cfg.torch_dtype
        self.input_layernorm = RMSNorm(cfg.hidden, dtype, fused_norm)
        self.post_attention_layernorm = RMSNorm(cfg.hidden, dtype, fused_norm)
        self.self_attn = SelfAttention(cfg, spelling)
        self.gate = nn.Linear(cfg.hidden, cfg.ffn, bias=False, dtype=dtype)
        self.up = nn.Linear(cfg.hidden, cfg.ffn, bias=False, dtype=dtype)
        self.down = nn.Linear(cfg.ffn, cfg.hidden, bias=False, dtype=dtype)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        h = self.post_attention_layernorm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class LlamaLike(nn.Module):
    """A LLaMA-style decoder: ``forward(input_ids (B, S)[, position_ids (B, S)]) -> logits
    (B, S, vocab)`` (hidden states (B, S, hidden) without ``lm_head``).

    ``attention``: one ``Attention`` for every layer, or a sequence of them taken in turn
    (layer i spells its attention ``attention[i % len(attention)]``). ``position_ids``: the
    forward takes position ids (RoPE's angles from them, with an ``inv_freq`` buffer), else
    it makes positions 0..S-1. Parameters are made in ``cfg.dtype``.
    """

    def __init__(self, cfg: ModelConfig, *, attention: Union[Attention, Sequence[Attention]] = Attention.SDPA,
                 position_ids: bool = False, fused_norm: bool = True, lm_head: bool = True):
        super().__init__()
        spellings = (attention,) if isinstance(attention, Attention) else tuple(attention)
        if not spellings or not all(isinstance(a, Attention) for a in spellings):
            raise TypeError(f"attention: an Attention or a sequence of them, got {attention!r}")
        self.cfg, self.takes_position_ids = cfg, position_ids
        dtype = cfg.torch_dtype
        self.embed_tokens = nn.Embedding(cfg.vocab, cfg.hidden, dtype=dtype)
        self.layers = nn.ModuleList(DecoderLayer(cfg, spellings[i % len(spellings)], fused_norm)
                                    for i in range(cfg.layers))
        self.norm = RMSNorm(cfg.hidden, dtype, fused_norm)
        self.lm_head = nn.Linear(cfg.hidden, cfg.vocab, bias=False, dtype=dtype) if lm_head else None
        if lm_head and cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        if position_ids:  # float64: exact enough for any cfg.dtype, and for a model built in float32 then .double()
            self.register_buffer("inv_freq", _inverse_frequencies(cfg.head_dim, torch.float64), persistent=False)

    def forward(self, input_ids, position_ids=None):
        hidden = self.hidden_states(input_ids, position_ids)
        return hidden if self.lm_head is None else self.lm_head(hidden)

    def hidden_states(self, input_ids, position_ids: Optional[torch.Tensor] = None):
        """The final norm's output, the LM head's input (B, S, hidden)."""
        if self.takes_position_ids != (position_ids is not None):
            raise TypeError("position_ids: this model takes them" if self.takes_position_ids else
                            "position_ids: this model makes its own positions (0..S-1); pass only input_ids")
        if position_ids is None:  # positions 0..S-1, angles in float32: one sequence per row
            inv = _inverse_frequencies(self.cfg.head_dim, torch.float32, input_ids.device)
            angles = torch.outer(torch.arange(input_ids.shape[1], device=input_ids.device, dtype=torch.float32), inv)
            angles = torch.cat((angles, angles), dim=-1)
            dtype = self.embed_tokens.weight.dtype
            cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)  # (S, head_dim)
            x = self.embed_tokens(input_ids)
        else:  # each token's own position (a shard of the sequence keeps its global positions)
            x = self.embed_tokens(input_ids)
            freqs = position_ids[:, :, None].to(self.inv_freq.dtype) * self.inv_freq[None, None, :]
            angles = torch.cat((freqs, freqs), dim=-1)
            cos, sin = angles.cos()[:, None].to(x.dtype), angles.sin()[:, None].to(x.dtype)  # (B, 1, S, head_dim)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.norm(x)


def _inverse_frequencies(head_dim: int, dtype: torch.dtype, device=None) -> torch.Tensor:
    """RoPE's 1 / 10000^(2i / d), i < d / 2."""
    return 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, dtype=dtype, device=device) / head_dim))
