"""Ring attention on real multi-process gloo rings: one spawn per ring size runs the
whole case matrix; bad input across ranks; a dead or stuck peer."""

import os
import time

import pytest
import torch

import ringfx
from ringfx.runtime.ring import backend_mismatch
from ringfx.testing import spawn_gloo
from ring_cases import TOLERANCE, Case, matrix, run_case

pytestmark = pytest.mark.gloo


def _matrix_on_ring(rank, world):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    results = []
    for i, case in enumerate(matrix()):
        results.append((case, "float64", run_case(case, None, torch.float64, seed=i)))
    for i, case in enumerate(matrix(quick=True)[::3]):
        results.append((case, "float32", run_case(case, dist.group.WORLD, torch.float32, seed=50 + i)))
    mesh = init_device_mesh("cpu", (world,))
    case = Case(layout="zigzag", causal=True, hq=8, hkv=2)
    results.append((case, "float64 mesh", run_case(case, mesh, torch.float64, seed=99)))
    return results


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_matrix_on_gloo_ring(world):
    failures = []
    for rank, results in enumerate(spawn_gloo(world, _matrix_on_ring)):
        for case, dtype, errors in results:
            tol = TOLERANCE[torch.float64 if dtype.startswith("float64") else torch.float32]
            if not max(errors) < tol:
                failures.append((rank, dtype, case, errors))
    assert not failures, failures


def _value_error_message(rank, world, s_local, causal_ranks):
    """Call the op with this rank's local length and causal flag; return the ValueError."""
    q = torch.randn(1, 2, s_local[rank], 8)
    try:
        ringfx.ring_attention(q, q, q, causal=rank in causal_ranks)
    except ValueError as e:
        return str(e)
    return None


def test_different_local_lengths_raise_on_every_rank():
    messages = spawn_gloo(3, _value_error_message, [6, 4, 4], ())
    assert all(m and "different local sequence lengths [6, 4, 4]" in m for m in messages), messages


def test_disagreeing_options_raise():
    messages = spawn_gloo(2, _value_error_message, [4, 4], (1,))
    assert all(m and "disagree on the causal" in m for m in messages), messages


def _peer_fails(rank, world, mode, timeout):
    q = torch.randn(1, 2, 8, 8, requires_grad=True)
    if rank == 1:
        if mode == "dead-mid-ring":
            ringfx.ring_attention(q, q, q, causal=True)  # the forward ring completes ...
            os._exit(0)  # ... and this rank dies before the backward ring
        if mode == "dead":
            os._exit(0)  # dies without a word, sockets close
        time.sleep(timeout + 4)  # stuck: never joins the ring
        return None
    out = ringfx.ring_attention(q, q, q, causal=True) if mode == "dead-mid-ring" else None
    start = time.monotonic()
    try:
        if out is not None:
            out.sum().backward()
        else:
            ringfx.ring_attention(q, q, q, causal=True)
    except RuntimeError as e:
        return time.monotonic() - start, str(e)
    return None


@pytest.mark.parametrize("mode", ["dead", "dead-mid-ring", "stuck"])
def test_failed_peer_raises_within_timeout(mode):
    timeout = 4
    results = spawn_gloo(3, _peer_fails, mode, timeout, timeout=timeout)
    for rank in (0, 2):
        assert results[rank] is not None, f"rank {rank} did not raise"
        elapsed, message = results[rank]
        assert elapsed < timeout + 5, elapsed
        assert "peer has died or is stuck" in message


def test_backend_mismatch_messages():
    assert "nccl" in backend_mismatch("gloo", "cuda")
    assert "gloo" in backend_mismatch("nccl", "cpu")
    assert backend_mismatch("gloo", "cpu") is None
    assert backend_mismatch("nccl", "cuda") is None
    assert backend_mismatch("cpu:gloo,cuda:nccl", "cuda") is None
    assert "no backend for cuda" in backend_mismatch("cpu:gloo", "cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_on_gloo_group_are_refused():
    assert "nccl" in spawn_gloo(1, _cuda_on_gloo)[0]


def _cuda_on_gloo(rank, world):
    q = torch.randn(1, 2, 4, 8, device="cuda")
    try:
        ringfx.ring_attention(q, q, q)
    except ValueError as e:
        return str(e)


def _world_timeout(rank, world):
    from ringfx.runtime.ring import group_timeout
    import torch.distributed as dist

    return group_timeout(dist.group.WORLD).total_seconds()


def test_group_timeout_is_read_from_the_backend():
    assert spawn_gloo(1, _world_timeout, timeout=7) == [7.0]
