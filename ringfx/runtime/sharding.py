"""Moving whole tensors onto a ring and back: ``shard``, ``unshard``, ``positions``.

For a real group, ``shard`` returns this rank's tokens (in layout order) and
``unshard`` all-gathers them back into global order (differentiable: its backward
hands each rank the gradient of its own tokens). For a ``LoopbackRing`` the process
plays every rank, so ``shard`` returns all ranks' shards concatenated (a permutation
of the sequence) and ``unshard`` inverts it.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from .layout import LAYOUTS, check_divisible, check_layout, chunk_ranges, layout_permutation, local_positions
from .ring import LoopbackRing, check_usable, gather_small, group_name_of, resolve_group


def _ring(group):
    return resolve_group(group_name_of(group))


def _sequence_dim(x: torch.Tensor, dim: int) -> int:
    """``dim`` as a non-negative index, refused like torch refuses an out-of-range dim."""
    n = x.dim()
    if not -max(n, 1) <= dim < max(n, 1):
        raise IndexError(f"Dimension out of range (expected to be in range of [{-max(n, 1)}, {max(n, 1) - 1}], "
                         f"but got {dim}): dim names the sequence dimension of a {n}-D tensor")
    return dim % max(n, 1)


def _own_tokens(x: torch.Tensor, dim: int, layout: str, rank: int, world: int) -> torch.Tensor:
    """The tokens of ``rank`` from a full-length ``x`` (a view when they are one chunk)."""
    s_local = check_divisible(layout, x.shape[dim], world)
    parts = [x.narrow(dim, a, b - a) for a, b in chunk_ranges(layout, rank, world, s_local)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def shard(x: torch.Tensor, dim: int, *, layout: str = "contiguous", group=None) -> torch.Tensor:
    """This rank's part of ``x`` along the sequence dimension ``dim``."""
    check_layout(layout)
    dim = _sequence_dim(x, dim)
    ring = _ring(group)
    if isinstance(ring, LoopbackRing):
        if layout == "contiguous":
            check_divisible(layout, x.shape[dim], ring.size)
            return x
        return x.index_select(dim, layout_permutation(layout, ring.size, x.shape[dim], x.device))
    return _own_tokens(x, dim, layout, dist.get_rank(ring), dist.get_world_size(ring))


def unshard(x: torch.Tensor, dim: int, *, layout: str = "contiguous", group=None) -> torch.Tensor:
    """The full tensor, in global order, from every rank's shard along ``dim``. On a real
    group every rank must pass a shard of the same shape (checked first: a ValueError
    on every rank otherwise)."""
    check_layout(layout)
    dim = _sequence_dim(x, dim)
    ring = _ring(group)
    if isinstance(ring, LoopbackRing):
        if layout == "contiguous":
            return x
        perm = layout_permutation(layout, ring.size, x.shape[dim], x.device)
        return x.index_select(dim, torch.argsort(perm))
    return _GatherSequence.apply(x, dim, layout, ring)


def positions(seq_len: int, *, layout: str = "contiguous", group=None, device=None) -> torch.Tensor:
    """Global positions of the ``seq_len`` tokens this process holds (for a loopback ring,
    ``seq_len`` is the whole sequence)."""
    check_layout(layout)
    ring = _ring(group)
    if isinstance(ring, LoopbackRing):
        return layout_permutation(layout, ring.size, seq_len, device)
    return local_positions(layout, dist.get_rank(ring), dist.get_world_size(ring), seq_len, device)


class _GatherSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, layout, group):
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        ctx.dim, ctx.layout, ctx.group = dim, layout, group
        _agree_on_shards(x, dim, layout, group)
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x, group=group)
        s_local = x.shape[dim]
        shape = list(x.shape)
        shape[dim] = s_local * world
        full = x.new_empty(shape)
        for r, part in enumerate(parts):
            offset = 0
            for a, b in chunk_ranges(layout, r, world, s_local):
                full.narrow(dim, a, b - a).copy_(part.narrow(dim, offset, b - a))
                offset += b - a
        return full

    @staticmethod
    def backward(ctx, grad):
        own = _own_tokens(grad, ctx.dim, ctx.layout, dist.get_rank(ctx.group), dist.get_world_size(ctx.group))
        return own, None, None, None


_SHAPE_SLOTS = 12
_GATHER_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
                  torch.int16, torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128)


def _agree_on_shards(x: torch.Tensor, dim: int, layout: str, group) -> None:
    """Raise on every rank unless all ranks pass shards of one shape and dtype, gathered
    along the same dim in the same layout (an all-gather of mismatched shapes aborts
    one rank and returns a wrong-sized tensor on another)."""
    check_usable(group)
    shape = list(x.shape[:_SHAPE_SLOTS])
    if x.dim() > _SHAPE_SLOTS:
        shape[-1] = math.prod(x.shape[_SHAPE_SLOTS - 1:])  # the trailing dims' product
    code = _GATHER_DTYPES.index(x.dtype) if x.dtype in _GATHER_DTYPES else -1
    row = [x.dim(), dim, LAYOUTS.index(layout), code] + shape + [0] * (_SHAPE_SLOTS - len(shape))
    rows = gather_small(torch.tensor(row, dtype=torch.int64), group, x.device).tolist()
    if any(r != rows[0] for r in rows):
        shapes = [tuple(r[4:4 + min(r[0], _SHAPE_SLOTS)]) for r in rows]
        dtypes = [str(_GATHER_DTYPES[r[3]]) if r[3] >= 0 else "other" for r in rows]
        raise ValueError(
            f"ringfx.unshard: the ranks passed different shards (shapes {shapes}, dims {[r[1] for r in rows]}, "
            f"layouts {[LAYOUTS[r[2]] for r in rows]}, dtypes {dtypes}); "
            "every rank must pass its shard of one tensor, all of the same shape (S/P tokens each), along "
            "the same dim and layout"
        )
