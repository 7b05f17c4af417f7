"""How long ``python -m ringfx plan`` takes for each preset: a fresh process per plan, wall time.

    python benchmarks/planner_time.py [--repeats 3] [--presets tiny-llama,llama-70b-like] [--cases 128K,max]
                                      [--root OTHER_CHECKOUT]   # time another version's planner (before/after)

Each plan runs as its own ``python -m ringfx plan ... --quiet`` process (importing torch and
ringfx included: what a user waits for), ``--repeats`` times; the table gives the minimum
wall time of the repeats (the machine may be shared: the minimum is the least disturbed run)
and that run's CPU time (user + system of the child). Writes
``benchmarks/results/planner_time.json`` with every run. The target: every preset under 5 s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

PRESETS = ["tiny-llama", "gpt2-like", "llama-1b-like", "llama-8b-like", "llama-70b-like"]
# name -> the plan's flags beside --model; exit status 0 (fits), 1 (does not fit) or 2 (seq-len max finds
# nothing that fits) all count: each is a complete answer
CASES = {
    "128K": ["--seq-len", "131072", "--gpus", "8", "--device-memory", "80GiB", "--device", "H100"],
    "max": ["--seq-len", "max", "--gpus", "8", "--device-memory", "80GiB", "--device", "H100"],
    "max-fsdp-ckpt-64": ["--seq-len", "max", "--gpus", "64", "--device-memory", "80GiB", "--device", "H100",
                         "--fsdp", "--checkpointing"],
    "1M-fsdp-ckpt-64": ["--seq-len", "1M", "--gpus", "64", "--device-memory", "80GiB", "--device", "H100", "--fsdp",
                        "--checkpointing"],
}


# what every plan pays before the planner runs: importing torch, and torch._dynamo, which the first
# meta-device op imports (torch's Python meta kernels are wrapped in dynamo's "disable")
FLOOR = [sys.executable, "-c", "import torch; torch.ones(1, device='meta') * 2"]


def time_plan(preset: str, flags: list, root: str = ROOT) -> dict:
    command = [sys.executable, "-m", "ringfx", "plan", "--model", preset, *flags, "--quiet"] if preset else FLOOR
    before = os.times()
    start = time.perf_counter()
    done = subprocess.run(command, cwd=root, capture_output=True, text=True)  # -m: the ringfx of cwd
    wall = time.perf_counter() - start
    after = os.times()
    cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    if done.returncode not in (0, 1, 2) or (done.returncode == 2 and "not even" not in done.stderr) or \
            (not preset and done.returncode):
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr}")
    return {"wall_s": round(wall, 3), "cpu_s": round(cpu, 3), "exit": done.returncode,
            "answer": (done.stdout.splitlines() or done.stderr.splitlines() or [""])[0][:200]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--presets", default=",".join(PRESETS))
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of: {', '.join(CASES)}")
    parser.add_argument("--root", default=ROOT, help="the checkout whose ringfx plans (default: this one)")
    parser.add_argument("--pool", nargs="*", default=[], metavar="JSON",
                        help="earlier result files of the same code whose runs count with these (minimum over all)")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "planner_time.json"))
    args = parser.parse_args(argv)
    presets, cases = args.presets.split(","), args.cases.split(",")
    for case in cases:
        if case not in CASES:
            parser.error(f"--cases: {case!r} is not one of {', '.join(CASES)}")
    runs = {}
    for path in args.pool:
        with open(path) as f:
            for key, results in json.load(f)["runs"].items():
                runs.setdefault(key, []).extend(results)
    for repeat in range(args.repeats):  # repeats interleaved: a burst of load spoils one run of each, not all
        runs.setdefault("floor", []).append(time_plan(None, [], args.root))
        for preset in presets:
            for case in cases:
                result = time_plan(preset, CASES[case], args.root)
                runs.setdefault(f"{preset} | {case}", []).append(result)
                print(f"[{repeat + 1}/{args.repeats}] {preset:15} {case:26} {result['wall_s']:6.2f} s wall "
                      f"{result['cpu_s']:6.2f} s CPU  exit {result['exit']}", file=sys.stderr, flush=True)
    best = {key: min(results, key=lambda r: r["wall_s"]) for key, results in runs.items()}
    print(f"\n| preset | {' | '.join(cases)} |")
    print("|---|" + "---:|" * len(cases))
    for preset in presets:
        cells = [f"{best[f'{preset} | {case}']['wall_s']:.2f} s / {best[f'{preset} | {case}']['cpu_s']:.2f} s"
                 for case in cases]
        print(f"| {preset} | {' | '.join(cells)} |")
    floor = best.pop("floor")
    counts = sorted({len(results) for key, results in runs.items() if key != "floor"})
    count = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    print(f"\n(min wall of {count} fresh processes each / that run's CPU; worst: "
          f"{max(r['wall_s'] for r in best.values()):.2f} s; import torch + one meta op alone: "
          f"{floor['wall_s']:.2f} s / {floor['cpu_s']:.2f} s)")
    best["floor"] = floor
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    with open(args.out, "w") as f:
        json.dump({"root": os.path.abspath(args.root),
                   "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                               "python": sys.version.split()[0], "load_average_after": load},
                   "commands": {case: ["python", "-m", "ringfx", "plan", "--model", "PRESET", *CASES[case], "--quiet"]
                                for case in cases},
                   "repeats": args.repeats, "pooled_from": args.pool, "best": best, "runs": runs}, f, indent=1)
    print(f"wrote {os.path.relpath(args.out, ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
