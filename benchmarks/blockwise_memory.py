"""Predicted vs measured peak memory of a whole training step, with and without the blockwise loss.

    python benchmarks/blockwise_memory.py --seq 16384 32768 --json benchmarks/results/blockwise_memory_h200.json

A transformers LLaMA-style model built from a config (bf16, ``gradient_checkpointing_enable()``,
``use_cache=False``; a 128K vocabulary, where the logits and their loss dominate the step) runs
one warm-up and one measured step ``model(input_ids=ids, labels=ids).loss.backward()`` (and an
AdamW step with ``--optimizer``) on one device, three ways:

* ``untransformed``: the model as it is;
* ``transform``: ``ringfx.transform(model)``;
* ``transform+blockwise``: ``ringfx.transform(model, blockwise_loss=True)``: the LM head and its
  cross-entropy fused into ``ringfx::linear_cross_entropy`` (the logits never whole).

On one device the ring has one rank: a process group of one process (NCCL on CUDA, gloo on
CPU), as ``model_step.py`` runs it.  Beside each measured peak (``torch.cuda.max_memory_allocated``
of the measured step, nothing subtracted: parameters, gradients, ids and library workspaces are
in it; the parameters' bytes are reported separately) it prints the planner's predicted peak:
the planner's memory model of the config for one device (``ringfx.planner.memory_model(config,
ring=False, ...)``: what ``ringfx.plan(config, S, world_size=1, ...)`` evaluates at P = 1) with the
same precision (pure bf16), optimizer, checkpointing and blockwise option, and the ratio
predicted / measured.  On CPU nothing is
measured ("n/a"); the predictions are still printed (a smoke test).

The column ``pred cache`` is the plan of the same config with ``use_cache=True``: the planner
plans a training step without a cache either way, so the two columns agree (before the planner's
fix they did not: the cache was appended to again when checkpointed layers were recomputed).

The planner prices the AdamW state in float32 (``optimizer="adam"``); torch's AdamW keeps it in the
parameters' dtype (bf16 here), so with ``--optimizer`` the prediction carries 4 bytes per parameter
that are not allocated.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import socket
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import ringfx  # noqa: E402
from ringfx.planner import memory_model  # noqa: E402

VARIANTS = {"untransformed": None, "transform": 0, "transform+blockwise": True}  # name -> blockwise_loss
WITHIN = 0.10  # the planner's target: predicted peak within 10% of the measured one


def llama_config(args):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                       num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
                       max_position_embeddings=max(args.seq), attn_implementation="sdpa", use_cache=False,
                       dtype="bfloat16")


# -- the planner's prediction ----------------------------------------------------------------------


def one_device_memory_model(config, blockwise: bool, optimizer: bool):
    """The planner's memory model of one device (no ring: what ``ringfx.plan(config, S, world_size=1,
    ...)`` evaluates for P = 1) with this step's options; one simulation serves every length."""
    return memory_model(config, ring=False, precision="bf16", optimizer="adam" if optimizer else "none",
                        activation_checkpointing=True, blockwise_loss=blockwise)


def predictions(args) -> dict:
    """(seq, blockwise on?) -> the predicted peak and its breakdown for the program as the model
    runs it (no cache), and the peak the planner gives the config with ``use_cache=True``."""
    config = llama_config(args)
    cached = copy.deepcopy(config)
    cached.use_cache = True
    out = {}
    for blockwise in (False, True):
        model = one_device_memory_model(config, blockwise, args.optimizer)
        with_cache = one_device_memory_model(cached, blockwise, args.optimizer)
        for seq in args.seq:
            out[seq, blockwise] = {"peak": model.peak_bytes(seq, 1), "breakdown": model.evaluate(seq, 1),
                                   "peak_with_cache": with_cache.peak_bytes(seq, 1)}
    return out


# -- the measurement ---------------------------------------------------------------------------------


def build(config, device):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.gradient_checkpointing_enable()
    model.train()
    return model


def training_step(model, ids, optimizer):
    model(input_ids=ids, labels=ids).loss.backward()
    if optimizer is not None:
        optimizer.step()
    model.zero_grad(set_to_none=True)  # what optimizer.zero_grad() does: the next step starts without grads


def measure_row(args, config, seq, variant, device) -> dict:
    blockwise = VARIANTS[variant]
    row = {"seq": seq, "variant": variant}
    torch.compiler.reset()
    gc.collect()  # checkpointed layers hold their forward in a cycle: free the last row's model now
    if device.type == "cuda":
        torch.cuda.empty_cache()
    model = runner = optimizer = None
    try:
        model = build(config, device)
        row["param_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
        runner = model if blockwise is None else ringfx.transform(model, blockwise_loss=blockwise)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5) if args.optimizer else None
        ids = torch.randint(0, args.vocab, (1, seq), device=device)
        start = time.perf_counter()
        training_step(runner, ids, optimizer)  # warm-up: capture, rewrite, optimizer state
        row["warmup_s"] = time.perf_counter() - start
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        training_step(runner, ids, optimizer)
        if device.type == "cuda":
            torch.cuda.synchronize()
            row["measured"] = torch.cuda.max_memory_allocated()
        row["step_s"] = time.perf_counter() - start
        if blockwise is not None:
            rewritten = sum(getattr(s.decision, "value", s.decision) == "rewritten" for s in runner.sites)
            row["sites"] = f"{rewritten}/{len(runner.sites)}"
            row["fused_losses"] = sum(r.blockwise_loss.rewritten for r in runner.reports if r.blockwise_loss)
    except torch.OutOfMemoryError:
        row["measured"] = "OOM"
    finally:
        del model, runner, optimizer
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _in(n, unit: int) -> str:
    return f"{n / unit:.2f}" if isinstance(n, (int, float)) else str(n)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, nargs="+", default=[16384, 32768])
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--optimizer", action="store_true", help="an AdamW step after backward (in the measured step)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("blockwise_memory: no CUDA device (use --device cpu for a smoke test)", file=sys.stderr)
        return 2

    config = llama_config(args)
    start = time.perf_counter()
    plans = predictions(args)
    print(f"planner: {time.perf_counter() - start:.1f} s (4 memory models)", flush=True)
    unit, unit_name = (2**30, "GiB") if max(p["peak"] for p in plans.values()) >= 2**30 else (2**20, "MiB")

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if device.type == "cuda":
        torch.cuda.set_device(0)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"{name}, torch {torch.__version__}; LLaMA-style model: {args.layers} layers, hidden {args.hidden}, "
          f"intermediate {args.intermediate}, GQA {args.heads}/{args.kv_heads}, vocab {args.vocab}, bf16, "
          f"checkpointing on, one training step{' + AdamW' if args.optimizer else ''}; ring of 1 "
          f"({'nccl' if device.type == 'cuda' else 'gloo'} group of one process)")
    header = (f"{'seq':>6} {'variant':>20} {'params ' + unit_name:>10} {'measured ' + unit_name:>12} "
              f"{'pred ' + unit_name:>9} {'pred/meas':>9} {'within 10%':>10} {'pred cache':>10} {'warm-up s':>9} "
              f"{'step s':>7} sites")
    print(header)
    rows = []
    for seq in args.seq:
        for variant in args.variants:
            row = measure_row(args, config, seq, variant, device)
            plan = plans[seq, bool(VARIANTS[variant])]
            row.update(predicted=plan["peak"], predicted_with_cache=plan["peak_with_cache"],
                       predicted_breakdown=plan["breakdown"])
            measured = row.get("measured", "n/a")
            if isinstance(measured, int):
                row["ratio"] = plan["peak"] / measured
                row["within_10pct"] = abs(row["ratio"] - 1) <= WITHIN
            ratio = f"{row['ratio']:.3f}" if "ratio" in row else "n/a"
            within = ("yes" if row["within_10pct"] else "NO") if "within_10pct" in row else "n/a"
            step = f"{row['step_s']:.2f}" if "step_s" in row else "-"
            warmup = f"{row['warmup_s']:.1f}" if "warmup_s" in row else "-"
            sites = row.get("sites", "-") + (f", {row['fused_losses']} loss fused" if row.get("fused_losses") else "")
            rows.append(row)
            print(f"{seq:>6} {variant:>20} {_in(row.get('param_bytes', '-'), unit):>10} {_in(measured, unit):>12} "
                  f"{_in(plan['peak'], unit):>9} {ratio:>9} {within:>10} {_in(plan['peak_with_cache'], unit):>10} "
                  f"{warmup:>9} {step:>7} {sites}", flush=True)
            if args.json:  # after every row: a run cut short keeps what it measured
                os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
                with open(args.json, "w") as f:
                    json.dump({"device": name, "torch": torch.__version__, "args": vars(args), "rows": rows}, f,
                              indent=1)
    print(f"predicted breakdown ({unit_name}) at the peak moment:")
    for (seq, blockwise), plan in sorted(plans.items()):
        terms = ", ".join(f"{k} {v / unit:.3f}" for k, v in plan["breakdown"].items() if v)
        print(f"  S={seq:>6} blockwise={'on ' if blockwise else 'off'}: {terms}")
    dist.destroy_process_group()
    judged = [r for r in rows if "within_10pct" in r]
    return 0 if all(r["within_10pct"] for r in judged) else 1


if __name__ == "__main__":
    sys.exit(main())
