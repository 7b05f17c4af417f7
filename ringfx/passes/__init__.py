"""ringfx.passes: find attention in an FX graph and rewrite it into ring attention.

Each pass is a pure function ``*_pass(gm, *, options) -> (gm, PassReport)``; the
pipeline is the list ``PASSES`` run by ``run_passes``. See README.md for the invariants.

node_facts.py         read-only questions about nodes (canonical op names, shapes, source lines)
sites.py              typed analysis results kept in ``node.meta["ringfx"]`` and report records
options.py            PassOptions: the ring (group name, size, layout) the graph will run on
decompose_mha.py      nn.MultiheadAttention's opaque call -> projections + SDPA
patterns.py           the table of attention spellings, one plain PyTorch function each
find_attention.py     analysis: SDPA calls and softmax(q @ kᵀ) @ v chains -> AttentionSite
classify_masks.py     analysis: each mask's provenance -> causal / window / key padding / ...
rewrite_attention.py  transformation: each accepted site -> one torch.ops.ringfx.ring_attention
ring_glue.py          tensor functions the rewritten graph calls to build mask descriptors
"""

from __future__ import annotations

import logging
from typing import Optional

import torch.fx as fx

from .classify_masks import classify_masks_pass
from .decompose_mha import decompose_mha_pass
from .find_attention import find_attention_pass, sites_of
from .options import PassOptions
from .rewrite_attention import rewrite_attention_pass
from .sites import AttentionSite, MaskTerm, PassReport, SiteRecord

log = logging.getLogger("ringfx.passes")

PASSES = [decompose_mha_pass, find_attention_pass, classify_masks_pass, rewrite_attention_pass]


def run_passes(gm: fx.GraphModule, *, options: Optional[PassOptions] = None,
               passes=None) -> tuple[fx.GraphModule, list[PassReport]]:
    """Run the pipeline; a crash inside a pass is re-raised naming the pass."""
    options = options or PassOptions()
    reports = []
    for p in passes or PASSES:
        try:
            gm, report = p(gm, options=options)
        except Exception as e:
            if _retypeable(e):
                raise type(e)(f"ringfx pass {p.__name__} failed: {e}") from e
            raise
        reports.append(report)
    return gm, reports


def _retypeable(e: Exception) -> bool:
    try:
        type(e)("probe")
        return True
    except Exception:
        return False


__all__ = ["AttentionSite", "MaskTerm", "PASSES", "PassOptions", "PassReport", "SiteRecord",
           "classify_masks_pass", "decompose_mha_pass", "find_attention_pass", "rewrite_attention_pass", "run_passes", "sites_of"]
