"""ringfx vs torch's ``context_parallel`` (allgather and alltoall rotation) on a real NCCL ring.

    torchrun --nproc-per-node P benchmarks/vs_context_parallel.py \\
        [--seq 32K,64K,128K,256K] [--modes full,causal] [--kv-heads 8] [--max-seq 4M] \\
        [--out benchmarks/results/vs_context_parallel_p{P}.json]

Methods, same shapes (bf16, B=1, H=32, D=128 by default; S is the total sequence):

* ``ringfx``: ``ringfx.ring_attention`` on local shards, ``layout="zigzag"`` for causal,
  ``"contiguous"`` otherwise.
* ``cp_allgather`` / ``cp_alltoall``: ``torch.distributed.tensor.experimental.context_parallel``
  with ``set_rotate_method("allgather" | "alltoall")``, F.scaled_dot_product_attention
  under ``sdpa_kernel(--cp-backends)`` (head-tail load balancing for causal, none otherwise:
  torch refuses load balancing without ``is_causal``). GQA (``--kv-heads`` < ``--heads``):
  context_parallel has no GQA handling of its own; ``--cp-gqa native`` passes
  ``enable_gqa=True`` to SDPA, ``expand`` repeats K/V to H heads inside the timed step
  (the repeat and its backward counted), ``auto`` (default) uses native when the accuracy
  check at the smallest S passes with it, else expand. Each row says which (``cp_gqa``).

For each mode, S in ``--seq`` and method, every rank builds its own random local shards
(B, H, S/P, D) and times forward and forward+backward (median of ``--iters`` after one
warm-up, CUDA events, the slowest rank's time). For context_parallel the context is
entered with a (1, S) position buffer, as a model would (q/k/v are computed from sharded
inputs inside it), so neither method holds the whole problem on every rank. Reported:

* per-GPU TFLOP/s: 4·B·H·S²·D forward (half for causal), 3.5x for forward+backward, / P;
* % of ideal: single-GPU cuDNN/flash SDPA time on the whole problem / P, over the method's
  time; the SDPA time is measured on rank 0's GPU alone (other ranks wait) up to
  ``--ideal-max-seq`` and where the whole problem fits, otherwise left empty;
* peak memory per GPU: ``torch.cuda.max_memory_allocated`` over the timed steps (inputs
  included) after ``reset_peak_memory_stats``, the largest over ranks;
* max sequence reached: after the listed S, S keeps doubling (``--probe-modes``, one
  untimed forward+backward step per method: "probe" rows) until every method runs out of
  memory or S passes ``--max-seq``. A method that ran out of memory is not tried at larger S.
  Ranks agree on failure through an all_reduce of a flag after every attempt. An OOM that
  strikes one rank mid-ring while the others wait in NCCL cannot be recovered; the
  process group's ``--timeout`` then ends the run, and the JSON written so far survives.

Accuracy: at ``--check-seq`` (default: the first S) in each mode, all methods run on the same full q/k/v (CP with
its documented usage, ``buffers=[q, k, v, dout]`` sharded in place) and output and
gradients are compared with SDPA on the whole sequence (relative Frobenius error).

Rank 0 prints a table and writes JSON (``--out``, ``{P}`` replaced by the ring size; the
file is rewritten after every row): a list of rows with ``kind`` "timing", "probe" or
"max_seq", each with the device name, torch version and ``ring`` (P).
"""

from __future__ import annotations

import os

# The machines require NVLink multicast off; set before anything initialises NCCL.
os.environ["NCCL_NVLS_ENABLE"] = "0"
os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
os.environ["NVSHMEM_DISABLE_NVLS"] = "1"

import argparse  # noqa: E402
import contextlib  # noqa: E402
import datetime  # noqa: E402
import functools  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ring_attention import attention_flops, make_qkv, parse_tokens, run_sdpa, timed  # noqa: E402

import ringfx  # noqa: E402  (ring_attention.py put the repository root on sys.path)

DEVICE = "cuda"
METHODS = ("ringfx", "cp_allgather", "cp_alltoall")
BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def import_context_parallel():
    """(context_parallel, context_parallel_unshard, set_rotate_method, cp_options) of this torch.

    ``set_rotate_method`` and the options live in ``torch.distributed.tensor.experimental._attention``
    (a re-export of ``._context_parallel._attention`` since the module moved); both are tried."""
    try:
        from torch.distributed.tensor.experimental import context_parallel
    except ImportError as e:
        raise SystemExit(f"torch {torch.__version__} has no torch.distributed.tensor.experimental."
                         f"context_parallel ({e}); it needs torch >= 2.7") from e
    errors = []
    for name in ("torch.distributed.tensor.experimental._attention",
                 "torch.distributed.tensor.experimental._context_parallel._attention"):
        try:
            module = __import__(name, fromlist=["set_rotate_method"])
            return (context_parallel, module.context_parallel_unshard, module.set_rotate_method,
                    module._cp_options)
        except (ImportError, AttributeError) as e:
            errors.append(f"{name}: {e}")
    raise SystemExit(f"torch {torch.__version__}: cannot find set_rotate_method / _cp_options of "
                     "context parallelism (" + "; ".join(errors) + "); this benchmark needs them")


class Bench:
    """The ring, the mesh and the options shared by every measurement."""

    def __init__(self, args):
        self.args = args
        self.world, self.rank = dist.get_world_size(), dist.get_rank()
        self.group = dist.group.WORLD
        from torch.distributed.device_mesh import init_device_mesh
        self.mesh = init_device_mesh(DEVICE, (self.world,))
        self.cp, self.cp_unshard, self.set_rotate_method, self.cp_options = import_context_parallel()
        self.b, self.hq, self.d = args.batch, args.heads, args.dim
        self.hkv = args.kv_heads or args.heads
        self.dtype = torch.bfloat16
        self.cp_backends = [BACKENDS[n] for n in args.cp_backends.split(",")]

    # -- the attention of each method, on local shards (inside ``method_context``) --

    def attend_fn(self, method, causal, cp_gqa):
        if method == "ringfx":
            return functools.partial(ringfx.ring_attention, group=self.group, causal=causal,
                                     layout=layout_of(causal), kernel=self.args.kernel)
        rep = self.hq // self.hkv

        def cp_attend(q, k, v):
            extra = {}
            if rep > 1 and cp_gqa == "expand":
                k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            elif rep > 1:
                extra["enable_gqa"] = True
            with sdpa_kernel(self.cp_backends):  # F.scaled_dot_product_attention is CP's patch here
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal, **extra)

        return cp_attend

    @contextlib.contextmanager
    def method_context(self, method, causal, buffers, seq_dims):
        """Nothing for ringfx; for CP, its rotate method, load balancing (causal only) and
        ``context_parallel`` over ``buffers`` (sharded in place along ``seq_dims``)."""
        if method == "ringfx":
            yield
            return
        self.set_rotate_method(method.removeprefix("cp_"))
        saved = self.cp_options.enable_load_balance
        self.cp_options.enable_load_balance = causal
        try:
            with self.cp(self.mesh, buffers=buffers, buffer_seq_dims=seq_dims, no_restore_buffers=set(buffers)):
                yield
        finally:
            self.cp_options.enable_load_balance = saved

    # -- accuracy at the smallest S --

    def check(self, method, s, causal, cp_gqa):
        """Relative errors of out, dq, dk, dv against SDPA on the whole sequence."""
        q, k, v = make_qkv(self.b, self.hq, self.hkv, s, self.d, self.dtype, seed=s)
        g = torch.Generator(device=q.device).manual_seed(s + 1)  # the same dout on every rank
        dout = torch.randn(q.shape, device=q.device, dtype=q.dtype, generator=g)
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION]):
            ref = F.scaled_dot_product_attention(*leaves, is_causal=causal, enable_gqa=self.hkv != self.hq)
        ref = [ref.detach(), *torch.autograd.grad(ref, leaves, dout)]
        attend = self.attend_fn(method, causal, cp_gqa)
        if method == "ringfx":
            lay = layout_of(causal)
            local = [ringfx.shard(t, 2, layout=lay, group=self.group).contiguous() for t in (q, k, v, dout)]
            got = local_out_and_grads(attend, local)
            got = [ringfx.unshard(t, 2, layout=lay, group=self.group) for t in got]
        else:
            bufs = [t.clone() for t in (q, k, v, dout)]  # sharded in place by context_parallel
            with self.method_context(method, causal, bufs, [2] * 4):
                got = local_out_and_grads(attend, bufs)
                got = self.cp_unshard(self.mesh, got, [2] * 4)
        return {name: rel_error(a, b) for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref)}

    def choose_cp_gqa(self, method, s, causal):
        """"native" (enable_gqa=True) if CP's SDPA accepts it and is accurate on every rank, else "expand"."""
        try:
            err = max(self.check(method, s, causal, "native").values())
        except (RuntimeError, NotImplementedError) as e:  # a refused dispatch fails alike on every rank
            err = float("inf")
            if self.rank == 0:
                print(f"# {method}: enable_gqa=True failed ({type(e).__name__}: {str(e)[:200]}); "
                      "expanding K/V instead", flush=True)
        torch.cuda.empty_cache()
        (err,) = all_max([min(err, 1e9)])
        return "native" if err < 5e-2 else "expand"

    # -- timing and memory at one S --

    def trial(self, method, s, causal, cp_gqa, passes, iters, warmup):
        """{tag: (ms, peak GiB)} over ``passes`` (False: forward, True: forward+backward),
        largest over ranks, and the first pass that ran out of memory on any rank (or None)."""
        results, oom = {}, None
        for bwd in passes:
            tag = "fwd_bwd" if bwd else "fwd"
            failed, ms, peak = 0, 0.0, 0.0
            try:
                local = make_qkv(self.b, self.hq, self.hkv, s // self.world, self.d, self.dtype,
                                 seed=s + self.rank)
                pos = torch.arange(s, device=DEVICE)[None]
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                with self.method_context(method, causal, [pos], [1]):
                    step = make_step(self.attend_fn(method, causal, cp_gqa), local, bwd)
                    ms = timed(step, iters, warmup)
                peak = torch.cuda.max_memory_allocated() / 2**30
            except torch.OutOfMemoryError:
                failed = 1
            local = pos = step = None
            gc.collect()
            torch.cuda.empty_cache()
            failed, ms, peak = all_max([failed, ms, peak])
            if failed:
                oom = tag
                break
            results[tag] = (ms, peak)
        return results, oom

    def ideal(self, s, causal, passes):
        """Rank 0: {bwd: single-GPU SDPA ms on the whole problem}, None where it does not fit."""
        out = {}
        if self.rank == 0 and s <= parse_tokens(self.args.ideal_max_seq):
            try:
                q, k, v = make_qkv(self.b, self.hq, self.hkv, s, self.d, self.dtype, seed=s)
                for bwd in passes:
                    try:
                        out[bwd] = timed(run_sdpa(q, k, v, causal, bwd), self.args.iters)
                    except torch.OutOfMemoryError:
                        out[bwd] = None
                    torch.cuda.empty_cache()
            except torch.OutOfMemoryError:
                pass
            q = k = v = None
            gc.collect()
            torch.cuda.empty_cache()
        dist.barrier()
        return out


def layout_of(causal):
    return "zigzag" if causal else "contiguous"


def make_step(attend, tensors, backward):
    leaves = [t.detach().requires_grad_(backward) for t in tensors]
    dout = torch.randn_like(leaves[0]) if backward else None

    def step():
        out = attend(*leaves)
        if backward:
            torch.autograd.grad(out, leaves, dout)
        return out

    return step


def local_out_and_grads(attend, tensors):
    q, k, v, dout = tensors
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = attend(*leaves)
    return [out.detach(), *torch.autograd.grad(out, leaves, dout)]


def rel_error(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def all_max(values):
    t = torch.tensor([float(x) for x in values], device=DEVICE, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", default="32K,64K,128K,256K", help="timed total sequence lengths")
    p.add_argument("--modes", default="full,causal")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=None, help="K/V heads (GQA); default = --heads")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--kernel", default="auto", help="ringfx per-block kernel")
    p.add_argument("--cp-backends", default="cudnn,flash", help="SDPA backends context_parallel may use")
    p.add_argument("--cp-gqa", choices=("auto", "native", "expand"), default="auto")
    p.add_argument("--check-seq", default=None, help="S of the accuracy check; default: the first --seq")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--no-backward", action="store_true")
    p.add_argument("--ideal-max-seq", default="256K", help="largest S timed on one GPU for %% of ideal")
    p.add_argument("--max-seq", default="4M", help="stop doubling S beyond this; 0: no probing")
    p.add_argument("--probe-modes", default="causal", help="modes in which S doubles until OOM")
    p.add_argument("--timeout", type=int, default=900, help="NCCL collective timeout, seconds")
    p.add_argument("--out", default="benchmarks/results/vs_context_parallel_p{P}.json")
    args = p.parse_args(argv)

    if int(os.environ.get("WORLD_SIZE", "1")) < 2 or not torch.cuda.is_available():
        raise SystemExit("run under torchrun on >= 2 CUDA GPUs: "
                         "torchrun --nproc-per-node P benchmarks/vs_context_parallel.py ...")
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl", timeout=datetime.timedelta(seconds=args.timeout))
    bench = Bench(args)
    world, rank = bench.world, bench.rank
    methods = args.methods.split(",")
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise SystemExit(f"unknown methods {sorted(unknown)}; choose from {METHODS}")
    seqs = [parse_tokens(x) for x in args.seq.split(",")]
    bad = [s for s in seqs if s % (2 * world)]
    if bad:
        raise SystemExit(f"S must be divisible by 2·P = {2 * world} (zigzag and CP load balancing): {bad}")
    if bench.hq % bench.hkv:
        raise SystemExit(f"--heads {bench.hq} must be a multiple of --kv-heads {bench.hkv}")
    check_seq = parse_tokens(args.check_seq) if args.check_seq else seqs[0]
    if check_seq % (2 * world):
        raise SystemExit(f"--check-seq must be divisible by 2·P = {2 * world}")
    max_seq = parse_tokens(args.max_seq)
    passes = [False] if args.no_backward else [False, True]
    out_path = args.out.replace("{P}", str(world))
    common = {"ring": world, "batch": bench.b, "heads": bench.hq, "kv_heads": bench.hkv, "dim": bench.d,
              "dtype": "bfloat16", "device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "nccl": ".".join(map(str, torch.cuda.nccl.version()))}
    rows = []

    def emit(row):
        rows.append({**common, **row})
        if rank == 0:
            print_row(rows[-1])
            os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
            with open(out_path, "w") as f:
                json.dump(rows, f, indent=1)

    for mode in args.modes.split(","):
        causal = mode == "causal"
        checks, cp_gqa, reached, first_fail = {}, {}, {}, {}
        for method in methods:
            choice = args.cp_gqa if method != "ringfx" and bench.hkv != bench.hq else "none"
            if choice == "auto":
                choice = bench.choose_cp_gqa(method, check_seq, causal)
            cp_gqa[method] = choice
            checks[method] = bench.check(method, check_seq, causal, choice)
        probing = False
        todo = list(seqs)
        while todo:
            s = todo.pop(0)
            alive = [m for m in methods if m not in first_fail]
            if not alive:
                break
            ideal = {} if probing else bench.ideal(s, causal, passes)
            for method in alive:
                if probing:
                    res, oom = bench.trial(method, s, causal, cp_gqa[method], [passes[-1]], iters=1, warmup=0)
                else:
                    res, oom = bench.trial(method, s, causal, cp_gqa[method], passes, args.iters, 1)
                row = {"kind": "probe" if probing else "timing", "seq": s, "mode": mode, "method": method,
                       "layout": layout_of(causal) if method == "ringfx" else ("head-tail" if causal else "contiguous"),
                       "cp_gqa": cp_gqa[method], "status": f"oom in {oom}" if oom else "ok",
                       "check_seq": check_seq, "rel_error_vs_sdpa": max(checks[method].values()),
                       "rel_errors": checks[method]}
                for bwd in passes:
                    tag = "fwd_bwd" if bwd else "fwd"
                    if tag not in res:
                        continue
                    ms, peak = res[tag]
                    row[f"{tag}_peak_gib"] = peak
                    if probing:
                        row[f"{tag}_probe_ms"] = ms  # one cold step: not a timing
                        continue
                    flops = attention_flops(bench.b, bench.hq, s, bench.d, causal, bwd) / world
                    row[f"{tag}_ms"] = ms
                    row[f"{tag}_tflops"] = flops / ms / 1e9
                    sdpa_ms = ideal.get(bwd)
                    row[f"{tag}_sdpa_ms"] = sdpa_ms
                    row[f"{tag}_pct_ideal"] = 100 * sdpa_ms / world / ms if sdpa_ms else None
                if oom:
                    first_fail[method] = s
                else:
                    reached[method] = s
                emit(row)
            if not todo and mode in args.probe_modes.split(",") and 2 * s <= max_seq:
                todo, probing = [2 * s], True
        for method in methods if mode in args.probe_modes.split(",") and max_seq else []:
            emit({"kind": "max_seq", "mode": mode, "method": method, "max_seq": reached.get(method),
                  "first_oom_seq": first_fail.get(method), "capped_at": None if method in first_fail else s,
                  "cp_gqa": cp_gqa[method]})
    if rank == 0:
        print_table(rows)
        print(f"wrote {out_path}")
    dist.destroy_process_group()


def print_row(r):
    skip = ("ring", "batch", "heads", "kv_heads", "dim", "dtype", "device", "torch", "nccl", "rel_errors")
    print("# " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                          for k, v in r.items() if k not in skip and v is not None), flush=True)


def fmt(x, spec):
    """``format(x, spec)``, or a dash as wide as ``spec`` ("7.1f", "9d") for None."""
    return format(x, spec) if x is not None else "-".rjust(int(spec.rstrip("dfg").split(".")[0]))


def print_table(rows):
    first = rows[0]
    print(f"\n{first['device']}, P={first['ring']}, torch {first['torch']}, B={first['batch']} "
          f"H={first['heads']} Hkv={first['kv_heads']} D={first['dim']} bf16; TF: per-GPU TFLOP/s; "
          "GQA: how context_parallel got K/V heads (native: enable_gqa=True, expand: repeat_interleave)")
    head = (f"{'S':>8} {'mode':>6} {'method':>12} | {'fwd TF':>7} {'%ideal':>6} {'GiB':>6} | "
            f"{'f+b TF':>7} {'%ideal':>6} {'GiB':>6} | {'rel err':>8} {'GQA':>6} {'status':>12}")
    print(head)
    print("-" * len(head))
    for r in rows:
        if r["kind"] == "max_seq":
            continue
        star = "*" if r["kind"] == "probe" else " "
        print(f"{r['seq']:>7}{star} {r['mode']:>6} {r['method']:>12} | {fmt(r.get('fwd_tflops'), '7.1f')} "
              f"{fmt(r.get('fwd_pct_ideal'), '6.1f')} {fmt(r.get('fwd_peak_gib'), '6.1f')} | "
              f"{fmt(r.get('fwd_bwd_tflops'), '7.1f')} {fmt(r.get('fwd_bwd_pct_ideal'), '6.1f')} "
              f"{fmt(r.get('fwd_bwd_peak_gib'), '6.1f')} | {r['rel_error_vs_sdpa']:8.2e} {r['cp_gqa']:>6} "
              f"{r['status']:>12}")
    if any(r["kind"] == "probe" for r in rows):
        print("(* probe: one untimed step to find the largest S that fits)")
    maxima = [r for r in rows if r["kind"] == "max_seq"]
    if maxima:
        print(f"\n{'mode':>6} {'method':>12} {'cp_gqa':>7} | {'max S':>9} {'first OOM':>10}")
    for r in maxima:
        print(f"{r['mode']:>6} {r['method']:>12} {r['cp_gqa']:>7} | {fmt(r['max_seq'], '9d')} "
              f"{fmt(r['first_oom_seq'], '10d')}")


if __name__ == "__main__":
    main()
