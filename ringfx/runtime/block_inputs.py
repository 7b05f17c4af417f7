"""The tensors of one block call: K and V packed into one buffer for the ring, and the
slices (queries, resident keys) and mask of each kernel call a step plans
(``blocks.plan_step``).
"""

from __future__ import annotations

import dataclasses

import torch

from .blocks import BlockCall, MaskSpec, build_mask
from .layout import local_positions


def pack_kv(k, v):
    """K and V in one (2, ...) buffer: two plain copies (torch.stack's batched-cat kernel
    ran at a third of the copy bandwidth on an H100)."""
    kv = torch.empty((2, *k.shape), dtype=k.dtype, device=k.device)
    kv[0].copy_(k)
    kv[1].copy_(v)
    return kv


@dataclasses.dataclass(frozen=True)
class BlockSource:
    """What every block of one rank program is sliced from: fixed for the call."""

    layout: str
    world: int
    s_local: int
    spec: MaskSpec
    q_pos: torch.Tensor  # global positions of this rank's queries
    has_padding: bool  # a key padding mask travels with the keys (row 0 of ``tok``)
    seg_q: torch.Tensor | None  # this rank's segment ids (B, S_local); the keys' travel in row 1
    bias: torch.Tensor | None  # (b, h, S_local or 1, S_total or 1), key columns in global order
    dtype: torch.dtype  # of the mask the kernels take
    alibi: torch.Tensor | None = None  # per-head ALiBi slopes (Hq,): slope_h * (j - i) joins every mask
    rel: torch.Tensor | None = None  # relative-position table (Hq, 2S - 1): rel[h, j - i + S - 1] joins every mask
    alibi_in_kernel: bool = False  # the flex kernel adds the ALiBi term itself (no mask carries it)


@dataclasses.dataclass(frozen=True)
class Block:
    """One kernel call: this rank's query rows, the resident keys and values, the mask
    (and, when one was built, the keys' global positions)."""

    rows: slice
    k: torch.Tensor
    v: torch.Tensor
    mask: torch.Tensor | None
    k_pos: torch.Tensor | None = None
    alibi: tuple | None = None  # (slopes, query positions, key positions) for the flex kernel's ALiBi

    @classmethod
    def of(cls, call: BlockCall, src: int, kv, tok, source: BlockSource) -> "Block":
        """``call`` against the block of rank ``src``: ``kv`` its packed K/V, ``tok`` its
        token masks (padding, segment ids) or None."""
        a, b = call.q
        c, d = call.k
        k, v = kv[0][:, :, c:d], kv[1][:, :, c:d]
        mask = k_pos = alibi = None
        if call.masked or source.alibi_in_kernel:
            k_pos = local_positions(source.layout, src, source.world, source.s_local, source.q_pos.device)[c:d]
        if source.alibi_in_kernel:
            alibi = (source.alibi, source.q_pos[a:b], k_pos)
        if call.masked:
            pad_k = tok[0, :, c:d].bool() if tok is not None and source.has_padding else None
            seg_k = tok[1, :, c:d] if tok is not None and source.seg_q is not None else None
            seg_q = source.seg_q[:, a:b] if source.seg_q is not None else None
            bias_blk = None
            bias = source.bias
            if bias is not None:
                bias_blk = bias[..., a:b, :] if bias.shape[-2] > 1 else bias
                if bias.shape[-1] > 1:
                    bias_blk = bias_blk.index_select(-1, k_pos)
            mask = build_mask(source.q_pos[a:b], k_pos, source.spec, source.dtype, pad_k, seg_q, seg_k, bias_blk,
                              None if source.alibi_in_kernel else source.alibi, source.rel)
        return cls(slice(a, b), k, v, mask, k_pos, alibi)
