"""A transformers LLaMA under the zero-touch call on a real ring: checked on every rank, then timed.

    torchrun --nproc-per-node 2 benchmarks/zero_touch_ring.py --cuda --seq 16384 32768 --json out.json
    torchrun --nproc-per-node 3 benchmarks/zero_touch_ring.py --seq 1027          # CPU, gloo

Every rank builds the same model and the same full-length batch. First a correctness check
at a small length: ``ringfx.transform(model)`` called like the model, loss and every
parameter gradient compared with the untransformed model run on the same rank (so every
rank is checked; gradients are averaged over the ring by ringfx itself). Then, for each
``--seq``, the training step is timed side by side: the untransformed model on one device
(the whole sequence, rank 0's device) and the transformed model on the ring; peak memory per
rank. A length the untransformed model cannot hold is reported as OOM, not skipped.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import time

import torch
import torch.distributed as dist

import ringfx


def build(args, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4, num_hidden_layers=args.layers,
                      num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
                      max_position_embeddings=max(args.seq + [args.check_seq]), attn_implementation="sdpa",
                      use_cache=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(device=device, dtype=dtype)
    if args.checkpointing:
        model.gradient_checkpointing_enable()
    return model.train()


def batch(args, seq, device):
    g = torch.Generator().manual_seed(seq)
    ids = torch.randint(0, args.vocab, (1, seq), generator=g)
    return ids.to(device)


def check(args, device) -> dict:
    """Loss and gradients of the transformed model vs the untransformed one, on this rank."""
    model = build(args, device, torch.float32)
    ref = copy.deepcopy(model)
    ids = batch(args, args.check_seq, device)
    ref.zero_grad()
    ref_loss = ref(input_ids=ids, labels=ids).loss
    ref_loss.backward()
    ring = ringfx.transform(model, layout=args.layout)
    loss = ring(input_ids=ids, labels=ids).loss
    loss.backward()
    grad_err = max((p.grad - q.grad).abs().max().item() for p, q in zip(model.parameters(), ref.parameters()))
    return {"loss_err": abs(loss.item() - ref_loss.item()), "grad_err": grad_err,
            "sites": f"{sum(s.decision == 'rewritten' for s in ring.sites)}/{len(ring.sites)}"}


def timed(step, steps, device):
    step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return sorted(times)[len(times) // 2], peak


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cuda", action="store_true")
    p.add_argument("--seq", type=int, nargs="+", default=[1027])
    p.add_argument("--check-seq", type=int, default=67)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=1000)
    p.add_argument("--layout", default="zigzag", choices=["contiguous", "zigzag"])
    p.add_argument("--checkpointing", action="store_true")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if args.cuda else torch.device("cpu")
    if args.cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if args.cuda else "gloo", timeout=datetime.timedelta(seconds=300))
    rank, world = dist.get_rank(), dist.get_world_size()

    result = check(args, device)
    results = [None] * world
    dist.all_gather_object(results, result)
    if rank == 0:
        print(f"ring of {world} ({'NCCL' if args.cuda else 'gloo'}), LLaMA {args.layers} layers hidden {args.hidden}, "
              f"check at S={args.check_seq} (float32):")
        for r, res in enumerate(results):
            print(f"  rank {r}: sites {res['sites']}, |loss err| {res['loss_err']:.2e}, max |grad err| "
                  f"{res['grad_err']:.2e}")
    ok = all(r["loss_err"] < 1e-4 and r["grad_err"] < 1e-4 for r in results)

    rows = []
    dtype = torch.bfloat16 if args.cuda else torch.float32
    for seq in args.seq:
        torch._dynamo.reset()
        model = build(args, device, dtype)
        ids = batch(args, seq, device)
        single = None
        if rank == 0:
            try:
                single = timed(lambda: model(input_ids=ids, labels=ids).loss.backward(), args.steps, device)
            except torch.OutOfMemoryError:
                single = ("OOM", None)
            if args.cuda:
                torch.cuda.empty_cache()
        dist.barrier()
        ring = ringfx.transform(model, layout=args.layout)
        ring_time, ring_peak = timed(lambda: ring(input_ids=ids, labels=ids).loss.backward(), args.steps, device)
        peaks = [None] * world
        dist.all_gather_object(peaks, ring_peak)
        if rank == 0:
            row = {"seq": seq, "world": world, "single_s": single[0], "single_peak_gib": single[1],
                   "ring_s": ring_time, "ring_peak_gib": peaks}
            if isinstance(single[0], float):
                row["speedup"] = single[0] / ring_time
            rows.append(row)
            print(f"S={seq}: one device {single[0] if isinstance(single[0], str) else f'{single[0]:.3f} s'}, "
                  f"ring of {world} {ring_time:.3f} s" + (f" ({row['speedup']:.2f}x)" if "speedup" in row else "")
                  + (f", peak GiB per rank {[round(x, 2) for x in peaks]}" if args.cuda else ""))
        del model, ring
    if rank == 0 and args.json:
        with open(args.json, "w") as f:
            json.dump({"check": results, "rows": rows, "args": vars(args),
                       "device": torch.cuda.get_device_name() if args.cuda else "cpu"}, f, indent=1)
    dist.destroy_process_group()
    if not ok:
        raise SystemExit("MISMATCH against the untransformed model")


if __name__ == "__main__":
    main()
