"""The ring attention algorithm, written once per rank as a generator.

Forward (Liu, Zaharia, Abbeel 2023, Alg. 1): P steps; at step t a rank holds the K/V
block of rank ``(r - t) % P``. The next block's transfer is posted *before* the current
block is computed, so the two overlap. Each step's partial result (out_b, lse_b) is
merged into the running (out, lse) in float32 (float64 for float64 inputs).

Backward: K/V travel again; a rank computes the block gradients with the kernel's own
backward op and the merged (out, lse); dQ stays home, dK/dV accumulate in float32
into a buffer that travels with its block and arrives home at the end.

The programs yield ``AllGather`` / ``Exchange`` requests; ``ring.py`` drives them over
a real process group or a loopback ring.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import torch

from .blocks import MaskSpec, build_mask, plan_step, step_count
from .kernels import block_forward, choose_kernel, gqa_backward
from .layout import LAYOUTS, chunk_ranges, local_positions
from .ring import AllGather, Exchange

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclasses.dataclass(frozen=True)
class RingConfig:
    layout: str
    causal: bool
    scale: float
    window: int
    kernel: str


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Merge and gradient accumulators: float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _merge_eager(out, lse, out_b, lse_b):
    w = torch.sigmoid(lse_b - lse).nan_to_num(0.0).unsqueeze(-1)
    out.sub_(w * (out - out_b))
    lse.copy_(torch.logaddexp(lse, lse_b))


def merge_partial(out, lse, out_b, lse_b):
    """Fold a block's partial (out_b, lse_b) into the running (out, lse), in place.

    out <- out - sigmoid(lse_b - lse) * (out - out_b);  lse <- logaddexp(lse, lse_b).
    A row that neither side has seen (both lse -inf) stays as it is. On CUDA with
    float32 accumulators this is one Triton kernel (one pass over the block) instead
    of five elementwise kernels; RINGFX_FUSED_MERGE=0 turns that off.
    """
    # the fused kernel gave wrong rows for head dims that are not a multiple of 16 on
    # an H100 (d=72, torch 2.11 / Triton 3.6; exact under TRITON_INTERPRET): those
    # take the eager path
    if out.is_cuda and out.dtype == torch.float32 and out.shape[-1] % 16 == 0 and _fused_merge() is not None:
        return _fused_merge()(out, lse, out_b, lse_b)
    return _merge_eager(out, lse, out_b, lse_b)


@functools.lru_cache(maxsize=1)
def _fused_merge():
    if os.environ.get("RINGFX_FUSED_MERGE", "1") == "0":
        return None
    try:
        from .merge_triton import merge_partial_triton
    except ImportError:  # no Triton: the eager merge is used
        return None
    return merge_partial_triton


# -- agreement across ranks ----------------------------------------------------------

_META_FIELDS = ("local sequence length", "batch", "query heads", "kv heads", "head dim", "dtype",
                "causal", "window", "layout", "key padding mask", "segment ids", "attn bias")


def _metadata(q, k, pad, seg, bias, cfg: RingConfig, s_local: int) -> AllGather:
    """The request that makes every rank agree on shapes and options (and share the
    segment-id range of each of its chunks). Built on the CPU: only segment ids need a
    look at device data."""
    b, hq, _, d = q.shape
    fields = [s_local, b, hq, k.shape[1], d, _DTYPES.index(q.dtype), int(cfg.causal), cfg.window,
              LAYOUTS.index(cfg.layout), pad is not None, seg is not None, bias is not None]
    seg_ranges = [0, 0, 0, 0]
    if seg is not None:
        parts = seg.reshape(seg.shape[0], 1 if cfg.layout == "contiguous" else 2, -1)
        ranges = torch.stack([parts.amin(dim=(0, 2)), parts.amax(dim=(0, 2))], 1).reshape(-1).tolist()
        seg_ranges = ranges + [0] * (4 - len(ranges))
    return AllGather(torch.tensor(fields + seg_ranges, dtype=torch.int64), device=q.device)


def _agree(gathered: torch.Tensor, cfg: RingConfig, has_seg: bool):
    """Raise if the ranks were called with different shapes or options; return the
    per-rank segment-id ranges (or None)."""
    rows = gathered.tolist()
    for i, name in enumerate(_META_FIELDS):
        values = [r[i] for r in rows]
        if len(set(values)) > 1:
            if i == 0:
                raise ValueError(
                    f"ring attention: the ranks hold different local sequence lengths {values}; every rank "
                    "must hold S/P tokens: shard the sequence with ringfx.shard (pad S to a multiple of "
                    "the ring size, or of 2 * ring size for the zigzag layout)"
                )
            raise ValueError(f"ring attention: ranks disagree on the {name}: {values}; call the op with "
                             "the same shapes and options on every rank of the ring")
    if not has_seg:
        return None
    n = 1 if cfg.layout == "contiguous" else 2
    base = len(_META_FIELDS)
    return tuple(tuple((r[base + 2 * i], r[base + 2 * i + 1]) for i in range(n)) for r in rows)


# -- overlap: float32 accumulation on a side stream --------------------------------


class SideStream:
    """Runs the memory-bound float32 work (merges, dQ/dK/dV accumulation, the dK/dV
    transfers) on a second CUDA stream, so that it overlaps the next block's
    compute-bound attention kernel on the main stream (the two-stream scheme of
    TransformerEngine's p2p context parallelism). On the CPU it runs inline.

    One side stream per device, shared by every (virtual) rank in the process, so that
    a dK/dV buffer handed between loopback ranks stays in stream order. Never yield
    to the ring driver inside ``with side:``: another rank program would run on it.
    """

    _streams: dict = {}

    def __init__(self, device: torch.device):
        self.stream = None
        if device.type == "cuda" and os.environ.get("RINGFX_SIDE_STREAM", "1") != "0":
            self.main = torch.cuda.current_stream(device)
            key = (device.index, self.main.stream_id)
            if key not in SideStream._streams:
                SideStream._streams[key] = torch.cuda.Stream(device)
            self.stream = SideStream._streams[key]

    def __enter__(self):
        """Enter the side stream after everything queued so far on the main stream."""
        if self.stream is not None:
            self.stream.wait_stream(self.main)
            self._ctx = torch.cuda.stream(self.stream)
            self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        if self.stream is not None:
            self._ctx.__exit__(*exc)

    def keep(self, *tensors):
        """Tensors made on the main stream and read on the side stream: do not reuse
        their memory before the side stream is done with them."""
        if self.stream is not None:
            for t in tensors:
                t.record_stream(self.stream)

    def join(self):
        """The main stream waits for all side-stream work."""
        if self.stream is not None:
            self.main.wait_stream(self.stream)


# -- the rank programs ---------------------------------------------------------------


def _deliver(values, dtypes, into):
    """The results in their output dtypes: new tensors (never views of one buffer: a
    custom op's outputs may not alias), or written into ``into``, a loopback ring's
    slices of the full outputs."""
    if into is None:
        return tuple(v.to(dt, copy=True) if v._base is not None else v.to(dt) for v, dt in zip(values, dtypes))
    for dest, v in zip(into, values):
        dest.copy_(v)
    return into



class _Block:
    """Slices of one step's call: queries, resident keys, and the call's mask."""

    def __init__(self, call, q_pos, src, world, s_local, cfg, spec, kv, tok, pad_seg_q, bias, dtype):
        a, b = call.q
        c, d = call.k
        self.rows = slice(a, b)
        self.k, self.v = kv[0][:, :, c:d], kv[1][:, :, c:d]
        self.mask = None
        if call.masked:
            k_pos = local_positions(cfg.layout, src, world, s_local, q_pos.device)[c:d]
            pad_k = tok[0, :, c:d].bool() if tok is not None and pad_seg_q[0] else None
            seg_k = tok[1, :, c:d] if tok is not None and pad_seg_q[1] is not None else None
            seg_q = pad_seg_q[1][:, a:b] if pad_seg_q[1] is not None else None
            bias_blk = None
            if bias is not None:
                bias_blk = bias[..., a:b, :] if bias.shape[-2] > 1 else bias
                if bias.shape[-1] > 1:
                    bias_blk = bias_blk.index_select(-1, k_pos)
            self.mask = build_mask(q_pos[a:b], k_pos, spec, dtype, pad_k, seg_q, seg_k, bias_blk)


def _setup(q, k, v, pad, seg, bias, cfg: RingConfig, rank: int, world: int):
    s_local = q.shape[2]
    spec = MaskSpec(cfg.causal, cfg.window, pad is not None or seg is not None or bias is not None)
    tok = None
    if pad is not None or seg is not None:
        b = q.shape[0]
        tok = torch.stack([
            pad.to(torch.int64) if pad is not None else torch.ones(b, s_local, dtype=torch.int64, device=q.device),
            seg.to(torch.int64) if seg is not None else torch.zeros(b, s_local, dtype=torch.int64, device=q.device),
        ])
    q_pos = local_positions(cfg.layout, rank, world, s_local, q.device)
    return s_local, spec, tok, q_pos


def forward_program(q, k, v, pad, seg, bias, cfg: RingConfig, rank: int, world: int, into=None):
    s_local, spec, tok, q_pos = _setup(q, k, v, pad, seg, bias, cfg, rank, world)
    seg_ranges = _agree((yield _metadata(q, k, pad, seg, bias, cfg, s_local)), cfg, seg is not None)
    n_steps = step_count(cfg.layout, world, s_local, spec, seg_ranges)
    acc = acc_dtype(q.dtype)
    out = torch.zeros(q.shape, dtype=acc, device=q.device)
    lse = torch.full(q.shape[:-1], float("-inf"), dtype=acc, device=q.device)
    kv = torch.stack((k, v)) if n_steps > 1 else (k, v)  # one buffer to send; none to send alone
    pad_seg_q = (pad is not None, seg)
    side = SideStream(q.device)
    for t in range(n_steps):
        src = (rank - t) % world
        if t + 1 < n_steps:
            pending = yield Exchange([kv] if tok is None else [kv, tok])
        for call in plan_step(cfg.layout, rank, src, world, s_local, spec, seg_ranges):
            blk = _Block(call, q_pos, src, world, s_local, cfg, spec, kv, tok, pad_seg_q, bias, q.dtype)
            kern = choose_kernel(cfg.kernel, q.device, q.dtype, q.shape[-1], blk.mask is not None)
            out_b, lse_b = block_forward(kern, q[:, :, blk.rows], blk.k, blk.v, blk.mask, call.is_causal,
                                         cfg.scale)
            with side:
                side.keep(out_b, lse_b)
                merge_partial(out[:, :, blk.rows], lse[:, :, blk.rows], out_b, lse_b.to(acc))
        if t + 1 < n_steps:
            received = pending.wait()
            kv = received[0]
            tok = received[1] if tok is not None else None
    side.join()
    return _deliver((out, lse), (q.dtype, acc), into)


def backward_program(dout, q, k, v, out, lse, pad, seg, bias, cfg: RingConfig, rank: int, world: int,
                     into=None):
    s_local, spec, tok, q_pos = _setup(q, k, v, pad, seg, bias, cfg, rank, world)
    seg_ranges = _agree((yield _metadata(q, k, pad, seg, bias, cfg, s_local)), cfg, seg is not None)
    n_steps = step_count(cfg.layout, world, s_local, spec, seg_ranges)
    acc = acc_dtype(q.dtype)
    # rows that saw no key: exp(s - inf) = 0 instead of exp(-inf + inf) = NaN
    lse = lse.masked_fill(lse == float("-inf"), float("inf"))
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    kv = torch.stack((k, v)) if n_steps > 1 else (k, v)  # one buffer to send; none to send alone
    pad_seg_q = (pad is not None, seg)
    side = SideStream(q.device)
    dkv_pending = None
    for t in range(n_steps):
        src = (rank - t) % world
        if t + 1 < n_steps:
            kv_pending = yield Exchange([kv] if tok is None else [kv, tok])
        block_grads = []
        for call in plan_step(cfg.layout, rank, src, world, s_local, spec, seg_ranges):
            blk = _Block(call, q_pos, src, world, s_local, cfg, spec, kv, tok, pad_seg_q, bias, q.dtype)
            kern = choose_kernel(cfg.kernel, q.device, q.dtype, q.shape[-1], blk.mask is not None)
            r = blk.rows
            dq_b, dk_b, dv_b = gqa_backward(kern, dout[:, :, r], q[:, :, r], blk.k, blk.v, out[:, :, r],
                                            lse[:, :, r], blk.mask, call.is_causal, cfg.scale)
            block_grads.append((r, call.k, dq_b, dk_b, dv_b))
        # accumulate on the side stream: dQ here, dK/dV into the buffer that travelled
        # here with this block; then send it on (the side stream orders the send)
        with side:
            if dkv_pending is None:
                dkv = torch.zeros((2, *k.shape), dtype=acc, device=q.device)
            else:
                dkv = dkv_pending.wait()[0]
            for r, (a, b), dq_b, dk_b, dv_b in block_grads:
                side.keep(dq_b, dk_b, dv_b)
                dq[:, :, r] += dq_b
                dkv[0][:, :, a:b] += dk_b
                dkv[1][:, :, a:b] += dv_b
        # the last hop sends each accumulator straight home (the ring may stop early)
        dkv_pending = yield Exchange([dkv], shift=1 if t + 1 < n_steps else -(n_steps - 1), stream=side.stream)
        if t + 1 < n_steps:
            received = kv_pending.wait()
            kv = received[0]
            tok = received[1] if tok is not None else None
    with side:
        dkv = dkv_pending.wait()[0]
    side.join()
    return _deliver((dq, dkv[0], dkv[1]), (q.dtype, k.dtype, v.dtype), into)
