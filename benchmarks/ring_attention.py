"""Ring attention vs monolithic SDPA, measured side by side in one run.

One GPU (default): a loopback ring of P virtual ranks runs the same step code as a real
ring, every block on this GPU; the ratio to monolithic cuDNN SDPA on the whole sequence
shows what the ring's merges, copies and block splits cost (the transfers themselves
are free on a loopback ring).

Several GPUs: `torchrun --nproc-per-node P benchmarks/ring_attention.py` runs a real
NCCL ring; each rank reports its per-GPU TFLOP/s and % of ideal (single-GPU SDPA time
on the whole problem / P).

    python benchmarks/ring_attention.py --seq 32K,64K,128K,256K --rings 2,4,8

Prints a table and writes JSON (``--out``). FLOPs: 4·B·H·S²·D forward (half for
causal), 3.5x that for forward+backward (DESIGN.md §6).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import ringfx  # noqa: E402


def parse_tokens(text: str) -> int:
    text = text.strip().upper()
    mult = {"K": 1024, "M": 1024 * 1024}.get(text[-1], 1)
    return int(float(text[:-1] if mult > 1 else text) * mult)


def timed(fn, iters: int, warmup: int = 1) -> float:
    """Median milliseconds of ``fn`` over ``iters`` runs, with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def attention_flops(b, h, s, d, causal, backward):
    f = 4 * b * h * s * s * d / (2 if causal else 1)
    return f * 3.5 if backward else f


def make_qkv(b, hq, hkv, s, d, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(b, h, s, d, device="cuda", dtype=dtype, generator=g) for h in (hq, hkv, hkv)]


def run_sdpa(q, k, v, causal, backward):
    leaves = [t.detach().requires_grad_(backward) for t in (q, k, v)]
    dout = torch.randn_like(q)

    def step():
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION]):
            out = F.scaled_dot_product_attention(*leaves, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1])
        if backward:
            torch.autograd.grad(out, leaves, dout)
        return out

    return step


def run_ring(q, k, v, causal, backward, group, layout, kernel):
    shard = lambda x: ringfx.shard(x, 2, layout=layout, group=group).contiguous()  # noqa: E731
    leaves = [shard(t).detach().requires_grad_(backward) for t in (q, k, v)]
    dout = torch.randn_like(leaves[0])

    def step():
        out = ringfx.ring_attention(*leaves, group=group, causal=causal, layout=layout, kernel=kernel)
        if backward:
            torch.autograd.grad(out, leaves, dout)
        return out

    return step


def rel_error(ring_out, ref_out, layout, group):
    full = ringfx.unshard(ring_out, 2, layout=layout, group=group)
    return ((full.float() - ref_out.float()).norm() / ref_out.float().norm()).item()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", default="32K,64K,128K,256K")
    p.add_argument("--rings", default="2,4,8", help="loopback ring sizes (ignored under torchrun)")
    p.add_argument("--modes", default="full,causal")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--kernel", default="auto")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--no-backward", action="store_true")
    p.add_argument("--ablate", action="append", default=[], metavar="VAR=VALUE",
                   help="also time each ring with this environment variable set (e.g. RINGFX_FOLD_GROUPS=0), "
                        "side by side in the same process; repeatable")
    p.add_argument("--pg-backend", default="nccl",
                   help="torchrun only: the process group's backend; 'cpu:gloo,cuda:nccl' lets the per-call "
                        "agreement gather on the CPU without waiting for the GPU")
    p.add_argument("--nccl-high-priority", action="store_true",
                   help="torchrun only: NCCL on high-priority streams (TORCH_NCCL_HIGH_PRIORITY=1)")
    p.add_argument("--out", default="benchmarks/results/ring_attention.json")
    args = p.parse_args(argv)
    if args.nccl_high_priority:
        os.environ["TORCH_NCCL_HIGH_PRIORITY"] = "1"

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        dist.init_process_group(args.pg_backend)
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    rank = dist.get_rank() if distributed else 0
    b, hq, d = args.batch, args.heads, args.dim
    hkv = args.kv_heads or hq
    dtype = torch.bfloat16
    rows = []
    for s in map(parse_tokens, args.seq.split(",")):
        for mode in args.modes.split(","):
            causal = mode == "causal"
            layout = "zigzag" if causal else "contiguous"
            q, k, v = make_qkv(b, hq, hkv, s, d, dtype, seed=s)
            ref = None
            passes = [False] if args.no_backward else [False, True]
            sdpa_ms = {}
            for bwd in passes:
                try:
                    sdpa_ms[bwd] = timed(run_sdpa(q, k, v, causal, bwd), args.iters)
                except torch.OutOfMemoryError:
                    sdpa_ms[bwd] = None
                torch.cuda.empty_cache()
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION]):
                ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=hq != hkv)
            rings = [dist.get_world_size()] if distributed else [int(x) for x in args.rings.split(",")]
            for world in rings:
                group = dist.group.WORLD if distributed else ringfx.LoopbackRing(world)
                row = {"seq": s, "mode": mode, "layout": layout, "ring": world, "batch": b, "heads": hq,
                       "kv_heads": hkv, "dim": d, "kernel": args.kernel,
                       "device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "ring_kind": "nccl" if distributed else "loopback"}
                out = run_ring(q, k, v, causal, False, group, layout, args.kernel)()
                row["rel_error_vs_sdpa"] = rel_error(out, ref, layout, group)
                del out
                for bwd in passes:
                    tag = "fwd_bwd" if bwd else "fwd"
                    flops = attention_flops(b, hq, s, d, causal, bwd)
                    ring_ms = timed(run_ring(q, k, v, causal, bwd, group, layout, args.kernel), args.iters)
                    torch.cuda.empty_cache()
                    per_gpu = flops / (world if distributed else 1)
                    row[f"{tag}_ring_ms"] = ring_ms
                    row[f"{tag}_ring_tflops"] = per_gpu / ring_ms / 1e9
                    row[f"{tag}_sdpa_ms"] = sdpa_ms[bwd]
                    row[f"{tag}_sdpa_tflops"] = flops / sdpa_ms[bwd] / 1e9 if sdpa_ms[bwd] else None
                    if sdpa_ms[bwd]:
                        ideal = sdpa_ms[bwd] / (world if distributed else 1)
                        row[f"{tag}_ratio"] = ideal / ring_ms  # loopback: ring vs monolithic; real: % of ideal
                    for setting in args.ablate:
                        var, value = setting.split("=", 1)
                        saved = os.environ.get(var)
                        os.environ[var] = value
                        try:
                            ms = timed(run_ring(q, k, v, causal, bwd, group, layout, args.kernel), args.iters)
                        finally:
                            if saved is None:
                                del os.environ[var]
                            else:
                                os.environ[var] = saved
                        torch.cuda.empty_cache()
                        abl = row.setdefault("ablations", {}).setdefault(setting, {})
                        abl[f"{tag}_ring_ms"] = ms
                        if sdpa_ms[bwd]:
                            abl[f"{tag}_ratio"] = sdpa_ms[bwd] / (world if distributed else 1) / ms
                rows.append(row)
                if rank == 0:
                    print_row(row)
            del q, k, v, ref
            torch.cuda.empty_cache()
    if rank == 0:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
        print_table(rows)
    if distributed:
        dist.destroy_process_group()


def print_row(r):
    print(f"# S={r['seq']} {r['mode']} P={r['ring']} err={r['rel_error_vs_sdpa']:.2e} "
          + " ".join(f"{k}={v:.3f}" for k, v in r.items() if k.endswith(("ms", "ratio")) and v), flush=True)
    for setting, values in r.get("ablations", {}).items():
        print(f"#   with {setting}: " + " ".join(f"{k}={v:.3f}" for k, v in values.items()), flush=True)


def print_table(rows):
    head = f"{'S':>8} {'mode':>6} {'P':>3} | {'fwd ring TF':>11} {'fwd SDPA TF':>11} {'ratio':>6} | " \
           f"{'f+b ring TF':>11} {'f+b SDPA TF':>11} {'ratio':>6} | {'rel err':>8}"
    print(head)
    print("-" * len(head))
    fmt = lambda x, spec: format(x, spec) if x is not None else "-"  # noqa: E731
    for r in rows:
        print(f"{r['seq']:>8} {r['mode']:>6} {r['ring']:>3} | {fmt(r.get('fwd_ring_tflops'), '11.1f')} "
              f"{fmt(r.get('fwd_sdpa_tflops'), '11.1f')} {fmt(r.get('fwd_ratio'), '6.3f')} | "
              f"{fmt(r.get('fwd_bwd_ring_tflops'), '11.1f')} {fmt(r.get('fwd_bwd_sdpa_tflops'), '11.1f')} "
              f"{fmt(r.get('fwd_bwd_ratio'), '6.3f')} | {r['rel_error_vs_sdpa']:8.2e}")


if __name__ == "__main__":
    main()
