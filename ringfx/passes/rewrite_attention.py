"""Rewrite every attention site marked ``rewrite`` into one ring attention op.

Reads ``node.meta["ringfx"]`` (``AttentionSite``, filled by find_attention_pass and
classify_masks_pass) and changes nothing else in the graph::

    # before                                    # after
    s = q @ k.transpose(-2, -1) / 8.0           out, lse = torch.ops.ringfx.ring_attention(
    s = torch.where(causal, s, -inf)                q, k_kv, v_kv, None, None, None,
    p = softmax(s.float(), -1).type_as(q)           "loopback:4", "contiguous", True,
    o = p @ repeat_kv(v, 4)                         0.125, 0, "auto")
                                                o = out

A soft-capped site (``cap * tanh(s / cap)``) and a site with sinks (``cat([s, sinks
column], -1)``, softmax, ``p[..., :-1]``) pass ``sinks`` (the ``(H,)`` parameter itself)
and ``softcap`` as two more arguments of the op; a chunked site (Llama 4) adds ``chunk``
and an ALiBi site its slopes ``(H,)``, read off the model's mask when it was classified and
held by the graph module as a buffer (``_ringfx_alibi_<n>``)::

    bias = slopes[:, None, None] * (j - i)      out, lse = torch.ops.ringfx.ring_attention(
    s = s + bias.masked_fill(triu, -inf)            q, k, v, ..., "auto", None, 0.0, 0,
                                                    self._ringfx_alibi_0)

A ``relative`` term (T5's learned bias, proven a function of ``j - i``) becomes the op's table
``(Hq, 2S - 1)`` (argument 16), the model's own chain rerun on the distances of one query row
(``relative_bias.relative_table``), one per bias however many layers add it::

    bias = emb(bucket(arange(S)[None, :] - arange(S)[:, None])).permute([2, 0, 1])[None]
    s = q @ kᵀ + bias                          table = emb(bucket(arange(2S - 1).view(1, -1) - (S - 1))
                                                           ).permute([2, 0, 1])[None][0, :, 0, :]
                                               out, lse = ring_attention(q, k, v, ..., None, table)

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
from .node_facts import OUTER_KEY, VALUE_KEY, called_subgraph, dtype_of, hop_subgraphs, shape_of
from ..runtime.collectives import padded_length
from .options import PassOptions
from .relative_bias import relative_table
from .sites import AttentionSite, Decision, Operand, PassReport, SiteRecord

log = logging.getLogger("ringfx.passes")


def ring_attention_target():
    """The custom op the rewrite emits (importing the runtime registers it)."""
    import ringfx.runtime  # noqa: F401  (registers torch.ops.ringfx.*)

    return torch.ops.ringfx.ring_attention.default


def ring_attention_nodes(gm: fx.GraphModule, *, nested: bool = False) -> list[fx.Node]:
    """The ring attention ops of a rewritten graph (``nested``: also those in the subgraphs
    its higher-order ops call, e.g. checkpointed regions)."""
    target = ring_attention_target()
    graphs = [gm] + ([sub for _, _, sub in hop_subgraphs(gm)] if nested else [])
    return [n for g in graphs for n in g.graph.nodes if n.op == "call_function" and n.target == target]


def rewrite_attention_pass(gm: fx.GraphModule, *, options: Optional[PassOptions] = None
                           ) -> tuple[fx.GraphModule, PassReport]:
    options = options or PassOptions()
    report = PassReport("rewrite_attention")
    sites = sites_of(gm)
    replaced: dict[fx.Node, fx.Node] = {}  # a rewritten site's output -> the node now holding its value
    tables: dict = {}  # a relative bias -> its table (T5's layers share the first layer's bias)
    for site in sites:
        if site.decision is Decision.REWRITE:
            _rewrite(gm, site, options, replaced, tables)
            report.rewritten += 1
        else:
            report.skipped += 1
        report.sites.append(SiteRecord.of(site))
    # a body rewritten before this graph may have added operands to its call here
    calls = _drop_unread_operands(gm)
    if report.rewritten or calls:
        gm.graph.lint()
        gm.recompile()
    log.info("rewrite_attention: rewrote %d attention ops, skipped %d", report.rewritten, report.skipped)
    return gm, report


def _canonical(graph: fx.Graph, o: Operand, replaced: dict) -> fx.Node:
    x = replaced.get(o.node, o.node)
    if o.permute is not None:
        x = graph.call_method("permute", (x, *o.permute))
    if o.unsqueeze0:
        x = graph.call_method("unsqueeze", (x, 0))
    return x


def _rewrite(gm: fx.GraphModule, site: AttentionSite, options: PassOptions, replaced: dict, tables: dict) -> None:
    """Insert the ring op just before the site's output: every input of the site (q, k, v,
    masks, scale factors) is defined above it. A site fed by an earlier rewritten site
    (attention after attention) reads that site's new output through ``replaced``."""
    graph = gm.graph
    out_node = site.output
    scores_nd = 3 if site.q.unsqueeze0 else 4
    now = lambda n: _passed_in(gm, n, replaced) if n.graph is not graph else replaced.get(n, n)
    with graph.inserting_before(out_node):
        q, k, v = (_canonical(graph, o, replaced) for o in (site.q, site.k, site.v))
        # MLA (DeepSeek): a value head dim unlike the query/key one. The block kernels take one
        # head dim, so the narrower side is padded with zeros (scores and lse unchanged: the
        # scale is explicit; the output is cut back to v's width)
        d_qk, d_v = _head_dim(site.q), _head_dim(site.v)
        width = max(d_qk or 0, d_v or 0)
        if d_qk is not None and d_v is not None and d_qk != d_v:
            if d_qk < width:
                q, k = (_padded(graph, t, o, width) for t, o in ((q, site.q), (k, site.k)))
            else:
                v = _padded(graph, v, site.v, width)
        kpms, biases, seg, rel = [], [], None, None
        for term in site.terms:
            mask = now(term.node)
            if term.heads_folded is not None and term.kind in ("key_padding", "dense"):
                mask = _unfold_heads(graph, mask, term)
            if term.kind == "key_padding" and term.form in ("keep", "drop") and _kpm_ok(mask, scores_nd):
                kpms.append(graph.call_function(ring_glue.key_padding_from_mask,
                                                (mask, term.form == "drop", q)))
            elif term.kind in ("key_padding", "dense"):
                b = graph.call_function(ring_glue.bias_from_mask,
                                        (mask, term.form, scores_nd, site.q.unsqueeze0))
                biases.append(graph.call_function(ring_glue.gather_key_columns,
                                                  (b, options.group_name, options.layout)))
            elif term.kind == "segment_ids":
                seg = now(term.segment_node)
            elif term.kind == "relative":
                table = _relative_table(graph, term, site, options, tables)
                rel = table if rel is None else graph.call_function(operator.add, (rel, table))
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
            scale = graph.call_function(operator.mul if power > 0 else operator.truediv, (scale, now(node)))
        variants = ()  # soft-capping, sinks, chunks, ALiBi, relative bias: per head, the same on every rank
        if site.softcap or site.sinks is not None or site.chunk or site.alibi is not None or rel is not None:
            sinks = now(site.sinks) if site.sinks is not None else None
            variants = (sinks, float(site.softcap))
        if site.chunk or site.alibi is not None or rel is not None:
            variants += (int(site.chunk), _slopes_buffer(gm, site.alibi) if site.alibi is not None else None)
        if rel is not None:
            variants += (rel,)
        ring = graph.call_function(ring_attention_target(), (
            q, k, v, kpm, seg, bias, options.group_name, options.layout, bool(site.causal),
            scale, int(site.window or 0), options.kernel, *variants))
        out = graph.call_function(operator.getitem, (ring, 0))
        if d_qk is not None and d_v is not None and d_v < width:
            out = graph.call_function(operator.getitem, (out, (Ellipsis, slice(None, d_v))))
            out.meta[VALUE_KEY] = _meta_like(site.v, d_v, shape_from=site.q)
        if site.out_fold_heads:  # (B, H, S, D) -> (B*H, S, D), as the model's bmm with v made it
            out = graph.call_method("reshape", (out, *shape_of(out_node)))
            out.meta[VALUE_KEY] = _meta_of(out_node)
        if site.out_squeeze0:
            out = graph.call_method("squeeze", (out, 0))
        if site.out_permute is not None:
            out = graph.call_method("permute", (out, *site.out_permute))
    ring.meta["stack_trace"] = out_node.meta.get("stack_trace")
    out_node.replace_all_uses_with(out)
    replaced[out_node] = out
    _erase_unused(graph, list(site.chain) + [out_node])


def _relative_table(graph: fx.Graph, term, site: AttentionSite, options: PassOptions, tables: dict) -> fx.Node:
    """The ring op's table ``(Hq, 2S - 1)`` for a ``relative`` term, S the sequence length the
    op will see: the model's (or the caller's shards') length, padded as the sharding pass pads
    it on a ring. Built once per bias (every layer of T5 adds the first layer's)."""
    n = _operand_shape(site.q)[-2]
    if options.inputs == "full":
        total = padded_length(n, options.ring_size, options.layout) if options.ring_size > 1 else n
    else:  # the caller's shards: this rank's tokens, all ranks' on a loopback ring
        total = n if options.loopback else n * options.ring_size
    heads = _operand_shape(site.q)[0 if site.q.unsqueeze0 else 1]
    key = (term.node, term.form, total, heads)
    if key not in tables:
        table = relative_table(graph, term.relative, total, heads)
        tables[key] = graph.call_function(operator.neg, (table,)) if term.form == "subtracted" else table
    return tables[key]


def _meta_of(node: fx.Node) -> torch.Tensor:
    return torch.empty(shape_of(node), dtype=dtype_of(node), device="meta")


def _unfold_heads(graph: fx.Graph, mask: fx.Node, term) -> fx.Node:
    """A ``(B*H, ..., S)`` mask (a baddbmm bias) viewed as ``(B, H, ..., S)``."""
    b, h = term.heads_folded
    shape = shape_of(term.node)
    out = graph.call_method("reshape", (mask, b, h, *shape[1:]))
    out.meta[VALUE_KEY] = torch.empty((b, h, *shape[1:]), dtype=dtype_of(term.node), device="meta")
    return out


def _operand_shape(o: Operand):
    shape = shape_of(o.node)
    if shape is not None and o.permute is not None:
        shape = [shape[i] for i in o.permute]
    return None if shape is None else tuple(shape)


def _meta_like(o: Operand, last: int, shape_from: Optional[Operand] = None) -> torch.Tensor:
    """A meta tensor of ``shape_from``'s shape (default ``o``'s) with last dim ``last`` and ``o``'s dtype."""
    shape = _operand_shape(shape_from or o)
    return torch.empty((*shape[:-1], last), dtype=dtype_of(o.node), device="meta")


def _padded(graph: fx.Graph, node: fx.Node, o: Operand, width: int) -> fx.Node:
    """``node`` (the operand ``o`` as the site reads it) zero-padded to ``width`` in its last dim."""
    padded = graph.call_function(torch.nn.functional.pad, (node, (0, width - _operand_shape(o)[-1])))
    padded.meta[VALUE_KEY] = _meta_like(o, width)
    return padded


def _head_dim(o: Operand):
    """The last dim of an operand as the site reads it (after its permute), or None."""
    shape = _operand_shape(o)
    return shape[-1] if shape is not None and isinstance(shape[-1], int) else None


def _slopes_buffer(gm: fx.GraphModule, slopes: torch.Tensor) -> fx.Node:
    """The ALiBi slopes as a (non-persistent) buffer of ``gm`` and its ``get_attr`` node."""
    i = 0
    while hasattr(gm, f"_ringfx_alibi_{i}"):
        i += 1
    name = f"_ringfx_alibi_{i}"
    gm.register_buffer(name, slopes.detach().clone(), persistent=False)
    node = gm.graph.get_attr(name)
    node.meta["example_value"] = getattr(gm, name)
    return node


def _passed_in(gm: fx.GraphModule, node: fx.Node, passed: dict) -> fx.Node:
    """A mask part that the graph calling this region (a checkpointed body) computes: made
    an operand of the call and a placeholder of the body, once per node::

        tag_activation_checkpoint(body, x, m)   ->   tag_activation_checkpoint(body, x, m, pad)
        def body(x, m):                          ->   def body(x, m, pad):
    """
    if node in passed:
        return passed[node]
    owner = node.graph.owning_module
    call = next(n for n in owner.graph.nodes if (c := called_subgraph(owner, n)) is not None and c[1] is gm)
    last = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
    with gm.graph.inserting_after(last):
        placeholder = gm.graph.placeholder(f"{node.name}_passed_in")
    placeholder.meta.update({k: node.meta[k] for k in ("example_value", "val", VALUE_KEY) if k in node.meta})
    placeholder.meta[OUTER_KEY] = node
    call.args = call.args + (node,)
    passed[node] = placeholder
    return placeholder


def _drop_unread_operands(gm: fx.GraphModule) -> int:
    """The number of regions ``gm`` calls. Operands of checkpointed regions whose body no longer reads them (a mask that a ring
    op inside replaced) are dropped, and what only fed them is erased::

        m = causal_mask(...)                          (gone)
        tag_activation_checkpoint(body, x, m)    ->   tag_activation_checkpoint(body, x)
    """
    calls = 0
    for node in list(gm.graph.nodes):
        called = called_subgraph(gm, node)
        if called is None:
            continue
        calls += 1
        _, body, operands = called
        placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != len(operands):
            continue
        unread = [i for i, p in enumerate(placeholders) if not p.users]
        if not unread:
            continue
        for i in unread:
            body.graph.erase_node(placeholders[i])
        body.graph.lint()
        body.recompile()
        node.args = (node.args[0],) + tuple(a for i, a in enumerate(operands) if i not in unread)
        _erase_unused(gm.graph, [operands[i] for i in unread if isinstance(operands[i], fx.Node)])
    return calls


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
