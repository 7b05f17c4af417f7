"""Attention variants on a loopback ring vs the monolithic kernels a model would use, on one device.

For each sequence length and KV-head count (B=1, H=32, D=128, bf16, causal by default),
three variants, each timed forward and forward+backward, side by side in one process:

* plain attention: ringfx loopback ring P=1 and P=4 (cuDNN / flash block kernels) vs
  ``F.scaled_dot_product_attention`` on the whole sequence (the backend SDPA picks, and
  cuDNN and flash forced);
* logit soft-capping (cap 50, Gemma 2): the ring (its math block kernel) vs transformers'
  Gemma 2 eager spelling (matmul, scale, tanh cap, additive mask, float32 softmax, matmul)
  and ``flex_attention`` compiled with a tanh ``score_mod`` (transformers' flex spelling);
* attention sinks (one logit per head, GPT-OSS): the ring vs transformers' GPT-OSS eager
  spelling (the sink column joined to the scores, softmax, dropped) and compiled
  ``flex_attention`` returning its log-sum-exp, renormalised outside the kernel:
  ``out * sigmoid(lse - sink)`` (what transformers' flex integration does; flex's
  ``score_mod`` cannot add a term to the denominator, and SDPA has no public
  log-sum-exp output).

A loopback ring of P runs every rank's blocks one after another on this device (the
transfers are free), so its time is the whole problem's; "per-rank" = loopback time / P
is what each GPU of a real ring of P would spend computing, communication not counted.
"mono/row" = the fastest monolithic baseline's time for the same variant and pass /
this row's time (> 1: this row is faster). "fwd" is the forward of a training step
(inputs require grad; no backward), so one compiled flex graph serves both passes
(on CPU, where flex has no backward, an inference forward: --inference-fwd).
Peak memory: max_memory_allocated during one call minus what was allocated before it
(the inputs). "max err": max |out - float32 reference| of the forward output, at the
smallest sequence length only. Times: CUDA events (wall clock on CPU), median of --iters
calls (at least 3, fewer than --iters only for a pass slower than --row-seconds / --iters)
after two untimed ones; a row's error (OOM, unsupported, a failed compile) is its note.

    python benchmarks/variants_speed.py --json benchmarks/results/variants_speed_h200.json
    python benchmarks/variants_speed.py --device cpu --dtype float32 --seq 256 --heads 4 \\
        --kv-heads 2 --dim 32 --iters 2        # smoke test
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import ringfx  # noqa: E402

SOFTCAP = 50.0  # Gemma 2's attn_logit_softcapping
QUERY_GAIN = 4.0  # scores ~ N(0, 4²): the cap moves the largest logits (~15 at 8K keys) by ~0.4, so it shows
RINGS = (1, 4)
VARIANTS = ("plain", "softcap", "sinks")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class Problem:
    """One (S, Hkv) problem: full-sequence inputs, shared by every row."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    sinks: torch.Tensor
    dout: torch.Tensor
    causal: bool
    scale: float
    mask: torch.Tensor | None = None  # transformers' additive 4-D mask (B, 1, S, S), built on first use
    block_mask: object = None  # flex's BlockMask, built on first use

    @property
    def gqa(self) -> int:
        return self.q.shape[1] // self.k.shape[1]


@dataclass
class Contender:
    """A way to compute one variant: ``prepare(problem)`` -> (inputs, attend, dout, to_global),
    where ``attend(*inputs)`` returns the output (for a ring, its ranks' shards) and
    ``to_global`` puts it back in sequence order."""

    name: str
    variant: str
    ring: int  # 0: monolithic
    prepare: Callable
    notes: list = field(default_factory=list)


# ----------------------------------------------------------------- monolithic spellings

def repeat_kv(x, n_rep):
    # transformers' repeat_kv (modeling_gemma2.py, modeling_gpt_oss.py)
    if n_rep == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


def gemma2_eager(q, k, v, mask, scale, softcap, gqa):
    # transformers' Gemma 2 eager_attention_forward (dropout 0; the final transpose left out)
    k, v = repeat_kv(k, gqa), repeat_kv(v, gqa)
    w = torch.matmul(q, k.transpose(2, 3)) * scale
    w = w / softcap
    w = torch.tanh(w)
    w = w * softcap
    if mask is not None:
        w = w + mask
    w = F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(w, v)


def gpt_oss_eager(q, k, v, sinks, mask, scale, gqa):
    # transformers' GPT-OSS eager_attention_forward (dropout 0; the final transpose left out)
    k, v = repeat_kv(k, gqa), repeat_kv(v, gqa)
    w = torch.matmul(q, k.transpose(2, 3)) * scale
    if mask is not None:
        w = w + mask
    sink = sinks.reshape(1, -1, 1, 1).expand(q.shape[0], -1, q.shape[-2], -1)
    logits = torch.cat([w, sink], dim=-1)
    logits = logits - logits.max(dim=-1, keepdim=True).values
    probs = F.softmax(logits, dim=-1, dtype=logits.dtype)
    return torch.matmul(probs[..., :-1].to(v.dtype), v)


def additive_mask(pb: Problem):
    """transformers' eager models add a (B, 1, S, S) mask of the model dtype: 0 or dtype min."""
    if pb.mask is None and pb.causal:
        s = pb.q.shape[2]
        pb.mask = torch.full((s, s), torch.finfo(pb.q.dtype).min, dtype=pb.q.dtype, device=pb.q.device)
        pb.mask = pb.mask.triu(1)[None, None]
    return pb.mask


def softcap_score(score, b, h, q_idx, kv_idx):
    # transformers' flex_attention_forward score_mod for Gemma 2
    return SOFTCAP * torch.tanh(score / SOFTCAP)


def causal_mask(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


_compiled_flex = None


def compiled_flex():
    """``torch.compile(flex_attention)`` once, static shapes (each S / Hkv gets its own kernels:
    automatic dynamic shapes would time a generic kernel after the second shape)."""
    global _compiled_flex
    if _compiled_flex is None:
        from torch.nn.attention.flex_attention import flex_attention
        import torch._dynamo.config as dynamo_config
        # one compiled function serves every (variant, S, Hkv): more entries than the default limit of 8
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(dynamo_config, name):
                setattr(dynamo_config, name, max(64, getattr(dynamo_config, name)))
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


def flex_block_mask(pb: Problem):
    if pb.block_mask is None and pb.causal:
        from torch.nn.attention.flex_attention import create_block_mask
        s = pb.q.shape[2]
        pb.block_mask = create_block_mask(causal_mask, None, None, s, s, device=pb.q.device)
    return pb.block_mask


def flex_lse_kwargs():
    """torch >= 2.9 asks for the log-sum-exp with ``return_aux``, earlier ones with ``return_lse``."""
    try:
        from torch.nn.attention.flex_attention import AuxRequest
    except ImportError:
        return {"return_lse": True}, lambda res: res
    return {"return_aux": AuxRequest(lse=True)}, lambda res: (res[0], res[1].lse)


# ----------------------------------------------------------------------- contenders

def ring_contender(variant, world):
    ring = ringfx.LoopbackRing(world)
    layout = "zigzag"  # balances causal work over the ranks; P=1: the whole sequence

    def prepare(pb: Problem):
        def shard(x):
            return ringfx.shard(x, 2, layout=layout, group=ring).contiguous()

        extra = {"softcap": SOFTCAP} if variant == "softcap" else {}
        inputs = [shard(pb.q), shard(pb.k), shard(pb.v)] + ([pb.sinks] if variant == "sinks" else [])

        def attend(q, k, v, sinks=None):
            return ringfx.ring_attention(q, k, v, group=ring, causal=pb.causal, layout=layout, scale=pb.scale,
                                         sinks=sinks, **extra)

        return inputs, attend, shard(pb.dout), lambda out: ringfx.unshard(out, 2, layout=layout, group=ring)

    kernel = "math block kernel" if variant == "softcap" else "fused SDPA block kernels (kernel=auto)"
    return Contender(f"ringfx loopback P={world}", variant, world, prepare, [kernel])


def sdpa_contender(backends, label):
    def prepare(pb: Problem):
        def attend(q, k, v):
            if backends is None:  # what SDPA picks by itself
                return F.scaled_dot_product_attention(q, k, v, is_causal=pb.causal, scale=pb.scale,
                                                      enable_gqa=pb.gqa > 1)
            with sdpa_kernel(backends):
                return F.scaled_dot_product_attention(q, k, v, is_causal=pb.causal, scale=pb.scale,
                                                      enable_gqa=pb.gqa > 1)

        return [pb.q, pb.k, pb.v], attend, pb.dout, lambda out: out

    return Contender(label, "plain", 0, prepare)


def eager_contender(variant):
    def prepare(pb: Problem):
        mask = additive_mask(pb)
        if variant == "softcap":
            def attend(q, k, v):
                return gemma2_eager(q, k, v, mask, pb.scale, SOFTCAP, pb.gqa)
            inputs = [pb.q, pb.k, pb.v]
        else:
            def attend(q, k, v, sinks):
                return gpt_oss_eager(q, k, v, sinks, mask, pb.scale, pb.gqa)
            inputs = [pb.q, pb.k, pb.v, pb.sinks]
        return inputs, attend, pb.dout, lambda out: out

    source = "Gemma 2" if variant == "softcap" else "GPT-OSS"
    return Contender(f"eager ({source} spelling)", variant, 0, prepare)


def flex_contender(variant):
    def prepare(pb: Problem):
        flex = compiled_flex()
        block_mask = flex_block_mask(pb)
        if variant == "softcap":
            def attend(q, k, v):
                return flex(q, k, v, score_mod=softcap_score, block_mask=block_mask, scale=pb.scale,
                            enable_gqa=pb.gqa > 1)
            return [pb.q, pb.k, pb.v], attend, pb.dout, lambda out: out

        lse_kwargs, unpack = flex_lse_kwargs()

        def attend(q, k, v, sinks):
            out, lse = unpack(flex(q, k, v, block_mask=block_mask, scale=pb.scale, enable_gqa=pb.gqa > 1,
                                   **lse_kwargs))
            # the sink joins each row's denominator: exp(L) / (exp(L) + exp(sink)) = sigmoid(L - sink)
            weight = torch.sigmoid(lse.float() - sinks.float()[None, :, None])
            return (out.float() * weight[..., None]).to(q.dtype)

        return [pb.q, pb.k, pb.v, pb.sinks], attend, pb.dout, lambda out: out

    how = "tanh score_mod" if variant == "softcap" else "lse renorm: out*sigmoid(lse-sink)"
    return Contender("flex_attention (compiled)", variant, 0, prepare, [how])


def contenders(device):
    rows = []
    for variant in VARIANTS:
        rows += [ring_contender(variant, p) for p in RINGS]
        if variant == "plain":
            rows.append(sdpa_contender(None, "SDPA (its own pick)"))
            if device.type == "cuda":
                rows.append(sdpa_contender([SDPBackend.CUDNN_ATTENTION], "SDPA cuDNN"))
                rows.append(sdpa_contender([SDPBackend.FLASH_ATTENTION], "SDPA flash"))
        else:
            rows += [eager_contender(variant), flex_contender(variant)]
    return rows


# ------------------------------------------------------------------------ reference

def reference(pb: Problem, variant: str) -> torch.Tensor:
    """The variant in float32 on the full sequence, a few heads at a time (bounded memory)."""
    q, k, v = pb.q.float(), pb.k.float(), pb.v.float()
    b, hq, s, _ = q.shape
    out = torch.empty_like(q)
    step = max(1, min(hq, (1 << 29) // max(1, b * s * s)))  # ~2 GiB of float32 scores per chunk
    keep = torch.ones(s, s, dtype=torch.bool, device=q.device).tril() if pb.causal else None
    for h0 in range(0, hq, step):
        heads = torch.arange(h0, min(hq, h0 + step), device=q.device)
        kv = heads // pb.gqa
        scores = q[:, heads] @ k[:, kv].transpose(-2, -1) * pb.scale
        if variant == "softcap":
            scores = SOFTCAP * torch.tanh(scores / SOFTCAP)
        if keep is not None:
            scores = scores.masked_fill(~keep, float("-inf"))
        if variant == "sinks":
            sink = pb.sinks.float()[heads].reshape(1, -1, 1, 1).expand(b, -1, s, 1)
            scores = torch.cat([scores, sink], dim=-1)
        p = torch.softmax(scores, dim=-1)
        if variant == "sinks":
            p = p[..., :-1]
        out[:, heads] = p @ v[:, kv]
        del scores, p
    return out


# ---------------------------------------------------------------------------- timing

class Clock:
    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def time_ms(self, fn) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    def peak_delta(self, fn):
        """(fn's result, bytes allocated at its peak beyond what was allocated before it)."""
        if not self.cuda:
            return fn(), None
        self.sync()
        gc.collect()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        result = fn()
        self.sync()
        return result, torch.cuda.max_memory_allocated() - before


def measure(clock: Clock, inputs, attend, dout, backward: bool, args):
    """One pass: {first_call_s, ms, iters, peak_bytes}, and the output of a call."""
    leaves = [t.detach().requires_grad_(backward or not args.inference_fwd) for t in inputs]

    def step():
        out = attend(*leaves)
        if backward:
            torch.autograd.grad(out, leaves, dout)
        return out

    t0 = time.perf_counter()
    step()  # compiles, if anything does
    clock.sync()
    first_s = time.perf_counter() - t0
    for _ in range(args.warmup):
        step()
    t0 = time.perf_counter()
    out, peak = clock.peak_delta(step)
    call_s = time.perf_counter() - t0
    out = out.detach()
    # slow rows (the math kernel at long S) take fewer calls: median of at least 3
    iters = max(min(3, args.iters), min(args.iters, int(args.row_seconds / max(call_s, 1e-9))))
    ms = statistics.median(clock.time_ms(step) for _ in range(iters))
    return {"first_call_s": first_s, "ms": ms, "iters": iters, "peak_bytes": peak}, out


def release(clock):
    gc.collect()
    if clock.cuda:
        torch.cuda.empty_cache()


def error_text(exc: BaseException) -> str:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return "OOM"
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first[:160]}"


def run_row(clock, pb, contender, ref, args):
    row = {"variant": contender.variant, "impl": contender.name, "ring": contender.ring,
           "notes": list(contender.notes)}
    try:
        inputs, attend, dout, to_global = contender.prepare(pb)
    except Exception as exc:  # noqa: BLE001 -- a row that cannot be built is reported, the table goes on
        row["notes"].append(f"setup: {error_text(exc)}")
        if args.raise_errors:
            raise
        return row
    for tag, backward in (("fwd", False), ("fwd_bwd", True)):
        if tag == "fwd_bwd" and "fwd_ms" not in row:
            row["notes"].append("fwd+bwd: not run (forward failed)")
            break
        try:
            res, out = measure(clock, inputs, attend, dout, backward, args)
        except Exception as exc:  # noqa: BLE001 -- OOM, an unsupported backend, a failed compile: per row
            row["notes"].append(f"{tag.replace('_', '+')}: {error_text(exc)}")
            if args.raise_errors:
                raise
            if args.verbose:
                traceback.print_exc()
            del exc
            release(clock)
            continue
        row[f"{tag}_ms"] = res["ms"]
        row[f"{tag}_iters"] = res["iters"]
        row[f"{tag}_first_call_s"] = res["first_call_s"]
        row[f"{tag}_peak_bytes"] = res["peak_bytes"]
        if contender.ring:
            row[f"{tag}_per_rank_ms"] = res["ms"] / contender.ring
        if tag == "fwd" and ref is not None:
            row["max_abs_err"] = (to_global(out).float() - ref).abs().max().item()
        del out
        release(clock)
    return row


def make_problem(b, hq, hkv, s, d, dtype, device, causal, seed):
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, device=device, dtype=torch.float32, generator=g)

    q = (QUERY_GAIN * randn(b, hq, s, d)).to(dtype)
    k, v, dout = randn(b, hkv, s, d).to(dtype), randn(b, hkv, s, d).to(dtype), randn(b, hq, s, d).to(dtype)
    # about a row's log-sum-exp (scores ~ N(0, QUERY_GAIN²): lse ~ QUERY_GAIN²/2 + log(keys)), so the
    # sink takes a visible share of the rows
    sinks = (QUERY_GAIN ** 2 / 2 + math.log(s) + randn(hq)).to(dtype)
    return Problem(q, k, v, sinks, dout, causal, 1.0 / math.sqrt(d))


def add_ratios(rows):
    """mono/row: the fastest monolithic time of the same (S, Hkv, variant, pass) / this row's."""
    for tag in ("fwd", "fwd_bwd"):
        best = {}
        for r in rows:
            if not r["ring"] and r.get(f"{tag}_ms") is not None:
                key = (r["seq"], r["kv_heads"], r["variant"])
                best[key] = min(best.get(key, math.inf), r[f"{tag}_ms"])
        for r in rows:
            key = (r["seq"], r["kv_heads"], r["variant"])
            if r.get(f"{tag}_ms") is not None and key in best:
                r[f"{tag}_mono_over_row"] = best[key] / r[f"{tag}_ms"]
                if r["ring"]:  # a real ring of P, ideally: each GPU spends loopback time / P
                    r[f"{tag}_mono_over_per_rank"] = best[key] / r[f"{tag}_per_rank_ms"]


def print_table(rows, header):
    def num(x, spec):
        return format(x, spec) if x is not None else format("-", ">" + spec.split(".")[0])

    def mib(x):
        return format(x / 2**20, ".0f") if x is not None else "-"

    cols = (f"{'S':>6} {'Hkv':>3} {'variant':<7} {'implementation':<26} | {'fwd ms':>8} {'/rank':>8} "
            f"{'mono/row':>8} | {'f+b ms':>8} {'/rank':>8} {'mono/row':>8} | {'fwd MiB':>8} {'f+b MiB':>8} | "
            f"{'max err':>8} | note")
    print(header)
    print(cols)
    print("-" * len(cols))
    last = None
    for r in rows:
        key = (r["seq"], r["kv_heads"], r["variant"])
        if last is not None and key != last:
            print()
        last = key
        print(f"{r['seq']:>6} {r['kv_heads']:>3} {r['variant']:<7} {r['impl']:<26} | "
              f"{num(r.get('fwd_ms'), '8.2f')} {num(r.get('fwd_per_rank_ms'), '8.2f')} "
              f"{num(r.get('fwd_mono_over_row'), '8.3f')} | "
              f"{num(r.get('fwd_bwd_ms'), '8.2f')} {num(r.get('fwd_bwd_per_rank_ms'), '8.2f')} "
              f"{num(r.get('fwd_bwd_mono_over_row'), '8.3f')} | "
              f"{mib(r.get('fwd_peak_bytes')):>8} {mib(r.get('fwd_bwd_peak_bytes')):>8} | "
              f"{num(r.get('max_abs_err'), '8.1e')} | {'; '.join(r['notes'])}", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", type=int, nargs="+", default=[8192, 32768], help="total sequence lengths")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, nargs="+", default=[32, 8], help="one row set per value (8: GQA)")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--device", default="cuda")
    p.add_argument("--no-causal", action="store_true", help="full (non-causal) attention")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--iters", type=int, default=5, help="timed calls per pass (median)")
    p.add_argument("--warmup", type=int, default=0,
                   help="untimed calls beyond the two every pass makes (the first compiles, if anything does; "
                        "the second measures peak memory)")
    p.add_argument("--row-seconds", type=float, default=3.0,
                   help="a pass whose calls would take longer than this gets fewer (at least 3) timed calls")
    p.add_argument("--inference-fwd", action=argparse.BooleanOptionalAction, default=None,
                   help="time the forward with inputs that do not require grad (default: on CPU only, where "
                        "flex_attention has no backward; on CUDA it would compile flex once more per shape)")
    p.add_argument("--json", default=None, help="write the rows here")
    p.add_argument("--raise-errors", action="store_true", help="re-raise a row's error instead of reporting it")
    p.add_argument("--verbose", action="store_true", help="print each row error's traceback")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    if args.inference_fwd is None:
        args.inference_fwd = device.type == "cpu"
    dtype = DTYPES[args.dtype]
    causal = not args.no_causal
    clock = Clock(device)
    for s in args.seq:
        if s % (2 * max(RINGS)):
            p.error(f"--seq {s}: the zigzag loopback ring of {max(RINGS)} needs S divisible by {2 * max(RINGS)}")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    fwd_kind = "an inference forward (no grad)" if args.inference_fwd else "the forward of a training step"
    header = (f"# {name}, torch {torch.__version__}, {args.dtype}, B={args.batch} H={args.heads} D={args.dim}, "
              f"{'causal' if causal else 'full'}, softcap {SOFTCAP}\n"
              "# loopback ring of P: all P ranks' blocks run one after another on this device, so 'ms' is the\n"
              "# whole problem's time; '/rank' = loopback ms / P = what each GPU of a real ring of P would spend\n"
              "# computing (communication not counted). mono/row = fastest monolithic ms (same S, Hkv, variant,\n"
              f"# pass) / this row's ms. fwd = {fwd_kind}. MiB = peak allocation beyond the inputs.\n"
              f"# max err = max |out - float32 reference| at S={min(args.seq)} only.")
    print(header.splitlines()[0], flush=True)
    started = time.perf_counter()
    rows = []
    for s in args.seq:
        for hkv in args.kv_heads:
            pb = make_problem(args.batch, args.heads, hkv, s, args.dim, dtype, device, causal, seed=s + hkv)
            for variant in args.variants:
                ref = reference(pb, variant) if s == min(args.seq) else None
                for c in contenders(device):
                    if c.variant != variant:
                        continue
                    t0 = time.perf_counter()
                    row = run_row(clock, pb, c, ref, args)
                    row.update(seq=s, kv_heads=hkv, heads=args.heads, dim=args.dim, batch=args.batch,
                               dtype=args.dtype, causal=causal, seconds=time.perf_counter() - t0)
                    rows.append(row)
                    print(f"#  S={s} Hkv={hkv} {variant:<7} {c.name:<26} fwd {row.get('fwd_ms', '-')} ms, "
                          f"f+b {row.get('fwd_bwd_ms', '-')} ms ({row['seconds']:.1f} s) "
                          f"{'; '.join(row['notes'])}", flush=True)
                del ref
                release(clock)
            del pb
            release(clock)
    add_ratios(rows)
    total = time.perf_counter() - started
    print()
    print_table(rows, header)
    print(f"# total {total:.0f} s")
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        meta = {"device": name, "torch": torch.__version__, "softcap": SOFTCAP, "query_gain": QUERY_GAIN,
                "rings": RINGS, "iters": args.iters, "warmup": args.warmup, "total_s": total,
                "command": " ".join(sys.argv)}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        print(f"# wrote {args.json}")


if __name__ == "__main__":
    main()
