"""``torch.ops.ringfx.ring_attention``: the custom op everything targets, and its wrapper.

One opaque, differentiable node for dynamo, AOTAutograd, inductor and torch.export:
a fake implementation gives shapes, the autograd formula calls the backward op
``torch.ops.ringfx.ring_attention_backward``, which runs the ring backward.

    out, lse = torch.ops.ringfx.ring_attention(
        q, k, v, key_padding_mask, segment_ids, attn_bias,
        group_name, layout, causal, scale, window, kernel)

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
from .kernels import KERNELS
from .layout import check_layout
from .ring import LoopbackRing, check_backend, group_name_of, resolve_group, ring_size, run_loopback, run_on_group


def _split(x, world, dim):
    if x is None:
        return [None] * world
    if x.shape[dim] == 1:  # broadcast along the sequence (a bias row shared by all queries)
        return [x] * world
    return list(x.chunk(world, dim))


def _run(program, tensors, dims, cfg, group_name, outputs):
    """Run ``program`` on every rank this process plays: one for a real group, P for a
    loopback ring (inputs split along the sequence; each virtual rank writes its results
    straight into its slice of the full outputs, so the loopback adds no concatenation).
    ``outputs``: (shape, dtype) of each result."""
    group = resolve_group(group_name)
    if isinstance(group, LoopbackRing):
        world = group.size
        parts = [_split(t, world, d) for t, d in zip(tensors, dims)]
        device = tensors[0].device
        full = [torch.empty(shape, dtype=dtype, device=device) for shape, dtype in outputs]
        slices = [t.chunk(world, 2) for t in full]
        run_loopback([program(*(p[r] for p in parts), cfg, r, world, into=tuple(s[r] for s in slices))
                      for r in range(world)])
        return tuple(full)
    check_backend(group, tensors[0].device)
    return run_on_group(program(*tensors, cfg, torch.distributed.get_rank(group),
                                torch.distributed.get_world_size(group)), group, tensors[0].device)


@torch.library.custom_op("ringfx::ring_attention", mutates_args=())
def ring_attention_op(
    q: Tensor, k: Tensor, v: Tensor,
    key_padding_mask: Optional[Tensor], segment_ids: Optional[Tensor], attn_bias: Optional[Tensor],
    group_name: str, layout: str, causal: bool, scale: float, window: int, kernel: str,
) -> tuple[Tensor, Tensor]:
    cfg = RingConfig(layout, causal, scale, window, kernel)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    return _run(forward_program, (q, k, v, key_padding_mask, segment_ids, attn_bias), (2, 2, 2, 1, 1, -2),
                cfg, group_name, [(q.shape, q.dtype), (q.shape[:-1], acc_dtype(q.dtype))])


@ring_attention_op.register_fake
def _(q, k, v, key_padding_mask, segment_ids, attn_bias, group_name, layout, causal, scale, window, kernel):
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty(q.shape[:-1], dtype=acc_dtype(q.dtype), device=q.device))


@torch.library.custom_op("ringfx::ring_attention_backward", mutates_args=())
def ring_attention_backward_op(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    key_padding_mask: Optional[Tensor], segment_ids: Optional[Tensor], attn_bias: Optional[Tensor],
    group_name: str, layout: str, causal: bool, scale: float, window: int, kernel: str,
) -> tuple[Tensor, Tensor, Tensor]:
    cfg = RingConfig(layout, causal, scale, window, kernel)
    tensors = (dout.contiguous(), q.contiguous(), k.contiguous(), v.contiguous(), out.contiguous(), lse.contiguous(),
               key_padding_mask, segment_ids, attn_bias)
    return _run(backward_program, tensors, (2, 2, 2, 2, 2, 2, 1, 1, -2), cfg, group_name,
                [(t.shape, t.dtype) for t in (q, k, v)])


@ring_attention_backward_op.register_fake
def _(dout, q, k, v, out, lse, key_padding_mask, segment_ids, attn_bias, group_name, layout, causal, scale, window,
      kernel):
    # the real op returns contiguous gradients whatever the inputs' strides
    return tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))


def _setup_context(ctx, inputs, output):
    q, k, v, pad, seg, bias, *options = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, pad, seg, bias)
    ctx.options = options


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, pad, seg, bias = ctx.saved_tensors
    dq, dk, dv = torch.ops.ringfx.ring_attention_backward(dout, q, k, v, out, lse, pad, seg, bias, *ctx.options)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None


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
        attn_bias: last resort: additive float (or bool, True = attend) bias broadcastable to
            ``(B, Hq, S_local, S_total)``; rows are local queries, columns keys in global order.
            Treated as a constant (no gradient).
        dropout_p: must be 0: ring attention is exact.
        kernel: per-block kernel, ``"auto"`` (fastest correct) or one of ``flash``,
            ``cudnn``, ``efficient``, ``math``.
    """
    name = group_name_of(group)
    world = ring_size(name)
    _check_inputs(q, k, v, key_padding_mask, segment_ids, attn_bias, dropout_p, window, kernel, world,
                  loopback=name.startswith("loopback:"))
    check_layout(layout)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    out, _ = torch.ops.ringfx.ring_attention(
        q, k, v, key_padding_mask, segment_ids, attn_bias, name, layout, bool(causal), scale, int(window or 0), kernel
    )
    return out


def _check_inputs(q, k, v, pad, seg, bias, dropout_p, window, kernel, world, loopback):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor (B, H, S_local, D), got "
                             f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
        if t.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise TypeError(f"{name} has dtype {t.dtype}; ring attention needs a floating dtype")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype}); cast them to one dtype")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v are on different devices ({q.device}, {k.device}, {v.device})")
    if k.shape != v.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    b, hq, s, d = q.shape
    if k.shape[0] != b or k.shape[2] != s or k.shape[3] != d:
        raise ValueError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree on batch, local sequence length and head dim"
        )
    if hq % k.shape[1]:
        raise ValueError(f"{hq} query heads are not a multiple of {k.shape[1]} kv heads (GQA needs Hq % Hkv == 0)")
    if dropout_p:
        raise ValueError(f"dropout_p={dropout_p}: ring attention is exact attention without dropout; "
                         "pass dropout_p=0 (put the model in eval mode)")
    if window is not None and (not isinstance(window, int) or window < 1):
        raise ValueError(f"window={window!r} must be a positive int (keys j > i - window are visible) or None")
    if kernel not in KERNELS:
        raise ValueError(f"kernel={kernel!r} is not known; use one of {KERNELS}")
    if loopback and s % world:
        raise ValueError(f"a LoopbackRing({world}) needs the sequence length {s} divisible by {world}; "
                         "pass the output of ringfx.shard")
    for name, t in (("key_padding_mask", pad), ("segment_ids", seg)):
        if t is not None and tuple(t.shape) != (b, s):
            raise ValueError(f"{name} must have shape (B, S_local) = {(b, s)}, got {tuple(t.shape)}")
    if pad is not None and pad.dtype != torch.bool:
        raise TypeError(f"key_padding_mask must be bool (True = real token), got {pad.dtype}")
    if seg is not None and (seg.dtype.is_floating_point or seg.dtype == torch.bool):
        raise TypeError(f"segment_ids must be an integer tensor, got {seg.dtype}")
    if bias is not None:
        s_total = s if loopback else s * world
        if bias.dim() != 4 or bias.shape[-2] not in (1, s) or bias.shape[-1] not in (1, s_total):
            raise ValueError(f"attn_bias must be 4-D, broadcastable to (B, Hq, S_local, S_total) = "
                             f"{(b, hq, s, s_total)}, got {tuple(bias.shape)}")
        if bias.requires_grad and torch.is_grad_enabled():
            raise ValueError("attn_bias requires grad, but ring attention treats the bias as a constant; "
                             "detach it, or leave this attention unrewritten")
