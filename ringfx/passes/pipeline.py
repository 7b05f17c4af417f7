"""The pass pipeline: a list and a short loop.

    gm, reports = run_passes(gm, options=PassOptions(group_name="loopback:4", ring_size=4))

Each pass is ``*_pass(gm, *, options) -> (gm, PassReport)``; a crash inside one is
re-raised with the pass's name (same exception type where it can be rebuilt).
"""

from __future__ import annotations

from typing import Optional

import torch.fx as fx

from .classify_masks import classify_masks_pass
from .decompose_mha import decompose_mha_pass
from .find_attention import find_attention_pass
from .options import PassOptions
from .positions import check_positions_pass
from .rewrite_attention import rewrite_attention_pass
from .sequence_axis import check_sequence_axis_pass
from .sequence_mixing import check_sequence_mixing_pass
from .sites import PassReport

PASSES = [decompose_mha_pass, find_attention_pass, classify_masks_pass, check_sequence_axis_pass,
          rewrite_attention_pass, check_positions_pass, check_sequence_mixing_pass]


def run_passes(gm: fx.GraphModule, *, options: Optional[PassOptions] = None,
               passes=None) -> tuple[fx.GraphModule, list[PassReport]]:
    """Run ``passes`` (default ``PASSES``) in order; return the graph and their reports."""
    options = options or PassOptions()
    reports = []
    for p in passes or PASSES:
        try:
            gm, report = p(gm, options=options)
        except Exception as e:
            if _rebuildable(e):
                raise type(e)(f"ringfx pass {p.__name__} failed: {e}") from e
            raise
        reports.append(report)
    return gm, reports


def _rebuildable(e: Exception) -> bool:
    try:
        type(e)("probe")
        return True
    except Exception:  # exception types whose constructor takes other arguments
        return False
