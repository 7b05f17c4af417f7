"""Guard: a position generator over the local sequence is wrong on a ring.

A model that makes its own positions from the length it sees gets, on a rank of a
ring, the positions of its shard (0 .. S/P - 1), not the tokens' global positions::

    pos = torch.arange(x.shape[1])          # x sharded: arange(S/P)   -> noted
    cos, sin = rope(pos)                    # every rank rotates as if it held tokens 0..S/P-1
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)   # rewritten to the ring op

The pass runs after the rewrite, on rings of more than one rank, for graphs fed with the
caller's shards (``inputs="sharded"``). It reads the sharding pass's own analysis
(``shard_sequence.sequence_analysis``: the same walk, on a copy): every value the model
made that meets the sequence along its axis — where, with full-length inputs, the sharding
pass would slice it to the rank's tokens — is traced back to the ``arange(n)`` over the
sequence's length it came from, and that arange is noted with its source line (a
``ringfx.RingfxWarning``). Aranges that only built a mask the rewrite replaced, that only
index the rank's own tokens (transformers' mask functions), or that run over another axis
of the same size never meet the sequence and are not noted. It changes nothing: positions
are the caller's input there (shard them with ``ringfx.shard``, or make them with
``ringfx.positions``); with full-length inputs the sharding pass makes them global.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch.fx as fx

from .options import PassOptions
from .shard_sequence import sequence_analysis
from .sites import Note, PassReport

log = logging.getLogger("ringfx.passes")


def check_positions_pass(gm: fx.GraphModule, *, options: Optional[PassOptions] = None
                         ) -> tuple[fx.GraphModule, PassReport]:
    options = options or PassOptions()
    report = PassReport("check_positions")
    if options.ring_size > 1:
        for _, what, where in sequence_analysis(gm, options).local_positions:
            report.notes.append(Note(
                f"{what}: on a ring of {options.ring_size} ranks the model sees its local tokens, so this makes "
                "the positions of the shard, not the tokens' global positions, and they meet the sequence here "
                "(RoPE, position embeddings, masks); pass position ids as an input sharded like the sequence "
                "(ringfx.shard) or made with ringfx.positions, or pass full-length inputs (inputs='full'), where "
                "ringfx makes them global", where))
    log.info("check_positions: %d position generator(s) over the local sequence", len(report.notes))
    return gm, report
