"""``torch.ops.ringfx.ring_attention``: the custom op everything targets, and its wrapper.

One opaque, differentiable node for dynamo, AOTAutograd, inductor and torch.export:
a fake implementation gives shapes, the autograd formula calls the backward op
``torch.ops.ringfx.ring_attention_backward``, which runs the ring backward.

    out, lse = torch.ops.ringfx.ring_attention(
        q, k, v, key_padding_mask, segment_ids, attn_bias,
        group_name, layout, causal, scale, window, kernel, sinks=None, softcap=0.0,
        chunk=0, alibi=None)

``softcap`` > 0 soft-caps the scaled scores before the mask (``softcap * tanh(s /
softcap)``, Gemma 2; computed by the math block kernel); ``sinks`` ``(Hq,)`` adds a learned
logit per head to every row's softmax denominator (GPT-OSS; see ``sinks.py``), and the
returned lse then includes it. ``chunk`` > 0 is chunked local attention (Llama 4: query i
sees key j only if ``j // chunk == i // chunk``, and ``j <= i`` under causal), computed from
global positions, blocks in no common chunk skipped; ``alibi`` ``(Hq,)`` holds ALiBi slopes
(BLOOM / MPT): ``slope_h * (j - i)`` is added to the scores of every block, built per block
from global positions (a constant: slopes that require grad are refused). The variants are
per-head / replicated: the same on every rank.

The group travels as its name (process groups are not a schema type): a real group's
``group_name``, or ``"loopback:P"`` for P virtual ranks in this process, in which case
the tensors hold all P shards concatenated along the sequence, rank 0's first.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .algorithm import RingConfig, acc_dtype, backward_program, forward_program
from .checks import LEARNED_ALIBI, LEARNED_BIAS, as_4d_bias, check_chunk, check_inputs, check_softcap, check_window
from .ring import LoopbackRing, check_backend, group_name_of, resolve_group, run_loopback, run_on_group
from .sinks import apply_sinks, sinks_grad


def _split(x, world, dim):
    if x is None or dim is None:  # absent, or replicated (per-head slopes)
        return [None] * world
    if x.shape[dim] == 1:  # broadcast along the sequence (a bias row shared by all queries)
        return [x] * world
    return list(x.chunk(world, dim))


def _run(program, tensors, dims, cfg, group, outputs, alibi=None):
    """Run ``program`` on every rank this process plays: one for a real group, P for a
    loopback ring (inputs split along the sequence; each virtual rank writes its results
    straight into its slice of the full outputs, so the loopback adds no concatenation).
    ``outputs``: (shape, dtype) of each result; ``alibi``: replicated slopes, or None."""
    if isinstance(group, LoopbackRing):
        world = group.size
        device = tensors[0].device
        if tensors[0].numel() == 0:  # nothing to attend (S, B or H is 0): no kernel runs
            return tuple(torch.zeros(shape, dtype=dtype, device=device) for shape, dtype in outputs)
        parts = [_split(t, world, d) for t, d in zip(tensors, dims)]
        full = [torch.empty(shape, dtype=dtype, device=device) for shape, dtype in outputs]
        slices = [t.chunk(world, 2) for t in full]
        run_loopback([program(*(p[r] for p in parts), cfg, r, world, into=tuple(s[r] for s in slices),
                              alibi=alibi) for r in range(world)])
        return tuple(full)
    check_backend(group, tensors[0].device)
    return run_on_group(program(*tensors, cfg, torch.distributed.get_rank(group),
                                torch.distributed.get_world_size(group), alibi=alibi), group, tensors[0].device)


@torch.library.custom_op("ringfx::ring_attention", mutates_args=())
def ring_attention_op(
    q: Tensor, k: Tensor, v: Tensor,
    key_padding_mask: Optional[Tensor], segment_ids: Optional[Tensor], attn_bias: Optional[Tensor],
    group_name: str, layout: str, causal: bool, scale: float, window: int, kernel: str,
    sinks: Optional[Tensor] = None, softcap: float = 0.0, chunk: int = 0, alibi: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    cfg = RingConfig(layout, causal, scale, window, kernel, softcap, sinks is not None, chunk, alibi is not None)
    group = resolve_group(group_name)
    loopback = isinstance(group, LoopbackRing)
    tensors = (q, k, v, key_padding_mask, segment_ids, attn_bias)
    try:
        check_inputs(*tensors, layout=layout, window=window, kernel=kernel, loopback=loopback,
                     world=group.size if loopback else torch.distributed.get_world_size(group),
                     sinks=sinks, softcap=softcap, chunk=chunk, alibi=alibi)
    except (ValueError, TypeError) as refused:
        if loopback:
            raise
        # this rank still joins the ranks' agreement, where every rank learns of the
        # refusal and raises before any transfer
        rank, world = torch.distributed.get_rank(group), torch.distributed.get_world_size(group)
        return run_on_group(forward_program(*tensors, cfg, rank, world, refused=refused), group)
    tensors = (q.contiguous(), k.contiguous(), v.contiguous(), key_padding_mask, segment_ids,
               as_4d_bias(attn_bias))
    out, lse = _run(forward_program, tensors, (2, 2, 2, 1, 1, -2), cfg, group,
                    [(q.shape, q.dtype), (q.shape[:-1], acc_dtype(q.dtype))], _slopes(alibi, q.dtype))
    if sinks is not None:
        out, lse = apply_sinks(out, lse, sinks)
    return out, lse


def _slopes(alibi, dtype):
    """ALiBi slopes in the accumulation dtype (the block bias is computed there, rounded once)."""
    return None if alibi is None else alibi.detach().to(acc_dtype(dtype)).contiguous()


@ring_attention_op.register_fake
def _(q, k, v, key_padding_mask, segment_ids, attn_bias, group_name, layout, causal, scale, window, kernel,
      sinks=None, softcap=0.0, chunk=0, alibi=None):
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty(q.shape[:-1], dtype=acc_dtype(q.dtype), device=q.device))


@torch.library.custom_op("ringfx::ring_attention_backward", mutates_args=())
def ring_attention_backward_op(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    key_padding_mask: Optional[Tensor], segment_ids: Optional[Tensor], attn_bias: Optional[Tensor],
    group_name: str, layout: str, causal: bool, scale: float, window: int, kernel: str, softcap: float = 0.0,
    chunk: int = 0, alibi: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Fed the forward's (out, lse) (with the sinks, if any, already in them: see
    ``sinks.py``), this is also the backward of attention with sinks."""
    cfg = RingConfig(layout, causal, scale, window, kernel, softcap, False, chunk, alibi is not None)
    tensors = (dout.contiguous(), q.contiguous(), k.contiguous(), v.contiguous(), out.contiguous(), lse.contiguous(),
               key_padding_mask, segment_ids, as_4d_bias(attn_bias))
    return _run(backward_program, tensors, (2, 2, 2, 2, 2, 2, 1, 1, -2), cfg, resolve_group(group_name),
                [(t.shape, t.dtype) for t in (q, k, v)], _slopes(alibi, q.dtype))


@ring_attention_backward_op.register_fake
def _(dout, q, k, v, out, lse, key_padding_mask, segment_ids, attn_bias, group_name, layout, causal, scale, window,
      kernel, softcap=0.0, chunk=0, alibi=None):
    # the real op returns contiguous gradients whatever the inputs' strides
    return tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))


def _setup_context(ctx, inputs, output):
    if ctx.needs_input_grad[5]:  # attn_bias (masks and ids are bool / integer)
        raise ValueError(LEARNED_BIAS)
    if len(ctx.needs_input_grad) > 15 and ctx.needs_input_grad[15]:  # alibi slopes (when passed)
        raise ValueError(LEARNED_ALIBI)
    q, k, v, pad, seg, bias, *options, sinks, softcap, chunk, alibi = inputs  # defaults filled in by the op
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, pad, seg, bias, sinks, alibi)
    ctx.options = (*options, softcap, chunk)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, pad, seg, bias, sinks, alibi = ctx.saved_tensors
    dq, dk, dv = torch.ops.ringfx.ring_attention_backward(dout, q, k, v, out, lse, pad, seg, bias, *ctx.options,
                                                          alibi=alibi)
    dsinks = sinks_grad(dout, out, lse, sinks) if sinks is not None and ctx.needs_input_grad[12] else None
    return dq, dk, dv, None, None, None, None, None, None, None, None, None, dsinks, None, None, None


ring_attention_op.register_autograd(_backward, setup_context=_setup_context)


def ring_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    group=None,
    causal: bool = False,
    scale: float | None = None,
    layout: str = "contiguous",
    window: int | None = None,
    key_padding_mask: Tensor | None = None,
    segment_ids: Tensor | None = None,
    attn_bias: Tensor | None = None,
    dropout_p: float = 0.0,
    kernel: str = "auto",
    softcap: float | None = None,
    sinks: Tensor | None = None,
    chunk: int | None = None,
    alibi_slopes: Tensor | None = None,
) -> Tensor:
    """Exact attention over a sequence sharded across a ring; equals
    ``F.scaled_dot_product_attention`` on the full sequence.

    Args:
        q: this rank's queries ``(B, Hq, S_local, D)``.
        k, v: this rank's keys and values ``(B, Hkv, S_local, D)``; ``Hq % Hkv == 0``
            (GQA/MQA: K/V travel with their own heads, never expanded).
        group: the ring: None (default group), a ProcessGroup, a 1-D DeviceMesh,
            ``(mesh, dim)``, or ``ringfx.LoopbackRing(P)`` (then q/k/v hold all P shards
            concatenated along the sequence, as ``ringfx.shard`` returns them).
        causal: causal attention in *global* positions.
        scale: score scale; default ``1/sqrt(D)``.
        layout: ``"contiguous"`` or ``"zigzag"`` (balances causal work).
        window: left sliding window W: query i sees keys j > i - W (and j <= i if causal).
        key_padding_mask: bool ``(B, S_local)``, True where the key is a real token.
        segment_ids: integer ``(B, S_local)``: attend only within the same segment/document.
        attn_bias: last resort: additive float (or bool, True = attend) bias of 2 to 4 dims,
            broadcastable (as SDPA broadcasts a mask) to ``(B, Hq, S_local, S_total)``; rows
            are local queries, columns keys in global order. A constant: one that requires
            grad is refused (learned biases are not supported yet).
        dropout_p: must be 0: ring attention is exact.
        kernel: per-block kernel, ``"auto"`` (fastest correct) or one of ``flash``,
            ``cudnn``, ``efficient``, ``math``.
        softcap: logit soft-capping (Gemma 2): the scaled scores become
            ``softcap * tanh(scores / softcap)`` before masks and biases are added. Computed
            by the math kernel (``kernel="auto"`` or ``"math"``). None or 0: none.
        sinks: attention sinks (GPT-OSS): a learned logit per query head, ``(Hq,)``, that
            joins every row's softmax denominator without a value; it receives a gradient
            (from this rank's queries: on a real ring, sum it over the ring as any
            parameter's).
        chunk: chunked local attention (Llama 4): query i sees key j only if
            ``j // chunk == i // chunk`` (global positions; and j <= i if causal). Blocks
            whose queries and keys share no chunk are skipped. None or 0: none.
        alibi_slopes: ALiBi (BLOOM, MPT): per-query-head slopes ``(Hq,)``, the same on every
            rank; ``slope_h * (j - i)`` is added to the scaled scores (after soft-capping).
            A constant: slopes that require grad are refused.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a tensor (B, H, S_local, D), got {type(t).__name__}")
    if dropout_p:
        raise ValueError(f"dropout_p={dropout_p}: ring attention is exact attention without dropout; "
                         "pass dropout_p=0 (put the model in eval mode)")
    check_window(window)
    check_softcap(softcap or 0.0, kernel)
    check_chunk(chunk, none_value=None)
    if isinstance(attn_bias, Tensor) and attn_bias.requires_grad and torch.is_grad_enabled():
        raise ValueError(LEARNED_BIAS)
    if isinstance(alibi_slopes, Tensor) and alibi_slopes.requires_grad and torch.is_grad_enabled():
        raise ValueError(LEARNED_ALIBI)
    if scale is None:
        d = q.shape[-1] if q.dim() else 0
        scale = 1.0 / math.sqrt(d) if d else 1.0  # head dim 0 is refused by the op
    # everything else is checked by the op itself (on a real group, with every rank
    # told of a refusal before any transfer)
    out, _ = torch.ops.ringfx.ring_attention(
        q, k, v, key_padding_mask, segment_ids, attn_bias, group_name_of(group), layout, bool(causal),
        float(scale), int(window or 0), kernel, sinks=sinks, softcap=float(softcap or 0.0),
        chunk=int(chunk or 0), alibi=alibi_slopes,
    )
    return out
