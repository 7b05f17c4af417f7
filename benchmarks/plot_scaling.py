"""Per-GPU TFLOP/s and max sequence vs ring size, from the benchmarks' JSON.

    python benchmarks/plot_scaling.py \\
        [--cp 'benchmarks/results/vs_context_parallel*.json'] \\
        [--loopback benchmarks/results/ring_attention_h100.json] \\
        [--out benchmarks/results/scaling.png]

Inputs:

* ``--cp``: files (or glob patterns) written by ``vs_context_parallel.py``, one per ring
  size or one combined list; rows are told apart by their ``ring``. Only rows with
  ``--kv-heads`` K/V heads are plotted (default: as many as query heads).
* ``--loopback``: ``ring_attention.py`` run on one GPU (loopback ring: every block of a
  P-rank ring on one GPU, transfers free). Its TFLOP/s is the whole problem's FLOPs over
  the loopback time, i.e. the throughput of the ring's per-block work.

With multi-GPU data: one panel per mode (per-GPU TFLOP/s of ``--pass`` vs P; colour: method,
line style: S; grey: the loopback ring at the largest S, an upper bound without
transfers) and a panel of the largest S each method ran (hollow marker: never ran out of
memory, so the true maximum is higher). With loopback data only: per-block TFLOP/s vs P for
each S (P=1: monolithic cuDNN SDPA on the whole sequence), titled as multi-GPU data pending.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
METHOD_COLORS = {"ringfx": "tab:blue", "cp_allgather": "tab:orange", "cp_alltoall": "tab:green"}
PASS_NAMES = {"fwd": "forward", "fwd_bwd": "forward+backward"}
STYLES = ["-", "--", ":", "-."]


def tokens(s: int) -> str:
    return f"{s // 2**20}M" if s % 2**20 == 0 else f"{s // 1024}K" if s % 1024 == 0 else str(s)


def load(patterns: list[str]) -> tuple[list[dict], list[str]]:
    rows, files = [], []
    for pattern in patterns:
        for path in sorted(glob.glob(pattern)) or ([pattern] if os.path.exists(pattern) else []):
            with open(path) as f:
                data = json.load(f)
            rows.extend(data if isinstance(data, list) else [data])
            files.append(path)
    return rows, files


def ring_axis(ax, rings, with_one=False):
    ticks = ([1] if with_one else []) + sorted(rings)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ticks)
    ax.set_xticklabels(["1\n(SDPA)" if t == 1 else str(t) for t in ticks])
    ax.set_xlim(ticks[0] / 1.3, ticks[-1] * 1.3)
    ax.set_xlabel("ring size P")
    ax.grid(True, alpha=0.3)


def plot_loopback(axes, loop, passes):
    """Per mode: loopback per-block TFLOP/s vs P, one colour per S; P=1 is monolithic SDPA."""
    seqs = sorted({r["seq"] for r in loop})
    colors = plt.cm.viridis([i / max(1, len(seqs) - 1) * 0.85 for i in range(len(seqs))])
    for ax, mode in zip(axes, ("full", "causal")):
        for color, s in zip(colors, seqs):
            rs = sorted((r for r in loop if r["seq"] == s and r["mode"] == mode), key=lambda r: r["ring"])
            if not rs:
                continue
            for style, tag in zip(STYLES, passes):
                xs = [1] + [r["ring"] for r in rs]
                ys = [rs[0][f"{tag}_sdpa_tflops"]] + [r[f"{tag}_ring_tflops"] for r in rs]
                ax.plot(xs, ys, style, color=color, marker="o", ms=4)
        ring_axis(ax, {r["ring"] for r in loop}, with_one=True)
        ax.set_title(f"{mode} attention")
        ax.set_ylabel("TFLOP/s (one GPU, whole problem)")
    handles = [Line2D([], [], color=c, marker="o", label=f"S={tokens(s)}") for c, s in zip(colors, seqs)]
    handles += [Line2D([], [], color="k", ls=st, label=PASS_NAMES[t]) for st, t in zip(STYLES, passes)]
    axes[-1].legend(handles=handles, fontsize=8, loc="lower left")


def plot_multi(axes, cp, loop, tag):
    """Per mode: per-GPU TFLOP/s of ``tag`` vs P; last panel: max sequence vs P."""
    timing = [r for r in cp if r["kind"] == "timing" and r.get(f"{tag}_tflops")]
    rings = sorted({r["ring"] for r in cp})
    methods = [m for m in METHOD_COLORS if any(r["method"] == m for r in cp)]
    # the (up to 3) largest S timed at every ring size
    by_ring = defaultdict(set)
    for r in timing:
        by_ring[r["ring"]].add(r["seq"])
    common = set.intersection(*by_ring.values()) if by_ring else set()
    seqs = sorted(common or {r["seq"] for r in timing})[-3:][::-1]
    for ax, mode in zip(axes, ("full", "causal")):
        for method in methods:
            for style, s in zip(STYLES, seqs):
                pts = sorted((r["ring"], r[f"{tag}_tflops"]) for r in timing
                             if r["mode"] == mode and r["method"] == method and r["seq"] == s)
                if pts:
                    ax.plot(*zip(*pts), style, color=METHOD_COLORS[method], marker="o", ms=4)
        lb = [r for r in loop if r["mode"] == mode and seqs and r["seq"] == seqs[0]]
        if lb:
            pts = sorted((r["ring"], r[f"{tag}_ring_tflops"]) for r in lb)
            ax.plot(*zip(*pts), "-", color="0.6", marker="s", ms=4, zorder=0)
        ring_axis(ax, rings)
        ax.set_title(f"{mode} attention, {PASS_NAMES[tag]}")
        ax.set_ylabel("TFLOP/s per GPU")
        ax.set_ylim(bottom=0)
    handles = [Line2D([], [], color=METHOD_COLORS[m], marker="o", label=m) for m in methods]
    handles += [Line2D([], [], color="k", ls=st, label=f"S={tokens(s)}") for st, s in zip(STYLES, seqs)]
    if loop:
        handles.append(Line2D([], [], color="0.6", marker="s", label=f"ringfx loopback, S={tokens(seqs[0])}"
                              if seqs else "ringfx loopback"))
    axes[1].legend(handles=handles, fontsize=8, loc="lower left")

    ax = axes[2]
    maxima = [r for r in cp if r["kind"] == "max_seq" and r.get("max_seq")]
    for method in methods:
        for mode, marker in (("causal", "o"), ("full", "^")):
            pts = sorted((r["ring"], r["max_seq"], r.get("first_oom_seq") is None) for r in maxima
                         if r["method"] == method and r["mode"] == mode)
            if not pts:
                continue
            xs, ys, capped = zip(*pts)
            ax.plot(xs, ys, "-", color=METHOD_COLORS[method], lw=1)
            for x, y, c in pts:
                ax.plot(x, y, marker, color=METHOD_COLORS[method], mfc="none" if c else METHOD_COLORS[method])
    ring_axis(ax, rings)
    ax.set_yscale("log", base=2)
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda y, _: tokens(int(y))))
    ax.set_title("largest S that ran (forward+backward)")
    ax.set_ylabel("total sequence length S")
    modes = {r["mode"] for r in maxima}
    handles = [Line2D([], [], color=METHOD_COLORS[m], marker="o", label=m) for m in methods]
    handles += [Line2D([], [], color="k", marker=mk, ls="", label=md) for md, mk in (("causal", "o"), ("full", "^"))
                if md in modes]
    handles.append(Line2D([], [], color="k", marker="o", mfc="none", ls="", label="no OOM (capped)"))
    ax.legend(handles=handles, fontsize=8, loc="upper left")


def describe(rows):
    devices = sorted({r.get("device", "?") for r in rows})
    versions = sorted({r.get("torch", "?") for r in rows})
    r = rows[0]
    shape = f"B={r.get('batch')} H={r.get('heads')} Hkv={r.get('kv_heads')} D={r.get('dim')} bf16"
    return f"{', '.join(devices)}, torch {', '.join(versions)}, {shape}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cp", nargs="*", default=[os.path.join(HERE, "results", "vs_context_parallel*.json")],
                   help="vs_context_parallel.py JSON files or glob patterns")
    p.add_argument("--loopback", default=os.path.join(HERE, "results", "ring_attention_h100.json"))
    p.add_argument("--kv-heads", type=int, default=None, help="plot rows with this many K/V heads")
    p.add_argument("--pass", dest="tag", choices=("fwd", "fwd_bwd"), default="fwd_bwd",
                   help="pass whose TFLOP/s the multi-GPU panels show")
    p.add_argument("--out", default=os.path.join(HERE, "results", "scaling.png"))
    args = p.parse_args(argv)

    loop, _ = load([args.loopback]) if args.loopback else ([], [])
    loop = [r for r in loop if r.get("ring_kind", "loopback") == "loopback"]
    cp, cp_files = load(args.cp)
    cp = [r for r in cp if "method" in r and r.get("kv_heads") == (args.kv_heads or r.get("heads"))]
    if not cp and not loop:
        raise SystemExit("no data: neither --cp nor --loopback gave any rows")

    if cp:
        fig, axes = plt.subplots(1, 3, figsize=(17, 5.2))
        plot_multi(axes, cp, loop, args.tag)
        title = f"ringfx vs torch context_parallel, per-GPU throughput and reach ({describe(cp)})"
    else:
        fig, axes = plt.subplots(1, 2, figsize=(12, 5.2), sharey=True)
        plot_loopback(axes, loop, ["fwd_bwd", "fwd"])
        title = (f"ringfx loopback ring: per-block TFLOP/s vs ring size, all blocks on one GPU ({describe(loop)})\n"
                 "multi-GPU data (vs_context_parallel.py) pending")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out} ({len(cp)} context-parallel rows from {len(cp_files)} files, {len(loop)} loopback rows)")


if __name__ == "__main__":
    main()
