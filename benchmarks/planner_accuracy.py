"""Planner accuracy: predicted vs measured peak memory on one CUDA GPU.

Two measurements, each compared with ``torch.cuda.max_memory_allocated``:

1. one attention layer fwd+bwd (q, k, v requiring grad, the incoming gradient given) at
   several sequence lengths, per SDPA backend (P = 1: plain ``F.scaled_dot_product_attention``);
   predicted by ``ringfx.planner.memory.attention_layer_peak``;
1b. one rank of a ring (P = 4) running the runtime's forward and backward rank programs,
   the transfers stubbed by copies (what a receive allocates), predicted from the runtime
   contract (``ring_attention_buffers``);
2. a small LLaMA-style model (``tiny-llama`` preset, bf16) forward + loss + backward, with and
   without activation checkpointing; predicted by ``ringfx.planner.memory_model(...)`` at P = 1.

    python benchmarks/planner_accuracy.py [--out benchmarks/results/planner_accuracy.json]

Prints a table and writes JSON.  Importable on CPU (nothing runs at import).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from ringfx.planner import memory_model  # noqa: E402
from ringfx.planner.memory import AttentionShape, attention_layer_peak  # noqa: E402
from ringfx.planner.presets import PRESETS, build_reference_model, lm_loss  # noqa: E402

BACKENDS = {"cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION"}


def _measure(fn) -> int:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def attention_layer_rows(seq_lens, heads=32, head_dim=128, causal=True):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    rows = []
    for kernel, backend in BACKENDS.items():
        for s in seq_lens:
            def step():
                q, k, v = (torch.randn(1, heads, s, head_dim, device="cuda", dtype=torch.bfloat16,
                                       requires_grad=True) for _ in range(3))
                dout = torch.randn(1, heads, s, head_dim, device="cuda", dtype=torch.bfloat16)
                with sdpa_kernel([getattr(SDPBackend, backend)]):
                    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                    out.backward(dout)

            try:
                measured = _measure(step)
            except RuntimeError as err:  # a backend that does not take these shapes
                rows.append({"case": f"attention fwd+bwd ({kernel})", "seq_len": s, "error": str(err)[:200]})
                continue
            att = AttentionShape(batch=1, q_heads=heads, kv_heads=heads, head_dim=head_dim, dtype_bytes=2,
                                 causal=causal)
            predicted = int(attention_layer_peak(att, s, ring=False, kernel=kernel))
            rows.append({"case": f"attention fwd+bwd ({kernel})", "seq_len": s, "predicted": predicted,
                         "measured": measured})
    return rows


class _Received:
    def __init__(self, tensors):
        self._tensors = tensors

    def wait(self):
        return self._tensors


def _drive_one_rank(program, world):
    """Run one rank's ring program alone: a receive allocates what NCCL's would (a buffer
    like each sent tensor; here a copy, so the numbers stay finite)."""
    from ringfx.runtime.ring import drive

    return drive(
        program,
        lambda req: _Received([t.clone() for t in req.tensors] if req.shift % world else list(req.tensors)),
        lambda req: torch.stack([req.tensor] * world),
    )


def ring_rank_rows(local_lens, world=4, heads=32, kv_heads=32, head_dim=128, causal=True, kernel="cudnn"):
    """One rank of a ring of ``world`` (the runtime's rank programs, transfers stubbed)."""
    try:
        from ringfx.runtime.algorithm import RingConfig, backward_program, forward_program
    except ImportError as err:  # the runtime's internals moved
        return [{"case": f"ring rank P={world}", "seq_len": 0, "error": str(err)}]
    rows = []
    layout = "zigzag" if causal else "contiguous"
    for s in local_lens:
        cfg = RingConfig(layout, causal, head_dim ** -0.5, 0, kernel)

        def step():
            q = torch.randn(1, heads, s, head_dim, device="cuda", dtype=torch.bfloat16)
            k, v = (torch.randn(1, kv_heads, s, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(2))
            dout = torch.randn_like(q)
            out, lse = _drive_one_rank(forward_program(q, k, v, None, None, None, cfg, 0, world), world)
            grads = _drive_one_rank(backward_program(dout, q, k, v, out, lse, None, None, None, cfg, 0, world), world)
            del grads

        try:
            measured = _measure(step)
        except Exception as err:  # noqa: BLE001 - report, do not stop the other rows
            rows.append({"case": f"ring rank P={world} ({kernel})", "seq_len": s * world, "error": str(err)[:200]})
            continue
        att = AttentionShape(batch=1, q_heads=heads, kv_heads=kv_heads, head_dim=head_dim, dtype_bytes=2,
                             causal=causal)
        predicted = int(attention_layer_peak(att, s, ring=True, kernel=kernel))
        rows.append({"case": f"ring rank P={world} ({kernel}{', GQA' if kv_heads != heads else ''})",
                     "seq_len": s * world, "predicted": predicted, "measured": measured})
    return rows


def model_rows(seq_lens, preset="tiny-llama"):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    cfg = PRESETS[preset]
    rows = []
    for ckpt in (False, True):
        predicted_model = memory_model(cfg, ring=False, precision="bf16", optimizer="none",
                                       activation_checkpointing=ckpt, kernel="cudnn")
        for s in seq_lens:
            gc.collect()  # checkpointed layers hold their forward in a cycle: free the last model now
            torch.cuda.empty_cache()
            torch.manual_seed(0)
            model = build_reference_model(cfg, device="cuda")
            if ckpt:
                for layer in model.layers:
                    layer.forward = (lambda f: lambda *a: torch.utils.checkpoint.checkpoint(f, *a, use_reentrant=False)
                                     )(type(layer).forward.__get__(layer))
            ids = torch.randint(0, cfg.vocab, (1, s), device="cuda")
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

            def step():
                with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                    loss = lm_loss(model(ids), (ids,))
                    loss.backward()

            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            step()
            torch.cuda.synchronize()
            measured = torch.cuda.max_memory_allocated()  # parameters and ids included, as in the model
            predicted = predicted_model.peak_bytes(s, 1)
            rows.append({"case": f"{preset} fwd+bwd{' ckpt' if ckpt else ''}", "seq_len": s, "predicted": predicted,
                         "measured": measured})
            del model, ids
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/planner_accuracy.json")
    parser.add_argument("--attn-seq", default="16384,65536,131072,262144")
    parser.add_argument("--model-seq", default="4096,16384,32768")
    parser.add_argument("--ring-local-seq", default="16384,65536", help="local lengths S/P for the ring rank rows")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("planner_accuracy: needs a CUDA GPU", file=sys.stderr)
        return 2
    rows = attention_layer_rows([int(x) for x in args.attn_seq.split(",")])
    ring_local = [int(x) for x in args.ring_local_seq.split(",")]
    rows += ring_rank_rows(ring_local)
    rows += ring_rank_rows(ring_local, kv_heads=8)
    rows += model_rows([int(x) for x in args.model_seq.split(",")])
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"{'case':34} {'S':>8} {'predicted GiB':>14} {'measured GiB':>13} {'error':>8}")
    worst = 0.0
    for r in rows:
        if "error" in r:
            print(f"{r['case']:34} {r['seq_len']:>8} {'-':>14} {'-':>13}  {r['error'][:40]}")
            continue
        r["rel_error"] = (r["predicted"] - r["measured"]) / r["measured"]
        worst = max(worst, abs(r["rel_error"]))
        print(f"{r['case']:34} {r['seq_len']:>8} {r['predicted'] / 2**30:>14.3f} {r['measured'] / 2**30:>13.3f} "
              f"{r['rel_error']:>+8.1%}")
    print(f"worst |error|: {worst:.1%} (target: within 10%)")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows,
                   "worst_rel_error": worst}, f, indent=2)
    return 0 if worst <= 0.10 else 1


if __name__ == "__main__":
    sys.exit(main())
