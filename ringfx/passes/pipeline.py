"""The pass pipeline: a list and a short loop.

    gm, reports = run_passes(gm, options=PassOptions(group_name="loopback:4", ring_size=4))

Each pass is ``*_pass(gm, *, options) -> (gm, PassReport)``; a crash inside one is
re-raised with the pass's name (same exception type where it can be rebuilt).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch.fx as fx

from .blockwise_loss import blockwise_loss_pass
from .classify_masks import classify_masks_pass
from .decompose_mha import decompose_mha_pass
from .find_attention import find_attention_pass
from .lower_flex import lower_flex_attention_pass
from .node_facts import OUTER_KEY, called_subgraph
from .normalise import normalise_pass
from .options import PassOptions
from .positions import check_positions_pass
from .rewrite_attention import rewrite_attention_pass
from .sequence_axis import check_sequence_axis_pass
from .sequence_mixing import check_sequence_mixing_pass
from .shard_sequence import shard_sequence_pass
from .sites import PassReport

PASSES = [normalise_pass, decompose_mha_pass, lower_flex_attention_pass, find_attention_pass,
          classify_masks_pass, check_sequence_axis_pass, rewrite_attention_pass, check_positions_pass,
          check_sequence_mixing_pass, blockwise_loss_pass, shard_sequence_pass]
# With full-length inputs the sharding pass makes positions and token-mixing ops exact; these
# guards only speak for graphs that the caller feeds with its own shards.
_CALLER_SHARDED_ONLY = (check_positions_pass, check_sequence_mixing_pass)


def run_passes(gm: fx.GraphModule, *, options: Optional[PassOptions] = None,
               passes=None) -> tuple[fx.GraphModule, list[PassReport]]:
    """Run ``passes`` (default ``PASSES``) in order; return the graph and their reports."""
    options = options or PassOptions()
    reports = []
    for p in passes or PASSES:
        if options.inputs == "full" and p in _CALLER_SHARDED_ONLY:
            continue
        try:
            gm, report = _with_subgraphs(p, gm, options) if p in SUBGRAPH_PASSES else p(gm, options=options)
        except Exception as e:
            if _rebuildable(e):
                raise type(e)(f"ringfx pass {p.__name__} failed: {e}") from e
            raise
        reports.append(report)
    return gm, reports


# The attention passes and their guards also run on the subgraphs that checkpointed regions
# call (``tag_activation_checkpoint(wrap_body_0, ...)``): their sites join this graph's report.
# (The positions and sequence-mixing guards read the sharding pass's analysis, which walks
# into the bodies itself.)
SUBGRAPH_PASSES = (normalise_pass, decompose_mha_pass, lower_flex_attention_pass, find_attention_pass,
                   classify_masks_pass, check_sequence_axis_pass, rewrite_attention_pass)


def _with_subgraphs(p, gm: fx.GraphModule, options: PassOptions, done=None) -> tuple[fx.GraphModule, PassReport]:
    """``p`` on the bodies ``gm`` calls (innermost first), then on ``gm``: a body's rewrite
    is done when its caller's pass runs, so the caller can drop operands the body no
    longer reads (a mask the ring op replaced)."""
    done = set() if done is None else done
    reports = []
    for node in list(gm.graph.nodes):
        called = called_subgraph(gm, node)
        if called is None or id(called[1]) in done:  # one body called twice: analysed and rewritten once
            continue
        name, sub, operands = called
        done.add(id(sub))
        for placeholder, operand in zip((n for n in sub.graph.nodes if n.op == "placeholder"), operands):
            placeholder.meta[OUTER_KEY] = operand  # what the analyses of the subgraph look through
        sub, sub_report = _with_subgraphs(p, sub, dataclasses.replace(options, example_inputs=None), done)
        setattr(gm, name, sub)
        reports.append(sub_report)
    gm, report = p(gm, options=options)
    report.sites = [s for r in reports for s in r.sites] + report.sites  # the bodies' sites count as this graph's
    for r in reports:
        report.notes += r.notes
        report.rewritten += r.rewritten
        report.skipped += r.skipped
    return gm, report


def _rebuildable(e: Exception) -> bool:
    """Whether ``type(e)`` can be rebuilt from a message alone (``UnicodeDecodeError``, say, cannot)."""
    try:
        type(e)("probe")
        return True
    except TypeError:  # a constructor that takes other arguments
        return False
