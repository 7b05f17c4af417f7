"""One-pass float32 folds of up to four blocks into a running result (Triton, CUDA).

Two kinds, both over query (or key) rows of (B, H, S, D) tensors whose last dim is
contiguous:

* merge: dst = Σ_i exp(lse_i - lse') · out_i over the running (acc, acc_lse) and the
  blocks, lse' = logaddexp of them all. Rows that nobody has seen (every lse -inf) keep
  lse -inf and output 0.
* sum:   dst = acc + Σ_i block_i (gradients).

Folding several blocks in one pass reads the float32 accumulator once for all of them;
without ``acc`` the blocks initialise ``dst`` (no zero fill). ``dst`` may be the
accumulator itself (in place) or a tensor of another dtype (the final bf16 result).
"""

from __future__ import annotations

import triton
import triton.language as tl

MAX_BLOCKS = 4
# elements of a (rows x head dim) tile per program and warps per program: every tensor
# of the fold costs a 64-bit pointer per element in registers, so tiles stay small
TILE_ELEMS = 2048  # the best of 1024-4096 x 4/8 warps on an H100 (benchmarks/fold_kernels.py)
NUM_WARPS = 4


@triton.jit
def _row_offsets(rows, H, SQ, sb, sh, ss):
    return (rows // (H * SQ)) * sb + ((rows // SQ) % H) * sh + (rows % SQ) * ss


@triton.jit
def _load_block(ptr, lse_ptr, rows, live, cols, mask, H, SQ, s0, s1, s2, ls0, ls1, ls2, MERGE: tl.constexpr):
    o = tl.load(ptr + _row_offsets(rows, H, SQ, s0, s1, s2)[:, None] + cols[None, :], mask=mask,
                other=0.0).to(tl.float32)
    if MERGE:
        lv = tl.load(lse_ptr + _row_offsets(rows, H, SQ, ls0, ls1, ls2), mask=live,
                     other=float("-inf")).to(tl.float32)
    else:
        lv = tl.zeros_like(rows).to(tl.float32)
    return o, lv


@triton.jit
def _fold_rows(dst, dst_lse, acc, acc_lse, o0, l0, o1, l1, o2, l2, o3, l3, n_rows, H, SQ, D,
               sd0, sd1, sd2, sdl0, sdl1, sdl2, sa0, sa1, sa2, sal0, sal1, sal2,
               s00, s01, s02, sl00, sl01, sl02, s10, s11, s12, sl10, sl11, sl12,
               s20, s21, s22, sl20, sl21, sl22, s30, s31, s32, sl30, sl31, sl32,
               N: tl.constexpr, HAS_ACC: tl.constexpr, MERGE: tl.constexpr,
               BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    live = rows < n_rows
    cols = tl.arange(0, BLOCK_D)
    mask = live[:, None] & (cols[None, :] < D)
    x0, m0 = _load_block(o0, l0, rows, live, cols, mask, H, SQ, s00, s01, s02, sl00, sl01, sl02, MERGE)
    x1, m1 = x0, m0
    x2, m2 = x0, m0
    x3, m3 = x0, m0
    if N > 1:
        x1, m1 = _load_block(o1, l1, rows, live, cols, mask, H, SQ, s10, s11, s12, sl10, sl11, sl12, MERGE)
    if N > 2:
        x2, m2 = _load_block(o2, l2, rows, live, cols, mask, H, SQ, s20, s21, s22, sl20, sl21, sl22, MERGE)
    if N > 3:
        x3, m3 = _load_block(o3, l3, rows, live, cols, mask, H, SQ, s30, s31, s32, sl30, sl31, sl32, MERGE)
    xa, ma = x0, m0
    if HAS_ACC:
        xa, ma = _load_block(acc, acc_lse, rows, live, cols, mask, H, SQ, sa0, sa1, sa2, sal0, sal1, sal2,
                             MERGE)
    d_off = _row_offsets(rows, H, SQ, sd0, sd1, sd2)[:, None] + cols[None, :]
    if MERGE:
        m = m0
        if N > 1:
            m = tl.maximum(m, m1)
        if N > 2:
            m = tl.maximum(m, m2)
        if N > 3:
            m = tl.maximum(m, m3)
        if HAS_ACC:
            m = tl.maximum(m, ma)
        m = tl.where(m == float("-inf"), 0.0, m)
        e0 = tl.exp(m0 - m)
        total = e0
        o = e0[:, None] * x0
        if N > 1:
            e1 = tl.exp(m1 - m)
            total += e1
            o += e1[:, None] * x1
        if N > 2:
            e2 = tl.exp(m2 - m)
            total += e2
            o += e2[:, None] * x2
        if N > 3:
            e3 = tl.exp(m3 - m)
            total += e3
            o += e3[:, None] * x3
        if HAS_ACC:
            ea = tl.exp(ma - m)
            total += ea
            o += ea[:, None] * xa
        o = o / tl.where(total > 0, total, 1.0)[:, None]
        tl.store(dst_lse + _row_offsets(rows, H, SQ, sdl0, sdl1, sdl2), m + tl.log(total), mask=live)
    else:
        o = x0
        if N > 1:
            o += x1
        if N > 2:
            o += x2
        if N > 3:
            o += x3
        if HAS_ACC:
            o += xa
    tl.store(dst + d_off, o.to(dst.dtype.element_ty), mask=mask)


def fold_triton(dst, acc, blocks, dst_lse=None, acc_lse=None, lses=None, *, tile_elems=None, num_warps=None):
    """Write into ``dst`` the fold of ``acc`` (or nothing) and ``blocks`` (1..4 tensors of
    dst's shape). With ``lses`` a softmax merge (``dst_lse``/``acc_lse`` the row lse),
    without a plain sum."""
    n = len(blocks)
    assert 1 <= n <= MAX_BLOCKS
    tensors = [dst, acc, *blocks]
    assert all(t is None or (t.shape == dst.shape and t.stride(-1) == 1) for t in tensors)
    bsz, h, sq, d = dst.shape
    merge = lses is not None

    def strides(t, rank):
        return tuple(t.stride()[:rank]) if t is not None else (0,) * rank

    def row_strides(t):
        return strides(t, 3) if merge else (0, 0, 0)

    # the kernel takes MAX_BLOCKS (out, lse) pointers; unused ones (and the lse pointers of
    # a sum) repeat a real tensor and are never read
    outs = list(blocks) + [blocks[0]] * (MAX_BLOCKS - n)
    rows = list(lses) + [lses[0]] * (MAX_BLOCKS - n) if merge else outs
    has_acc = acc is not None
    ptrs = [dst, dst_lse if merge else dst, acc if has_acc else dst, acc_lse if merge and has_acc else dst]
    args = [*strides(dst, 3), *row_strides(dst_lse), *strides(acc, 3), *row_strides(acc_lse if has_acc else None)]
    for o, lv in zip(outs, rows):
        ptrs += [o, lv]
        args += [*strides(o, 3), *row_strides(lv)]
    n_rows = bsz * h * sq
    block_d = triton.next_power_of_2(d)
    block_r = max(1, (tile_elems or TILE_ELEMS) // block_d)
    grid = (triton.cdiv(n_rows, block_r),)
    _fold_rows[grid](*ptrs, n_rows, h, sq, d, *args, N=n, HAS_ACC=has_acc, MERGE=merge,
                     BLOCK_R=block_r, BLOCK_D=block_d, num_warps=num_warps or NUM_WARPS)
