"""Small models whose ops outside attention combine tokens across the sequence.

Each is a causal attention layer followed (or preceded) by one sequence-mixing construct
a real model uses. Under ``ringfx.transform`` with full-length inputs they must equal
the untransformed model, forward and backward, on every rank of every ring.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

E, H, VOCAB, CLASSES = 16, 4, 40, 5  # E differs from every tested sequence length
DTYPE = torch.float64


class Attention(nn.Module):
    """Causal SDPA over (B, S, E), heads split by view."""

    def __init__(self, causal=True):
        super().__init__()
        self.qkv = nn.Linear(E, 3 * E, dtype=DTYPE)
        self.out = nn.Linear(E, E, dtype=DTYPE)
        self.causal = causal

    def forward(self, x, bias=None):
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, H, E // H).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=self.causal and bias is None)
        return x + self.out(o.transpose(1, 2).reshape(b, s, E))


class MeanPoolClassifier(nn.Module):  # sentence classifier: mean over tokens, then a linear head
    def __init__(self):
        super().__init__()
        self.attn, self.head = Attention(causal=False), nn.Linear(E, CLASSES, dtype=DTYPE)

    def forward(self, x):
        return self.head(self.attn(x).mean(dim=1))


class SumPool(nn.Module):  # a sum over tokens, keepdim
    def __init__(self):
        super().__init__()
        self.attn = Attention()

    def forward(self, x):
        return self.attn(x).sum(1, keepdim=True) * 0.1


class FirstTokenPooler(nn.Module):  # BERT's pooler: the first token through tanh(linear)
    def __init__(self):
        super().__init__()
        self.attn, self.dense = Attention(causal=False), nn.Linear(E, E, dtype=DTYPE)

    def forward(self, x):
        return torch.tanh(self.dense(self.attn(x)[:, 0]))


class LastTokenHead(nn.Module):  # a causal LM's next-token head: the last position only
    def __init__(self):
        super().__init__()
        self.attn, self.head = Attention(), nn.Linear(E, VOCAB, dtype=DTYPE)

    def forward(self, x):
        return self.head(self.attn(x)[:, -1, :])


class ShiftedLoss(nn.Module):  # GPT-2 style: logits[:, :-1] against labels[:, 1:], mean over valid
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, E, dtype=DTYPE)
        self.attn, self.head = Attention(), nn.Linear(E, VOCAB, dtype=DTYPE)

    def forward(self, ids, labels):
        logits = self.head(self.attn(self.emb(ids)))
        return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100)


class PaddedShiftSumLoss(nn.Module):  # transformers' ForCausalLMLoss: pad + shift labels, sum / count
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, E, dtype=DTYPE)
        self.attn, self.head = Attention(), nn.Linear(E, VOCAB, dtype=DTYPE)

    def forward(self, ids, labels):
        logits = self.head(self.attn(self.emb(ids))).float().double()
        shifted = F.pad(labels, (0, 1), value=-100)[..., 1:].contiguous()
        count = (shifted != -100).sum()
        loss = F.cross_entropy(logits.view(-1, VOCAB), shifted.view(-1), ignore_index=-100, reduction="sum")
        return loss / count


class CumsumScan(nn.Module):  # a prefix sum over tokens (linear-attention style state)
    def __init__(self):
        super().__init__()
        self.attn = Attention()

    def forward(self, x):
        return self.attn(x).cumsum(dim=1)


class CausalConv(nn.Module):  # Mamba / Hyena front: causal depthwise conv1d of kernel 4 over tokens
    def __init__(self):
        super().__init__()
        self.attn = Attention()
        self.conv = nn.Conv1d(E, E, 4, groups=E, padding=3, dtype=DTYPE)

    def forward(self, x):
        h = self.attn(x)
        return self.conv(h.transpose(1, 2))[..., : h.shape[1]].transpose(1, 2)


class RollShift(nn.Module):  # token shift (RWKV-style): each token mixed with its predecessor
    def __init__(self):
        super().__init__()
        self.attn = Attention()

    def forward(self, x):
        h = self.attn(x)
        return h + 0.5 * torch.roll(h, 1, dims=1)


class MaxPool(nn.Module):  # max over tokens
    def __init__(self):
        super().__init__()
        self.attn = Attention(causal=False)

    def forward(self, x):
        return self.attn(x).amax(dim=1)


class MomentPool(nn.Module):  # pooled statistics over tokens: variance, std, logsumexp, 2-norm
    def __init__(self):
        super().__init__()
        self.attn = Attention(causal=False)

    def forward(self, x):
        h = self.attn(x)
        return torch.cat([h.var(dim=1), h.std(dim=1, correction=0, keepdim=True).squeeze(1),
                          torch.logsumexp(h, 1), h.norm(dim=1), torch.linalg.vector_norm(h, dim=1)], -1) + h.norm(2)


class MaxWithIndex(nn.Module):  # max over tokens with its position (values and indices), argmin
    def __init__(self):
        super().__init__()
        self.attn = Attention()

    def forward(self, x):
        h = self.attn(x)
        values, where = h.max(dim=1)
        return values + 0.01 * where.to(values.dtype) + 0.001 * h.argmin(1).to(values.dtype)


class TiedMax(nn.Module):  # max and argmax with ties across ranks: the first position wins, as in torch
    def __init__(self):
        super().__init__()
        self.attn = Attention()

    def forward(self, x):
        h = self.attn(x)
        coarse = torch.floor(h.clamp(-1, 1))  # three values: ties between ranks in every row
        values, where = (h + coarse.detach() * 100).max(dim=1)
        return values + where.to(values.dtype) + coarse.argmax(1).to(values.dtype)


class LastNonPaddingToken(nn.Module):  # sequence classification: each row's last real token
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, E, dtype=DTYPE)
        self.attn, self.head = Attention(), nn.Linear(E, CLASSES, dtype=DTYPE)

    def forward(self, ids, labels):
        logits = self.head(self.attn(self.emb(ids)))
        real = labels != -100
        last = (torch.arange(ids.shape[1]) * real).argmax(-1)  # transformers' last_non_pad_token
        return logits[torch.arange(ids.shape[0]), last]


class CumprodGate(nn.Module):  # a decaying gate: the running product of sigmoids over tokens
    def __init__(self):
        super().__init__()
        self.attn = Attention()

    def forward(self, x):
        return torch.sigmoid(self.attn(x)).cumprod(dim=1)


class ArangeRope(nn.Module):  # RoPE with positions made inside the model by arange (no position ids)
    def __init__(self):
        super().__init__()
        self.attn = Attention()
        self.register_buffer("inv_freq", 1.0 / (100 ** (torch.arange(0, E, 2, dtype=DTYPE) / E)), persistent=False)

    def forward(self, x):
        pos = torch.arange(x.shape[1], dtype=DTYPE)
        angles = pos[:, None] * self.inv_freq[None]
        x = x * torch.cat((angles.cos(), angles.sin()), dim=-1)[None]
        return self.attn(x)


class AlibiBias(nn.Module):  # ALiBi: a float bias from aranges (distance * slope) plus a causal triu
    def __init__(self):
        super().__init__()
        self.attn = Attention()
        self.register_buffer("slopes", torch.tensor([2.0 ** -(i + 1) for i in range(H)], dtype=DTYPE),
                             persistent=False)

    def forward(self, x):
        s = x.shape[1]
        i = torch.arange(s)
        dist = (i[None, :] - i[:, None]).to(DTYPE)
        causal = torch.ones(s, s, dtype=torch.bool).triu(1)
        bias = (self.slopes[:, None, None] * dist).masked_fill(causal, float("-inf"))[None]
        return self.attn(x, bias)


class MseLoss(nn.Module):  # a regression loss averaged over every token and feature
    def __init__(self):
        super().__init__()
        self.attn = Attention()

    def forward(self, x, target):
        return F.mse_loss(self.attn(x), target)


class CheckpointedLayers(nn.Module):  # activation checkpointing per layer (dynamo: tag_activation_checkpoint)
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Attention(), Attention()])

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        for layer in self.layers:
            x = checkpoint(layer, x, use_reentrant=False)
        return x.mean(dim=1)


class PatchesWithClassToken(nn.Module):  # ViT: tokens made inside the model (patches + a class token)
    def __init__(self):
        super().__init__()
        self.patch = nn.Conv1d(2, E, 4, stride=4, dtype=DTYPE)
        self.cls = nn.Parameter(torch.randn(1, 1, E, dtype=DTYPE))
        self.attn = Attention(causal=False)

    def forward(self, signal):  # (B, 2, 4 * patches)
        x = self.patch(signal).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
        return self.attn(x)[:, 0]


class HandWrittenSoftmax(nn.Module):  # attention the matcher does not know: exp(s - max) / sum
    def __init__(self):
        super().__init__()
        self.qkv, self.attn = nn.Linear(E, 3 * E, dtype=DTYPE), Attention()

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        s = q @ k.transpose(1, 2) / math.sqrt(E)
        p = torch.exp(s - s.amax(-1, keepdim=True))
        return self.attn(x + (p / p.sum(-1, keepdim=True)) @ v)


@dataclass
class MixingCase:
    name: str
    make: Callable[[], nn.Module]
    inputs: Callable[[int, torch.Generator], list]
    costly_fallback: bool = False  # an op with no sharded form: all-gathered, exact, and warned
    tol: float = 1e-10


def _x(s, g):
    return [torch.randn(2, s, E, generator=g, dtype=DTYPE)]


def _ids_labels(s, g):
    ids = torch.randint(0, VOCAB, (2, s), generator=g)
    labels = ids.clone()
    labels[1, s - 3:] = -100  # a right-padded row
    return [ids, labels]


def _x_target(s, g):
    return [torch.randn(2, s, E, generator=g, dtype=DTYPE), torch.randn(2, s, E, generator=g, dtype=DTYPE)]


def _signal(s, g):  # s - 1 patches of 4 samples: s tokens with the class token
    return [torch.randn(2, 2, 4 * (s - 1), generator=g, dtype=DTYPE)]


CASES = [
    MixingCase("mean_pool_classifier", MeanPoolClassifier, _x),
    MixingCase("sum_pool", SumPool, _x),
    MixingCase("first_token_pooler", FirstTokenPooler, _x),
    MixingCase("last_token_head", LastTokenHead, _x),
    MixingCase("shifted_loss", ShiftedLoss, _ids_labels),
    # float32 logits: gradients summed over P ranks and averaged round at float32 (P not a power of 2)
    MixingCase("padded_shift_sum_loss", PaddedShiftSumLoss, _ids_labels, tol=1e-6),
    MixingCase("cumsum_scan", CumsumScan, _x),
    MixingCase("causal_conv", CausalConv, _x),
    MixingCase("roll_shift", RollShift, _x),
    MixingCase("max_pool", MaxPool, _x),
    MixingCase("moment_pool", MomentPool, _x),
    MixingCase("max_with_index", MaxWithIndex, _x),
    MixingCase("tied_max", TiedMax, _x),
    MixingCase("cumprod_gate", CumprodGate, _x),
    MixingCase("last_non_padding_token", LastNonPaddingToken, _ids_labels),
    MixingCase("arange_rope", ArangeRope, _x),
    MixingCase("alibi_bias", AlibiBias, _x),
    MixingCase("mse_loss", MseLoss, _x_target),
    MixingCase("checkpointed_layers", CheckpointedLayers, _x),
    MixingCase("patches_with_class_token", PatchesWithClassToken, _signal),
    MixingCase("hand_written_softmax", HandWrittenSoftmax, _x, costly_fallback=True),
]


def run_case(case: MixingCase, group, layout: str, seq_len: int, seed: int = 0, inner: str = "eager") -> dict:
    """The case untransformed and under ``ringfx.transform`` on ``group`` with the same
    full-length inputs (``inner``: the inner compiler); the largest output and
    parameter-gradient differences."""
    import copy
    import warnings

    import ringfx
    from ringfx.errors import RingfxWarning

    torch.compiler.reset()
    torch.manual_seed(seed)
    model = case.make()
    ref = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed + 1)
    inputs = case.inputs(seq_len, g)
    ref_out = ref(*inputs)
    w = torch.randn(ref_out.shape, generator=g, dtype=ref_out.dtype)
    (ref_out * w).sum().backward()
    ring = ringfx.transform(model, mesh=group, layout=layout, inner=inner)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RingfxWarning)
        out = ring(*inputs)
    (out * w).sum().backward()
    grad_err = max((_grad(p) - _grad(q)).abs().max().item() for p, q in zip(model.parameters(), ref.parameters()))
    reports = [r.sharding for r in ring.reports if r.sharding is not None]
    return {"name": case.name, "tol": case.tol, "out_err": (out - ref_out).abs().max().item(), "grad_err": grad_err,
            "shape_ok": out.shape == ref_out.shape, "rewritten": sum(s.decision == "rewritten" for s in ring.sites),
            "warned": sum(issubclass(w.category, RingfxWarning) for w in caught),
            "distributed": [d for r in reports for d in r.distributed],
            "sharded_inputs": [x for r in reports for x in r.sharded_inputs],
            "fallbacks": [f for r in reports for f in r.costly_fallbacks]}


def _grad(p):
    return p.grad if p.grad is not None else torch.full_like(p, float("nan"))


def gloo_mixing_worker(rank: int, world: int, layouts: list) -> list:
    """On each rank of a real gloo ring: every case in every layout (seq lengths odd and even)."""
    torch.set_num_threads(1)
    results = []
    for layout in layouts:
        for i, case in enumerate(CASES):
            seq_len = 2 * world * 3 + (i % 3)  # divisible, +1, +2
            r = run_case(case, None, layout, seq_len)
            r.update(layout=layout, rank=rank, seq_len=seq_len)
            results.append(r)
    return results
