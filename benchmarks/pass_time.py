"""How long the attention passes take next to dynamo's capture of the same model.

    python benchmarks/pass_time.py [--layers 32] [--repeats 3]

For 32-layer LLaMA-style and GPT-2-style models (tests/zoo.py, tiny widths: the graph,
not the arithmetic, is what is measured) it times

* capture: dynamo tracing the model into one FX graph (first call with a backend that
  only records the graph, minus the time of running that graph), and
* passes: ``ringfx.passes.run_passes`` on that graph (decompose MHA, find attention,
  classify masks, rewrite, shard the whole graph along the sequence), inside the backend as
  ``torch.compile(backend="ringfx")`` runs it,

and prints the ratio (target: passes < 10 % of capture). Writes
``benchmarks/results/pass_time.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from zoo import TinyGpt2, TinyLlama, tokens  # noqa: E402

from ringfx.passes import PassOptions, run_passes  # noqa: E402


def measure(make_model, layers: int, seq_len: int) -> dict:
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = make_model(layers).eval()
    inputs = [i.value for i in tokens(seq_len, 0)]
    timing = {}

    def backend(gm, example_inputs):
        timing["backend_entered"] = time.perf_counter()
        nodes = len(gm.graph.nodes)
        options = PassOptions(group_name="loopback:2", ring_size=2, loopback=True, example_inputs=list(example_inputs),
                              inputs="full")  # the zero-touch pipeline: attention passes + whole-graph sharding
        t0 = time.perf_counter()
        gm, reports = run_passes(gm, options=options)
        timing["passes"] = time.perf_counter() - t0
        timing["nodes"] = nodes
        timing["rewritten"] = next(r for r in reports if r.name == "rewrite_attention").rewritten
        return gm.forward

    start = time.perf_counter()
    with torch.no_grad():
        torch.compile(model, backend=backend, dynamic=False)(*inputs)
    timing["capture"] = timing["backend_entered"] - start
    return timing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=os.path.join(HERE, "results", "pass_time.json"))
    args = parser.parse_args()

    models = {
        "llama": lambda n: TinyLlama(layers=n),
        "llama-sdpa": lambda n: TinyLlama(layers=n, sdpa=True),
        "gpt2": lambda n: TinyGpt2(layers=n),
    }
    measure(models["llama"], 1, 8)  # one-time imports (runtime op registration), not per-graph work
    rows = []
    for name, make in models.items():
        runs = [measure(make, args.layers, args.seq_len) for _ in range(args.repeats)]
        capture = statistics.median(r["capture"] for r in runs)
        passes = statistics.median(r["passes"] for r in runs)
        rows.append({"model": name, "layers": args.layers, "graph_nodes": runs[0]["nodes"],
                     "attention_rewritten": runs[0]["rewritten"], "capture_s": capture, "passes_s": passes,
                     "ratio": passes / capture})
    head = f"{'model':<12}{'layers':>7}{'nodes':>8}{'rewritten':>10}{'capture s':>11}{'passes s':>10}{'passes/capture':>16}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['model']:<12}{r['layers']:>7}{r['graph_nodes']:>8}{r['attention_rewritten']:>10}"
              f"{r['capture_s']:>11.3f}{r['passes_s']:>10.3f}{r['ratio']:>15.1%}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
                   "repeats": args.repeats, "seq_len": args.seq_len, "target_ratio": 0.10, "rows": rows}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
