"""Folding block results into a running result: the softmax merge of partial
attention outputs (forward) and the sum of gradients (backward).

``fold`` takes up to four blocks and the running accumulator in one call: eager
float32 (float64 for float64) ops, or one Triton pass on CUDA (``merge_triton.py``).
Merge formula (a stable form of FlashAttention's online softmax rescaling):
lse' = logsumexp(acc_lse, lse_1, ...), out' = Σ exp(lse_i - lse') · out_i.
"""

from __future__ import annotations

import functools

import torch

from .tuning import Tuning


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Merge and gradient accumulators: float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def fold(dst, acc, blocks, *, dst_lse=None, acc_lse=None, lses=None, tuning: Tuning | None = None):
    """Fold ``blocks`` (1..4 tensors of dst's shape) and the running ``acc`` (or None: the
    blocks start the result) into ``dst``: with ``lses`` a softmax merge of partial
    attention results (``dst_lse``/``acc_lse`` the row log-sum-exps), without a sum.

    Merge: lse' = logsumexp(acc_lse, lse_1, ...), dst = Σ exp(lse_i - lse') · out_i,
    computed in float32 (float64 for float64); a row nobody has seen (every lse -inf)
    gets lse -inf and output 0; a NaN row (NaN in the inputs) stays NaN, as in SDPA.
    ``dst`` may be ``acc`` (in place) or a tensor of the input dtype (the last fold
    writes the result directly). On CUDA with float32 accumulation this is one Triton
    pass unless ``tuning`` (default: the environment's) turns it off.
    """
    if fused_fold_applies(dst, blocks[0].dtype, tuning or Tuning.from_environment()):
        return _fused_fold()(dst, acc, blocks, dst_lse=dst_lse, acc_lse=acc_lse, lses=lses)
    ct = acc_dtype(blocks[0].dtype)
    if lses is None:  # a sum: in place where the accumulator allows, no float32 temporaries
        total = dst if dst.dtype == ct else torch.empty(dst.shape, dtype=ct, device=dst.device)
        rest = blocks
        if acc is None:
            total.copy_(blocks[0])
            rest = blocks[1:]
        elif acc.data_ptr() != total.data_ptr() or acc.stride() != total.stride():
            total.copy_(acc)
        for b in rest:
            total.add_(b)
        if total is not dst:
            dst.copy_(total)
        return
    if acc is not None and len(blocks) == 1:  # the two-temporary form of one block's merge
        out = acc.to(ct, copy=True) if acc.data_ptr() != dst.data_ptr() or dst.dtype != ct else dst
        lse_b = lses[0].to(ct)
        # a block row nobody saw (lse -inf) weighs 0, also against an unseen acc row
        # (sigmoid(-inf + inf) is NaN); a NaN row (NaN in the inputs) stays NaN
        w = torch.sigmoid(lse_b - acc_lse).masked_fill(lse_b == float("-inf"), 0.0).unsqueeze(-1)
        out.sub_(w * (out - blocks[0]))
        dst_lse.copy_(torch.logaddexp(acc_lse, lse_b))
        if out is not dst:
            dst.copy_(out)
        return
    outs = [b.to(ct) for b in blocks] + ([acc.to(ct)] if acc is not None else [])
    stacked = torch.stack([x.to(ct) for x in lses] + ([acc_lse.to(ct)] if acc is not None else []))
    lse = torch.logsumexp(stacked, 0)
    # rows nobody saw weigh 0 (exp(-inf + inf) is NaN); a NaN row stays NaN
    w = torch.exp(stacked - lse).masked_fill(stacked == float("-inf"), 0.0).unsqueeze(-1)
    dst.copy_(functools.reduce(torch.add, (w[i] * o for i, o in enumerate(outs))))
    dst_lse.copy_(lse)


def fused_fold_applies(t: torch.Tensor, dtype: torch.dtype, tuning: Tuning) -> bool:
    """Whether ``fold`` runs as one Triton pass for results like ``t`` of inputs of ``dtype``."""
    return tuning.fused_merge and fused_fold_available(t, dtype)


def fused_fold_available(t: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether the Triton fold can take results like ``t`` of inputs of ``dtype``."""
    # the fused kernel gave wrong rows for head dims that are not a multiple of 16 on
    # an H100 (d=72, torch 2.11 / Triton 3.6; exact under TRITON_INTERPRET): those
    # take the eager path
    return (t.is_cuda and acc_dtype(dtype) == torch.float32 and t.shape[-1] % 16 == 0
            and _fused_fold() is not None)


def merge_partial(out, lse, out_b, lse_b):
    """Fold one block's partial (out_b, lse_b) into the running (out, lse), in place."""
    fold(out, out, [out_b], dst_lse=lse, acc_lse=lse, lses=[lse_b])


@functools.lru_cache(maxsize=1)
def _fused_fold():
    """The Triton fold, or None where Triton is not installed."""
    try:
        from .merge_triton import fold_triton
    except ImportError:  # no Triton: the eager fold is used
        return None
    return fold_triton
