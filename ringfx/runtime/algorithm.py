"""The ring attention algorithm, written once per rank as a generator.

Forward (Liu, Zaharia, Abbeel 2023, Alg. 1): P steps; at step t a rank holds the K/V
block of rank ``(r - t) % P``. The next block's transfer is posted *before* the current
block is computed, so the two overlap. Each step's partial result (out_b, lse_b) is
merged into the running (out, lse) in float32 (float64 for float64 inputs).

Backward: K/V travel again; a rank computes the block gradients with the kernel's own
backward op and the merged (out, lse); dQ stays home, dK/dV accumulate in float32
into a buffer that travels with its block and arrives home at the end. A learned
relative-position table's gradient stays home too: each block's dS (math kernel) summed by
distance ``j - i`` from this rank's queries.

Both programs start with the same prologue (the ranks' agreement, the call's fixed
state) and rotate K/V the same way (``_Rank``). They yield ``AllGather`` /
``Exchange`` requests; ``ring.py`` drives them over a real process group or a
loopback ring.
"""

from __future__ import annotations

import dataclasses

import torch

from .agreement import agree, metadata
from .block_inputs import Block, BlockSource, pack_kv
from .blocks import MaskSpec, cut_rows, plan_step, relative_index, step_count
from .deferred import DQ_GROUP, MERGE_GROUP, Deferred, fold_groups  # noqa: F401  (MERGE_GROUP: the planner's)
from .fold import _fused_fold, acc_dtype, fold, merge_partial  # noqa: F401  (re-exported for tests, benchmarks)
from .kernels import block_forward, choose_kernel, flex_for_scores, gqa_backward
from .layout import local_positions
from .ring import Exchange
from .streams import TWO_STREAMS_MIN_WORK, Streams
from .tuning import Tuning


@dataclasses.dataclass(frozen=True)
class RingConfig:
    layout: str
    causal: bool
    scale: float
    window: int
    kernel: str
    softcap: float = 0.0  # 0: none; else scores = softcap * tanh(scores / softcap) (math kernel)
    sinks: bool = False  # a per-head sink logit joins each row's softmax (applied by the op)
    chunk: int = 0  # 0: none; C: query i sees keys j with j // C == i // C (Llama 4)
    alibi: bool = False  # per-head slopes: slope_h * (j - i) added to the scores of every block
    rel_bias: bool = False  # a relative-position table (Hq, 2S - 1): rel[h, j - i + S - 1] added to the scores


@dataclasses.dataclass
class _Rank:
    """What the forward and the backward program of one rank share: the call's fixed
    state, and the K/V block (with its token masks) that rotates one rank per step."""

    q: torch.Tensor
    cfg: RingConfig
    rank: int
    world: int
    n_steps: int
    seg_ranges: tuple | None
    source: BlockSource
    tuning: Tuning
    side: Streams
    kv: object  # the resident block's packed K/V (a (k, v) pair when it never travels)
    tok: torch.Tensor | None  # its key padding and segment ids, (2, B, S_local) int64
    bias_grad: bool = False  # the backward also sums the mask's gradient (math kernel)

    def pass_on(self, t: int):
        """Post the resident block's transfer to the next rank (none after the last
        step): a generator, ``pending = yield from rank.pass_on(t)``."""
        if t + 1 < self.n_steps:
            return (yield Exchange([self.kv] if self.tok is None else [self.kv, self.tok]))
        return None

    def take(self, pending) -> None:
        """Make the block ``pass_on`` is receiving the resident one."""
        if pending is not None:
            received = pending.wait()
            self.kv = received[0]
            self.tok = received[1] if self.tok is not None else None

    def calls(self, t: int) -> list:
        """The kernel calls of step ``t`` against the block of rank ``(rank - t) % world``:
        (call, kernel), a call cut into parts of fewer query rows where its kernel would
        materialise more than ``MATERIALISED_ELEMENTS`` per tensor (a mask, the math
        kernel's scores)."""
        q = self.q
        # the gradient of a learned relative bias needs each block's dS: the math kernel gives it
        kernel = "math" if self.bias_grad else "flex" if self.source.alibi_in_kernel else self.cfg.kernel
        calls = []
        for call in plan_step(self.cfg.layout, self.rank, (self.rank - t) % self.world, self.world,
                              self.source.s_local, self.source.spec, self.seg_ranges):
            kern = choose_kernel(kernel, q.device, q.dtype, q.shape[-1], call.masked, self.cfg.softcap)
            calls += [(part, kern) for part in cut_rows(call, self._rows_per_call(call, kern))]
        return calls

    def _rows_per_call(self, call, kern) -> int:
        b, hq, _, _ = self.q.shape
        keys = call.k[1] - call.k[0]
        if kern.name == "math":  # float32 scores, probabilities and their gradients, (B, Hq, rows, keys)
            per_row = b * hq * keys
        elif call.masked:  # the mask (b or 1, Hq or 1 or the GQA group) and its int64 distances (rows, keys)
            src = self.source
            bias = src.bias
            per_batch = src.has_padding or src.seg_q is not None or (bias is not None and bias.shape[0] > 1)
            per_head = (src.alibi is not None and not src.alibi_in_kernel) or src.rel is not None or \
                (bias is not None and bias.shape[1] > 1)
            heads = hq if per_head else hq // self.kv[0].shape[1]  # GQA repeats a headless mask per group
            per_row = ((b if per_batch else 1) * heads + 2) * keys
        else:
            return call.q[1] - call.q[0]
        return max(1, MATERIALISED_ELEMENTS // per_row)

    def blocks(self, t: int):
        """The kernel calls of step ``t``: (call, block, kernel)."""
        src = (self.rank - t) % self.world
        for call, kern in self.calls(t):
            yield call, Block.of(call, src, self.kv, self.tok, self.source), kern


def _prologue(q, k, v, pad, seg, bias, cfg: RingConfig, rank: int, world: int, refused=None, alibi=None,
              rel=None, bias_grad=False):
    """The ranks' agreement, then the call's fixed state: a generator returning a
    ``_Rank``, or None when there is nothing to attend (S, B or H is 0). ``alibi``: the
    per-head slopes (Hq,) in the accumulation dtype, or None; ``rel``: the relative-position
    table (Hq, 2S - 1), or None; ``bias_grad``: the backward sums the table's gradient."""
    seg_ranges = agree((yield metadata(q, k, pad, seg, bias, cfg, refused)), cfg, seg is not None, refused)
    if q.numel() == 0:
        return None
    tuning = Tuning.from_environment()
    s_local = q.shape[2]
    # ALiBi inside the flex kernel needs no mask: the blocks are planned as without it
    alibi_in_kernel = cfg.alibi and not bias_grad and flex_for_scores(cfg.kernel, q.device, q.dtype, q.shape[-1])
    spec = MaskSpec(cfg.causal, cfg.window, pad is not None or seg is not None or bias is not None or cfg.rel_bias
                    or (cfg.alibi and not alibi_in_kernel), cfg.chunk)
    tok = None
    if pad is not None or seg is not None:
        b = q.shape[0]
        tok = torch.stack([
            pad.to(torch.int64) if pad is not None else torch.ones(b, s_local, dtype=torch.int64, device=q.device),
            seg.to(torch.int64) if seg is not None else torch.zeros(b, s_local, dtype=torch.int64, device=q.device),
        ])
    q_pos = local_positions(cfg.layout, rank, world, s_local, q.device)
    n_steps = step_count(cfg.layout, world, s_local, spec, seg_ranges)
    source = BlockSource(cfg.layout, world, s_local, spec, q_pos, pad is not None, seg, bias, q.dtype, alibi, rel,
                         alibi_in_kernel)
    step_work = q.shape[0] * q.shape[1] * s_local * s_local
    side = Streams(q.device, side=tuning.side_stream,
                   two=tuning.two_streams and step_work >= TWO_STREAMS_MIN_WORK)
    kv = pack_kv(k, v) if n_steps > 1 else (k, v)  # one buffer to send; none to send alone
    return _Rank(q, cfg, rank, world, n_steps, seg_ranges, source, tuning, side, kv, tok, bias_grad)


def _fold_groups(q, tuning: Tuning) -> tuple[int, int]:
    return fold_groups(q) if tuning.fold_groups and tuning.fused_merge else (1, 1)


def _single_block(ring: "_Rank"):
    """The one kernel call of a ring that has nothing to merge (a ring of one, or a mask
    that leaves a rank only its own block): (call, block, kernel) covering every query row
    and every key, else None."""
    if ring.n_steps != 1:
        return None
    s_local = ring.source.s_local
    # the plan alone (no block masks are built for a call that is then not taken)
    calls = ring.calls(0)
    if len(calls) != 1 or calls[0][0].q != (0, s_local) or calls[0][0].k != (0, s_local):
        return None
    call, kern = calls[0]
    return call, Block.of(call, ring.rank, ring.kv, ring.tok, ring.source), kern


def forward_program(q, k, v, pad, seg, bias, cfg: RingConfig, rank: int, world: int, into=None, refused=None,
                    alibi=None, rel=None):
    """``refused``: the error this rank's inputs were refused with (it is raised on every
    rank after the agreement, before any transfer); ``alibi``, ``rel``: see ``_prologue``."""
    ring = yield from _prologue(q, k, v, pad, seg, bias, cfg, rank, world, refused, alibi, rel)
    if ring is None:  # empty results, no kernel runs
        return into if into is not None else (torch.empty_like(q), q.new_empty(q.shape[:-1], dtype=acc_dtype(q.dtype)))
    acc = acc_dtype(q.dtype)
    single = _single_block(ring)
    if single is not None:  # nothing to merge: the kernel's results are the results (no float32 pass)
        call, blk, kern = single
        out_b, lse_b = block_forward(kern, q, blk.k, blk.v, blk.mask, call.is_causal, cfg.scale, blk.alibi)
        if into is not None:  # a loopback ring's rank: its slice of the full results
            into[0].copy_(out_b)
            into[1].copy_(lse_b)
            return into
        return out_b, lse_b.to(acc).contiguous()  # the op lays ``out`` out as its fake promises
    out = torch.empty(q.shape, dtype=acc, device=q.device)
    lse = torch.empty(q.shape[:-1], dtype=acc, device=q.device)
    merged = Deferred(out, lse, _fold_groups(q, ring.tuning)[0], merge=True, tuning=ring.tuning)
    side = ring.side
    for t in range(ring.n_steps):
        pending = yield from ring.pass_on(t)
        for call, blk, kern in ring.blocks(t):
            with side.kernel(q, blk.k, blk.v, blk.mask):
                out_b, lse_b = block_forward(kern, q[:, :, blk.rows], blk.k, blk.v, blk.mask, call.is_causal,
                                             cfg.scale, blk.alibi)
            with side:
                side.keep(out_b, lse_b)
                merged.add(blk.rows, out_b, lse_b, last_step=t + 1 == ring.n_steps)
        ring.take(pending)
    result = into[0] if into is not None else torch.empty(q.shape, dtype=q.dtype, device=q.device)
    result_lse = into[1] if into is not None else lse
    with side:
        if not merged.finish(result, result_lse):  # else the last fold wrote the results
            result.copy_(out)
            result_lse.copy_(lse)
    side.join()
    return result, result_lse


def backward_program(dout, q, k, v, out, lse, pad, seg, bias, cfg: RingConfig, rank: int, world: int,
                     into=None, alibi=None, rel=None, bias_grad=False):
    """dQ, dK, dV of this rank's tokens (written into ``into`` when given); with
    ``bias_grad``, also the gradient of the relative-position table ``rel`` from this rank's
    queries (Hq, 2S - 1, accumulation dtype), returned after them: the block kernels' dS
    summed by distance ``j - i``."""
    acc = acc_dtype(q.dtype)
    d_rel = torch.zeros(rel.shape, dtype=acc, device=q.device) if bias_grad else None
    ring = yield from _prologue(q, k, v, pad, seg, bias, cfg, rank, world, alibi=alibi, rel=rel,
                                bias_grad=bias_grad)
    if ring is None:  # no query: no gradient flows to any key
        grads = into if into is not None else (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v))
        grads[1].zero_()
        grads[2].zero_()
        return (*grads, d_rel) if bias_grad else grads
    n_steps, s_local, side = ring.n_steps, ring.source.s_local, ring.side
    # rows that saw no key: exp(s - inf) = 0 instead of exp(-inf + inf) = NaN
    lse = lse.masked_fill(lse == float("-inf"), float("inf"))
    single = _single_block(ring)
    if single is not None:  # one block: the kernel's gradients are the gradients
        call, blk, kern = single
        grads = gqa_backward(kern, dout, q, blk.k, blk.v, out, lse, blk.mask, call.is_causal, cfg.scale, bias_grad,
                             blk.alibi)
        if bias_grad:
            _add_bias_grad(d_rel, grads[3], ring.source.q_pos, blk.k_pos)
            grads = grads[:3]
        if into is not None:
            for dst, g in zip(into, grads):
                dst.copy_(g)
            return (*into, d_rel) if bias_grad else into
        grads = tuple(g.to(t.dtype).contiguous() for g, t in zip(grads, (q, k, v)))
        return (*grads, d_rel) if bias_grad else grads
    dq = torch.empty(q.shape, dtype=acc, device=q.device)
    dq_acc = Deferred(dq, None, _fold_groups(q, ring.tuning)[1], merge=False, tuning=ring.tuning)
    dkv_pending = None
    for t in range(n_steps):
        kv_pending = yield from ring.pass_on(t)
        block_grads = []
        for call, blk, kern in ring.blocks(t):
            r = blk.rows
            with side.kernel(q, blk.k, blk.v, blk.mask, dout, out, lse):
                dq_b, dk_b, dv_b, *ds = gqa_backward(kern, dout[:, :, r], q[:, :, r], blk.k, blk.v, out[:, :, r],
                                                     lse[:, :, r], blk.mask, call.is_causal, cfg.scale, bias_grad,
                                                     blk.alibi)
            block_grads.append((r, call.k, dq_b, dk_b, dv_b))
            if ds:
                with side:  # one stream adds into the table's gradient (the kernels' alternate)
                    side.keep(ds[0])
                    _add_bias_grad(d_rel, ds[0], ring.source.q_pos[r], blk.k_pos)
            if len(block_grads) > HELD_BLOCK_GRADS:  # a block cut into many calls: sum their dK/dV now
                with side:
                    block_grads = [_sum_block_grads(block_grads, dq_acc, side, k.shape, acc, s_local)]
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
                side.keep(dk_b, dv_b)
                if dq_b is not None:
                    side.keep(dq_b)
                    dq_acc.add(r, dq_b, last_step=last)
                for i, g in enumerate((dk_b, dv_b)):
                    running = dkv[i][:, :, a:b]
                    fold(send[i] if last and whole else running, None if starts else running, [g],
                         tuning=ring.tuning)
            if last and not whole:
                send[0].copy_(dkv[0])
                send[1].copy_(dkv[1])
        # the last hop sends each rank's dK/dV straight home (the ring may stop early)
        dkv_pending = yield Exchange(send, shift=1 if not last else -(n_steps - 1), stream=side.stream)
        ring.take(kv_pending)
    dq_out = into[0] if into is not None else torch.empty(q.shape, dtype=q.dtype, device=q.device)
    with side:
        dq_direct = dq_acc.finish(dq_out)
        dk, dv = dkv_pending.wait()
    side.join()
    if not dq_direct:
        dq_out.copy_(dq)
    if into is None:
        return (dq_out, dk, dv, d_rel) if bias_grad else (dq_out, dk, dv)
    into[1].copy_(dk)
    into[2].copy_(dv)
    return (*into, d_rel) if bias_grad else into


# the block gradients a step holds before their dK/dV are summed (a block whose query rows
# were cut into many calls would otherwise hold one full-length dK and dV per call)
HELD_BLOCK_GRADS = 4


def _sum_block_grads(block_grads, dq_acc, side, kv_shape, acc, s_local):
    """Queue the dQ of ``block_grads`` and sum their dK/dV into one (r, keys, None, dK, dV)
    entry covering every key of the block (the first entry may be such a sum already)."""
    first = block_grads[0]
    if first[2] is None:  # an earlier sum: add into it
        dk, dv = first[3], first[4]
        block_grads = block_grads[1:]
    else:
        dk = torch.zeros(kv_shape, dtype=acc, device=first[3].device)
        dv = torch.zeros(kv_shape, dtype=acc, device=first[3].device)
    for r, (a, b), dq_b, dk_b, dv_b in block_grads:
        side.keep(dq_b, dk_b, dv_b)
        dq_acc.add(r, dq_b)
        dk[:, :, a:b] += dk_b
        dv[:, :, a:b] += dv_b
    return None, (0, s_local), None, dk, dv


# A call's query rows are taken in parts where its kernel would materialise more than this
# many elements per tensor (2**26: 256 MiB of float32): the math kernel's scores,
# probabilities and dS (soft-capping, a learned relative table's backward), an explicit
# mask (ALiBi's per-head bias, key padding) and its int64 distances. So their memory does
# not grow with the block: ALiBi at 32K tokens on one GPU needed a (H, S, S) float32 bias.
MATERIALISED_ELEMENTS = 2**26


def _add_bias_grad(d_rel, ds, q_pos, k_pos) -> None:
    """Sum a block's dS (B, Hq, Sq, Sk) by relative distance into the table's gradient
    (Hq, 2S - 1): the bias of (i, j) is the table's column ``j - i + S - 1``."""
    idx = relative_index(q_pos, k_pos, d_rel.shape[-1])
    d_rel.index_add_(1, idx.reshape(-1), ds.sum(0).reshape(ds.shape[1], -1).to(d_rel.dtype))
