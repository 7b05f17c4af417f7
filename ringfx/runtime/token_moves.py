"""Tokens that cross shard boundaries: shifts, windows and halos (zero-touch).

Some ops outside attention read a few tokens past the edge of a rank's shard: a slice
that drops the first token (``logits[:, :-1]``), a pad by k tokens, ``torch.roll``, a
convolution over the tokens. Each is exact on a ring once every rank has the tokens it
reads, which are (almost all) its own plus a few of its neighbours'. One move does it:

    y_local = take_tokens(x_local, dim, length, spec, fill, group_name, layout)

where ``spec`` says which global token of ``x`` (a sequence of ``length`` tokens) each
output token is:

* ``"shift:N:OFFSET:WRAP"``: ``y`` is a sequence of N tokens, sharded as any sequence of N
  tokens is (the same layout, padded as the ring pads it), and ``y[t] = x[t + OFFSET]``
  (``(t + OFFSET) mod length`` if WRAP is 1); outside ``x``: ``fill``.
* ``"halo:N:LEFT:RIGHT"``: for each of this rank's chunks ``[a, b)`` of a sequence of N
  tokens, the window ``x[a - LEFT : b + RIGHT]`` (outside ``x``: ``fill``), the windows
  concatenated: what a convolution needs to produce its outputs ``[a, b)``.

Every rank computes the same plan from the spec, so the tokens travel in one
``all_to_all`` (each rank sends exactly the tokens others read, nothing more); the
backward sends the gradients back the same way and adds them up where a token was read
twice (halos overlap). On a loopback ring (every rank's tokens in one tensor, rank 0's
first) a move is an index.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import torch.distributed as dist
from torch import Tensor

from .collectives import _world_rank, padded_length
from .layout import chunk_ranges, chunks_per_rank


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Where each rank's output tokens come from: ``sources[r]`` lists, in rank r's
    output order, ``(source rank, source local index)`` or None (``fill``)."""

    sources: tuple
    out_local: int  # output tokens per rank
    src_local: int  # input tokens per rank


def _wanted(spec: str, length: int, world: int, layout: str) -> tuple[list, int]:
    """Global source positions (-1: fill) of each rank's output tokens, and the count per rank."""
    kind, *nums = spec.split(":")
    if kind == "shift":
        new_length, offset, wrap = int(nums[0]), int(nums[1]), nums[2] == "1"
        per = padded_length(new_length, world, layout) // world
        wanted = []
        for r in range(world):
            src = []
            for a, b in chunk_ranges(layout, r, world, per):
                for t in range(a, b):
                    p = (t + offset) % length if wrap else t + offset
                    src.append(p if t < new_length and 0 <= p < length else -1)
            wanted.append(src)
        return wanted, per
    if kind == "halo":
        out_length, left, right = (int(n) for n in nums)
        per = padded_length(out_length, world, layout) // world
        wanted = []
        for r in range(world):
            src = []
            for a, b in chunk_ranges(layout, r, world, per):
                src.extend(p if 0 <= p < length else -1 for p in range(a - left, b + right))
            wanted.append(src)
        return wanted, len(wanted[0])
    raise ValueError(f"take_tokens: unknown spec {spec!r}")


@functools.lru_cache(maxsize=256)
def _plan(spec: str, length: int, world: int, layout: str) -> _Plan:
    src_local = padded_length(length, world, layout) // world
    owner = {}
    for s in range(world):
        j = 0
        for a, b in chunk_ranges(layout, s, world, src_local):
            for p in range(a, b):
                owner[p] = (s, j)
                j += 1
    wanted, out_local = _wanted(spec, length, world, layout)
    sources = tuple(tuple(owner[p] if p >= 0 else None for p in src) for src in wanted)
    return _Plan(sources, out_local, src_local)


@functools.lru_cache(maxsize=256)
def _exchange(spec: str, length: int, world: int, layout: str, rank: int, device: torch.device):
    """Index tensors for one rank of a real ring: what it sends (local indices, grouped by
    destination rank), how many to each rank, where what it receives goes (output
    indices, grouped by source rank) and how many from each."""
    plan = _plan(spec, length, world, layout)
    send, send_counts = [], []
    for r in range(world):
        mine = [src[1] for src in plan.sources[r] if src is not None and src[0] == rank]
        send.extend(mine)
        send_counts.append(len(mine))
    place, recv_counts = [], []
    for s in range(world):
        got = [i for i, src in enumerate(plan.sources[rank]) if src is not None and src[0] == s]
        place.extend(got)
        recv_counts.append(len(got))
    as_index = functools.partial(torch.tensor, dtype=torch.int64, device=device)
    return as_index(send), send_counts, as_index(place), recv_counts


@functools.lru_cache(maxsize=256)
def _loopback_index(spec: str, length: int, world: int, layout: str, device: torch.device):
    """For every rank's outputs in one tensor: the index into every rank's inputs, and
    which outputs are read (the others are ``fill``)."""
    plan = _plan(spec, length, world, layout)
    flat = [-1 if src is None else src[0] * plan.src_local + src[1] for r in range(world) for src in plan.sources[r]]
    index = torch.tensor(flat, dtype=torch.int64, device=device)
    read = index >= 0
    return read.nonzero().flatten(), index[read]


def _out_tokens(spec: str, length: int, group_name: str, layout: str) -> int:
    world, rank, _ = _world_rank(group_name)
    per = _plan(spec, length, world, layout).out_local
    return per * world if rank < 0 else per


def _take_impl(x: Tensor, dim: int, length: int, spec: str, fill: float, group_name: str, layout: str) -> Tensor:
    world, rank, group = _world_rank(group_name)
    xm = x.movedim(dim, 0)
    out = xm.new_full((_out_tokens(spec, length, group_name, layout), *xm.shape[1:]), fill)
    if rank < 0:
        outputs, inputs = _loopback_index(spec, length, world, layout, x.device)
        out[outputs] = xm[inputs]
    else:
        send, send_counts, place, recv_counts = _exchange(spec, length, world, layout, rank, x.device)
        received = xm.new_empty((sum(recv_counts), *xm.shape[1:]))
        dist.all_to_all_single(received, xm[send].contiguous(), recv_counts, send_counts, group=group)
        out[place] = received
    return out.movedim(0, dim).contiguous()


def _give_back_impl(grad: Tensor, dim: int, length: int, spec: str, group_name: str, layout: str) -> Tensor:
    """The transpose of ``take_tokens``: each output token's gradient added to the input
    token it was read from, on the rank that holds it."""
    world, rank, group = _world_rank(group_name)
    gm = grad.movedim(dim, 0)
    src_local = _plan(spec, length, world, layout).src_local
    out = gm.new_zeros((src_local * (world if rank < 0 else 1), *gm.shape[1:]))
    if rank < 0:
        outputs, inputs = _loopback_index(spec, length, world, layout, grad.device)
        out.index_add_(0, inputs, gm[outputs])
    else:
        send, send_counts, place, recv_counts = _exchange(spec, length, world, layout, rank, grad.device)
        back = gm.new_empty((sum(send_counts), *gm.shape[1:]))
        dist.all_to_all_single(back, gm[place].contiguous(), send_counts, recv_counts, group=group)
        out.index_add_(0, send, back)
    return out.movedim(0, dim).contiguous()


def _with_tokens(x: Tensor, dim: int, count: int) -> Tensor:
    shape = list(x.shape)
    shape[dim] = count
    return x.new_empty(shape)


@torch.library.custom_op("ringfx::take_tokens", mutates_args=())
def take_tokens_op(x: Tensor, dim: int, length: int, spec: str, fill: float, group_name: str,
                   layout: str) -> Tensor:
    return _take_impl(x, dim, length, spec, fill, group_name, layout)


@take_tokens_op.register_fake
def _(x, dim, length, spec, fill, group_name, layout):
    return _with_tokens(x, dim, _out_tokens(spec, length, group_name, layout))


@torch.library.custom_op("ringfx::give_back_tokens", mutates_args=())
def give_back_tokens_op(grad: Tensor, dim: int, length: int, spec: str, group_name: str, layout: str) -> Tensor:
    return _give_back_impl(grad, dim, length, spec, group_name, layout)


@give_back_tokens_op.register_fake
def _(grad, dim, length, spec, group_name, layout):
    world, rank, _ = _world_rank(group_name)
    src_local = _plan(spec, length, world, layout).src_local
    return _with_tokens(grad, dim, src_local * (world if rank < 0 else 1))


def _take_setup(ctx, inputs, output):
    ctx.args = (inputs[1], inputs[2], inputs[3], inputs[5], inputs[6])


def _take_backward(ctx, grad):
    return (torch.ops.ringfx.give_back_tokens(grad, *ctx.args),) + (None,) * 6


def _give_back_setup(ctx, inputs, output):
    ctx.args = inputs[1:]


def _give_back_backward(ctx, grad):
    dim, length, spec, group_name, layout = ctx.args
    return (torch.ops.ringfx.take_tokens(grad, dim, length, spec, 0.0, group_name, layout),) + (None,) * 5


take_tokens_op.register_autograd(_take_backward, setup_context=_take_setup)
give_back_tokens_op.register_autograd(_give_back_backward, setup_context=_give_back_setup)


def take_tokens(x: Tensor, dim: int, length: int, spec: str, fill, group_name: str, layout: str) -> Tensor:
    """This rank's output tokens of the move ``spec`` (module docstring) from the sharded ``x``."""
    return torch.ops.ringfx.take_tokens(x, dim % x.dim(), length, spec, float(fill), group_name, layout)


def shift_spec(new_length: int, offset: int, wrap: bool = False) -> str:
    return f"shift:{new_length}:{offset}:{int(wrap)}"


def conv1d_over_sequence(x: Tensor, weight: Tensor, bias, left: int, right: int, dilation: int, groups: int,
                         length: int, out_length: int, group_name: str, layout: str) -> Tensor:
    """``F.conv1d(F.pad(x, (left, right)), weight, bias, dilation=dilation, groups=groups)``
    over a sequence sharded along ``x``'s last axis: each output chunk's window of input
    tokens (its own, plus ``dilation * (k - 1)`` beyond it) is brought in by one move, and
    the convolution runs on the windows with no padding."""
    span = dilation * (weight.shape[-1] - 1)
    windows = take_tokens(x, -1, length, f"halo:{out_length}:{left}:{span - left}", 0.0, group_name, layout)
    world, rank, _ = _world_rank(group_name)
    per = padded_length(out_length, world, layout) // world
    chunks = chunks_per_rank(layout) * (world if rank < 0 else 1)
    y = torch.nn.functional.conv1d(windows, weight, bias, dilation=dilation, groups=groups)
    # each window of (c + span) inputs gives c outputs, then span that straddle two windows
    c = per // chunks_per_rank(layout)
    y = torch.nn.functional.pad(y, (0, span))
    return y.unflatten(-1, (chunks, c + span))[..., :c].flatten(-2)
