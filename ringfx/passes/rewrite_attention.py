"""Rewrite every attention site marked ``rewrite`` into one ring attention op.

Reads ``node.meta["ringfx"]`` (``AttentionSite``, filled by find_attention_pass and
classify_masks_pass) and changes nothing else in the graph::

    # before                                    # after
    s = q @ k.transpose(-2, -1) / 8.0           out, lse = torch.ops.ringfx.ring_attention(
    s = torch.where(causal, s, -inf)                q, k_kv, v_kv, None, None, None,
    p = softmax(s.float(), -1).type_as(q)           "loopback:4", "contiguous", True,
    o = p @ repeat_kv(v, 4)                         0.125, 0, "auto")
                                                o = out

Layout fixes (permute / unsqueeze for ``(B*H, S, D)`` spellings) are inserted before the
op and undone after it; the replaced chain and the nodes that only fed it (the key
transpose, the repeat_kv expansion, q/k scaling) are erased.
"""

from __future__ import annotations

import logging
import operator
from typing import Optional

import torch
import torch.fx as fx

from . import ring_glue
from .find_attention import sites_of
from .node_facts import dtype_of, shape_of
from .options import PassOptions
from .sites import REWRITE, AttentionSite, Operand, PassReport, SiteRecord

log = logging.getLogger("ringfx.passes")


def ring_attention_target():
    """The custom op the rewrite emits (importing the runtime registers it)."""
    import ringfx.runtime  # noqa: F401  (registers torch.ops.ringfx.*)

    return torch.ops.ringfx.ring_attention.default


def ring_attention_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """The ring attention ops of a rewritten graph."""
    target = ring_attention_target()
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target == target]


def rewrite_attention_pass(gm: fx.GraphModule, *, options: Optional[PassOptions] = None
                           ) -> tuple[fx.GraphModule, PassReport]:
    options = options or PassOptions()
    report = PassReport("rewrite_attention")
    sites = sites_of(gm)
    for site in sites:
        if site.decision == REWRITE:
            _rewrite(gm, site, options)
            report.rewritten += 1
        else:
            report.skipped += 1
        report.sites.append(SiteRecord.of(site))
    if report.rewritten:
        gm.graph.lint()
        gm.recompile()
    log.info("rewrite_attention: rewrote %d attention ops, skipped %d", report.rewritten, report.skipped)
    return gm, report


def _canonical(graph: fx.Graph, o: Operand) -> fx.Node:
    x = o.node
    if o.permute is not None:
        x = graph.call_method("permute", (x, *o.permute))
    if o.unsqueeze0:
        x = graph.call_method("unsqueeze", (x, 0))
    return x


def _rewrite(gm: fx.GraphModule, site: AttentionSite, options: PassOptions) -> None:
    graph = gm.graph
    out_node = site.output
    scores_nd = 3 if site.q.unsqueeze0 else 4
    with graph.inserting_before(out_node):
        q, k, v = (_canonical(graph, o) for o in (site.q, site.k, site.v))
        kpms, biases, seg = [], [], None
        for term in site.terms:
            if term.kind == "key_padding" and term.form in ("keep", "drop") and _kpm_ok(term.node, scores_nd):
                kpms.append(graph.call_function(ring_glue.key_padding_from_mask,
                                                (term.node, term.form == "drop", q)))
            elif term.kind in ("key_padding", "dense"):
                b = graph.call_function(ring_glue.bias_from_mask,
                                        (term.node, term.form, scores_nd, site.q.unsqueeze0))
                biases.append(graph.call_function(ring_glue.gather_key_columns,
                                                  (b, options.group_name, options.layout)))
            elif term.kind == "segment_ids":
                seg = term.segment_node
        kpm = kpms[0] if kpms else None
        for extra in kpms[1:]:
            kpm = graph.call_function(torch.logical_and, (kpm, extra))
        bias = None
        if len(biases) == 1:
            bias = biases[0]
        elif biases:
            bias = graph.call_function(ring_glue.combine_biases, (dtype_of(site.q.node), *biases))
        scale = float(site.scale)
        for node, power in site.scale_nodes:
            scale = graph.call_function(operator.mul if power > 0 else operator.truediv, (scale, node))
        ring = graph.call_function(ring_attention_target(), (
            q, k, v, kpm, seg, bias, options.group_name, options.layout, bool(site.causal),
            scale, int(site.window or 0), options.kernel))
        out = graph.call_function(operator.getitem, (ring, 0))
        if site.out_squeeze0:
            out = graph.call_method("squeeze", (out, 0))
        if site.out_permute is not None:
            out = graph.call_method("permute", (out, *site.out_permute))
    for n in (q, k, v, ring, out):
        n.meta["ringfx_inserted"] = True
    ring.meta["stack_trace"] = out_node.meta.get("stack_trace")
    ring.meta["ringfx_site"] = SiteRecord.of(site)
    out_node.replace_all_uses_with(out)
    _erase_unused(graph, list(site.chain) + [out_node])


def _kpm_ok(mask: fx.Node, nd: int) -> bool:
    """A bool per-key mask is key padding when only batch and key axes vary."""
    shape = shape_of(mask)
    one = lambda d: isinstance(d, int) and d == 1
    if shape is None or nd != 4:
        return bool(shape) and all(one(d) for d in shape[:-1])
    shape = (1,) * (4 - len(shape)) + tuple(shape)
    return one(shape[1]) and one(shape[2])


_PURE = ("call_function", "call_method")


def _erase_unused(graph: fx.Graph, start: list[fx.Node]) -> None:
    """Erase the replaced nodes and whatever only fed them (local dead-code removal)."""
    work, erased = list(reversed(start)), set()
    while work:
        node = work.pop(0)
        if node in erased or node.users or node.op not in _PURE or node.is_impure():
            continue
        inputs = node.all_input_nodes
        graph.erase_node(node)
        erased.add(node)
        work.extend(i for i in inputs if i.op in _PURE)
