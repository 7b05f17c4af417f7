"""Sequence layouts: which global token positions each rank of a ring holds.

``contiguous``: rank r holds chunk r of P equal chunks.
``zigzag``: the sequence is cut into 2P chunks and rank r holds chunks r and 2P-1-r,
so every rank gets the same amount of causal work (the "DualChunkSwap" of Megatron,
the zigzag of ring-flash-attention).

A rank's local tokens are always in increasing global position; this is what lets a
causal kernel run on a rank's own block with ``is_causal=True``.
"""

from __future__ import annotations

import torch

LAYOUTS = ("contiguous", "zigzag")


def check_layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is not known; use one of {LAYOUTS}")
    return layout


def chunks_per_rank(layout: str) -> int:
    return 1 if check_layout(layout) == "contiguous" else 2


def chunk_ranges(layout: str, rank: int, world: int, s_local: int) -> list[tuple[int, int]]:
    """Global ``[start, stop)`` ranges of the tokens ``rank`` holds, in local order."""
    if check_layout(layout) == "contiguous":
        return [(rank * s_local, (rank + 1) * s_local)]
    if s_local % 2:
        raise ValueError(
            f"the zigzag layout needs an even number of local tokens, got {s_local}; "
            "make the sequence length divisible by 2 * ring size (pad it) or use layout='contiguous'"
        )
    c = s_local // 2
    return [(rank * c, (rank + 1) * c), ((2 * world - 1 - rank) * c, (2 * world - rank) * c)]


def local_positions(layout: str, rank: int, world: int, s_local: int, device=None) -> torch.Tensor:
    """Global positions (int64, shape ``(s_local,)``) of the tokens held by ``rank``."""
    parts = [torch.arange(a, b, device=device) for a, b in chunk_ranges(layout, rank, world, s_local)]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def check_divisible(layout: str, s_total: int, world: int) -> int:
    """Return the per-rank length, or raise naming the fix."""
    unit = world * chunks_per_rank(layout)
    if s_total % unit:
        raise ValueError(
            f"sequence length {s_total} is not divisible by {unit} "
            f"({'2 * ' if layout == 'zigzag' else ''}ring size {world}) as the {layout!r} layout needs; "
            f"pad the sequence to a multiple of {unit}"
        )
    return s_total // world


def layout_permutation(layout: str, world: int, s_total: int, device=None) -> torch.Tensor:
    """The global positions of all ranks' tokens, rank 0's first: ``x[perm]`` is the
    concatenation of every rank's shard."""
    s_local = check_divisible(layout, s_total, world)
    return torch.cat([local_positions(layout, r, world, s_local, device) for r in range(world)])
