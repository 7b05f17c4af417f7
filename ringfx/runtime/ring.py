"""Rings: who sends to whom, over a real process group or a loopback of virtual ranks.

The ring algorithm (``algorithm.py``) is written once, per rank, as a generator that
*yields* its communication requests (``Exchange``, ``AllGather``) and gets back a
handle. Two drivers run it:

* ``run_on_group``: one program, one real ``ProcessGroup`` (gloo on CPU, NCCL on CUDA);
  an ``Exchange`` posts ``batch_isend_irecv`` at once and returns a handle that is
  waited on later, so the transfer overlaps the compute that runs in between.
* ``run_loopback``: P programs in one process, advanced in lock step; an ``Exchange``
  hands each virtual rank its neighbour's tensors (no copy). This is the loopback ring
  used by the unit tests and by single-GPU efficiency measurements.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import re
from typing import Any, Generator, Sequence

import torch
import torch.distributed as dist

from .._compat import process_group_timeout, resolve_process_group

log = logging.getLogger("ringfx.runtime.ring")

_LOOPBACK = re.compile(r"^loopback:(\d+)$")


class LoopbackRing:
    """A ring of ``size`` virtual ranks inside one process.

    Tensors given to ring ops on a loopback ring hold *all* ranks' shards concatenated
    along the sequence, rank 0's first (what ``ringfx.shard`` returns for it).
    """

    def __init__(self, size: int):
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"LoopbackRing(size={size!r}): size must be a positive int")
        self.size = size
        self.group_name = f"loopback:{size}"

    def __repr__(self) -> str:
        return f"LoopbackRing({self.size})"


def group_name_of(group: Any) -> str:
    """The string that names ``group`` inside the op schema (process groups are not a
    schema type). Accepts None (the default group), a ProcessGroup, a 1-D DeviceMesh,
    ``(mesh, dim)``, a LoopbackRing or a name."""
    if isinstance(group, str):
        resolve_group(group)
        return group
    if isinstance(group, LoopbackRing):
        return group.group_name
    if group is None:
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError(
                "group=None means the default process group, but torch.distributed is not "
                "initialised; call dist.init_process_group(...) (torchrun does) or pass "
                "group=ringfx.LoopbackRing(P) to run P virtual ranks in this process"
            )
        group = dist.group.WORLD
    if isinstance(group, tuple) and len(group) == 2:
        mesh, dim = group
        group = mesh.get_group(dim)
    if type(group).__name__ == "DeviceMesh":
        if group.ndim != 1:
            raise ValueError(
                f"a {group.ndim}-D DeviceMesh names no single ring; pass mesh['cp'] or (mesh, 'cp')"
            )
        group = group.get_group()
    if isinstance(group, dist.ProcessGroup):
        return group.group_name
    raise TypeError(
        f"group must be None, a ProcessGroup, a 1-D DeviceMesh, (mesh, dim) or a LoopbackRing, "
        f"not {type(group).__name__}"
    )


def resolve_group(name: str) -> LoopbackRing | dist.ProcessGroup:
    m = _LOOPBACK.match(name)
    if m:
        return LoopbackRing(int(m.group(1)))
    try:
        return resolve_process_group(name)
    except RuntimeError as e:  # no group of that name
        raise ValueError(
            f"no process group named {name!r} in this process; create the ring with "
            "dist.new_group / init_process_group before calling ring attention"
        ) from e


def ring_size(group: Any) -> int:
    g = resolve_group(group_name_of(group))
    return g.size if isinstance(g, LoopbackRing) else dist.get_world_size(g)


# -- the requests a rank program yields --------------------------------------------


@dataclasses.dataclass
class Exchange:
    """Send ``tensors`` to rank ``(r + shift) % P`` and receive the same shapes from
    ``(r - shift) % P``. The driver answers with a handle whose ``wait()`` returns the
    received tensors."""

    tensors: Sequence[torch.Tensor]
    shift: int = 1
    stream: Any = None  # CUDA stream to order the transfer after (None: the current one)


@dataclasses.dataclass
class AllGather:
    """Gather one small tensor from every rank; answered with a (P, ...) tensor.
    ``device``: where a real group's collective runs (the loopback ring stays put, so a
    CPU tensor costs it no device synchronisation)."""

    tensor: torch.Tensor
    device: Any = None


class _Ready:
    def __init__(self, tensors):
        self._tensors = tensors

    def wait(self):
        return self._tensors


RankProgram = Generator[Any, Any, Any]


def run_loopback(programs: list[RankProgram]) -> list[Any]:
    """Advance P rank programs in lock step; every rank must issue the same requests."""
    world = len(programs)
    results: list[Any] = [None] * world
    requests: list[Any] = []
    for g in programs:
        requests.append(_advance(g, None, results, len(requests)))
    while not all(isinstance(r, _Done) for r in requests):
        kinds = {type(r) for r in requests}
        if len(kinds) != 1:
            raise RuntimeError(f"loopback ring ranks diverged: requests {[type(r).__name__ for r in requests]}")
        first = requests[0]
        if isinstance(first, Exchange):
            answers = [_Ready(list(requests[(r - first.shift) % world].tensors)) for r in range(world)]
        elif isinstance(first, AllGather):
            stacked = torch.stack([r.tensor for r in requests])
            answers = [stacked] * world
        else:
            raise TypeError(f"unknown ring request {first!r}")
        requests = [_advance(g, a, results, r) for r, (g, a) in enumerate(zip(programs, answers))]
    return results


class _Done:
    pass


def _advance(gen, answer, results, rank):
    try:
        return gen.send(answer)
    except StopIteration as stop:
        results[rank] = stop.value
        return _Done()


class _Pending:
    def __init__(self, works, received, group, timeout, outstanding: set):
        self._works, self._received, self._group, self._timeout = works, received, group, timeout
        self._outstanding = outstanding
        outstanding.add(self)

    def wait(self):
        for w in self._works:
            try:
                ok = w.wait(self._timeout) if self._timeout is not None else w.wait()
            except RuntimeError as e:  # a dead or stuck peer ends here (NCCL's DistBackendError is one)
                raise _peer_failure(self._group, e) from e
            if ok is False:
                raise _peer_failure(self._group, "a ring transfer timed out")
        self._outstanding.discard(self)
        return self._received

    def drain(self):
        """Wait for the transfers, if not done yet, without raising (the caller is already
        raising); one that cannot complete marks the group unusable."""
        try:
            self.wait()
        except RuntimeError:
            pass


# group name -> why ring attention can no longer use it
_UNUSABLE: dict[str, str] = {}


def _peer_failure(group, error) -> RuntimeError:
    message = (f"ring attention: rank {dist.get_rank(group)} of group {group.group_name!r} could not complete a "
               f"ring transfer; a peer has died or is stuck (the group's timeout bounds the wait): {error}")
    _UNUSABLE[group.group_name] = message
    return RuntimeError(message)


def check_usable(group: dist.ProcessGroup) -> None:
    """Refuse a group that an earlier ring call left with transfers that never completed:
    its next transfers would be matched with those."""
    why = _UNUSABLE.get(group.group_name)
    if why is not None:
        raise RuntimeError(f"process group {group.group_name!r} is no longer usable by ringfx: an earlier call "
                           f"failed with: {why}. Create a new process group (dist.new_group) for the ring")


def gather_small(tensor: torch.Tensor, group: dist.ProcessGroup, device=None) -> torch.Tensor:
    """All-gather one small tensor from every rank of ``group``: a (P, ...) tensor.
    ``device``: where the collective runs when the group cannot take CPU tensors."""
    # a group with a CPU backend too ("cpu:gloo,cuda:nccl") gathers CPU tensors there: the
    # host then waits for the other ranks only, not for this GPU's queued work
    if dist.get_world_size(group) == 1:  # a ring of one: nothing to gather, no collective to wait for
        return tensor[None]
    on = device or tensor.device
    if tensor.device.type == "cpu" and backend_mismatch(str(dist.get_backend(group)), "cpu") is None:
        on = tensor.device
    tensor = tensor.to(on).contiguous()
    out = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    try:
        dist.all_gather(out, tensor, group=group)
    except RuntimeError as e:  # a dead or stuck peer ends here
        raise _peer_failure(group, e) from e
    return torch.stack(out)


def group_timeout(group: dist.ProcessGroup, device: torch.device | None = None) -> datetime.timedelta | None:
    """The group's collective timeout (what bounds a wait on a dead or stuck peer), read
    from the backend that serves ``device``; None where the backend does not expose it
    (its own watchdog still applies)."""
    return process_group_timeout(group, device or torch.device("cpu"))


def drive(program: RankProgram, exchange, all_gather) -> Any:
    """Run one rank program to its end, answering each ``Exchange`` with
    ``exchange(request)`` and each ``AllGather`` with ``all_gather(request)``."""
    answer = None
    while True:
        try:
            request = program.send(answer)
        except StopIteration as stop:
            return stop.value
        if isinstance(request, Exchange):
            answer = exchange(request)
        elif isinstance(request, AllGather):
            answer = all_gather(request)
        else:
            raise TypeError(f"unknown ring request {request!r}")


def run_on_group(program: RankProgram, group: dist.ProcessGroup, device: torch.device | None = None) -> Any:
    """Drive one rank program over a real process group (``device``: the tensors')."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    timeout = group_timeout(group, device)

    outstanding: set = set()  # posted transfers not yet waited for

    def exchange(request: Exchange):
        if request.stream is None:
            return _post_exchange(request, group, rank, world, timeout, outstanding)
        with torch.cuda.stream(request.stream):
            return _post_exchange(request, group, rank, world, timeout, outstanding)

    def all_gather(request: AllGather):
        return gather_small(request.tensor, group, request.device)

    check_usable(group)
    try:
        return drive(program, exchange, all_gather)
    except Exception as e:
        if outstanding and group.group_name not in _UNUSABLE:
            # complete this rank's posted transfers before raising: a transfer left
            # pending would be matched by the next call's and mix the two calls' data
            for handle in list(outstanding):
                handle.drain()
            note = getattr(e, "add_note", None)  # Python 3.11+
            if note is not None:
                note(f"ring attention failed on rank {rank} after its ring transfers had started; they were "
                     "completed before raising, so the group stays usable where every rank failed at the same "
                     "step (a rank that did not fail reports a dead or stuck peer after the group's timeout)")
        raise


def _post_exchange(request: Exchange, group, rank, world, timeout, outstanding: set):
    shift = request.shift % world
    if shift == 0:
        return _Ready(list(request.tensors))
    dst = dist.get_global_rank(group, (rank + shift) % world)
    src = dist.get_global_rank(group, (rank - shift) % world)
    received = [torch.empty_like(t) for t in request.tensors]
    ops = [dist.P2POp(dist.isend, t, dst, group) for t in request.tensors]
    ops += [dist.P2POp(dist.irecv, t, src, group) for t in received]
    works = dist.batch_isend_irecv(ops)
    return _Pending(works, received, group, timeout, outstanding)


def backend_mismatch(backend: str, device_type: str) -> str | None:
    """Why a group of ``backend`` cannot carry tensors of ``device_type`` (None if it can)."""
    backend = backend.lower()
    if ":" in backend:  # e.g. "cpu:gloo,cuda:nccl": one backend per device type
        table = dict(part.split(":", 1) for part in backend.split(","))
        if device_type in table:
            return None
        return (f"the process group has no backend for {device_type} tensors ({backend}); "
                f"add one, e.g. 'cpu:gloo,cuda:nccl'")
    if device_type == "cuda" and backend == "gloo":
        return ("ring attention got CUDA tensors but a gloo process group; create the ring with "
                "backend='nccl' (or 'cpu:gloo,cuda:nccl'), or move the tensors to the CPU")
    if device_type == "cpu" and backend == "nccl":
        return ("ring attention got CPU tensors but an NCCL process group; use a gloo group for CPU "
                "tensors (backend='gloo' or 'cpu:gloo,cuda:nccl'), or move the tensors to CUDA")
    return None


def check_backend(group: dist.ProcessGroup, device: torch.device) -> None:
    """Refuse a group whose backend cannot move tensors of ``device``."""
    problem = backend_mismatch(str(dist.get_backend(group)), device.type)
    if problem:
        raise ValueError(problem)
