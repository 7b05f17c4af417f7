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
import time

import torch
import torch.nn.functional as F

from .planner.cli import positive_int
from .reference_model import Attention, LlamaLike, ModelConfig


class TinyLlama(LlamaLike):
    """The demo's model: 2 layers of width 64, GQA 4/2 heads, RoPE from position ids, and
    attention written out by hand (softmax(q kᵀ / sqrt(d)) v, a causal mask made from the
    sizes): what ringfx's passes must find in code that never calls SDPA.
    ``forward(input_ids, position_ids) -> logits``; ``ringfx.reference_model`` is the one
    definition."""

    def __init__(self, vocab=97, dim=64, heads=4, kv_heads=2, layers=2):
        cfg = ModelConfig("demo-tiny-llama", layers=layers, hidden=dim, heads=heads, kv_heads=kv_heads,
                          head_dim=dim // heads, ffn=4 * dim, vocab=vocab, dtype="fp32")
        super().__init__(cfg, attention=Attention.MASKED_FILL, position_ids=True, fused_norm=False)


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
