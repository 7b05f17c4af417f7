"""One-pass merge of a block's partial result into the running output (Triton, CUDA).

For each query row: lse' = logaddexp(lse, lse_b), w = exp(lse_b - lse'), then
out <- out + w * (out_b - out) over the head dim: out is read and written once, out_b
read once, instead of the five elementwise kernels of the unfused form. Rows that
neither side has seen (both lse -inf) keep lse -inf and their output.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _merge_rows(out, lse, out_b, lse_b, n_rows, H, SQ, D,
                o_b, o_h, o_s, l_b, l_h, l_s, p_b, p_h, p_s, q_b, q_h, q_s,
                BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    live = rows < n_rows
    b = rows // (H * SQ)
    h = (rows // SQ) % H
    s = rows % SQ
    lse_ptr = lse + b * l_b + h * l_h + s * l_s
    la = tl.load(lse_ptr, mask=live, other=float("-inf"))
    lb = tl.load(lse_b + b * q_b + h * q_h + s * q_s, mask=live, other=float("-inf")).to(tl.float32)
    m = tl.maximum(la, lb)
    m = tl.where(m == float("-inf"), 0.0, m)
    ea = tl.exp(la - m)
    eb = tl.exp(lb - m)
    total = ea + eb
    w = tl.where(total > 0, eb / total, 0.0)
    tl.store(lse_ptr, m + tl.log(total), mask=live)
    cols = tl.arange(0, BLOCK_D)
    mask = live[:, None] & (cols[None, :] < D)
    o_ptr = out + (b * o_b + h * o_h + s * o_s)[:, None] + cols[None, :]
    o = tl.load(o_ptr, mask=mask, other=0.0)
    ob = tl.load(out_b + (b * p_b + h * p_h + s * p_s)[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(o_ptr, o + w[:, None] * (ob - o), mask=mask)


def merge_partial_triton(out, lse, out_b, lse_b):
    """In place on ``out`` (float32, (B, H, S, D), last dim contiguous) and ``lse``."""
    bsz, h, sq, d = out.shape
    assert out.stride(-1) == 1 and out_b.stride(-1) == 1 and out.dtype == torch.float32
    n_rows = bsz * h * sq
    block_d = triton.next_power_of_2(d)
    block_r = max(1, min(64, 4096 // block_d))
    grid = (triton.cdiv(n_rows, block_r),)
    _merge_rows[grid](out, lse, out_b, lse_b, n_rows, h, sq, d,
                      *out.stride()[:3], *lse.stride(), *out_b.stride()[:3], *lse_b.stride(),
                      BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4)
