"""Helpers for testing code on real rings of local CPU processes.

    def check(rank, world, x):              # a module-level (picklable) function
        ...                                 # torch.distributed is initialised (gloo)
        return value                        # any picklable value

    results = ringfx.testing.spawn_gloo(4, check, x)   # [value of rank 0, ..., rank 3]

    rows = ringfx.testing.map_in_processes(run_case, cases)  # independent cases, one per core

Ranks (and the workers of ``map_in_processes``) are forked from a server process that
has imported torch and ringfx once (``multiprocessing``'s forkserver; spawn where there
is none), so a ring starts in well under a second instead of paying an interpreter and
a torch import per rank; an exception on any rank is re-raised here with that rank's
traceback. The rendezvous
store lives in the calling process, so a rank that finishes (or dies) first cannot take
it away from ranks still setting up groups.

Comparing a transformed model with the original: ``float_outputs(out)`` names the
floating-point tensors of a model's output, ``max_abs_error(a, b)`` measures one pair,
``gradient_errors(params, ref_grads)`` compares every parameter's gradient.
"""

from __future__ import annotations

import concurrent.futures
import datetime
import multiprocessing
import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# what the fork server imports once, so that no rank pays for it (dynamo and inductor
# alone are ~3 s of CPU per process); a module that is not installed is skipped
PRELOAD = ("torch", "torch.distributed", "torch.distributed.device_mesh", "torch._dynamo", "torch._inductor",
           "functorch.compile", "ringfx", "ringfx.testing", "transformers")


def _start_method() -> str:
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return "spawn"
    # read when the server starts (the first call), a no-op afterwards
    multiprocessing.get_context("forkserver").set_forkserver_preload(list(PRELOAD))
    return "forkserver"


def _entry(rank, world_size, port, timeout, result_dir, fn, args):
    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=timeout)
    store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False, timeout=timeout)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=timeout)
    result = fn(rank, world_size, *args)  # an exception travels back to spawn_gloo
    torch.save(result, os.path.join(result_dir, f"{rank}.pt"))
    sys.stdout.flush()
    sys.stderr.flush()
    # skip gloo's teardown: after a peer died or timed out, its pending transfers can
    # abort the process on the way out, after the result is already safe
    os._exit(0)


def spawn_gloo(world_size: int, fn, *args, timeout: float = 120.0) -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` local processes joined in a
    gloo process group whose collective timeout is ``timeout`` seconds; return the
    per-rank results (None for a rank that returned nothing or exited early)."""
    store = dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=timeout))
    with tempfile.TemporaryDirectory() as result_dir:
        mp.start_processes(_entry, args=(world_size, store.port, timeout, result_dir, fn, args),
                           nprocs=world_size, join=True, start_method=_start_method())
        results = []
        for r in range(world_size):
            path = os.path.join(result_dir, f"{r}.pt")
            results.append(torch.load(path, weights_only=False) if os.path.exists(path) else None)
    del store
    return results



def map_in_processes(fn, items, processes: int | None = None) -> list:
    """``[fn(item) for item in items]`` computed in ``processes`` worker processes (default:
    one per CPU core, at most one per item), each with one thread and forked like the
    ranks of ``spawn_gloo``: cases that each keep one core busy compiling finish that
    many times sooner. ``fn`` must be a module-level function; the first exception raised
    by a case is raised here."""
    items = list(items)
    processes = max(1, min(processes or os.cpu_count() or 1, len(items)))
    context = multiprocessing.get_context(_start_method())
    with concurrent.futures.ProcessPoolExecutor(processes, mp_context=context, initializer=torch.set_num_threads,
                                                initargs=(1,)) as pool:
        return list(pool.map(fn, items))

def float_outputs(out) -> dict:
    """The floating-point tensors of a model's output (a ``ModelOutput`` or dict, a
    tuple, or a tensor) by name: ``{"logits": ..., "output[1]": ..., "hidden_states[0]": ...}``
    (a tuple or list of tensors inside a dict is named per element); caches and other
    non-tensors are left out."""
    if isinstance(out, torch.Tensor):
        return {"output": out}
    items = list(out.items()) if hasattr(out, "items") else [(f"output[{i}]", v) for i, v in enumerate(out)]
    flat = {}
    for k, v in items:
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            flat[k] = v
        elif isinstance(v, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in v):
            flat.update({f"{k}[{i}]": t for i, t in enumerate(v) if t.is_floating_point()})
    return flat


def max_abs_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest absolute difference of ``a`` and ``b``, computed in float64: ``inf``
    when their shapes differ, ``nan`` when any difference is nan, 0 for empty tensors."""
    if a.shape != b.shape:
        return float("inf")
    d = (a.detach().double() - b.detach().double()).abs()
    return float("nan") if d.isnan().any() else (d.max().item() if d.numel() else 0.0)


def gradient_errors(params: dict, ref_grads: dict, *, rtol: float, atol: float) -> tuple[str, float, list]:
    """Every parameter's ``.grad`` (``params``: name -> parameter) against ``ref_grads``
    (name -> tensor or None): ``(worst name, its max abs error, [what differs])``, a
    differing entry being the name, or ``"name: grad missing"`` / ``"name: grad unexpected"``."""
    worst, err, bad = "", 0.0, []
    for name, p in params.items():
        r, g = ref_grads.get(name), p.grad
        if (r is None) != (g is None):
            bad.append(f"{name}: grad {'missing' if g is None else 'unexpected'}")
            continue
        if r is None:
            continue
        e = max_abs_error(g, r)
        if not e <= err:  # nan counts as worst
            worst, err = name, e
        if not (g.shape == r.shape and torch.allclose(g, r, rtol=rtol, atol=atol)):
            bad.append(name)
    return worst, err, bad
