"""The ranks' agreement: before any transfer, every rank gathers a few integers from
all ranks (shapes, dtype, options, whether its inputs were refused, the segment-id
range of each of its chunks). Ranks called differently raise a clear ValueError on
every rank instead of a hang or a wrong result; the segment ranges let every rank skip
the same document blocks. ``cfg``: the call's ``algorithm.RingConfig``.
"""

from __future__ import annotations

import struct

import torch

from .kernels import KERNELS
from .layout import LAYOUTS
from .ring import AllGather

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_META_FIELDS = ("refused", "local sequence length", "batch", "query heads", "kv heads", "head dim", "dtype",
                "causal", "window", "layout", "kernel", "scale", "key padding mask", "segment ids", "attn bias",
                "softcap", "sinks", "chunk", "alibi", "relative bias")
_N_SEG = 4  # segment-id (min, max) of each of up to two chunks


def _float_bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", x))[0]


def metadata(q, k, pad, seg, bias, cfg, refused=None) -> AllGather:
    """The request that makes every rank agree on shapes and options (and share the
    segment-id range of each of its chunks). Built on the CPU: only segment ids need a
    look at device data. A rank whose inputs were refused sends only that."""
    if refused is not None:
        return AllGather(torch.tensor([1] + [0] * (len(_META_FIELDS) - 1 + _N_SEG), dtype=torch.int64),
                         device=q.device)
    b, hq, s_local, d = q.shape
    fields = [0, s_local, b, hq, k.shape[1], d, _DTYPES.index(q.dtype), int(cfg.causal), cfg.window,
              LAYOUTS.index(cfg.layout), KERNELS.index(cfg.kernel), _float_bits(cfg.scale),
              pad is not None, seg is not None, bias is not None, _float_bits(cfg.softcap), int(cfg.sinks),
              cfg.chunk, int(cfg.alibi), int(cfg.rel_bias)]
    seg_ranges = [0] * _N_SEG
    if seg is not None and seg.numel():
        parts = seg.reshape(seg.shape[0], 1 if cfg.layout == "contiguous" else 2, -1)
        ranges = torch.stack([parts.amin(dim=(0, 2)), parts.amax(dim=(0, 2))], 1).reshape(-1).tolist()
        seg_ranges = ranges + [0] * (_N_SEG - len(ranges))
    return AllGather(torch.tensor(fields + seg_ranges, dtype=torch.int64), device=q.device)


def agree(gathered: torch.Tensor, cfg, has_seg: bool, refused=None):
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
            if name in ("scale", "softcap"):
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
