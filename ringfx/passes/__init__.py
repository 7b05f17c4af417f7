"""ringfx.passes: find attention in an FX graph and rewrite it into ring attention.

Each pass is a pure function ``*_pass(gm, *, options) -> (gm, PassReport)``; the
pipeline is the list ``PASSES`` run by ``run_passes``. See README.md for the invariants.

node_facts.py         read-only questions about nodes (canonical op names, shapes, source lines)
sites.py              typed analysis results kept in ``node.meta["ringfx"]`` and report records
options.py            PassOptions: the ring (group name, size, layout) the graph will run on
decompose_mha.py      nn.MultiheadAttention's opaque call -> projections + SDPA
lower_flex.py         flex_attention calls -> the mask_mod's dense mask + SDPA (or soft-capped eager)
normalise.py          first pass: in-place arithmetic on the score path made functional, dead code erased
spellings.py          the spelling tables recognition walks (QK products, score steps, normalisers, ...)
patterns.py           example spellings, one plain PyTorch function each, naming the rules it fires
find_attention.py     analysis: SDPA calls and normaliser(q @ kᵀ) @ v chains, walked through spellings.py -> AttentionSite
classify_masks.py     analysis: each mask's provenance -> causal / window / key padding / ...
relative_bias.py      a bias proven a function of j - i (T5's) and the O(S) table the ring op takes for it
sequence_axis.py      guard: attention that contracts over the sequence (channel attention) is left alone
rewrite_attention.py  transformation: each accepted site -> one torch.ops.ringfx.ring_attention
positions.py          guard: arange over the local sequence (a position generator) is noted, never changed
sequence_mixing.py    guard: ops that combine tokens across the sequence (pooling, shifts, scans) are noted
shard_sequence.py     transformation (full-length inputs): shard the sequence inputs, give token-mixing ops distributed forms
blockwise_loss.py     transformation: linear -> cross_entropy fused into one op over chunks of tokens (opt-in)
pipeline.py           PASSES and run_passes: the list and the loop
ring_glue.py          tensor functions the rewritten graph calls to build mask descriptors
"""

from __future__ import annotations

from .classify_masks import classify_masks_pass
from .decompose_mha import decompose_mha_pass
from .find_attention import find_attention_pass, sites_of
from .options import PassOptions
from .pipeline import PASSES, run_passes
from .positions import check_positions_pass
from .rewrite_attention import rewrite_attention_pass
from .sequence_axis import check_sequence_axis_pass
from .sequence_mixing import check_sequence_mixing_pass
from .sites import AttentionSite, Decision, MaskKind, MaskTerm, PassReport, SiteRecord

__all__ = ["AttentionSite", "Decision", "MaskKind", "MaskTerm", "PASSES", "PassOptions", "PassReport", "SiteRecord",
           "check_positions_pass", "check_sequence_axis_pass", "check_sequence_mixing_pass", "classify_masks_pass",
           "decompose_mha_pass", "find_attention_pass", "rewrite_attention_pass", "run_passes", "sites_of"]
