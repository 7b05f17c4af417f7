"""Guard: a position generator over the local sequence is wrong on a ring.

A model that makes its own positions from the length it sees gets, on a rank of a
ring, the positions of its shard (0 .. S/P - 1), not the tokens' global positions::

    pos = torch.arange(x.shape[1])          # x sharded: arange(S/P)   -> noted
    cos, sin = rope(pos)                    # every rank rotates as if it held tokens 0..S/P-1
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)   # rewritten to the ring op

The pass runs after the rewrite, on rings of more than one rank: a live ``arange(n)``
(start 0, step 1) whose ``n`` is the query length of a ring attention op in the same
graph is reported in ``PassReport.notes`` with its source line; the backend turns each
note into a ``ringfx.RingfxWarning``. It changes nothing: positions are the caller's
input (shard them with ``ringfx.shard``, or make them with ``ringfx.positions``), as with
torch's ``context_parallel``. Aranges that only built a mask the rewrite replaced are
dead by then and not reported, nor are those that only index the rank's own tokens
(``mask[(batch_idx, arange(n)[None, :])]``: local positions are right there); an arange
of the same length over another axis is (the note says so): a guard, not a proof.
Rewriting positions is DESIGN.md §4.4's.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch.fx as fx

from .node_facts import arange_length, live_nodes, op_name, shape_of, source_line, source_location
from .options import PassOptions
from .sites import Note, PassReport

log = logging.getLogger("ringfx.passes")


def check_positions_pass(gm: fx.GraphModule, *, options: Optional[PassOptions] = None
                         ) -> tuple[fx.GraphModule, PassReport]:
    options = options or PassOptions()
    report = PassReport("check_positions")
    from .rewrite_attention import ring_attention_nodes

    lengths = set()
    for node in ring_attention_nodes(gm, nested=True) if options.ring_size > 1 else ():
        shape = shape_of(node.args[0])
        if shape is not None:
            lengths.add(str(shape[-2]))
    live = live_nodes(gm.graph) if lengths else set()
    for node in gm.graph.nodes:
        end = arange_length(node)
        if node in live and end is not None and str(end) in lengths and not _only_indexes(node):
            report.notes.append(Note(
                f"torch.arange({end}) at {source_line(node)}: on a ring of {options.ring_size} ranks the model "
                f"sees its local {end} tokens, so this makes the positions of the shard, not the tokens' global "
                "positions; if it feeds positions (RoPE, position embeddings, masks), pass position ids as an "
                "input sharded like the sequence (ringfx.shard) or made with ringfx.positions; ignore this if "
                "it is over another axis of the same size", source_location(node)))
    log.info("check_positions: %d position generator(s) over the local sequence", len(report.notes))
    return gm, report


_INDEX_PREP = frozenset({"unsqueeze", "view", "reshape", "expand", "to", "add", "sub", "contiguous"})


def _only_indexes(node: fx.Node) -> bool:
    """Whether the arange is only an index into the tokens the rank holds
    (``mask[(batch_idx, arange(n)[None, :])]``, transformers' mask functions): local
    positions are then the right ones."""
    todo, seen, indexes = [node], set(), False
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        for user in n.users:
            name = op_name(user)
            if name == "getitem" and user.args[0] is n:  # arange(n)[None, :]: still the arange
                todo.append(user)
            elif name == "getitem" and n in _flat(user.args[1]):
                indexes = True
            elif name in _INDEX_PREP and user.args and user.args[0] is n and \
                    all(not isinstance(a, fx.Node) for a in user.args[1:]):
                todo.append(user)
            else:
                return False
    return indexes


def _flat(index) -> list:
    return list(index) if isinstance(index, (tuple, list)) else [index]
