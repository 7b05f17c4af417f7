"""Whole-sequence moves for a model sharded by the graph pass (zero-touch).

The sharding pass (``ringfx.passes.shard_sequence``) calls these from rewritten graphs:

    x_local = shard_sequence(x, dim, length, group_name, layout)        # pad, keep own tokens
    x_full  = gather_sequence(x_local, dim, length, group_name, layout) # all-gather, trim
    total   = all_reduce_sum(partial, group_name)                        # differentiable sum
    row     = select_token(x_local, dim, index, length, group_name, layout)

``length`` is the true global sequence length S; a ring pads it to a multiple of its
layout's unit (``padded_length``) so every rank holds the same number of tokens, and
the pad tokens are masked (``valid_tokens``) wherever tokens are combined.

Gradients follow one convention so that parameter gradients can be averaged over the
ring whatever path they took: the gradient a rank holds for any value, averaged over the
ring's ranks, is the true gradient. ``gather_sequence`` therefore reduce-scatters in its
backward (each rank's copy of the full gradient counts), ``all_reduce_sum`` all-reduces,
and a shard is a plain slice (its backward scatters into zeros). A loopback ring holds
every rank in one tensor, so there every move is a permutation and no averaging is needed.
"""

from __future__ import annotations


import torch
import torch.distributed as dist
from torch import Tensor

from .._compat import tracing_tensors
from .layout import chunks_per_rank, local_positions
from .ring import LoopbackRing, resolve_group


def padded_length(length: int, world: int, layout: str) -> int:
    """The smallest multiple of the layout's unit (P, or 2P for zigzag) holding ``length``."""
    unit = world * chunks_per_rank(layout)
    return -(-length // unit) * unit


def ring_world(group_name: str) -> int:
    """How many ranks the ring has."""
    return _world_rank(group_name)[0]


def is_loopback(group_name: str) -> bool:
    return _world_rank(group_name)[1] < 0


def _world_rank(group_name: str) -> tuple[int, int, object]:
    group = resolve_group(group_name)
    if isinstance(group, LoopbackRing):
        return group.size, -1, group
    return dist.get_world_size(group), dist.get_rank(group), group


_POSITIONS: dict = {}


def _token_positions(group_name: str, layout: str, padded: int, device: torch.device) -> Tensor:
    """Global positions of the tokens this process holds, in local order (every rank's,
    rank 0's first, on a loopback ring). Cached outside tracing only: while AOTAutograd or
    inductor traces a graph (``shard_sequence`` runs in the graph) a tensor made is a
    functional or fake one, which the ops' real kernels must never be handed, and a cached
    real one must not enter the traced graph."""
    key = (group_name, layout, padded, device)
    if tracing_tensors():
        key = None
    elif key in _POSITIONS:
        return _POSITIONS[key]
    world, rank, _ = _world_rank(group_name)
    s_local = padded // world
    ranks = range(world) if rank < 0 else (rank,)
    positions = torch.cat([local_positions(layout, r, world, s_local, device) for r in ranks])
    if key is not None and len(_POSITIONS) < 256:
        _POSITIONS[key] = positions
    return positions


def token_positions(group_name: str, layout: str, length: int, device) -> Tensor:
    world, _, _ = _world_rank(group_name)
    return _token_positions(group_name, layout, padded_length(length, world, layout), torch.device(device))


def valid_tokens(group_name: str, layout: str, length: int, device) -> Tensor:
    """Bool per local token: True for the sequence's own tokens, False for padding."""
    return token_positions(group_name, layout, length, device) < length


def valid_key_mask(q: Tensor, length: int, group_name: str, layout: str) -> Tensor:
    """A ring op's key padding mask ``(B, S_local)`` that hides the pad tokens (``q``:
    the op's ``(B, H, S_local, D)`` queries)."""
    return valid_tokens(group_name, layout, length, q.device).expand(q.shape[0], -1)


def local_length(group_name: str, layout: str, length: int) -> int:
    """How many tokens one rank holds (a loopback ring holds all of them)."""
    world, rank, _ = _world_rank(group_name)
    padded = padded_length(length, world, layout)
    return padded if rank < 0 else padded // world


def _pad_to(x: Tensor, dim: int, padded: int, fill) -> Tensor:
    extra = padded - x.shape[dim]
    if extra == 0:
        return x
    shape = list(x.shape)
    shape[dim] = extra
    return torch.cat([x, x.new_full(shape, fill)], dim)


def shard_sequence(x: Tensor, dim: int, length: int, group_name: str, layout: str, fill=0,
                   outer: int = 1, inner: int = 1) -> Tensor:
    """This process's tokens of the full-length ``x`` along ``dim`` (padded with ``fill``).

    ``outer``/``inner``: ``dim`` holds ``outer * length * inner`` values (a flattened
    ``(B, S, ...)``); the sequence is the middle factor."""
    dim = dim % x.dim()
    if outer != 1 or inner != 1:
        split = x.unflatten(dim, (outer, length, inner))
        local = shard_sequence(split, dim + 1, length, group_name, layout, fill)
        return local.flatten(dim, dim + 2)
    if x.shape[dim] != length:
        raise ValueError(f"shard_sequence: dim {dim} of {tuple(x.shape)} is not the sequence of {length} tokens")
    world, rank, _ = _world_rank(group_name)
    padded = padded_length(length, world, layout)
    x = _pad_to(x, dim, padded, fill)
    positions = _token_positions(group_name, layout, padded, x.device)
    if rank >= 0 and layout == "contiguous":
        s_local = padded // world
        return x.narrow(dim, rank * s_local, s_local)
    if rank < 0 and layout == "contiguous":
        return x
    return x.index_select(dim, positions)


def pad_sequence(x: Tensor, dim: int, length: int, group_name: str, layout: str, fill=0) -> Tensor:
    """``x`` with ``dim`` (full length, e.g. an attention bias's key columns) padded as the ring pads it."""
    world, _, _ = _world_rank(group_name)
    return _pad_to(x, dim % x.dim(), padded_length(length, world, layout), fill)


# ---- all-gather along the sequence (backward: reduce-scatter) -------------------------------------


def _gather_impl(x: Tensor, dim: int, length: int, group_name: str, layout: str) -> Tensor:
    world, rank, group = _world_rank(group_name)
    padded = padded_length(length, world, layout)
    positions = _token_positions(group_name, layout, padded, x.device)
    if rank >= 0:
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x, group=group)
        x = torch.cat(parts, dim)
        positions = torch.cat([_positions_of(layout, r, world, padded, x.device) for r in range(world)])
    full = torch.empty_like(x).index_copy_(dim, positions, x)
    return full.narrow(dim, 0, length).contiguous()


def _positions_of(layout, rank, world, padded, device):
    return local_positions(layout, rank, world, padded // world, device)


def _reduce_scatter_impl(grad: Tensor, dim: int, length: int, group_name: str, layout: str) -> Tensor:
    world, rank, group = _world_rank(group_name)
    padded = padded_length(length, world, layout)
    grad = _pad_to(grad, dim, padded, 0)
    if rank < 0:
        return grad.index_select(dim, _token_positions(group_name, layout, padded, grad.device)).contiguous()
    total = grad.contiguous()
    dist.all_reduce(total, group=group)
    return total.index_select(dim, _token_positions(group_name, layout, padded, grad.device)).contiguous()


def _full_shape(x: Tensor, dim: int, length: int) -> list:
    shape = list(x.shape)
    shape[dim] = length
    return shape


@torch.library.custom_op("ringfx::gather_sequence", mutates_args=())
def gather_sequence_op(x: Tensor, dim: int, length: int, group_name: str, layout: str) -> Tensor:
    return _gather_impl(x, dim, length, group_name, layout)


@gather_sequence_op.register_fake
def _(x, dim, length, group_name, layout):
    return x.new_empty(_full_shape(x, dim, length))


@torch.library.custom_op("ringfx::reduce_scatter_sequence", mutates_args=())
def reduce_scatter_sequence_op(grad: Tensor, dim: int, length: int, group_name: str, layout: str) -> Tensor:
    return _reduce_scatter_impl(grad, dim, length, group_name, layout)


@reduce_scatter_sequence_op.register_fake
def _(grad, dim, length, group_name, layout):
    shape = list(grad.shape)
    shape[dim] = local_length(group_name, layout, length)
    return grad.new_empty(shape)


def _gather_setup(ctx, inputs, output):
    ctx.args = inputs[1:]


def _gather_backward(ctx, grad):
    return (torch.ops.ringfx.reduce_scatter_sequence(grad, *ctx.args),) + (None,) * 4


def _reduce_scatter_backward(ctx, grad):
    return (torch.ops.ringfx.gather_sequence(grad, *ctx.args),) + (None,) * 4


gather_sequence_op.register_autograd(_gather_backward, setup_context=_gather_setup)
reduce_scatter_sequence_op.register_autograd(_reduce_scatter_backward, setup_context=_gather_setup)


def gather_sequence(x: Tensor, dim: int, length: int, group_name: str, layout: str) -> Tensor:
    """The full-length ``x`` (global order, padding trimmed) from every rank's tokens."""
    return torch.ops.ringfx.gather_sequence(x, dim % x.dim(), length, group_name, layout)


# ---- sums over the ring ---------------------------------------------------------------------------


@torch.library.custom_op("ringfx::all_reduce_sum", mutates_args=())
def all_reduce_sum_op(x: Tensor, group_name: str) -> Tensor:
    world, rank, group = _world_rank(group_name)
    out = x.clone()
    if rank >= 0 and world > 1:
        dist.all_reduce(out, group=group)
    return out


@all_reduce_sum_op.register_fake
def _(x, group_name):
    return torch.empty_like(x)


def _sum_setup(ctx, inputs, output):
    ctx.group_name = inputs[1]


def _sum_backward(ctx, grad):
    return torch.ops.ringfx.all_reduce_sum(grad, ctx.group_name), None


all_reduce_sum_op.register_autograd(_sum_backward, setup_context=_sum_setup)


def all_reduce_sum(x: Tensor, group_name: str) -> Tensor:
    """The sum over the ring's ranks of every rank's ``x`` (differentiable)."""
    return torch.ops.ringfx.all_reduce_sum(x, group_name)


def select_token(x: Tensor, dim: int, index: int, length: int, group_name: str, layout: str) -> Tensor:
    """``x.select(dim, index)`` of the full sequence, from the rank that holds token ``index``."""
    dim = dim % x.dim()
    index = index % length
    positions = token_positions(group_name, layout, length, x.device)
    hits = (positions == index).nonzero().flatten().tolist()
    world, rank, _ = _world_rank(group_name)
    if rank < 0:
        return x.select(dim, hits[0])
    if hits:
        local = x.select(dim, hits[0])
    else:  # zeros, still connected to x: every rank must take part in the backward's all-reduce
        local = torch.where(torch.zeros((), dtype=torch.bool, device=x.device), x.select(dim, 0), 0)
    return all_reduce_sum(local, group_name)


def mask_padding(x: Tensor, dim: int, length: int, group_name: str, layout: str, fill=0) -> Tensor:
    """``x`` with the pad tokens along ``dim`` set to ``fill`` (no-op when nothing is padded)."""
    world, _, _ = _world_rank(group_name)
    if padded_length(length, world, layout) == length:
        return x
    dim = dim % x.dim()
    valid = valid_tokens(group_name, layout, length, x.device)
    shape = [1] * x.dim()
    shape[dim] = valid.numel()
    return torch.where(valid.view(shape), x, torch.as_tensor(fill, dtype=x.dtype, device=x.device))
