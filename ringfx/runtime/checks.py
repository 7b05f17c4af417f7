"""What the ring attention op accepts: every input is checked here, before the first
transfer, so that a bad call raises a clear error and leaves the ring as it was.

``check_inputs`` is the op's own check (the graph rewrite calls the op directly); the
Python wrapper adds what only it can see (``dropout_p``, a bias that requires grad).
On a real group a rank whose inputs are refused still joins the ranks' agreement
(``algorithm.py``), so every rank raises instead of waiting for it.

A mask or bias is accepted exactly where SDPA would broadcast it: ``attn_bias`` of 2
to 4 dims, broadcastable to ``(B, Hq, S_local, S_total)`` (rows: this rank's queries,
columns: every key in global order).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .kernels import KERNELS, SOFTCAP_KERNELS
from .layout import check_layout

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_WINDOW = 2**63 - 1  # the op schema's int is an int64

LEARNED_BIAS = (
    "attn_bias requires grad, but learned attention biases are not supported by ringfx yet: the ring op "
    "treats the bias as a constant and would return no gradient for it. Detach the bias if it is a "
    "constant (or run under torch.no_grad()), or leave this attention unrewritten"
)


def _dense(name: str, t: Tensor) -> None:
    if t.layout != torch.strided or t.is_nested:
        raise TypeError(f"{name} is a {'nested' if t.is_nested else str(t.layout)} tensor; ring attention "
                        f"takes dense (torch.strided) tensors: pass {name}.to_dense()")


def check_window(window, *, none_value=None) -> None:
    """``window``: an int in [1, 2**63 - 1], or ``none_value`` (no window: None for the
    wrapper, 0 in the op's schema)."""
    if window is None and none_value is None:
        return
    if not isinstance(window, bool) and isinstance(window, int) and (
            window == none_value or 1 <= window <= MAX_WINDOW):
        return
    raise ValueError(
        f"window={window!r} must be an int in [1, 2**63 - 1] (query i sees keys j > i - window); "
        f"pass {none_value!r} for no window (any window >= the sequence length means none)"
    )


LEARNED_ALIBI = (
    "alibi slopes require grad, but the ring op takes ALiBi slopes as constants (as BLOOM / MPT / Falcon "
    "do): call ringfx.ring_attention(..., alibi_slopes=slopes), which passes learned slopes as the "
    "relative table slope_h * (j - i) and gives them their gradient, or detach them (slopes.detach())"
)


def check_chunk(chunk, *, none_value=0) -> None:
    """``chunk``: an int in [1, 2**63 - 1] (the attention chunk size), or ``none_value`` / 0."""
    if chunk is None and none_value is None:
        return
    if not isinstance(chunk, bool) and isinstance(chunk, int) and 0 <= chunk <= MAX_WINDOW:
        return
    raise ValueError(f"chunk={chunk!r} must be an int >= 1 (query i sees key j only if j // chunk == i // chunk), "
                     "or None / 0 for no chunked attention")


def check_softcap(softcap, kernel: str) -> None:
    """``softcap``: a finite number >= 0 (0: no soft-capping), with a kernel that computes it."""
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not 0 <= softcap < math.inf:
        raise ValueError(f"softcap={softcap!r} must be a finite number > 0 (scores = softcap * tanh(scores / "
                         "softcap)), or None / 0 for no soft-capping")
    if softcap and kernel not in SOFTCAP_KERNELS:
        raise ValueError(f"kernel={kernel!r} cannot soft-cap the scores; pass kernel='auto' or 'math' with "
                         f"softcap={softcap}")


def check_inputs(q, k, v, pad, seg, bias, *, layout: str, window: int, kernel: str, world: int,
                 loopback: bool, sinks=None, softcap: float = 0.0, chunk: int = 0, alibi=None,
                 rel_bias=None) -> None:
    """Raise ``ValueError``/``TypeError`` naming the argument and the fix, or return.
    ``window``: 0 for none. Shapes are this rank's (for a loopback ring, all ranks')."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a tensor (B, H, S_local, D), got {type(t).__name__}")
        _dense(name, t)
        if t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor (B, H, S_local, D), got {tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; ring attention needs a floating dtype {FLOAT_DTYPES}")
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
    if d == 0:
        raise ValueError("q, k, v have head dim 0: attention needs a head dim D >= 1")
    hkv = k.shape[1]
    if hkv == 0 and hq:
        raise ValueError(f"k and v have 0 heads for {hq} query heads; give them at least one head")
    if hkv and hq % hkv:
        raise ValueError(f"{hq} query heads are not a multiple of {hkv} kv heads (GQA needs Hq % Hkv == 0)")
    check_layout(layout)
    check_window(window, none_value=0)
    if kernel not in KERNELS:
        raise ValueError(f"kernel={kernel!r} is not known; use one of {KERNELS}")
    if loopback and s % world:
        raise ValueError(f"a LoopbackRing({world}) needs the sequence length {s} divisible by {world}; "
                         "pass the output of ringfx.shard")
    per_rank = s // world if loopback else s
    if layout == "zigzag" and per_rank % 2:
        raise ValueError(f"the zigzag layout needs an even number of tokens per rank, got {per_rank}; make the "
                         "sequence length divisible by 2 * ring size (pad it) or use layout='contiguous'")
    for name, t in (("key_padding_mask", pad), ("segment_ids", seg), ("attn_bias", bias)):
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a tensor or None, got {type(t).__name__}")
        _dense(name, t)
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}; move it to {q.device}")
    for name, t in (("key_padding_mask", pad), ("segment_ids", seg)):
        if t is not None and tuple(t.shape) != (b, s):
            raise ValueError(f"{name} must have shape (B, S_local) = {(b, s)}, got {tuple(t.shape)}")
    if pad is not None and pad.dtype != torch.bool:
        raise TypeError(f"key_padding_mask must be bool (True = real token), got {pad.dtype}; "
                        "pass mask.bool() (or mask != 0)")
    if seg is not None and (seg.dtype.is_floating_point or seg.dtype.is_complex or seg.dtype == torch.bool):
        raise TypeError(f"segment_ids must be an integer tensor, got {seg.dtype}; pass segment_ids.long()")
    if bias is not None:
        _check_bias(bias, (b, hq, s, s if loopback else s * world))
    check_softcap(softcap, kernel)
    if sinks is not None:
        if not isinstance(sinks, Tensor):
            raise TypeError(f"sinks must be a tensor (H,) or None, got {type(sinks).__name__}")
        _dense("sinks", sinks)
        if tuple(sinks.shape) != (hq,):
            raise ValueError(f"sinks must hold one logit per query head, shape ({hq},), got {tuple(sinks.shape)}")
        if not sinks.dtype.is_floating_point:
            raise TypeError(f"sinks has dtype {sinks.dtype}; pass a floating tensor (sinks.float())")
        if sinks.device != q.device:
            raise ValueError(f"sinks is on {sinks.device} but q is on {q.device}; move it to {q.device}")
    check_chunk(chunk)
    if alibi is not None:
        if not isinstance(alibi, Tensor):
            raise TypeError(f"alibi slopes must be a tensor (H,) or None, got {type(alibi).__name__}")
        _dense("alibi slopes", alibi)
        if tuple(alibi.shape) != (hq,):
            raise ValueError(f"alibi slopes must hold one slope per query head, shape ({hq},), got "
                             f"{tuple(alibi.shape)}")
        if not alibi.dtype.is_floating_point:
            raise TypeError(f"alibi slopes have dtype {alibi.dtype}; pass a floating tensor (slopes.float())")
        if alibi.device != q.device:
            raise ValueError(f"alibi slopes are on {alibi.device} but q is on {q.device}; move them to {q.device}")
    if rel_bias is not None:
        _check_relative_bias(rel_bias, hq, s if loopback else s * world, q.device)


def _check_relative_bias(rel: Tensor, hq: int, s_total: int, device) -> None:
    if not isinstance(rel, Tensor):
        raise TypeError(f"relative_bias must be a tensor (Hq, 2S - 1) or None, got {type(rel).__name__}")
    _dense("relative_bias", rel)
    want = (hq, 2 * s_total - 1)
    if tuple(rel.shape) != want:
        raise ValueError(
            f"relative_bias must hold one bias per query head and distance j - i in [-(S - 1), S - 1] over the "
            f"whole sequence of S = {s_total} tokens, shape (Hq, 2S - 1) = {want}, got {tuple(rel.shape)} "
            "(column j - i + S - 1 is the bias of query i against key j)")
    if not rel.dtype.is_floating_point:
        raise TypeError(f"relative_bias has dtype {rel.dtype}; pass a floating tensor (relative_bias.float())")
    if rel.device != device:
        raise ValueError(f"relative_bias is on {rel.device} but q is on {device}; move it to {device}")


def _check_bias(bias: Tensor, target: tuple[int, int, int, int]) -> None:
    if bias.dtype != torch.bool and not bias.dtype.is_floating_point:
        raise TypeError(
            f"attn_bias has dtype {bias.dtype}; pass a bool mask (True = attend) or a float additive bias "
            "(an integer 0/1 mask would be added as a bias: convert it with mask.bool())"
        )
    shape = tuple(bias.shape)
    padded = (1,) * (4 - len(shape)) + shape
    if not 2 <= len(shape) <= 4 or any(n not in (1, want) for n, want in zip(padded, target)):
        raise ValueError(
            f"attn_bias of shape {shape} is not broadcastable to (B, Hq, S_local, S_total) = {target}: it "
            "needs 2 to 4 dims (as SDPA's attn_mask), each 1 or that size (rows: this rank's queries, "
            "columns: every key in global order)"
        )


def as_4d_bias(bias: Tensor | None) -> Tensor | None:
    """A bias of 2 or 3 dims as a 4-D view (leading dims of size 1), as SDPA broadcasts it."""
    if bias is None or bias.dim() == 4:
        return bias
    return bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))
