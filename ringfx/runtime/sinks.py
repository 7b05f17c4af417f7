"""Attention sinks (GPT-OSS): a learned logit per query head that joins every row's
softmax denominator and contributes no value::

    out_i = sum_j exp(s_ij) v_j / (sum_j exp(s_ij) + exp(sink_h))

The ring computes the row's plain attention ``o`` and log-sum-exp ``L`` over every key;
then ``out = o * exp(L) / (exp(L) + exp(sink)) = o * sigmoid(L - sink)`` and the row's
log-sum-exp with the sink is ``L' = logaddexp(L, sink)``. Fed (out, L'), the ring
backward of plain attention is already the exact backward with the sink (its
probabilities ``exp(s - L')`` and ``delta = dout . out`` are those of the softmax that
includes the sink column, whose value is 0), so only the sink's own gradient is added:
``d sink_h = -sum_rows exp(sink_h - L') * (dout . out)`` (the sink column's probability
times ``0 - delta``).
"""

from __future__ import annotations

import torch
from torch import Tensor


def apply_sinks(out: Tensor, lse: Tensor, sinks: Tensor) -> tuple[Tensor, Tensor]:
    """(out, lse) of plain attention -> (out, lse) of attention with the sinks. A row that
    sees no key (lse = -inf) gets out 0 and lse = sink: all its weight is on the sink."""
    sink = sinks.to(lse.dtype)[None, :, None]
    weight = torch.sigmoid(lse - sink)
    return (out.to(lse.dtype) * weight[..., None]).to(out.dtype), torch.logaddexp(lse, sink)


def sinks_grad(dout: Tensor, out: Tensor, lse: Tensor, sinks: Tensor) -> Tensor:
    """The gradient of the sinks ``(H,)`` from this rank's rows; ``out``, ``lse`` as
    ``apply_sinks`` returned them."""
    acc = lse.dtype
    delta = (dout.to(acc) * out.to(acc)).sum(-1)
    p_sink = torch.exp(sinks.to(acc)[None, :, None] - lse)
    return (-(p_sink * delta).sum((0, 2))).to(sinks.dtype)
