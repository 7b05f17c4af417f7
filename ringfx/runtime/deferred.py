"""Deferred accumulation: block results wait, per row range, until several can be
folded into the float32 accumulator in one pass (``fold.py``).
"""

from __future__ import annotations

import torch

from .fold import fold, fused_fold_available
from .tuning import Tuning


class Deferred:
    """Block results waiting to be folded into a float32 accumulator, up to ``group``
    of them per row range, so that the accumulator is read and written once per group
    instead of once per block (the accumulation passes are memory-bound; the block
    kernels are not). The first fold initialises the accumulator instead of adding to
    zeros; ``finish`` may write the last fold straight into the result tensor.

    ``merge``: blocks are (out, lse) partial attention results; else gradients (sums).
    Call ``add``/``finish`` inside ``with side:`` (the accumulation stream).
    """

    def __init__(self, acc, acc_lse, group: int, merge: bool, tuning: Tuning | None = None):
        self.acc, self.acc_lse, self.group, self.merge = acc, acc_lse, group, merge
        self.tuning = tuning or Tuning.from_environment()
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
             lses=[x for _, x in items] if self.merge else None, tuning=self.tuning)

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
    """(forward merge group, dQ group) for a call on ``q`` whose folds may be fused and
    grouped (``Tuning.fused_merge`` and ``Tuning.fold_groups``; the caller checks them)."""
    return (MERGE_GROUP, DQ_GROUP) if fused_fold_available(q, q.dtype) else (1, 1)
