"""Helpers for testing code on real rings of local CPU processes.

    def check(rank, world, x):              # a module-level (picklable) function
        ...                                 # torch.distributed is initialised (gloo)
        return value                        # any picklable value

    results = ringfx.testing.spawn_gloo(4, check, x)   # [value of rank 0, ..., rank 3]

Ranks are started with ``torch.multiprocessing`` (spawn); an exception on any rank is
re-raised here with that rank's traceback.
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world_size, port, timeout, result_dir, fn, args):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout),
    )
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
    with tempfile.TemporaryDirectory() as result_dir:
        mp.start_processes(_entry, args=(world_size, free_port(), timeout, result_dir, fn, args),
                           nprocs=world_size, join=True, start_method="spawn")
        results = []
        for r in range(world_size):
            path = os.path.join(result_dir, f"{r}.pt")
            results.append(torch.load(path, weights_only=False) if os.path.exists(path) else None)
        return results
