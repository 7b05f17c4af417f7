"""Blockwise loss: the output projection and cross-entropy over chunks of tokens, so that
the ``(tokens, vocab)`` logits never exist at once (the "Blockwise Transformers" half of
Liu, Zaharia, Abbeel 2023: the loss is computed block by block like the feed-forward).

    loss, count = torch.ops.ringfx.linear_cross_entropy(hidden, weight, bias, labels, ignore_index,
                                                        reduction, label_smoothing, chunk, loss_dtype)

equals ``F.cross_entropy(F.linear(hidden, weight, bias).to(loss_dtype).view(-1, V), labels.view(-1),
ignore_index=..., reduction=..., label_smoothing=...)`` forward and backward:

* forward: for each chunk of ``chunk`` tokens, logits = linear(h_chunk) in the input dtype
  (rounded as ``F.linear`` rounds them), cast to ``loss_dtype`` and computed on in at least
  float32 (a bf16 loss is computed in float32: more accurate than the bf16 original, not
  bit-equal), the chunk's loss terms summed into one accumulator. Nothing of size vocab is
  saved: backward keeps ``hidden``, ``weight``, ``bias``, ``labels``.
* backward: each chunk's logits are computed again, ``softmax - target`` (with label
  smoothing: ``softmax - (1-e) onehot - e/V``) scaled by the incoming gradient gives the
  chunk's logit gradient, cast to the input dtype as the logits' own backward would, then
  ``dh = dlogits @ W``, ``dW += dlogitsᵀ h``, ``db += Σ dlogits`` (dW, db accumulated in
  the accumulation dtype over the chunks).
* ``count`` is the number of targets that are not ``ignore_index`` (int64): with
  ``reduction="mean"`` the loss is the sum over them divided by ``count``, as torch does
  (0 / 0 = nan when every target is ignored). A sharded sequence needs ``reduction="sum"``
  and the count, both summed over the ring.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["DEFAULT_CHUNK_TOKENS", "REDUCTIONS", "chunked_linear_cross_entropy", "linear_cross_entropy_op"]

# Tokens per chunk when the caller gives none: a (1024, 128K) float32 block is 512 MiB, small
# next to a long-context step's activations and large enough for the matmul to run at speed.
DEFAULT_CHUNK_TOKENS = 1024
REDUCTIONS = ("mean", "sum")


def chunk_tokens(option) -> int:
    """The ``blockwise_loss=`` option as tokens per chunk: False / None / 0 -> 0 (off),
    True -> ``DEFAULT_CHUNK_TOKENS``, a positive int -> itself."""
    if option is None or option is False:
        return 0
    if option is True:
        return DEFAULT_CHUNK_TOKENS
    if isinstance(option, int) and option >= 0:
        return option
    raise ValueError(f"blockwise_loss={option!r}: pass True (chunks of {DEFAULT_CHUNK_TOKENS} tokens), a number of "
                     "tokens per chunk, or False")


def accumulation_dtype(loss_dtype: torch.dtype) -> torch.dtype:
    """The dtype the loss is computed in: the dtype the cross-entropy receives, at least float32."""
    return torch.promote_types(loss_dtype, torch.float32)


def _flat(hidden: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    h = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1)
    if h.shape[0] != y.shape[0]:
        raise ValueError(f"linear_cross_entropy: {h.shape[0]} hidden rows but {y.shape[0]} labels")
    return h, y


def _chunk_terms(h: Tensor, weight: Tensor, bias: Optional[Tensor], y: Tensor, ignore_index: int,
                 label_smoothing: float, acc: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One chunk: (float logits, valid mask, safe targets, per-row loss terms, zero where ignored)."""
    logits = torch.nn.functional.linear(h, weight, bias).to(acc)
    valid = y != ignore_index
    target = torch.where(valid, y, 0)
    lse = torch.logsumexp(logits, dim=-1)
    terms = lse - logits.gather(1, target.unsqueeze(1)).squeeze(1)
    if label_smoothing:
        terms = (1 - label_smoothing) * terms + label_smoothing * (lse - logits.mean(dim=-1))
    return logits, valid, target, torch.where(valid, terms, 0)


def _check(reduction: str, chunk: int) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"linear_cross_entropy: reduction={reduction!r}; use one of {REDUCTIONS}")
    if chunk < 1:
        raise ValueError(f"linear_cross_entropy: chunk={chunk} tokens; use a positive number")


@torch.library.custom_op("ringfx::linear_cross_entropy", mutates_args=())
def linear_cross_entropy_op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor,
                            ignore_index: int, reduction: str, label_smoothing: float,
                            chunk: int, loss_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    _check(reduction, chunk)
    h, y = _flat(hidden, labels)
    acc = accumulation_dtype(loss_dtype)
    total = torch.zeros((), dtype=acc, device=hidden.device)
    for start in range(0, h.shape[0], chunk):
        _, _, _, terms = _chunk_terms(h[start:start + chunk], weight, bias, y[start:start + chunk], ignore_index,
                                      label_smoothing, acc)
        total += terms.sum()
    count = (y != ignore_index).sum()
    return (total / count if reduction == "mean" else total), count


@linear_cross_entropy_op.register_fake
def _(hidden, weight, bias, labels, ignore_index, reduction, label_smoothing, chunk, loss_dtype):
    return (hidden.new_empty((), dtype=accumulation_dtype(loss_dtype)),
            labels.new_empty((), dtype=torch.int64))


@torch.library.custom_op("ringfx::linear_cross_entropy_backward", mutates_args=())
def linear_cross_entropy_backward_op(grad: Tensor, hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                                     labels: Tensor, count: Tensor, ignore_index: int, reduction: str,
                                     label_smoothing: float, chunk: int,
                                     loss_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """(d hidden, d weight, d bias — an empty tensor when there is no bias)."""
    h, y = _flat(hidden, labels)
    acc = accumulation_dtype(loss_dtype)
    wacc = torch.promote_types(acc, weight.dtype)  # dW, db summed over the chunks
    scale = grad.to(acc) / count.to(acc) if reduction == "mean" else grad.to(acc)
    vocab = weight.shape[0]
    dh = torch.empty(h.shape, dtype=h.dtype, device=h.device)
    dw = torch.zeros(weight.shape, dtype=wacc, device=weight.device)
    db = torch.zeros(vocab, dtype=wacc, device=weight.device) if bias is not None else None
    for start in range(0, h.shape[0], chunk):
        hc = h[start:start + chunk]
        logits, valid, target, _ = _chunk_terms(hc, weight, bias, y[start:start + chunk], ignore_index, 0.0, acc)
        dlogits = torch.softmax(logits, dim=-1)
        del logits
        if label_smoothing:
            dlogits -= label_smoothing / vocab
        dlogits.scatter_add_(1, target.unsqueeze(1),
                             torch.full((hc.shape[0], 1), -(1 - label_smoothing), dtype=acc, device=h.device))
        dlogits *= torch.where(valid, scale, 0).unsqueeze(1)
        # the logits' own backward: the gradient reaches linear in the logits' dtype
        dlogits = dlogits.to(hidden.dtype)
        dh[start:start + chunk] = dlogits @ weight
        dw.addmm_(dlogits.t().to(wacc), hc.to(wacc))
        if db is not None:
            db += dlogits.sum(0, dtype=wacc)
    return (dh.reshape(hidden.shape), dw.to(weight.dtype),
            db.to(bias.dtype) if db is not None else weight.new_empty(0))


@linear_cross_entropy_backward_op.register_fake
def _(grad, hidden, weight, bias, labels, count, ignore_index, reduction, label_smoothing, chunk, loss_dtype):
    return (torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device),
            torch.empty(weight.shape, dtype=weight.dtype, device=weight.device),
            torch.empty(bias.shape, dtype=bias.dtype, device=bias.device) if bias is not None
            else weight.new_empty(0))


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, *options = inputs
    ctx.save_for_backward(hidden, weight, bias, labels, output[1])
    ctx.options = options


def _backward(ctx, grad, _grad_count):
    hidden, weight, bias, labels, count = ctx.saved_tensors
    dh, dw, db = torch.ops.ringfx.linear_cross_entropy_backward(grad, hidden, weight, bias, labels, count,
                                                                *ctx.options)
    return dh, dw, (db if bias is not None else None), None, None, None, None, None, None


linear_cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)


def chunked_linear_cross_entropy(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, *,
                                 ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                                 chunk: int = DEFAULT_CHUNK_TOKENS, loss_dtype: Optional[torch.dtype] = None
                                 ) -> Tensor:
    """``F.cross_entropy(F.linear(hidden, weight, bias).to(loss_dtype), labels, ...)`` over chunks
    of ``chunk`` tokens, without the whole logits tensor (see the module docstring). ``hidden``
    is ``(..., H)``, ``labels`` the matching ``(...)``; ``loss_dtype`` defaults to float32
    (float64 for float64 inputs), the dtype the loss is returned in."""
    _check(reduction, chunk)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing={label_smoothing} must be in [0, 1]")
    loss, _ = torch.ops.ringfx.linear_cross_entropy(hidden, weight, bias, labels, int(ignore_index), reduction,
                                                     float(label_smoothing), int(chunk),
                                                     loss_dtype or accumulation_dtype(hidden.dtype))
    return loss


def valid_target_count(labels: Tensor, ignore_index: int = -100) -> Tensor:
    """The number of targets a mean is taken over (what the op's second output holds)."""
    return (labels != ignore_index).sum()
