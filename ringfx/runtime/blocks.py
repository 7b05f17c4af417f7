"""Which (query rows, key columns) blocks a rank computes at each ring step.

At step t rank r holds the key/value block of rank ``src = (r - t) % P``. Each rank's
tokens are one or two chunks of global positions (see ``layout.py``); every
(query chunk, key chunk) pair is classified from positions alone:

* EMPTY   - no query sees any key (a future block under causal, a block wholly behind
            a sliding window, two chunks with no document in common, query and key
            positions in no common attention chunk): skipped, never computed and masked;
* FULL    - every query sees every key: a plain kernel call, no mask;
* PARTIAL - a mask is needed.

Pairs are then grouped into as few kernel calls as possible. A rank's own block under
causal is one ``is_causal=True`` call, valid because a rank's local tokens are in
increasing global position.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from .layout import chunk_ranges

EMPTY, FULL, PARTIAL = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class MaskSpec:
    causal: bool
    window: int  # 0: no sliding window; W: query i sees keys j > i - W
    token_masks: bool  # key padding, segment ids or a bias (ALiBi, relative bias too): every call takes a mask
    chunk: int = 0  # 0: none; C: query i sees keys j with j // C == i // C (Llama 4's chunked attention)


@dataclasses.dataclass(frozen=True)
class BlockCall:
    q: tuple[int, int]  # local query rows [start, stop)
    k: tuple[int, int]  # local key rows of the resident block [start, stop)
    is_causal: bool  # the kernel's own causal flag
    masked: bool  # build an explicit mask from positions / tokens


def classify(q: tuple[int, int], k: tuple[int, int], spec: MaskSpec) -> int:
    """Classify the global position rectangle ``q x k`` under causal / window / chunks."""
    dmin = q[0] - (k[1] - 1)  # smallest i - j in the rectangle
    dmax = (q[1] - 1) - k[0]  # largest
    if (spec.causal and dmax < 0) or (spec.window and dmin >= spec.window):
        return EMPTY
    if spec.chunk and _disjoint((q[0] // spec.chunk, (q[1] - 1) // spec.chunk),
                                (k[0] // spec.chunk, (k[1] - 1) // spec.chunk)):
        return EMPTY  # no chunk holds both a query and a key of the rectangle
    full = (not spec.causal or dmin >= 0) and (not spec.window or dmax < spec.window) and not _chunk_bites(q, k, spec)
    return FULL if full else PARTIAL


def _chunk_bites(q: tuple[int, int], k: tuple[int, int], spec: MaskSpec) -> bool:
    """Whether the chunks hide a key from a query of the rectangle (it spans two chunks)."""
    c = spec.chunk
    return bool(c) and len({q[0] // c, (q[1] - 1) // c, k[0] // c, (k[1] - 1) // c}) > 1


def _disjoint(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[1] < b[0] or b[1] < a[0]


@functools.lru_cache(maxsize=4096)
def plan_step(
    layout: str,
    rank: int,
    src: int,
    world: int,
    s_local: int,
    spec: MaskSpec,
    segment_ranges: tuple | None = None,
) -> tuple[BlockCall, ...]:
    """The kernel calls rank ``rank`` makes against the block of rank ``src``.

    ``segment_ranges[r][i]`` is the (min, max) segment id of rank r's chunk i over the
    batch; chunks whose ranges do not meet share no document and are skipped.
    """
    qch = chunk_ranges(layout, rank, world, s_local)
    kch = chunk_ranges(layout, src, world, s_local)
    c = s_local // len(qch)
    cls = [[classify(qc, kc, spec) for kc in kch] for qc in qch]
    if segment_ranges is not None:
        for i in range(len(qch)):
            for j in range(len(kch)):
                if _disjoint(segment_ranges[rank][i], segment_ranges[src][j]):
                    cls[i][j] = EMPTY
    if all(x == EMPTY for row in cls for x in row):
        return ()
    if spec.chunk and not spec.token_masks and not spec.window:
        cut = _within_chunks(qch, kch, c, spec)
        if cut is not None:
            return cut
    if rank == src and spec.causal:
        # one is_causal call unless a token mask, the window or the chunks bite inside the block
        causal_only = MaskSpec(True, 0, False)
        bites = any(
            (spec.window and (qc[1] - 1) - kc[0] >= spec.window) or _chunk_bites(qc, kc, spec)
            for qc in qch for kc in kch if classify(qc, kc, causal_only) != EMPTY
        )
        plain_causal = not spec.token_masks and not bites
        return (BlockCall((0, s_local), (0, s_local), plain_causal, not plain_causal),)
    calls = []
    i = 0
    while i < len(qch):
        cols = tuple(j for j, x in enumerate(cls[i]) if x != EMPTY)
        i_end = i + 1
        while i_end < len(qch) and tuple(j for j, x in enumerate(cls[i_end]) if x != EMPTY) == cols:
            i_end += 1
        if cols:
            partial = any(cls[a][j] == PARTIAL for a in range(i, i_end) for j in cols)
            calls.append(BlockCall((i * c, i_end * c), (cols[0] * c, (cols[-1] + 1) * c), False,
                                   partial or spec.token_masks))
        i = i_end
    return tuple(calls)


# the most calls a block is cut into at attention-chunk boundaries; past it (small chunks)
# one masked call is cheaper than many small kernels
MAX_CHUNK_CALLS = 32


def _within_chunks(qch, kch, c: int, spec: MaskSpec) -> tuple[BlockCall, ...] | None:
    """Chunked attention without a mask: each pair of layout chunks cut at the attention
    chunks' boundaries into rectangles no boundary crosses, each a plain call (every query
    sees every key) or, on the diagonal, an ``is_causal`` one (same positions for rows and
    columns). None when a chunk boundary crosses no pair (the grouped calls are fewer),
    when a rectangle would still need a mask, or past ``MAX_CHUNK_CALLS`` calls."""
    size = spec.chunk
    inner = MaskSpec(spec.causal, 0, False)
    calls, bites = [], False
    for i, (q0, q1) in enumerate(qch):
        for j, (k0, k1) in enumerate(kch):
            if classify((q0, q1), (k0, k1), spec) == EMPTY:
                continue
            bites = bites or _chunk_bites((q0, q1), (k0, k1), spec)
            for a in range(max(q0, k0) // size, (min(q1, k1) - 1) // size + 1):
                qs = (max(q0, a * size), min(q1, (a + 1) * size))
                ks = (max(k0, a * size), min(k1, (a + 1) * size))
                kind = classify(qs, ks, inner) if qs[0] < qs[1] and ks[0] < ks[1] else EMPTY
                if kind == EMPTY:
                    continue
                if kind == PARTIAL and qs != ks:
                    return None
                calls.append(BlockCall((i * c + qs[0] - q0, i * c + qs[1] - q0),
                                       (j * c + ks[0] - k0, j * c + ks[1] - k0), kind == PARTIAL, False))
    return tuple(calls) if bites and len(calls) <= MAX_CHUNK_CALLS else None


def cut_rows(call: BlockCall, rows: int) -> list[BlockCall]:
    """``call`` as calls of at most ``rows`` query rows each. A causal call (rows and key
    columns at the same positions) becomes, per part [s, e), a plain call on the keys
    before s and a causal one on [s, e)."""
    a, b = call.q
    if b - a <= rows:
        return [call]
    if call.is_causal and call.q[1] - call.q[0] != call.k[1] - call.k[0]:
        raise AssertionError(f"a causal block call with rows {call.q} and keys {call.k} of different lengths")
    parts = []
    for s in range(a, b, rows):
        e = min(s + rows, b)
        if not call.is_causal:
            parts.append(BlockCall((s, e), call.k, False, call.masked))
            continue
        k0 = call.k[0] - a  # key column of row 0's position
        if s > a:
            parts.append(BlockCall((s, e), (call.k[0], k0 + s), False, False))
        parts.append(BlockCall((s, e), (k0 + s, k0 + e), True, False))
    return parts


@functools.lru_cache(maxsize=1024)
def step_count(layout: str, world: int, s_local: int, spec: MaskSpec, segment_ranges=None) -> int:
    """Ring steps every rank takes: one past the last step at which any rank has work.
    The ring stops early when no further block can be seen (sliding window)."""
    last = 0
    for r in range(world):
        for t in range(world):
            if plan_step(layout, r, (r - t) % world, world, s_local, spec, segment_ranges):
                last = max(last, t)
    return last + 1


def build_mask(qpos, kpos, spec: MaskSpec, dtype, pad_k=None, seg_q=None, seg_k=None, bias=None, alibi=None,
               rel=None):
    """Additive mask (0 / -inf, plus ``bias``, the ALiBi bias and the relative bias) of shape
    (b, h, Sq, Sk), b and h possibly 1.

    qpos, kpos: global positions; pad_k (B, Sk) bool; seg_q (B, Sq), seg_k (B, Sk);
    bias: float (additive) or bool (True = attend), broadcastable to (B, H, Sq, Sk);
    alibi: per-head slopes (H,): ``slopes[h] * (j - i)`` from the global positions, computed
    in the slopes' dtype (float64 for float64 inputs, else float32) and rounded once;
    rel: a relative-position table (H, 2S - 1) over the whole sequence of S tokens:
    ``rel[h, j - i + S - 1]`` is gathered from the global positions (``relative_index``).
    """
    d = qpos[:, None] - kpos[None, :]
    allowed = torch.ones_like(d, dtype=torch.bool)
    if spec.causal:
        allowed &= d >= 0
    if spec.window:
        allowed &= d < spec.window
    if spec.chunk:
        allowed &= torch.div(qpos, spec.chunk, rounding_mode="floor")[:, None] == \
            torch.div(kpos, spec.chunk, rounding_mode="floor")[None, :]
    allowed = allowed[None, None]
    if pad_k is not None:
        allowed = allowed & pad_k[:, None, None, :]
    if seg_q is not None:
        allowed = allowed & (seg_q[:, None, :, None] == seg_k[:, None, None, :])
    if bias is not None and bias.dtype == torch.bool:
        allowed = allowed & bias
        bias = None
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))
    if bias is not None:
        mask = mask + bias.to(dtype)
    if alibi is not None:
        mask = mask + (alibi[None, :, None, None] * (-d).to(alibi.dtype)).to(dtype)
    if rel is not None:
        mask = mask + rel[:, relative_index(qpos, kpos, rel.shape[-1])].to(dtype)[None]
    return mask


def relative_index(qpos, kpos, table_len: int):
    """(Sq, Sk) indices into a relative-position table of ``table_len = 2S - 1`` columns:
    column ``j - i + S - 1`` holds the bias of query i against key j."""
    return kpos[None, :] - qpos[:, None] + (table_len - 1) // 2
