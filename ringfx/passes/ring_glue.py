"""Small functions that rewritten graphs call around the ring op.

They turn a mask as the model wrote it into the ring op's descriptors. Each is a plain
function of tensors, so eager execution, AOTAutograd and inductor all trace through it.

    kpm  = key_padding_from_mask(mask, drop=True, q=q)       # (B, 1, 1, S) -> (B, S) bool
    bias = bias_from_mask(mask, "additive", ndim=4, unsqueeze0=False)
    bias = gather_key_columns(bias, "loopback:4", "zigzag")  # key columns in global order
"""

from __future__ import annotations

import torch


def key_padding_from_mask(mask: torch.Tensor, drop: bool, q: torch.Tensor) -> torch.Tensor:
    """A per-key bool mask broadcastable to (B, 1, 1, S) as the ring op's (B, S), True =
    key kept (``q``: the op's (B, H, S, D) queries, for the batch size)."""
    s = mask.shape[-1]
    kpm = mask.reshape(-1, s) if mask.dim() > 1 else mask.reshape(1, s)
    kpm = kpm.expand(q.shape[0], s)
    return torch.logical_not(kpm) if drop else kpm


def bias_from_mask(mask: torch.Tensor, form: str, ndim: int, unsqueeze0: bool) -> torch.Tensor:
    """A mask in the scores' layout as a 4-D ``attn_bias`` (float additive, or bool keep)."""
    while mask.dim() < ndim:
        mask = mask.unsqueeze(0)
    if unsqueeze0:
        mask = mask.unsqueeze(0)
    if form == "subtracted":
        return -mask
    return torch.logical_not(mask) if form == "drop" else mask


def combine_biases(dtype: torch.dtype, *biases: torch.Tensor) -> torch.Tensor:
    """Several attn_bias terms as one (bool ones turned additive when mixed with floats)."""
    if all(b.dtype == torch.bool for b in biases):
        out = biases[0]
        for b in biases[1:]:
            out = out & b
        return out
    out = None
    for b in biases:
        if b.dtype == torch.bool:
            b = torch.zeros(b.shape, dtype=dtype, device=b.device).masked_fill(~b, float("-inf"))
        out = b if out is None else out + b
    return out


def gather_key_columns(bias: torch.Tensor, group_name: str, layout: str) -> torch.Tensor:
    """The bias with its key columns for the whole sequence, in global order (an
    all-gather of O(S) values for a per-key bias; a permutation on a loopback ring)."""
    if bias.shape[-1] == 1:
        return bias
    from ringfx.runtime import unshard
    from ringfx.runtime.ring import resolve_group

    return unshard(bias, -1, layout=layout, group=resolve_group(group_name))
