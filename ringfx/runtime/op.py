"""``torch.ops.ringfx.ring_attention``: the custom op everything targets, and its wrapper.

One opaque, differentiable node for dynamo, AOTAutograd, inductor and torch.export:
a fake implementation gives shapes, the autograd formula calls the backward op
``torch.ops.ringfx.ring_attention_backward``, which runs the ring backward.

    out, lse = torch.ops.ringfx.ring_attention(
        q, k, v, key_padding_mask, segment_ids, attn_bias,
        group_name, layout, causal, scale, window, kernel, sinks=None, softcap=0.0,
        chunk=0, alibi=None, rel_bias=None, token_major=False)

``softcap`` > 0 soft-caps the scaled scores before the mask (``softcap * tanh(s /
softcap)``, Gemma 2; computed by the flex or the math block kernel); ``sinks`` ``(Hq,)`` adds a learned
logit per head to every row's softmax denominator (GPT-OSS; see ``sinks.py``), and the
returned lse then includes it. ``chunk`` > 0 is chunked local attention (Llama 4: query i
sees key j only if ``j // chunk == i // chunk``, and ``j <= i`` under causal), computed from
global positions, blocks in no common chunk skipped; ``alibi`` ``(Hq,)`` holds ALiBi slopes
(BLOOM / MPT): ``slope_h * (j - i)`` is added to the scores of every block, built per block
from global positions (a constant here: ``ring_attention`` passes learned slopes as a relative
table). ``rel_bias``
``(Hq, 2S - 1)`` is a bias that depends only on the distance ``j - i`` (T5's bucketed
relative-position bias, learned): ``rel_bias[h, j - i + S - 1]`` is added to the scores, each
block gathering its (Sq, Sk) bias from global positions. The variants are per-head /
replicated: the same on every rank.

Why a table over distances and not T5's ``embedding(bucket(j - i))`` weight and bucket
parameters: the bucketing is the model's code (T5, mT5, UMT5, LongT5 and Pop2Piano differ in
it, and a model may add its own), so the graph rewrite builds the table by running the
model's own chain on the 1-D distances ``arange(1 - S, S)`` — O(S) values instead of the
(S, S) bias — and the op stays agnostic of how it was made. Its gradient is the blocks' dS
(the gradient of the scores' additive mask) summed by distance, per head; ordinary autograd
outside the op carries it on through the gather and the embedding to the learned weight. A
block's dS comes from the math kernel's backward (the fused kernels do not return it), so
a table that requires grad makes the backward blocks run the math kernel; the forward keeps
the fastest kernel that takes a mask.

``token_major`` only changes the output's memory layout: (B, S, H, D) in memory, as SDPA's
fused kernels return theirs (see ``_in_layout``); the eager inner compiler asks for it.

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
from .ring import LoopbackRing, check_backend, group_name_of, resolve_group, ring_size, run_loopback, run_on_group
from .sinks import apply_sinks, sinks_grad


def _split(x, world, dim):
    if x is None or dim is None:  # absent, or replicated (per-head slopes)
        return [None] * world
    if x.shape[dim] == 1:  # broadcast along the sequence (a bias row shared by all queries)
        return [x] * world
    return list(x.chunk(world, dim))


def _run(program, tensors, dims, cfg, group, outputs, summed=None, token_major=False, **replicated):
    """Run ``program`` on every rank this process plays: one for a real group, P for a
    loopback ring (inputs split along the sequence; each virtual rank writes its results
    straight into its slice of the full outputs, so the loopback adds no concatenation).
    ``outputs``: (shape, dtype) of each per-token result; ``summed``: (shape, dtype) of one
    more result that each rank returns from its own queries (a table's gradient): the
    virtual ranks' are added up; ``replicated``: keyword arguments every rank takes whole
    (ALiBi slopes, a relative-position table); ``token_major``: the first output is laid out
    (B, S, H, D) (see ``_in_layout``)."""
    if isinstance(group, LoopbackRing):
        world = group.size
        device = tensors[0].device
        if tensors[0].numel() == 0:  # nothing to attend (S, B or H is 0): no kernel runs
            return tuple(torch.zeros(shape, dtype=dtype, device=device)
                         for shape, dtype in outputs + ([summed] if summed else []))
        parts = [_split(t, world, d) for t, d in zip(tensors, dims)]
        full = [_empty_out(shape, dtype, device, token_major and i == 0)
                for i, (shape, dtype) in enumerate(outputs)]
        slices = [t.chunk(world, 2) for t in full]
        results = run_loopback([program(*(p[r] for p in parts), cfg, r, world, into=tuple(s[r] for s in slices),
                                        **replicated) for r in range(world)])
        if summed:
            full.append(sum(r[len(outputs)] for r in results).to(summed[1]))
        return tuple(full)
    check_backend(group, tensors[0].device)
    results = run_on_group(program(*tensors, cfg, torch.distributed.get_rank(group),
                                   torch.distributed.get_world_size(group), **replicated), group, tensors[0].device)
    if summed:
        results = (*results[:len(outputs)], results[len(outputs)].to(summed[1]))
    return results


@torch.library.custom_op("ringfx::ring_attention", mutates_args=())
def ring_attention_op(
    q: Tensor, k: Tensor, v: Tensor,
    key_padding_mask: Optional[Tensor], segment_ids: Optional[Tensor], attn_bias: Optional[Tensor],
    group_name: str, layout: str, causal: bool, scale: float, window: int, kernel: str,
    sinks: Optional[Tensor] = None, softcap: float = 0.0, chunk: int = 0, alibi: Optional[Tensor] = None,
    rel_bias: Optional[Tensor] = None, token_major: bool = False,
) -> tuple[Tensor, Tensor]:
    cfg = RingConfig(layout, causal, scale, window, kernel, softcap, sinks is not None, chunk, alibi is not None,
                     rel_bias is not None)
    group = resolve_group(group_name)
    loopback = isinstance(group, LoopbackRing)
    tensors = (q, k, v, key_padding_mask, segment_ids, attn_bias)
    try:
        check_inputs(*tensors, layout=layout, window=window, kernel=kernel, loopback=loopback,
                     world=group.size if loopback else torch.distributed.get_world_size(group),
                     sinks=sinks, softcap=softcap, chunk=chunk, alibi=alibi, rel_bias=rel_bias)
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
                    [(q.shape, q.dtype), (q.shape[:-1], acc_dtype(q.dtype))], alibi=_slopes(alibi, q.dtype),
                    rel=_table(rel_bias), token_major=token_major)
    if sinks is not None:
        out, lse = apply_sinks(out, lse, sinks)
    return _in_layout(out, token_major), lse


def _empty_out(shape, dtype, device, token_major: bool) -> Tensor:
    """An uninitialised (B, H, S, D) output, laid out as (B, S, H, D) when ``token_major``."""
    if not token_major:
        return torch.empty(shape, dtype=dtype, device=device)
    b, h, s, d = shape
    return torch.empty((b, s, h, d), dtype=dtype, device=device).transpose(1, 2)


def _in_layout(out: Tensor, token_major: bool) -> Tensor:
    """``out`` with the strides the fake implementation promises: contiguous (B, H, S, D), or
    token-major ((B, S, H, D) in memory, what SDPA's fused kernels return) when
    ``token_major``. Token-major lets a model's ``out.transpose(1, 2).reshape(B, S, H * D)``
    be a view, so the output projection saves the op's own output instead of a copy (one
    (S, hidden) tensor per layer). A copy only where the kernel left another layout."""
    if not token_major:
        return out.contiguous()
    if out.transpose(1, 2).is_contiguous():
        return out
    return _empty_out(out.shape, out.dtype, out.device, True).copy_(out)

def _alibi_table(slopes: Tensor, q: Tensor, group, table: Optional[Tensor]) -> Tensor:
    """ALiBi as a relative-position table ``(Hq, 2S - 1)``: column ``j - i + S - 1`` holds
    ``slopes[h] * (j - i)`` (added to ``table`` when one is given). S is the global length."""
    if not isinstance(slopes, Tensor) or slopes.dim() != 1:
        raise ValueError(f"alibi_slopes must be a 1-D tensor of one slope per query head, got "
                         f"{getattr(slopes, 'shape', type(slopes).__name__)}")
    s_total = q.shape[2] * (1 if isinstance(group, LoopbackRing) else ring_size(group))
    distances = torch.arange(1 - s_total, s_total, device=slopes.device).to(slopes.dtype)
    alibi = slopes[:, None] * distances[None, :]
    return alibi if table is None else table + alibi


def _slopes(alibi, dtype):
    """ALiBi slopes in the accumulation dtype (the block bias is computed there, rounded once)."""
    return None if alibi is None else alibi.detach().contiguous().to(acc_dtype(dtype))


def _table(rel_bias):
    """The relative-position table as the block masks gather from it (its own dtype)."""
    return None if rel_bias is None else rel_bias.detach().contiguous()


@ring_attention_op.register_fake
def _(q, k, v, key_padding_mask, segment_ids, attn_bias, group_name, layout, causal, scale, window, kernel,
      sinks=None, softcap=0.0, chunk=0, alibi=None, rel_bias=None, token_major=False):
    return (_empty_out(q.shape, q.dtype, q.device, token_major),
            torch.empty(q.shape[:-1], dtype=acc_dtype(q.dtype), device=q.device))


@torch.library.custom_op("ringfx::ring_attention_backward", mutates_args=())
def ring_attention_backward_op(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    key_padding_mask: Optional[Tensor], segment_ids: Optional[Tensor], attn_bias: Optional[Tensor],
    group_name: str, layout: str, causal: bool, scale: float, window: int, kernel: str, softcap: float = 0.0,
    chunk: int = 0, alibi: Optional[Tensor] = None, rel_bias: Optional[Tensor] = None, rel_bias_grad: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fed the forward's (out, lse) (with the sinks, if any, already in them: see
    ``sinks.py``), this is also the backward of attention with sinks. Returns dq, dk, dv and
    the gradient of ``rel_bias`` from this process's queries when ``rel_bias_grad`` (else an
    empty tensor)."""
    cfg = RingConfig(layout, causal, scale, window, kernel, softcap, False, chunk, alibi is not None,
                     rel_bias is not None)
    tensors = (dout.contiguous(), q.contiguous(), k.contiguous(), v.contiguous(), out.contiguous(), lse.contiguous(),
               key_padding_mask, segment_ids, as_4d_bias(attn_bias))
    grad_table = rel_bias is not None and rel_bias_grad
    grads = _run(backward_program, tensors, (2, 2, 2, 2, 2, 2, 1, 1, -2), cfg, resolve_group(group_name),
                 [(t.shape, t.dtype) for t in (q, k, v)],
                 summed=(rel_bias.shape, rel_bias.dtype) if grad_table else None,
                 alibi=_slopes(alibi, q.dtype), rel=_table(rel_bias), bias_grad=grad_table)
    return (*grads, q.new_empty(0)) if not grad_table else tuple(grads)


@ring_attention_backward_op.register_fake
def _(dout, q, k, v, out, lse, key_padding_mask, segment_ids, attn_bias, group_name, layout, causal, scale, window,
      kernel, softcap=0.0, chunk=0, alibi=None, rel_bias=None, rel_bias_grad=False):
    # the real op returns contiguous gradients whatever the inputs' strides
    grads = tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    table = rel_bias is not None and rel_bias_grad
    return (*grads, torch.empty(rel_bias.shape if table else (0,), dtype=rel_bias.dtype if table else q.dtype,
                                device=q.device))


def _setup_context(ctx, inputs, output):
    if ctx.needs_input_grad[5]:  # attn_bias (masks and ids are bool / integer)
        raise ValueError(LEARNED_BIAS)
    if len(ctx.needs_input_grad) > 15 and ctx.needs_input_grad[15]:  # alibi slopes (when passed)
        raise ValueError(LEARNED_ALIBI)
    q, k, v, pad, seg, bias, *options, sinks, softcap, chunk, alibi, rel, _ = inputs  # defaults filled in by the op
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, pad, seg, bias, sinks, alibi, rel)
    ctx.options = (*options, softcap, chunk)
    ctx.rel_grad = rel is not None and len(ctx.needs_input_grad) > 16 and ctx.needs_input_grad[16]


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, pad, seg, bias, sinks, alibi, rel = ctx.saved_tensors
    dq, dk, dv, drel = torch.ops.ringfx.ring_attention_backward(
        dout, q, k, v, out, lse, pad, seg, bias, *ctx.options, alibi=alibi, rel_bias=rel, rel_bias_grad=ctx.rel_grad)
    dsinks = sinks_grad(dout, out, lse, sinks) if sinks is not None and ctx.needs_input_grad[12] else None
    return (dq, dk, dv, None, None, None, None, None, None, None, None, None, dsinks, None, None, None,
            drel if ctx.rel_grad else None, None)


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
    relative_bias: Tensor | None = None,
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
            ``cudnn``, ``efficient``, ``flex``, ``math``.
        softcap: logit soft-capping (Gemma 2): the scaled scores become
            ``softcap * tanh(scores / softcap)`` before masks and biases are added. Computed
            by compiled flex per block on CUDA and the math kernel elsewhere (``kernel="auto"``),
            or by the one asked for (``"flex"`` or ``"math"``). None or 0: none.
        sinks: attention sinks (GPT-OSS): a learned logit per query head, ``(Hq,)``, that
            joins every row's softmax denominator without a value; it receives a gradient
            (from this rank's queries: on a real ring, sum it over the ring as any
            parameter's).
        chunk: chunked local attention (Llama 4): query i sees key j only if
            ``j // chunk == i // chunk`` (global positions; and j <= i if causal). Blocks
            whose queries and keys share no chunk are skipped. None or 0: none.
        alibi_slopes: ALiBi (BLOOM, MPT): per-query-head slopes ``(Hq,)``, the same on every
            rank; ``slope_h * (j - i)`` is added to the scaled scores (after soft-capping).
            Slopes that require grad (learned) get their gradient: they are passed to the op
            as the relative table ``slope_h * (j - i)`` (see ``relative_bias``; its backward
            runs the math kernel), from this rank's queries on a real ring.
        relative_bias: a bias that depends only on the distance ``j - i`` (T5's bucketed
            relative-position bias): a table ``(Hq, 2S - 1)`` over the whole sequence of S
            tokens (global: S_local * P on a real ring), the same on every rank; column
            ``j - i + S - 1`` is added to the scaled scores of query i and key j (after
            soft-capping). Each block gathers its bias from global positions (no S x S tensor);
            a table that requires grad gets its gradient, the blocks' dS summed by distance
            (from this rank's queries: on a real ring, sum it over the ring as any
            parameter's). Build it by applying the model's own bucketing and embedding to the
            distances ``arange(1 - S, S)``; its gradient then reaches the embedding's weight.
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
        # learned slopes: ALiBi is the relative table slope_h * (j - i), whose gradient the
        # op computes (the blocks' dS summed by distance); autograd takes it on to the slopes
        relative_bias = _alibi_table(alibi_slopes, q, group, relative_bias)
        alibi_slopes = None
    if scale is None:
        d = q.shape[-1] if q.dim() else 0
        scale = 1.0 / math.sqrt(d) if d else 1.0  # head dim 0 is refused by the op
    # everything else is checked by the op itself (on a real group, with every rank
    # told of a refusal before any transfer)
    out, _ = torch.ops.ringfx.ring_attention(
        q, k, v, key_padding_mask, segment_ids, attn_bias, group_name_of(group), layout, bool(causal),
        float(scale), int(window or 0), kernel, sinks=sinks, softcap=float(softcap or 0.0),
        chunk=int(chunk or 0), alibi=alibi_slopes, rel_bias=relative_bias,
    )
    return out
