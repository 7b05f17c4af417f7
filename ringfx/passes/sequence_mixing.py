"""Guard: ops that mix tokens across the sequence see only this rank's shard on a ring.

For graphs fed with the caller's own shards (``inputs="sharded"``). The ring op makes
attention exact on a sharded sequence; everything else in the graph runs on the shard as
it is. That is right for per-token ops and wrong, silently, for ops that combine tokens::

    h = ring_attention(q, k, v)                 # exact over the whole sequence
    pooled = h.mean(dim=1)                      # mean of this rank's tokens only  -> noted
    logits[:, :-1]                              # drops each shard's last token    -> noted
    x.cumsum(1), F.conv1d over the tokens       # stop at the shard's edge         -> noted

Which ops those are is decided by the sharding pass's own analysis (one engine:
``shard_sequence.mixing_ops`` walks a copy of the graph as the sharding pass would, from
the inputs with the attention's sequence length, and lists every op it would give a
distributed form or all-gather). Each becomes a note with its source line
(``ringfx.RingfxWarning``): a loss averaged over the local tokens may be what the caller
wants, so nothing is refused and nothing is changed. With full-length inputs (the
default) the sharding pass computes those ops exactly instead, and this guard does not run.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch.fx as fx

from .options import PassOptions
from .shard_sequence import mixing_ops
from .sites import Note, PassReport

log = logging.getLogger("ringfx.passes")


def check_sequence_mixing_pass(gm: fx.GraphModule, *, options: Optional[PassOptions] = None
                               ) -> tuple[fx.GraphModule, PassReport]:
    options = options or PassOptions()
    report = PassReport("check_sequence_mixing")
    if options.ring_size > 1:
        for what, where in mixing_ops(gm, options):
            report.notes.append(Note(f"{what}: on a ring of {options.ring_size} ranks it sees only this rank's "
                                     "tokens of the sequence (with full-length inputs, inputs='full', ringfx "
                                     "computes it over the whole sequence)", where))
    log.info("check_sequence_mixing: %d op(s) mix tokens across the sequence", len(report.notes))
    return gm, report
