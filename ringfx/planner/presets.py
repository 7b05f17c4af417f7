"""Model configs given as numbers (no downloads), built as the project's LLaMA-style model.

``PRESETS["llama-8b-like"]`` etc. are the shapes of public models; ``build_reference_model``
turns a config into ``ringfx.reference_model.LlamaLike`` as the presets spell it (RMSNorm as
``F.rms_norm``, RoPE from positions 0..S-1, GQA attention through
``F.scaled_dot_product_attention``, SwiGLU MLP), which the planner runs on the ``meta``
device to read its memory off and ``benchmarks/planner_accuracy.py`` runs on a GPU to
measure it.  ``gpt2-like`` keeps GPT-2's sizes in this LLaMA-style block.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..reference_model import LlamaLike, ModelConfig


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
        return LlamaLike(cfg)  # the presets' spelling: SDPA, F.rms_norm, positions 0..S-1, logits


def example_ids(cfg: ModelConfig, seq_len: int, batch: int = 1, device="meta"):
    return (torch.zeros(batch, seq_len, dtype=torch.long, device=device),)


def flops_per_token(cfg: ModelConfig) -> float:
    """Matmul FLOPs per token of one forward, attention scores excluded (2 per weight)."""
    h, q, kv = cfg.hidden, cfg.heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    return 2.0 * (cfg.layers * (h * q + 2 * h * kv + q * h + 3 * h * cfg.ffn) + cfg.vocab * h)

