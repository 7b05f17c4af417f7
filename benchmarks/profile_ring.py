"""Where a loopback ring's time goes: one forward+backward under torch.profiler.

Sums the GPU kernels by kind (attention forward/backward, folds, copies, other) and by
stream, the time the GPU was busy on any stream, and the wall time, next to monolithic
SDPA on the same inputs. Prints a table and writes JSON (and the chrome trace with
``--trace``).

    python benchmarks/profile_ring.py --seq 128K --ring 8 --mode full
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import ringfx  # noqa: E402
from ring_attention import make_qkv, parse_tokens, run_ring, run_sdpa  # noqa: E402


def kind_of(name: str) -> str:
    n = name.lower()
    if "fold_rows" in n or "merge" in n:
        return "fold (Triton)"
    if ("cudnn" in n or "flash" in n or "fmha" in n or "sdpa" in n or "attention" in n) and ("bwd" in n or "backward" in n or "dgrad" in n):
        return "attention backward"
    if "cudnn" in n or "flash" in n or "fmha" in n or "sdpa" in n or "attention" in n:
        return "attention forward"
    if "copy" in n or "memcpy" in n or "cat" in n or "stack" in n:
        return "copies"
    if "fill" in n or "memset" in n:
        return "fills"
    return "other elementwise"


def union_ms(intervals):
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total / 1000


def profile_step(step, trace_path=None):
    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
    wall = start.elapsed_time(end)
    path = trace_path or "/tmp/ringfx_trace.json"
    prof.export_chrome_trace(path)
    with open(path) as f:
        events = [e for e in json.load(f)["traceEvents"] if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    by_kind = collections.defaultdict(lambda: [0.0, 0])
    by_name = collections.defaultdict(lambda: [0.0, 0])
    by_stream = collections.defaultdict(list)
    for e in events:
        k = by_kind[kind_of(e["name"])]
        k[0] += e["dur"] / 1000
        k[1] += 1
        nm = by_name[e["name"][:90]]
        nm[0] += e["dur"] / 1000
        nm[1] += 1
        by_stream[e["args"].get("stream", 0)].append((e["ts"], e["ts"] + e["dur"]))
    return {
        "wall_ms": wall,
        "busy_ms": union_ms([i for v in by_stream.values() for i in v]),
        "kinds": {k: {"ms": v[0], "count": v[1]} for k, v in sorted(by_kind.items())},
        "top_kernels": {k: {"ms": v[0], "count": v[1]}
                        for k, v in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:14]},
        "streams": {str(s): {"busy_ms": union_ms(v), "kernels": len(v)} for s, v in by_stream.items()},
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", default="128K")
    p.add_argument("--ring", type=int, default=8)
    p.add_argument("--mode", default="full", choices=["full", "causal"])
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--trace", default=None, help="also keep the ring's chrome trace here")
    p.add_argument("--out", default="benchmarks/results/profile_ring.json")
    args = p.parse_args(argv)
    s, causal = parse_tokens(args.seq), args.mode == "causal"
    layout = "zigzag" if causal else "contiguous"
    q, k, v = make_qkv(1, args.heads, args.heads, s, args.dim, torch.bfloat16, seed=0)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "seq": s, "ring": args.ring,
              "mode": args.mode, "env": {k: v for k, v in os.environ.items() if k.startswith("RINGFX_")}}
    result["sdpa"] = profile_step(run_sdpa(q, k, v, causal, True))
    result["ring_profile"] = profile_step(run_ring(q, k, v, causal, True, ringfx.LoopbackRing(args.ring), layout,
                                                   "auto"), args.trace)
    for name in ("sdpa", "ring_profile"):
        r = result[name]
        print(f"== {name}: wall {r['wall_ms']:.1f} ms, GPU busy {r['busy_ms']:.1f} ms")
        for kind, x in r["kinds"].items():
            print(f"   {kind:>20}: {x['ms']:9.1f} ms  {x['count']:5d} kernels")
        for name_, x in r["top_kernels"].items():
            print(f"   {x['ms']:9.1f} ms {x['count']:5d}x  {name_}")
        for stream, x in r["streams"].items():
            print(f"   stream {stream:>4}: busy {x['busy_ms']:9.1f} ms  {x['kernels']:5d} kernels")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
