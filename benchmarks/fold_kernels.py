"""Bandwidth of the accumulation folds (ringfx/runtime/merge_triton.py) on one GPU.

For each fold the ring makes (forward merges of 1, 2 and 4 blocks, with and without
the running accumulator, the last one writing bf16; gradient sums), the time and the
bandwidth it reaches counting each tensor read once and each output written once,
for several tile sizes. Block outputs are laid out as cuDNN returns them
((B, S, H, D) in memory). Prints a table and writes JSON.

    python benchmarks/fold_kernels.py --seq 16K
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import triton.testing

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from ringfx.runtime import merge_triton  # noqa: E402
from ringfx.runtime.algorithm import fold  # noqa: E402


def parse_tokens(text: str) -> int:
    text = text.strip().upper()
    return int(float(text[:-1]) * 1024) if text.endswith("K") else int(text)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", default="16K", help="local sequence length (one block)")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--tiles", default="1024:4,2048:4,2048:8,4096:4,4096:8")
    p.add_argument("--out", default="benchmarks/results/fold_kernels.json")
    args = p.parse_args(argv)
    s, h, d = parse_tokens(args.seq), args.heads, args.dim
    shape = (1, h, s, d)

    def block():
        return torch.randn(1, s, h, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2)

    def lse():
        return torch.randn(1, h, s, device="cuda") * 3

    acc = torch.randn(shape, device="cuda")
    acc_lse = lse()
    rows = []
    cases = []
    for n in (1, 2, 4):
        for with_acc in (False, True):
            for out_bf16 in (False, True):
                cases.append(("merge", n, with_acc, out_bf16))
        cases.append(("sum", n, True, False))
    blocks = [block() for _ in range(4)]
    lses = [lse() for _ in range(4)]
    for kind, n, with_acc, out_bf16 in cases:
        dst = torch.empty(shape, device="cuda", dtype=torch.bfloat16 if out_bf16 else torch.float32)
        dst_lse = torch.empty(1, h, s, device="cuda")
        merge = kind == "merge"
        elems = 1 * h * s * d
        nbytes = elems * (2 * n + (4 if with_acc else 0) + dst.element_size())
        if merge:
            nbytes += h * s * 4 * (n + (1 if with_acc else 0) + 1)
        row = {"kind": kind, "blocks": n, "acc": with_acc, "dst": str(dst.dtype), "bytes": nbytes}
        for tile in args.tiles.split(","):
            elems_t, warps = map(int, tile.split(":"))
            fn = lambda: merge_triton.fold_triton(  # noqa: E731
                dst, acc if with_acc else None, blocks[:n], dst_lse=dst_lse if merge else None,
                acc_lse=acc_lse if merge and with_acc else None, lses=lses[:n] if merge else None,
                tile_elems=elems_t, num_warps=warps)
            ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
            row[tile] = {"ms": ms, "GBps": nbytes / ms / 1e6}
        # eager reference for correctness of the default tile
        check = torch.empty_like(dst)
        check_lse = torch.empty_like(dst_lse)
        os.environ["RINGFX_FUSED_MERGE"] = "0"
        from ringfx.runtime import algorithm
        algorithm._fused_fold.cache_clear()
        fold(check, acc if with_acc else None, blocks[:n], dst_lse=check_lse if merge else None,
             acc_lse=acc_lse if merge and with_acc else None, lses=lses[:n] if merge else None)
        os.environ.pop("RINGFX_FUSED_MERGE")
        algorithm._fused_fold.cache_clear()
        merge_triton.fold_triton(dst, acc if with_acc else None, blocks[:n], dst_lse=dst_lse if merge else None,
                                 acc_lse=acc_lse if merge and with_acc else None, lses=lses[:n] if merge else None)
        row["rel_err"] = ((dst.float() - check.float()).norm() / check.float().norm()).item()
        rows.append(row)
    tiles = args.tiles.split(",")
    print(f"{'kind':>5} {'N':>2} {'acc':>5} {'dst':>14} | " + " ".join(f"{t + ' GB/s':>13}" for t in tiles)
          + " | rel err")
    for r in rows:
        print(f"{r['kind']:>5} {r['blocks']:>2} {str(r['acc']):>5} {r['dst']:>14} | "
              + " ".join(f"{r[t]['GBps']:13.0f}" for t in tiles) + f" | {r['rel_err']:.1e}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
