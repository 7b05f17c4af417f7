"""Typed analysis results: what the passes record in ``node.meta["ringfx"]``.

``find_attention_pass`` stores an :class:`AttentionSite` on the node whose value the
attention produces (the ``probs @ v`` matmul, or the SDPA call).
``classify_masks_pass`` fills in each :class:`MaskTerm` and the site's descriptor fields;
``rewrite_attention_pass`` only reads them. :class:`PassReport` is what every pass returns.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.fx as fx

META_KEY = "ringfx"


class Decision(str, enum.Enum):
    """A site's fate. Its value is the word the reports print, and, being a ``str``, a
    decision compares equal to that word (``record.decision == "rewritten"``)."""

    REWRITE = "rewritten"
    LEAVE = "left alone"  # reported with the reason; the backend refuses it on a ring of P > 1

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


@dataclass
class Operand:
    """A q / k / v input of an attention, and how to bring it to the ring op's
    canonical ``(B, H, S, D)``: ``permute`` (or None), then ``unsqueeze0`` for 3-D
    ``(B*H, S, D)`` spellings."""

    node: fx.Node
    permute: Optional[tuple[int, ...]] = None
    unsqueeze0: bool = False


@dataclass
class MaskTerm:
    """One mask applied to the scores, as written by the model.

    form: ``additive`` (added to the scores), ``subtracted``, ``keep`` (bool, True = attend) or ``drop``
    (bool, True = masked out). kind (set by classify_masks_pass): ``none`` (all-attend),
    ``causal``, ``window``, ``key_padding`` (per key; a float one is gathered along the
    ring as an O(S) bias), ``segment_ids``, ``dense`` (passed block-wise as
    ``attn_bias``), ``chunk`` (Llama 4's chunked attention: key j seen only if ``j // chunk
    == i // chunk``), ``alibi`` (a per-head bias ``slopes[h] * (j - i)``, possibly with a
    causal / window / chunk pattern of -inf), ``relative`` (a bias proven a function of ``j - i``
    per head, learned or not: T5's; ``relative`` holds the proof) or ``unsupported`` (site is left alone;
    ``detail`` says why). A ``window`` or ``chunk`` term is ``causal`` when it also hides
    future keys (``i - W < j <= i``); otherwise it hides only keys more than W behind
    (``j > i - W``) or in other chunks."""

    node: fx.Node
    form: str
    kind: str = "unclassified"
    window: int = 0
    causal: bool = False
    segment_node: Optional[fx.Node] = None
    chunk: int = 0
    slopes: Optional[torch.Tensor] = None  # an ``alibi`` term's slopes (H,) or (1,), as the model's values
    relative: Optional[Any] = None  # a ``relative`` term's proof (``relative_bias.RelativeBias``)
    # (B, H) when the term is laid out with the heads folded into the batch, (B*H, ..., S) (a
    # baddbmm bias: BLOOM's ALiBi); the rewrite views it as (B, H, ..., S)
    heads_folded: Optional[tuple] = None
    detail: str = ""  # for the reader: why unsupported, or how it was proven


@dataclass(frozen=True)
class MaskKind:
    """What the masks of a site amount to, as ``classify_masks_pass`` found them; printed
    as the reports show it (``causal+window(4)+key_padding``, ``none``, ``unsupported``)."""

    causal: bool = False
    window: int = 0
    others: tuple[str, ...] = ()  # sorted kinds of the other terms: alibi, dense, key_padding, relative, segment_ids
    unsupported: bool = False
    chunk: int = 0

    def __str__(self) -> str:
        if self.unsupported:
            return "unsupported"
        parts = (["causal"] if self.causal else []) + ([f"window({self.window})"] if self.window else []) + \
            ([f"chunk({self.chunk})"] if self.chunk else [])
        return "+".join(parts + list(self.others)) or "none"


@dataclass
class AttentionSite:
    """One attention in the graph, matched from SDPA or from a softmax chain."""

    output: fx.Node
    pattern: str
    source_line: str
    q: Optional[Operand] = None
    k: Optional[Operand] = None
    v: Optional[Operand] = None
    out_permute: Optional[tuple[int, ...]] = None  # ring output (B,H,S,D) -> model layout
    out_squeeze0: bool = False
    out_fold_heads: bool = False  # ring output (B, H, S, D) -> (B*H, S, D) (BLOOM's bmm with v)
    scale: Optional[float] = None  # None: 1/sqrt(D)
    # symbolic factors of the scale (dynamic shapes: ``/ v.size(-1) ** 0.5``): (node, ±1)
    scale_nodes: list = field(default_factory=list)
    causal: bool = False
    window: int = 0
    gqa: str = "none"
    softcap: float = 0.0  # logit soft-capping: scores = softcap * tanh(scores / softcap) before the masks
    sinks: Optional[fx.Node] = None  # (H,) per-head sink logits joined to the softmax (GPT-OSS)
    chunk: int = 0  # chunked local attention (Llama 4): key j seen only if j // chunk == i // chunk
    alibi: Optional[torch.Tensor] = None  # ALiBi slopes (H,) or (1,): slopes[h] * (j - i) added to the scores
    terms: list[MaskTerm] = field(default_factory=list)
    chain: list[fx.Node] = field(default_factory=list)  # nodes the rewrite replaces
    anchor: Optional[fx.Node] = None  # the softmax or SDPA node: the user's source line
    mask: MaskKind = MaskKind()
    decision: Decision = Decision.REWRITE
    reason: str = ""

    @property
    def mask_kind(self) -> str:
        return str(self.mask)

    def skip(self, reason: str) -> "AttentionSite":
        self.decision, self.reason = Decision.LEAVE, reason
        return self


@dataclass
class SiteRecord:
    """A plain, picklable summary of a site for reports (no FX nodes)."""

    graph_index: int
    source_line: str
    pattern: str
    mask_kind: str
    decision: Decision
    reason: str
    causal: bool
    window: int
    gqa: str
    filename: str = ""  # the user's source file and line, for warnings that point there
    lineno: int = 0

    @staticmethod
    def of(site: AttentionSite, graph_index: int = 0) -> "SiteRecord":
        from .node_facts import source_location

        where = source_location(site.anchor if site.anchor is not None else site.output) or ("", 0)
        return SiteRecord(graph_index, site.source_line, site.pattern, site.mask_kind, site.decision,
                          site.reason, site.causal, site.window, site.gqa, *where)


class Note(str):
    """A guard's note (the text the user reads), carrying where in the user's code the op
    it is about was written, so that its warning can point there."""

    filename: str = ""
    lineno: int = 0

    def __new__(cls, text: str, where: Optional[tuple[str, int]] = None):
        note = super().__new__(cls, text)
        if where is not None:
            note.filename, note.lineno = where
        return note


@dataclass
class PassReport:
    """What a pass did: one line per site, plus a count of what changed."""

    name: str
    sites: list[SiteRecord] = field(default_factory=list)
    rewritten: int = 0
    skipped: int = 0
    notes: list[str] = field(default_factory=list)
