"""Model configs given as numbers (no downloads) and a reference LLaMA-like module.

``PRESETS["llama-8b-like"]`` etc. are the shapes of public models; ``build_reference_model``
turns a config into a plain-PyTorch decoder (RMSNorm, RoPE, GQA attention through
``F.scaled_dot_product_attention``, SwiGLU MLP) that the planner runs on the ``meta`` device
to read its memory off, and that ``benchmarks/planner_accuracy.py`` runs on a GPU to
measure it.  ``gpt2-like`` keeps GPT-2's sizes in this LLaMA-style block.
"""

from __future__ import annotations

import dataclasses

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

    @property
    def torch_dtype(self) -> torch.dtype:
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[self.dtype]

    @property
    def param_count(self) -> int:
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        block = h * q + 2 * h * kv + q * h + 3 * h * self.ffn + 2 * h
        embed = self.vocab * h * (1 if self.tie_embeddings else 2)
        return self.layers * block + embed + h


PRESETS = {c.name: c for c in [
    ModelConfig("llama-8b-like", layers=32, hidden=4096, heads=32, kv_heads=8, head_dim=128, ffn=14336, vocab=128256),
    ModelConfig("llama-70b-like", layers=80, hidden=8192, heads=64, kv_heads=8, head_dim=128, ffn=28672, vocab=128256),
    ModelConfig("llama-1b-like", layers=16, hidden=2048, heads=32, kv_heads=8, head_dim=64, ffn=8192, vocab=128256,
                tie_embeddings=True),
    ModelConfig("gpt2-like", layers=12, hidden=768, heads=12, kv_heads=12, head_dim=64, ffn=3072, vocab=50257,
                tie_embeddings=True),
    ModelConfig("tiny-llama", layers=4, hidden=512, heads=8, kv_heads=8, head_dim=64, ffn=1408, vocab=8192),
]}


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"model={name!r} is not a preset; use one of {', '.join(PRESETS)} or pass a ModelConfig")
    return PRESETS[name]


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.weight, 1e-5)


def rotate(x, cos, sin):
    """RoPE (Su et al. 2021) in the rotate-half form of the LLaMA reference code."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class DecoderBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        q, kv = cfg.heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
        self.attn_norm, self.mlp_norm = RMSNorm(cfg.hidden), RMSNorm(cfg.hidden)
        self.q_proj = nn.Linear(cfg.hidden, q, bias=False)
        self.k_proj = nn.Linear(cfg.hidden, kv, bias=False)
        self.v_proj = nn.Linear(cfg.hidden, kv, bias=False)
        self.o_proj = nn.Linear(q, cfg.hidden, bias=False)
        self.gate = nn.Linear(cfg.hidden, cfg.ffn, bias=False)
        self.up = nn.Linear(cfg.hidden, cfg.ffn, bias=False)
        self.down = nn.Linear(cfg.ffn, cfg.hidden, bias=False)

    def forward(self, x, cos, sin):
        cfg = self.cfg
        b, s, _ = x.shape
        h = self.attn_norm(x)
        q = self.q_proj(h).view(b, s, cfg.heads, cfg.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(b, s, cfg.kv_heads, cfg.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(b, s, cfg.kv_heads, cfg.head_dim).transpose(1, 2)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=cfg.causal, enable_gqa=cfg.heads != cfg.kv_heads)
        x = x + self.o_proj(a.transpose(1, 2).reshape(b, s, cfg.heads * cfg.head_dim))
        h = self.mlp_norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class LlamaLike(nn.Module):
    """A LLaMA-style decoder: ``forward(ids (B, S)) -> logits (B, S, vocab)``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab, cfg.hidden)
        self.layers = nn.ModuleList(DecoderBlock(cfg) for _ in range(cfg.layers))
        self.norm = RMSNorm(cfg.hidden)
        self.lm_head = nn.Linear(cfg.hidden, cfg.vocab, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def forward(self, ids):
        return self.lm_head(self.hidden_states(ids))

    def hidden_states(self, ids):
        """The final norm's output, the LM head's input (B, S, hidden)."""
        s = ids.shape[1]
        inv = 1.0 / (10000.0 ** (torch.arange(0, self.cfg.head_dim, 2, device=ids.device, dtype=torch.float32)
                                 / self.cfg.head_dim))
        angles = torch.outer(torch.arange(s, device=ids.device, dtype=torch.float32), inv)
        angles = torch.cat((angles, angles), dim=-1)
        dtype = self.embed.weight.dtype
        cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.norm(x)


def lm_loss(logits, inputs):
    """Next-token cross-entropy in float32, as HF models compute it (labels = the ids here)."""
    ids = inputs[0]
    return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), ids.reshape(-1))


class BlockwiseLossStep(nn.Module):
    """``ids -> loss`` of a :class:`LlamaLike` with the LM head and ``lm_loss`` fused into
    ringfx's blockwise loss (chunks of ``chunk`` tokens): what
    ``transform(..., blockwise_loss=chunk)`` makes of the head."""

    def __init__(self, model: LlamaLike, chunk: int):
        super().__init__()
        self.model, self.chunk = model, chunk

    def forward(self, ids):
        from ..blockwise import chunked_linear_cross_entropy

        return chunked_linear_cross_entropy(self.model.hidden_states(ids), self.model.lm_head.weight, None, ids,
                                            chunk=self.chunk, loss_dtype=torch.float32)


def build_reference_model(cfg: ModelConfig, device="meta") -> LlamaLike:
    with torch.device(device):
        model = LlamaLike(cfg)
    return model.to(cfg.torch_dtype)


def example_ids(cfg: ModelConfig, seq_len: int, batch: int = 1, device="meta"):
    return (torch.zeros(batch, seq_len, dtype=torch.long, device=device),)


def flops_per_token(cfg: ModelConfig) -> float:
    """Matmul FLOPs per token of one forward, attention scores excluded (2 per weight)."""
    h, q, kv = cfg.hidden, cfg.heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    return 2.0 * (cfg.layers * (h * q + 2 * h * kv + q * h + 3 * h * cfg.ffn) + cfg.vocab * h)

