"""``python -m ringfx demo``: a small LLaMA-style model, transformed, run on a ring of
local CPU processes over gloo, and checked against the untransformed model.

Each rank builds the same model and the same random batch and runs the untransformed
model on it (the reference). Then it calls ``ringfx.transform(model)`` exactly as the
model is called (full-length ids and positions, the same on every rank) and
backpropagates the same loss: the logits and the parameter gradients (averaged over the
ring by ringfx itself) must equal the reference on every rank.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from .planner.cli import positive_int


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


def rotate(x, pos, theta=10000.0):
    d = x.shape[-1]
    freqs = pos[..., None].to(x.dtype) / theta ** (torch.arange(0, d, 2, dtype=x.dtype, device=x.device) / d)
    cos, sin = freqs.cos()[:, None], freqs.sin()[:, None]
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)


class Block(nn.Module):
    def __init__(self, dim, heads, kv_heads):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.norm1, self.norm2 = RMSNorm(dim), RMSNorm(dim)
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * kv_heads * self.head_dim, bias=False)
        self.o = nn.Linear(dim, dim, bias=False)
        self.up = nn.Linear(dim, 2 * 4 * dim, bias=False)
        self.down = nn.Linear(4 * dim, dim, bias=False)

    def forward(self, x, pos):
        b, s, _ = x.shape
        h = self.norm1(x)
        q = self.q(h).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(h).view(b, s, 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = rotate(q, pos), rotate(k, pos)
        # LLaMA-style eager attention: repeat_kv, explicit causal mask from sizes
        g = self.heads // self.kv_heads
        k = k[:, :, None].expand(b, self.kv_heads, g, s, self.head_dim).reshape(b, self.heads, s, self.head_dim)
        v = v[:, :, None].expand(b, self.kv_heads, g, s, self.head_dim).reshape(b, self.heads, s, self.head_dim)
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
        causal = torch.ones(s, s, dtype=torch.bool, device=x.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
        attn = torch.softmax(scores, dim=-1) @ v
        x = x + self.o(attn.transpose(1, 2).reshape(b, s, -1))
        gate, up = self.up(self.norm2(x)).chunk(2, -1)
        return x + self.down(F.silu(gate) * up)


class TinyLlama(nn.Module):
    def __init__(self, vocab=97, dim=64, heads=4, kv_heads=2, layers=2):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, kv_heads) for _ in range(layers))
        self.norm = RMSNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids, pos):
        x = self.embed(ids)
        for blk in self.blocks:
            x = blk(x, pos)
        return self.head(self.norm(x))


def _run_rank(rank, world, seq_len, layout):
    import ringfx
    from ringfx.passes.sites import Decision

    torch.manual_seed(0)
    model = TinyLlama().double()
    ids = torch.randint(0, 97, (2, seq_len + 1))
    ids, labels = ids[:, :-1], ids[:, 1:]
    pos = torch.arange(seq_len).expand(2, seq_len)

    ref_logits = model(ids, pos)
    F.cross_entropy(ref_logits.flatten(0, 1), labels.flatten(), reduction="sum").backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    start = time.perf_counter()
    ring_model = ringfx.transform(model, layout=layout)
    logits = ring_model(ids, pos)
    F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum").backward()
    elapsed = time.perf_counter() - start
    sites = [s for g in ring_model.reports for s in g.sites]
    return {
        "logits_err": (logits - ref_logits).abs().max().item(),
        "grad_err": max((p.grad - ref_grads[n]).abs().max().item() for n, p in model.named_parameters()),
        "rewritten": sum(s.decision is Decision.REWRITE for s in sites),
        "sites": len(sites),
        "seconds": elapsed,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ringfx demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=positive_int, default=3, help="local CPU processes in the ring, >= 1 (default 3)")
    p.add_argument("--seq-len", type=positive_int, default=97,
                   help="tokens, any length: ringfx pads it inside to what the ring needs (default 97)")
    p.add_argument("--layout", default="zigzag", choices=["contiguous", "zigzag"])
    args = p.parse_args(argv)
    from .testing import spawn_gloo

    print(f"ringfx demo: TinyLlama (2 layers, GQA 4/2 heads, RoPE, causal) on a gloo ring of {args.ranks} "
          f"CPU processes, sequence {args.seq_len}, {args.layout} layout, float64")
    results = spawn_gloo(args.ranks, _run_rank, args.seq_len, args.layout)
    print(f"{'rank':>4} {'sites':>5} {'rewritten':>9} {'max |logits err|':>17} {'max |grad err|':>15} {'s':>6}")
    for r, res in enumerate(results):
        print(f"{r:>4} {res['sites']:>5} {res['rewritten']:>9} {res['logits_err']:>17.2e} {res['grad_err']:>15.2e} "
              f"{res['seconds']:>6.2f}")
    ok = len(results) == args.ranks and all(
        r["rewritten"] == 2 and r["logits_err"] < 1e-9 and r["grad_err"] < 1e-9 for r in results)
    print("OK: matches the untransformed model" if ok else "MISMATCH against the untransformed model")
    return 0 if ok else 1
