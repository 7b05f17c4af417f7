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

import contextlib
import dataclasses
import functools
import os
import struct

import torch

from .blocks import MaskSpec, build_mask, plan_step, step_count
from .kernels import KERNELS, block_forward, choose_kernel, gqa_backward
from .layout import LAYOUTS, local_positions
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


def fold(dst, acc, blocks, *, dst_lse=None, acc_lse=None, lses=None):
    """Fold ``blocks`` (1..4 tensors of dst's shape) and the running ``acc`` (or None: the
    blocks start the result) into ``dst``: with ``lses`` a softmax merge of partial
    attention results (``dst_lse``/``acc_lse`` the row log-sum-exps), without a sum.

    Merge: lse' = logsumexp(acc_lse, lse_1, ...), dst = Σ exp(lse_i - lse') · out_i,
    computed in float32 (float64 for float64); a row nobody has seen (every lse -inf)
    gets lse -inf and output 0; a NaN row (NaN in the inputs) stays NaN, as in SDPA. ``dst`` may be ``acc`` (in place) or a tensor of the
    input dtype (the last fold writes the result directly). On CUDA with float32
    accumulation this is one Triton pass (RINGFX_FUSED_MERGE=0 turns it off).
    """
    if fused_fold_applies(dst, blocks[0].dtype):
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


def fused_fold_applies(t: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether ``fold`` runs as one Triton pass for results like ``t`` of inputs of ``dtype``."""
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
    if os.environ.get("RINGFX_FUSED_MERGE", "1") == "0":
        return None
    try:
        from .merge_triton import fold_triton
    except ImportError:  # no Triton: the eager fold is used
        return None
    return fold_triton


class Deferred:
    """Block results waiting to be folded into a float32 accumulator, up to ``group``
    of them per row range, so that the accumulator is read and written once per group
    instead of once per block (the accumulation passes are memory-bound; the block
    kernels are not). The first fold initialises the accumulator instead of adding to
    zeros; ``finish`` may write the last fold straight into the result tensor.

    ``merge``: blocks are (out, lse) partial attention results; else gradients (sums).
    Call ``add``/``finish`` inside ``with side:`` (the accumulation stream).
    """

    def __init__(self, acc, acc_lse, group: int, merge: bool):
        self.acc, self.acc_lse, self.group, self.merge = acc, acc_lse, group, merge
        self.pending: dict[tuple[int, int], list] = {}
        self.started = False  # has the accumulator been written (else its memory is garbage)

    def add(self, rows: slice, block, lse=None, *, last_step: bool = False):
        """Queue a block; fold its row range once ``group`` blocks wait. On the last step
        the fold is left to ``finish``, which can then write the result directly."""
        key = (rows.start, rows.stop)
        self.pending.setdefault(key, []).append((block, lse))
        n = len(self.pending[key])
        if n == _MAX_FOLD or (n == self.group and not last_step):
            self._flush(key)

    def _flush(self, key, dst=None, dst_lse=None):
        items = self.pending.pop(key)
        rows = slice(*key)
        full = key == (0, self.acc.shape[2])
        if not self.started and not full:  # a partial first fold: the rest must read as empty
            self._clear()
        fresh = not self.started and full
        self.started = True
        acc = None if fresh else self.acc[:, :, rows]
        lse = self.acc_lse[:, :, rows] if self.merge else None
        fold(self.acc[:, :, rows] if dst is None else dst, acc, [b for b, _ in items],
             dst_lse=lse if dst_lse is None else dst_lse, acc_lse=None if fresh else lse,
             lses=[x for _, x in items] if self.merge else None)

    def finish(self, dst, dst_lse=None) -> bool:
        """Fold what is left. If the last fold covers every row, write it into ``dst``
        (the result, any dtype) and ``dst_lse`` and return True; else everything ends in
        the accumulator, and False."""
        whole = (0, self.acc.shape[2])
        for key in [k for k in self.pending if k != whole]:
            self._flush(key)
        if whole in self.pending:
            self._flush(whole, dst, dst_lse if dst_lse is not None else self.acc_lse)
            return True
        if not self.started:
            self._clear()
        return False

    def _clear(self):
        """The accumulator of nothing: output 0 (and lse -inf)."""
        self.acc.zero_()
        if self.merge:
            self.acc_lse.fill_(float("-inf"))


# block results folded per accumulator pass where the fold is one fused pass (else one
# at a time): the forward holds up to 3 block outputs, the backward one extra dQ block
# (see the planner's runtime contract, ringfx/planner/memory.py)
MERGE_GROUP = 4
DQ_GROUP = 2


_MAX_FOLD = 4  # blocks one fused fold takes (merge_triton.MAX_BLOCKS)


def fold_groups(q: torch.Tensor) -> tuple[int, int]:
    """(forward merge group, dQ group) for a call on ``q``; RINGFX_FOLD_GROUPS=0 folds
    every block on its own (for measuring what the groups save)."""
    if os.environ.get("RINGFX_FOLD_GROUPS", "1") == "0":
        return 1, 1
    return (MERGE_GROUP, DQ_GROUP) if fused_fold_applies(q, q.dtype) else (1, 1)


# -- agreement across ranks ----------------------------------------------------------

_META_FIELDS = ("refused", "local sequence length", "batch", "query heads", "kv heads", "head dim", "dtype",
                "causal", "window", "layout", "kernel", "scale", "key padding mask", "segment ids", "attn bias")
_N_SEG = 4  # segment-id (min, max) of each of up to two chunks


def _float_bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", x))[0]


def _metadata(q, k, pad, seg, bias, cfg: RingConfig, refused=None) -> AllGather:
    """The request that makes every rank agree on shapes and options (and share the
    segment-id range of each of its chunks). Built on the CPU: only segment ids need a
    look at device data. A rank whose inputs were refused sends only that."""
    if refused is not None:
        return AllGather(torch.tensor([1] + [0] * (len(_META_FIELDS) - 1 + _N_SEG), dtype=torch.int64),
                         device=q.device)
    b, hq, s_local, d = q.shape
    fields = [0, s_local, b, hq, k.shape[1], d, _DTYPES.index(q.dtype), int(cfg.causal), cfg.window,
              LAYOUTS.index(cfg.layout), KERNELS.index(cfg.kernel), _float_bits(cfg.scale),
              pad is not None, seg is not None, bias is not None]
    seg_ranges = [0] * _N_SEG
    if seg is not None and seg.numel():
        parts = seg.reshape(seg.shape[0], 1 if cfg.layout == "contiguous" else 2, -1)
        ranges = torch.stack([parts.amin(dim=(0, 2)), parts.amax(dim=(0, 2))], 1).reshape(-1).tolist()
        seg_ranges = ranges + [0] * (_N_SEG - len(ranges))
    return AllGather(torch.tensor(fields + seg_ranges, dtype=torch.int64), device=q.device)


def _agree(gathered: torch.Tensor, cfg: RingConfig, has_seg: bool, refused=None):
    """Raise on every rank if a rank refused its inputs or the ranks were called with
    different shapes or options (no transfer has been made: the ring stays usable);
    return the per-rank segment-id ranges (or None)."""
    rows = gathered.tolist()
    refusing = [r for r, row in enumerate(rows) if row[0]]
    if refused is not None:
        raise refused
    if refusing:
        who = f"rank {refusing[0]}" if len(refusing) == 1 else f"ranks {refusing}"
        raise ValueError(f"ring attention: {who} refused its inputs (the error raised there says why); "
                         "no transfer was made and the ring is still usable")
    for i, name in enumerate(_META_FIELDS):
        values = [r[i] for r in rows]
        if len(set(values)) > 1:
            if name == "local sequence length":
                raise ValueError(
                    f"ring attention: the ranks hold different local sequence lengths {values}; every rank "
                    "must hold S/P tokens: shard the sequence with ringfx.shard (pad S to a multiple of "
                    "the ring size, or of 2 * ring size for the zigzag layout)"
                )
            if name == "scale":
                values = [struct.unpack("<d", struct.pack("<q", x))[0] for x in values]
            elif name == "kernel":
                values = [KERNELS[x] for x in values]
            elif name == "layout":
                values = [LAYOUTS[x] for x in values]
            raise ValueError(f"ring attention: ranks disagree on the {name}: {values}; call the op with "
                             "the same shapes and options on every rank of the ring")
    if not has_seg:
        return None
    n = 1 if cfg.layout == "contiguous" else 2
    base = len(_META_FIELDS)
    return tuple(tuple((r[base + 2 * i], r[base + 2 * i + 1]) for i in range(n)) for r in rows)


# -- overlap: block kernels on two streams, float32 accumulation on a third ----------


# B·H·S_local² from which block kernels alternate between two streams (H100, bf16, D=128:
# two streams helped at 8K x 8K x 32 heads = 2.1e9 and up, and cost at 4K x 4K x 32 = 5.4e8)
TWO_STREAMS_MIN_WORK = 2**30


class Streams:
    """The CUDA streams of a rank program; on the CPU everything runs inline.

    * Block kernels alternate between two compute streams, so that one kernel's last,
      partly empty wave of thread blocks overlaps the next kernel's first (a 16K x 16K
      block is 31.03 waves of cuDNN tiles on 132 SMs: without the overlap ~3% of each
      call idles). Consecutive block kernels never depend on each other.
    * The memory-bound float32 work (merges, dQ/dK/dV accumulation, the dK/dV
      transfers) runs on a side stream (the scheme of TransformerEngine's p2p context
      parallelism), after the kernels whose blocks it folds.
    * The main stream keeps the rest (inputs, masks, K/V transfers) and waits for all
      of them at the end.

    The streams are per device and shared by every (virtual) rank in the process (the
    compute streams' turn too), so that a dK/dV buffer handed between loopback ranks
    stays in stream order and consecutive kernels of different loopback ranks overlap.
    Never yield to the ring driver inside ``with streams:`` or ``streams.kernel()``:
    another rank program would run on them. RINGFX_SIDE_STREAM=0 and
    RINGFX_TWO_STREAMS=0 turn the side stream and the second compute stream off.
    """

    _side: dict = {}
    _compute: dict = {}
    _turn: dict = {}

    def __init__(self, device: torch.device, step_work: int = 0):
        """``step_work``: B·H·S_local² of a ring step; two compute streams only pay when
        each kernel is long (below TWO_STREAMS_MIN_WORK the launch overhead of the extra
        stream waits costs more than the overlapped tails: BENCHMARKS.md)."""
        self.stream = None
        self.compute = ()
        if device.type != "cuda":
            return
        self.main = torch.cuda.current_stream(device)
        self.key = (device.index, self.main.stream_id)
        if os.environ.get("RINGFX_SIDE_STREAM", "1") != "0":
            if self.key not in Streams._side:
                Streams._side[self.key] = torch.cuda.Stream(device)
            self.stream = Streams._side[self.key]
        if os.environ.get("RINGFX_TWO_STREAMS", "1") != "0" and step_work >= TWO_STREAMS_MIN_WORK:
            # (a higher priority for these streams than the side stream's measured no
            # faster on an H100: BENCHMARKS.md)
            if self.key not in Streams._compute:
                Streams._compute[self.key] = (torch.cuda.Stream(device), torch.cuda.Stream(device))
            self.compute = Streams._compute[self.key]

    @contextlib.contextmanager
    def kernel(self, *inputs):
        """Run a block kernel on the next compute stream, after the main stream's work;
        ``inputs`` made elsewhere are not reused before it is done with them."""
        if not self.compute:
            yield
            return
        turn = Streams._turn.get(self.key, 0)
        Streams._turn[self.key] = 1 - turn
        stream = self.compute[turn]
        stream.wait_stream(self.main)
        with torch.cuda.stream(stream):
            yield
        for t in inputs:
            if t is not None:
                t.record_stream(stream)

    def __enter__(self):
        """Enter the side stream after everything queued so far on the main and the
        compute streams (without a side stream, the main stream waits for the compute
        streams and the work runs there)."""
        if self.stream is not None:
            self.stream.wait_stream(self.main)
            for c in self.compute:
                self.stream.wait_stream(c)
            self._ctx = torch.cuda.stream(self.stream)
            self._ctx.__enter__()
        else:
            for c in self.compute:
                self.main.wait_stream(c)
        return self

    def __exit__(self, *exc):
        if self.stream is not None:
            self._ctx.__exit__(*exc)

    def keep(self, *tensors):
        """Tensors made on another stream and read inside ``with streams:``: do not reuse
        their memory before that stream is done with them."""
        reader = self.stream if self.stream is not None else (self.main if self.compute else None)
        if reader is not None:
            for t in tensors:
                t.record_stream(reader)

    def join(self):
        """The main stream waits for all side-stream and compute-stream work."""
        for c in (self.stream, *self.compute):
            if c is not None:
                self.main.wait_stream(c)


# -- the rank programs ---------------------------------------------------------------


def _pack(k, v):
    """K and V in one (2, ...) buffer: two plain copies (torch.stack's batched-cat kernel
    ran at a third of the copy bandwidth on an H100)."""
    kv = torch.empty((2, *k.shape), dtype=k.dtype, device=k.device)
    kv[0].copy_(k)
    kv[1].copy_(v)
    return kv


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


def forward_program(q, k, v, pad, seg, bias, cfg: RingConfig, rank: int, world: int, into=None, refused=None):
    """``refused``: the error this rank's inputs were refused with (it is raised on every
    rank after the agreement, before any transfer)."""
    seg_ranges = _agree((yield _metadata(q, k, pad, seg, bias, cfg, refused)), cfg, seg is not None, refused)
    if q.numel() == 0:  # S, B or H is 0 (D is not): empty results, no kernel runs
        return into if into is not None else (torch.empty_like(q), q.new_empty(q.shape[:-1], dtype=acc_dtype(q.dtype)))
    s_local, spec, tok, q_pos = _setup(q, k, v, pad, seg, bias, cfg, rank, world)
    n_steps = step_count(cfg.layout, world, s_local, spec, seg_ranges)
    acc = acc_dtype(q.dtype)
    out = torch.empty(q.shape, dtype=acc, device=q.device)
    lse = torch.empty(q.shape[:-1], dtype=acc, device=q.device)
    merged = Deferred(out, lse, fold_groups(q)[0], merge=True)
    kv = _pack(k, v) if n_steps > 1 else (k, v)  # one buffer to send; none to send alone
    pad_seg_q = (pad is not None, seg)
    side = Streams(q.device, q.shape[0] * q.shape[1] * s_local * s_local)
    for t in range(n_steps):
        src = (rank - t) % world
        if t + 1 < n_steps:
            pending = yield Exchange([kv] if tok is None else [kv, tok])
        for call in plan_step(cfg.layout, rank, src, world, s_local, spec, seg_ranges):
            blk = _Block(call, q_pos, src, world, s_local, cfg, spec, kv, tok, pad_seg_q, bias, q.dtype)
            kern = choose_kernel(cfg.kernel, q.device, q.dtype, q.shape[-1], blk.mask is not None)
            with side.kernel(q, blk.k, blk.v, blk.mask):
                out_b, lse_b = block_forward(kern, q[:, :, blk.rows], blk.k, blk.v, blk.mask, call.is_causal,
                                             cfg.scale)
            with side:
                side.keep(out_b, lse_b)
                merged.add(blk.rows, out_b, lse_b, last_step=t + 1 == n_steps)
        if t + 1 < n_steps:
            received = pending.wait()
            kv = received[0]
            tok = received[1] if tok is not None else None
    result = into[0] if into is not None else torch.empty(q.shape, dtype=q.dtype, device=q.device)
    result_lse = into[1] if into is not None else lse
    with side:
        if not merged.finish(result, result_lse):  # else the last fold wrote the results
            result.copy_(out)
            result_lse.copy_(lse)
    side.join()
    return result, result_lse


def backward_program(dout, q, k, v, out, lse, pad, seg, bias, cfg: RingConfig, rank: int, world: int,
                     into=None):
    seg_ranges = _agree((yield _metadata(q, k, pad, seg, bias, cfg)), cfg, seg is not None)
    if q.numel() == 0:  # no query: no gradient flows to any key
        grads = into if into is not None else (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v))
        grads[1].zero_()
        grads[2].zero_()
        return grads
    s_local, spec, tok, q_pos = _setup(q, k, v, pad, seg, bias, cfg, rank, world)
    n_steps = step_count(cfg.layout, world, s_local, spec, seg_ranges)
    acc = acc_dtype(q.dtype)
    # rows that saw no key: exp(s - inf) = 0 instead of exp(-inf + inf) = NaN
    lse = lse.masked_fill(lse == float("-inf"), float("inf"))
    dq = torch.empty(q.shape, dtype=acc, device=q.device)
    dq_acc = Deferred(dq, None, fold_groups(q)[1], merge=False)
    kv = _pack(k, v) if n_steps > 1 else (k, v)  # one buffer to send; none to send alone
    pad_seg_q = (pad is not None, seg)
    side = Streams(q.device, q.shape[0] * q.shape[1] * s_local * s_local)
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
            with side.kernel(q, blk.k, blk.v, blk.mask, dout, out, lse):
                dq_b, dk_b, dv_b = gqa_backward(kern, dout[:, :, r], q[:, :, r], blk.k, blk.v, out[:, :, r],
                                                lse[:, :, r], blk.mask, call.is_causal, cfg.scale)
            block_grads.append((r, call.k, dq_b, dk_b, dv_b))
        # accumulate on the side stream: dQ here, dK/dV into the buffer that travelled
        # here with this block; then send it on (the side stream orders the send). The
        # last fold writes dK and dV in the input dtype for the hop home.
        last = t + 1 == n_steps
        with side:
            # the first step's block starts the buffer when it covers every key
            whole = len(block_grads) == 1 and block_grads[0][1] == (0, s_local)
            starts = dkv_pending is None and whole
            if dkv_pending is not None:
                dkv = dkv_pending.wait()[0]
            else:
                dkv = (torch.empty if starts else torch.zeros)((2, *k.shape), dtype=acc, device=q.device)
            send = [torch.empty(k.shape, dtype=k.dtype, device=q.device),
                    torch.empty(v.shape, dtype=v.dtype, device=q.device)] if last else [dkv]
            for r, (a, b), dq_b, dk_b, dv_b in block_grads:
                side.keep(dq_b, dk_b, dv_b)
                dq_acc.add(r, dq_b, last_step=last)
                for i, g in enumerate((dk_b, dv_b)):
                    running = dkv[i][:, :, a:b]
                    fold(send[i] if last and whole else running, None if starts else running, [g])
            if last and not whole:
                send[0].copy_(dkv[0])
                send[1].copy_(dkv[1])
        # the last hop sends each rank's dK/dV straight home (the ring may stop early)
        dkv_pending = yield Exchange(send, shift=1 if not last else -(n_steps - 1), stream=side.stream)
        if not last:
            received = kv_pending.wait()
            kv = received[0]
            tok = received[1] if tok is not None else None
    dq_out = into[0] if into is not None else torch.empty(q.shape, dtype=q.dtype, device=q.device)
    with side:
        dq_direct = dq_acc.finish(dq_out)
        dk, dv = dkv_pending.wait()
    side.join()
    if not dq_direct:
        dq_out.copy_(dq)
    if into is None:
        return dq_out, dk, dv
    into[1].copy_(dk)
    into[2].copy_(dv)
    return into
