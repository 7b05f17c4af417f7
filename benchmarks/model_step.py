"""One training step of a transformers LLaMA-style model: untransformed vs ``ringfx.transform``.

    python benchmarks/model_step.py --seq 16384 65536 --json results/model_step_h200.json

On one GPU the ring has one rank (an NCCL group of one process): what ringfx costs when it
shards nothing. For each sequence length, activation checkpointing on and off, and the inner
compiler ("eager": ringfx's default, and "inductor"), it prints step time and peak memory
side by side with the untransformed eager model, and the attention sites rewritten.
Rows that run out of memory are reported as such.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist


def build(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                      num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
                      max_position_embeddings=max(args.seq), attn_implementation="sdpa", use_cache=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(device="cuda", dtype=torch.bfloat16)


def step_time(model, ids, steps, warmup, row):
    for _ in range(warmup):
        t = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        torch.cuda.synchronize()
        row.setdefault("warmup_s", []).append(time.perf_counter() - t)
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    row["times_s"] = times
    return sorted(times)[len(times) // 2], torch.cuda.max_memory_allocated() / 2**30


def run_row(args, seq, checkpointing, variant):
    import ringfx

    torch.compiler.reset()
    model = build(args)
    if checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    ids = torch.randint(0, args.vocab, (1, seq), device="cuda")
    row = {"seq": seq, "checkpointing": checkpointing, "variant": variant}
    runner, sites = model, None
    if variant.startswith("ringfx:"):
        runner = ringfx.transform(model, inner=variant.split(":")[1])
    elif variant.startswith("compile"):  # plain torch.compile of the untransformed model ("compile:<backend>")
        runner = torch.compile(model, backend=variant.partition(":")[2] or "inductor")
    counters = torch._dynamo.utils.counters
    counters.clear()
    try:
        row["step_s"], row["peak_gib"] = step_time(runner, ids, args.steps, args.warmup, row)
        if variant.startswith("ringfx:"):
            sites = f"{sum(s.decision == 'rewritten' for s in runner.sites)}/{len(runner.sites)}"
        # what dynamo did over warm-up and the timed steps: a recompile inside the timed steps
        # would be counted as step time
        row["graphs"] = counters["stats"]["unique_graphs"]
        row["graph_breaks"] = sum(counters["graph_break"].values())
        row["recompiles"] = sum(counters["recompiles"].values())
    except torch.OutOfMemoryError:
        row["step_s"], row["peak_gib"] = None, "OOM"
    row["sites"] = sites
    del model, runner
    torch.cuda.empty_cache()
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, nargs="+", default=[16384])
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--variants", nargs="+", default=["untransformed", "ringfx:eager", "ringfx:inductor"],
                   help="untransformed, ringfx:<inner compiler>, compile[:<backend>] (plain torch.compile)")
    p.add_argument("--no-checkpointing-above", type=int, default=16384,
                   help="run checkpointing off only up to this length (the untransformed model's memory)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("nccl", rank=0, world_size=1)
    torch.cuda.set_device(0)
    rows = []
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; model: {args.layers} layers, hidden "
          f"{args.hidden}, GQA {args.heads}/{args.kv_heads}, bf16; one training step (forward + backward)")
    print(f"{'seq':>7} {'ckpt':>5} {'variant':>16} {'step s':>8} {'x eager':>8} {'peak GiB':>9} {'x eager':>8} sites")
    for seq in args.seq:
        for checkpointing in (True, False):
            if not checkpointing and seq > args.no_checkpointing_above:
                continue
            base = None
            for variant in args.variants:
                row = run_row(args, seq, checkpointing, variant)
                if variant == "untransformed":
                    base = row
                if base and row["step_s"] and base["step_s"]:
                    row["time_ratio"] = row["step_s"] / base["step_s"]
                    row["memory_ratio"] = row["peak_gib"] / base["peak_gib"]
                rows.append(row)
                fmt = lambda v, spec: format(v, spec) if isinstance(v, float) else str(v)  # noqa: E731
                print(f"{seq:>7} {str(checkpointing):>5} {variant:>16} {fmt(row['step_s'], '8.3f'):>8} "
                      f"{fmt(row.get('time_ratio'), '8.3f'):>8} {fmt(row['peak_gib'], '9.2f'):>9} "
                      f"{fmt(row.get('memory_ratio'), '8.3f'):>8} {row['sites']} graphs={row.get('graphs')} "
                      f"breaks={row.get('graph_breaks')} recompiles={row.get('recompiles')}", flush=True)
                if args.json:  # after every row: a run cut short keeps what it measured
                    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
                    with open(args.json, "w") as f:
                        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                   "args": vars(args), "rows": rows}, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
