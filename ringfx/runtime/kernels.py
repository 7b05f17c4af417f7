"""Per-block attention kernels that return the log-sum-exp, and their backward.

Every kernel has the same two functions:

    forward(q, k, v, mask, is_causal, scale)              -> out, lse   # lse: (B, H, Sq)
    backward(dout, q, k, v, out, lse, mask, is_causal, scale) -> dq, dk, dv

``mask`` is None or an additive float mask broadcastable to (B, H, Sq, Sk). The
backward is handed the *merged* (global) ``out`` and ``lse``: with those, a block's
probabilities ``exp(s - lse)`` are the global ones, so the block gradients are exact
(FlashAttention-2, Alg. 2). Rows that see no key at all have lse = -inf; backward
receives +inf there so that ``exp(s - lse)`` is 0, not NaN.

Backends: CPU ``_scaled_dot_product_flash_attention_for_cpu``; CUDA cuDNN, flash and
memory-efficient SDPA ops; a float32/float64 math fallback for everything else. Logit
soft-capping (``cap * tanh(s / cap)`` of the scaled scores, before the mask: Gemma 2)
is computed by torch's ``flex_attention`` (``FlexKernel``: on CUDA, where it compiles to a
fused kernel; its backward is fed the merged log-sum-exp through its own lse gradient) or
by the math kernel (CPU, float64): the SDPA kernels take no score function.
The math kernel's backward can also return dS, the gradient of the additive mask, from
which the ring sums a learned relative-position table's gradient by distance (the fused
kernels do not return it).
GQA is handled in ``gqa_forward``/``gqa_backward`` without expanding K and V when no
causal flag is needed: the G query heads of a KV head are laid out as more query rows.
"""

from __future__ import annotations

import functools
import logging

import torch

from .._compat import SDPA_KERNELS, autograd_inside_op, recompile_limit
from .fold import acc_dtype
log = logging.getLogger("ringfx.runtime.kernels")

KERNELS = ("auto", "flash", "cudnn", "efficient", "flex", "math")
SOFTCAP_KERNELS = ("auto", "flex", "math")  # the kernels that compute soft-capped scores
FLEX_HEAD_DIMS = (16, 32, 64, 128, 256)  # head dims flex's CUDA kernel is taken for by kernel="auto"


def _math_scores(q, k, mask, is_causal, scale, acc, softcap=0.0):
    """The block's scores, and ``tanh(scaled / softcap)`` (None without soft-capping) for
    the backward's chain rule."""
    s = torch.matmul(q.to(acc), k.to(acc).transpose(-2, -1)) * scale
    capped = None
    if softcap:
        capped = torch.tanh(s / softcap)
        s = capped * softcap
    if is_causal:
        sq, sk = s.shape[-2:]
        s = s.masked_fill(~torch.ones(sq, sk, dtype=torch.bool, device=s.device).tril(), float("-inf"))
    if mask is not None:
        s = s + mask.to(acc)
    return s, capped


class MathKernel:
    """Reference kernel in float32 (float64 for float64 inputs); any device, any mask;
    with ``softcap`` > 0 the scores are ``softcap * tanh(scale * q kᵀ / softcap)`` (Gemma 2's
    logit soft-capping) before the mask is added."""

    name = "math"

    def __init__(self, softcap: float = 0.0):
        self.softcap = softcap

    def forward(self, q, k, v, mask, is_causal, scale):
        # as the flash kernels: exponentials relative to the row maximum, normalised by
        # their own sum, so the output's weights sum to 1 to rounding. exp(s - lse) does
        # not: lse carries an absolute rounding error of eps * |lse|, which a large
        # common offset in K makes large, and the backward's delta = dout . out then
        # misses sum(dS) = 0 by that error times |V| (dQ lost 3 digits at offset 1e4).
        acc = acc_dtype(q.dtype)
        s, _ = _math_scores(q, k, mask, is_causal, scale, acc, self.softcap)
        m = s.amax(-1, keepdim=True)
        m = m.masked_fill(m == float("-inf"), 0.0)  # a row that sees no key: e = 0, out 0, lse -inf
        e = torch.exp(s - m)
        total = e.sum(-1, keepdim=True)
        out = torch.matmul(e, v.to(acc)) / total.masked_fill(total == 0, 1.0)
        return out.to(q.dtype), (m + total.log()).squeeze(-1)

    def backward(self, dout, q, k, v, out, lse, mask, is_causal, scale, bias_grad=False):
        """``bias_grad``: also return the gradient of the additive mask, ``dS`` (B, H, Sq, Sk)
        in the accumulation dtype (what a learned relative-position table's gradient is summed from)."""
        acc = acc_dtype(q.dtype)
        s, capped = _math_scores(q, k, mask, is_causal, scale, acc, self.softcap)
        p = torch.exp(s - lse.to(acc)[..., None])
        dout_, v_ = dout.to(acc), v.to(acc)
        dv = torch.matmul(p.transpose(-2, -1), dout_)
        dp = torch.matmul(dout_, v_.transpose(-2, -1))
        delta = (dout_ * out.to(acc)).sum(-1, keepdim=True)
        dmask = p * (dp - delta)  # the mask is added after the scale and the soft-cap
        ds = dmask
        if capped is not None:  # d(c tanh(x / c)) / dx = 1 - tanh²(x / c)
            ds = ds * (1.0 - capped * capped)
        ds = ds * scale
        dq = torch.matmul(ds, k.to(acc))
        dk = torch.matmul(ds.transpose(-2, -1), q.to(acc))
        grads = dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
        return (*grads, dmask) if bias_grad else grads


class CpuFlashKernel:
    """aten's CPU flash attention (``SDPA_KERNELS.cpu_flash``): any float dtype, takes a mask
    of the query's dtype."""

    name = "flash"

    def forward(self, q, k, v, mask, is_causal, scale):
        if mask is not None:
            mask = mask.to(q.dtype)
        out, lse = SDPA_KERNELS.cpu_flash(q, k, v, 0.0, is_causal, attn_mask=mask,
                                                                    scale=scale)
        # it returns out 0, lse 0 for a query row holding NaN; SDPA returns NaN
        nan_rows = q.isnan().any(-1)
        return out.masked_fill(nan_rows[..., None], float("nan")), lse.masked_fill(nan_rows, float("nan"))

    def backward(self, dout, q, k, v, out, lse, mask, is_causal, scale):
        if mask is not None:
            mask = mask.to(q.dtype)
        return SDPA_KERNELS.cpu_flash_backward(
            dout, q, k, v, out, lse, 0.0, is_causal, attn_mask=mask, scale=scale
        )


class FlexKernel:
    """torch's ``flex_attention`` (compiled: a Triton kernel on CUDA) with soft-capped
    scores (``softcap`` > 0; 0: plain) and the block's additive mask read inside the score
    function, so no (B, H, Sq, Sk) scores are materialised.

    flex's backward cannot be handed the ring's merged ``out`` and ``lse``; it differentiates
    its own block result (``out_b``, ``lse_b``). Since the global probabilities are
    ``p = exp(s - lse) = c * p_b`` with ``c = exp(lse_b - lse)`` per row, feeding it
    ``dout_b = c * dout`` and the log-sum-exp gradient ``dlse_b = rowsum(dout_b * out_b) -
    c * rowsum(dout * out)`` gives exactly the global dS = p * (dout vᵀ - rowsum(dout * out))
    restricted to the block (its dS is ``p_b * (dout_b vᵀ - rowsum(dout_b * out_b)) + p_b *
    dlse_b``). The price: the backward recomputes the block's forward.

    ALiBi is computed inside the kernel too: ``alibi = (slopes (Hq,), q_pos, k_pos)`` adds
    ``slopes[h] * (k_pos[j] - q_pos[i])`` (float32) to the scores, from the block's global
    positions. Under GQA a block's K/V are expanded to the query heads (as for a causal
    call; flex's own ``enable_gqa`` failed to compile on torch 2.11: H200, float32 and
    dynamic shapes).

    ``attend(q, k, v, mask, is_causal, scale, softcap, alibi) -> (out, lse)`` is flex by
    default; any differentiable function with the same meaning can stand in (the CPU
    tests: flex has no backward on CPU).
    """

    name = "flex"

    def __init__(self, softcap: float = 0.0, attend=None):
        self.softcap = softcap
        self.attend = attend

    def forward(self, q, k, v, mask, is_causal, scale, alibi=None):
        with torch.no_grad():
            return (self.attend or _flex_attend)(q, k, v, mask, is_causal, scale, self.softcap, alibi)

    def backward(self, dout, q, k, v, out, lse, mask, is_causal, scale, alibi=None):
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        with autograd_inside_op():  # the ring's backward op runs below autograd
            out_b, lse_b = (self.attend or _flex_attend)(*leaves, mask, is_causal, scale, self.softcap, alibi)
            acc = lse_b.dtype
            with torch.no_grad():
                c = torch.exp(lse_b - lse.to(acc))  # 0 where the block (or the whole ring) saw no key
                dout_b = (dout.to(acc) * c[..., None]).to(out_b.dtype)
                delta = (dout.to(acc) * out.to(acc)).sum(-1)
                dlse_b = (dout_b.to(acc) * out_b.to(acc)).sum(-1) - c * delta
            return torch.autograd.grad((out_b, lse_b), leaves, (dout_b, dlse_b))


def _flex_attend(q, k, v, mask, is_causal, scale, softcap, alibi=None):
    """flex_attention's output and natural log-sum-exp (float32) for one block: ``is_causal``
    as a block mask (query row i sees key j <= i), ``mask`` and the ALiBi term added to the
    (soft-capped) scores."""
    block_mask = _causal_block_mask(q.shape[-2], k.shape[-2], q.device) if is_causal else None
    if mask is not None:
        mask = mask.to(torch.float32).expand(q.shape[0], q.shape[1], q.shape[-2], k.shape[-2])
    slopes = q_pos = k_pos = None
    if alibi is not None:
        slopes, q_pos, k_pos = alibi
        slopes = slopes.to(torch.float32)
    with recompile_limit(FLEX_RECOMPILE_LIMIT):
        return _compiled_flex()(q, k, v, mask, block_mask, scale, float(softcap), slopes, q_pos, k_pos)


def _flex_call(q, k, v, mask, block_mask, scale, softcap, slopes, q_pos, k_pos):
    from torch.nn.attention.flex_attention import flex_attention

    def score_mod(score, b, h, i, j):
        if softcap:
            score = softcap * torch.tanh(score / softcap)
        if slopes is not None:
            score = score + slopes[h] * (k_pos[j] - q_pos[i]).to(torch.float32)
        if mask is not None:
            score = score + mask[b, h, i, j]
        return score

    options = dict(score_mod=score_mod, block_mask=block_mask, scale=scale)
    try:
        from torch.nn.attention.flex_attention import AuxRequest
    except ImportError:  # torch < 2.9
        return flex_attention(q, k, v, return_lse=True, **options)
    out, aux = flex_attention(q, k, v, return_aux=AuxRequest(lse=True), **options)
    return out, aux.lse


# graphs of the one flex call: per block shape, dtype, with and without a mask, ALiBi, a
# causal block mask and gradients, per soft-cap value
FLEX_RECOMPILE_LIMIT = 256


@functools.cache
def _compiled_flex():
    # flex only runs fused when compiled; static shapes (a ring's block shapes are few)
    return torch.compile(_flex_call, fullgraph=True, dynamic=False)


@functools.lru_cache(maxsize=64)
def _causal_block_mask(sq: int, sk: int, device):
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(lambda b, h, i, j: j <= i, None, None, sq, sk, device=device)


class CudnnKernel:
    """cuDNN fused attention (fastest on H100 for bf16/fp16). Its lse is (B, H, S, 1)."""

    name = "cudnn"

    def forward(self, q, k, v, mask, is_causal, scale):
        mask = _finite_floor(mask)
        res = SDPA_KERNELS.cudnn(q, k, v, mask, True, 0.0, is_causal, False, scale=scale)
        out, lse = res[0], res[1]
        return out, lse.reshape(q.shape[:-1])

    def backward(self, dout, q, k, v, out, lse, mask, is_causal, scale):
        # None stands for the undefined tensors autograd's own formula passes (no bias,
        # no nested sequences, no dropout)
        mask = _finite_floor(mask)
        dq, dk, dv = SDPA_KERNELS.cudnn_backward(
            dout, q, k, v, out, lse.unsqueeze(-1).contiguous(), None, None, mask, None, None,
            q.shape[-2], k.shape[-2], 0.0, is_causal, scale=scale,
        )
        return dq, dk, dv


class CudaFlashKernel:
    """FlashAttention-2 as shipped in PyTorch (bf16/fp16, no mask)."""

    name = "flash"

    def forward(self, q, k, v, mask, is_causal, scale):
        assert mask is None, "the CUDA flash kernel takes no mask"
        res = SDPA_KERNELS.flash(q, k, v, 0.0, is_causal, False, scale=scale)
        return res[0], res[1]

    def backward(self, dout, q, k, v, out, lse, mask, is_causal, scale):
        seed = torch.zeros(2, dtype=torch.int64, device=q.device)
        dq, dk, dv = SDPA_KERNELS.flash_backward(
            dout, q, k, v, out, lse.contiguous(), None, None, q.shape[-2], k.shape[-2], 0.0, is_causal,
            seed, seed, scale=scale,
        )
        return dq, dk, dv


class EfficientKernel:
    """Memory-efficient attention: takes an additive bias; fp32/bf16/fp16 on CUDA.
    Its lse is padded to a multiple of 32 along the query axis."""

    name = "efficient"

    def forward(self, q, k, v, mask, is_causal, scale):
        if mask is not None:
            mask = _aligned_bias(_finite_floor(mask.to(q.dtype)), q, k)
        out, lse, _, _ = SDPA_KERNELS.efficient(q, k, v, mask, True, 0.0, is_causal, scale=scale)
        return out, lse[..., : q.shape[-2]]

    def backward(self, dout, q, k, v, out, lse, mask, is_causal, scale):
        if mask is not None:
            mask = _aligned_bias(_finite_floor(mask.to(q.dtype)), q, k)
        sq = q.shape[-2]
        padded = lse.new_full((*lse.shape[:-1], (sq + 31) // 32 * 32), float("inf"))
        padded[..., :sq] = lse
        seed = torch.zeros((), dtype=torch.int64, device=q.device)
        dq, dk, dv, _ = SDPA_KERNELS.efficient_backward(
            dout, q, k, v, mask, out, padded, seed, seed, 0.0, [True, True, True, False], is_causal, scale=scale
        )
        return dq, dk, dv


# A bias entry this low means "masked". The CUDA kernels scale the biased scores by
# log2(e) before exp2, so a bias at the float32 minimum (transformers' eager masks are
# ``torch.finfo(dtype).min``) overflows to -inf there; a block whose row is masked
# entirely then comes back as garbage instead of an empty row (measured: errors of 1.9
# on a ring of 2, H200, torch 2.11). -1e30 still makes exp() exactly 0 beside any real
# score, keeps an all-masked row finite (uniform weights, as SDPA gives it), and is
# representable in bf16 and float32 (not in fp16, whose masks stay as they are).
_MASKED = -1e30


def _finite_floor(mask):
    if mask is None or not mask.is_floating_point() or mask.dtype == torch.float16:
        return mask
    return mask.clamp(min=_MASKED)


def _aligned_bias(mask, q, k):
    # the efficient kernel wants a bias whose last-dim stride is 16-byte aligned
    b, h = q.shape[0], q.shape[1]
    sq, sk = q.shape[-2], k.shape[-2]
    mask = mask.expand(b, h, sq, sk)
    pad = (-sk) % 16
    if pad == 0 and mask.stride(-2) % 16 == 0 and mask.stride(-1) == 1:
        return mask
    buf = mask.new_empty(b, h, sq, sk + pad)[..., :sk]
    buf.copy_(mask)
    return buf


_MATH, _CPU_FLASH, _CUDNN, _CUDA_FLASH, _EFFICIENT = (
    MathKernel(), CpuFlashKernel(), CudnnKernel(), CudaFlashKernel(), EfficientKernel()
)


@functools.lru_cache(maxsize=64)
def _softcapped(kind: str, softcap: float):
    return (FlexKernel if kind == "flex" else MathKernel)(softcap)


def flex_for_scores(kernel: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether scores that need a function (soft-capping, ALiBi) take the flex kernel:
    asked for, or ``kernel='auto'`` on CUDA at a head dim its fused kernel is taken for."""
    return kernel == "flex" or (kernel == "auto" and device.type == "cuda" and dtype != torch.float64
                                and head_dim in FLEX_HEAD_DIMS)


def choose_kernel(kernel: str, device: torch.device, dtype: torch.dtype, head_dim: int, masked: bool,
                  softcap: float = 0.0):
    """The fastest correct kernel for this device, dtype and mask (``kernel='auto'``), or the
    one asked for. Soft-capped scores (``softcap`` > 0) take flex on CUDA (bf16, fp16,
    float32), else the math kernel."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel={kernel!r} is not known; use one of {KERNELS}")
    if softcap:
        if kernel not in SOFTCAP_KERNELS:
            raise ValueError(f"kernel={kernel!r} cannot soft-cap the scores; use kernel='auto', 'flex' or 'math' "
                             "with softcap")
        return _softcapped("flex" if flex_for_scores(kernel, device, dtype, head_dim) else "math", float(softcap))
    if kernel == "math":
        return _MATH
    if kernel == "flex":
        return _softcapped("flex", 0.0)
    if device.type == "cpu":
        return _CPU_FLASH if kernel in ("auto", "flash") else _MATH
    if device.type != "cuda" or dtype == torch.float64:
        return _MATH
    half = dtype in (torch.float16, torch.bfloat16)
    if kernel == "efficient" and half:
        # its bf16/fp16 backward returned garbage dK/dV when fed a merged lse on
        # torch 2.11 / H100 (float32 is exact); refuse rather than be silently wrong
        raise ValueError("kernel='efficient' is validated for float32 only; use kernel='auto' "
                         "(cuDNN, with masks as a bias) or 'flash' for bf16/fp16")
    if kernel == "cudnn" or (kernel == "auto" and half and head_dim <= 128 and _cudnn_ok(device)):
        return _CUDNN  # takes a mask as an additive bias
    if half and head_dim <= 256 and not masked and kernel in ("auto", "flash"):
        return _CUDA_FLASH
    if dtype == torch.float32 and kernel in ("auto", "efficient"):
        return _EFFICIENT
    return _MATH


def _cudnn_ok(device) -> bool:
    """cuDNN attention is enabled and ``device`` (a CUDA device holding the inputs) is Hopper or newer."""
    return torch.backends.cuda.cudnn_sdp_enabled() and torch.cuda.get_device_capability(device)[0] >= 9


# -- GQA: the G query heads of each KV head laid out as more query rows -----------------


def _heads_into_rows(x, hkv):
    b, h, s, d = x.shape
    return x.reshape(b, hkv, (h // hkv) * s, d)


def _mask_heads_into_rows(mask, hq, hkv):
    if mask is None:
        return None
    g = hq // hkv
    b, h, sq, sk = mask.shape
    if h == 1:
        return mask.repeat(1, 1, g, 1)
    return mask.expand(b, hq, sq, sk).reshape(b, hkv, g * sq, sk)


def block_forward(kern, q, k, v, mask, is_causal, scale, alibi=None):
    """A kernel's forward on one block (GQA heads as rows), with rows that the mask hides
    entirely set to lse = -inf, out = 0: kernels disagree there (the CPU flash kernel
    reports lse 0, others NaN), and the merge must ignore such rows. ``alibi``: the flex
    kernel's in-kernel ALiBi (``FlexKernel``)."""
    out, lse = gqa_forward(kern, q, k, v, mask, is_causal, scale, alibi)
    if mask is not None:
        seen = (mask > float("-inf")).any(-1).expand(lse.shape)
        lse = lse.masked_fill(~seen, float("-inf"))
        out = out.masked_fill(~seen[..., None], 0.0)
    return out, lse


def gqa_forward(kern, q, k, v, mask, is_causal, scale, alibi=None):
    hq, hkv = q.shape[1], k.shape[1]
    flex = {"alibi": alibi} if kern.name == "flex" else {}  # the flex kernel's ALiBi, per query head
    if hq == hkv:
        return kern.forward(q, k, v, mask, is_causal, scale, **flex)
    if is_causal or flex:  # a causal flag or per-head ALiBi needs aligned heads: expand this one block's K/V
        g = hq // hkv
        return kern.forward(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), mask, is_causal, scale, **flex)
    out, lse = kern.forward(_heads_into_rows(q, hkv), k, v, _mask_heads_into_rows(mask, hq, hkv), False, scale)
    return out.reshape(q.shape), lse.reshape(q.shape[:-1])


def gqa_backward(kern, dout, q, k, v, out, lse, mask, is_causal, scale, bias_grad=False, alibi=None):
    """The block's dq, dk, dv; with ``bias_grad`` (math kernel only) also the mask's gradient
    ``dS`` (B, Hq, Sq, Sk) in the accumulation dtype."""
    extra = {"bias_grad": True} if bias_grad else {}
    if kern.name == "flex":
        extra = {"alibi": alibi}
    hq, hkv = q.shape[1], k.shape[1]
    if hq == hkv:
        return kern.backward(dout, q, k, v, out, lse, mask, is_causal, scale, **extra)
    g = hq // hkv
    if is_causal or kern.name == "flex":
        dq, dk, dv, *ds = kern.backward(dout, q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), out, lse,
                                        mask, is_causal, scale, **extra)
        b, _, s, d = dk.shape
        return dq, dk.view(b, hkv, g, s, d).sum(2), dv.view(b, hkv, g, s, d).sum(2), *ds
    b, _, sq, d = q.shape
    dq, dk, dv, *ds = kern.backward(
        _heads_into_rows(dout, hkv), _heads_into_rows(q, hkv), k, v, _heads_into_rows(out, hkv), lse.reshape(b, hkv, g * sq),
        _mask_heads_into_rows(mask, hq, hkv), False, scale, **extra
    )
    return dq.reshape(q.shape), dk, dv, *(x.reshape(b, hq, sq, x.shape[-1]) for x in ds)
