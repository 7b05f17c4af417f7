"""The planner's longest sequence for the Ring Attention paper's end-to-end configurations.

Liu, Zaharia, Abbeel 2023, "Ring Attention with Blockwise Transformers for Near-Infinite
Context" (arXiv:2310.01889 v4), §5.1 and Table 3: maximum context in end-to-end training with
FSDP, LLaMA-architecture 3B/7B/13B on 8x A100 (NVLink) and 7B/13B on 32x A100 (InfiniBand).
Each configuration is planned twice with ``python -m ringfx plan`` (in-process, the same
argument parsing and code path, ``--json``): without and with ``--blockwise-loss``.

    python benchmarks/paper_configs.py [--out benchmarks/results/paper_configs.json]

CPU only; about 25 s per plan on a 2-core machine (10 plans).
"""
import argparse
import contextlib
import io
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from ringfx.planner import cli  # noqa: E402

# LLaMA-1 shapes (vocabulary 32,000, multi-head attention, untied embeddings); the 3B is
# OpenLLaMA-3B's shape, the paper's 3B being "LLaMA architecture" without its shape given.
SHAPES = {
    "3B": dict(hidden_size=3200, intermediate_size=8640, num_hidden_layers=26, num_attention_heads=32),
    "7B": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
    "13B": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40),
}
VOCAB = 32000

# Table 3, tokens x1e3 as printed (powers of two: read here as K = 1024 tokens).
# "bpt" = the paper's "Memory Efficient Attn and FFN" baseline (Blockwise Parallel Transformer).
PAPER = [
    # (hardware, gpus, model, ring attention K, bpt K)
    ("8x A100 NVLink", 8, "3B", 512, 64),
    ("8x A100 NVLink", 8, "7B", 256, 32),
    ("8x A100 NVLink", 8, "13B", 128, 16),
    ("32x A100 InfiniBand", 32, "7B", 4096, 128),
    ("32x A100 InfiniBand", 32, "13B", 2048, 64),
]


def model_spec(size: str) -> str:
    s = dict(SHAPES[size])
    s["num_key_value_heads"] = s["num_attention_heads"]
    s["vocab_size"] = VOCAB
    return "llama:" + ",".join(f"{k}={v}" for k, v in s.items())


def argv_for(size: str, gpus: int, blockwise: bool, bandwidth: str = None) -> list:
    argv = ["--model", model_spec(size), "--seq-len", "max", "--device", "A100", "--device-memory", "80GiB",
            "--gpus", str(gpus), "--fsdp", "--checkpointing", "--precision", "bf16-mixed", "--optimizer", "adam",
            "--json", "--quiet"]
    if bandwidth:
        argv += ["--bandwidth", bandwidth]
    if blockwise:
        argv.append("--blockwise-loss")
    return argv


def run(argv: list) -> dict:
    buf = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(buf):
        rc = cli.main(argv)
    if rc not in (0, 1):
        raise RuntimeError(f"python -m ringfx plan {' '.join(argv)}: exit status {rc}")
    out = json.loads(buf.getvalue())
    out["plan_wall_s"] = round(time.perf_counter() - t0, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                   "paper_configs.json"))
    args = ap.parse_args()
    rows = []
    for hardware, gpus, size, paper_k, bpt_k in PAPER:
        # 32x A100 is four nodes: the ring's slowest link is InfiniBand (12.5 GB/s, the paper's Table 2).
        bandwidth = "12.5GB/s" if gpus > 8 else None
        row = {"hardware": hardware, "gpus": gpus, "model": size, "model_spec": model_spec(size),
               "paper_ring_attention_tokens": paper_k * 1024, "paper_bpt_tokens": bpt_k * 1024}
        for key, blockwise in (("without_blockwise_loss", False), ("with_blockwise_loss", True)):
            argv = argv_for(size, gpus, blockwise, bandwidth)
            print(f"planning {hardware} {size} {'with' if blockwise else 'without'} blockwise loss ...",
                  file=sys.stderr, flush=True)
            res = run(argv)
            row[key] = {"command": "python -m ringfx plan " + " ".join(argv), **{
                k: res[k] for k in ("seq_len", "ring_size", "block_size", "predicted_peak_bytes", "budget_bytes",
                                    "dominant", "breakdown", "min_block", "overlap", "step_time_s", "plan_wall_s")}}
        rows.append(row)

    def k(n):
        return f"{n / 1024:,.0f}K"

    print("| hardware | model | paper, Ring Attention | paper, BPT (per device) | planner, no blockwise loss "
          "(P, tokens/device) | planner, `--blockwise-loss` (P, tokens/device) | planner / paper (without / with) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        a, b = r["without_blockwise_loss"], r["with_blockwise_loss"]
        p = r["paper_ring_attention_tokens"]
        print(f"| {r['hardware']} | {r['model']} | {k(p)} | {k(r['paper_bpt_tokens'])} "
              f"| {a['seq_len']:,} ({k(a['seq_len'])}; P={a['ring_size']}, {a['block_size']:,}) "
              f"| {b['seq_len']:,} ({k(b['seq_len'])}; P={b['ring_size']}, {b['block_size']:,}) "
              f"| {a['seq_len'] / p:.2f} / {b['seq_len'] / p:.2f} |")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"source": "Liu, Zaharia, Abbeel 2023, arXiv:2310.01889 v4, Table 3 (tokens x1e3, read as K=1024)",
                   "options": "A100 80GiB, 10% headroom, FSDP over the ring, per-layer checkpointing, bf16-mixed, Adam, "
                              "batch 1, causal (zigzag)", "rows": rows}, f, indent=2)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
