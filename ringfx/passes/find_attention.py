"""Find attention in a captured graph (analysis only; the graph is not changed).

Two anchors:

* every ``F.scaled_dot_product_attention`` call, and
* every normaliser over the last axis (``spellings.NORMALISERS``: softmax) whose input
  walks back to a ``q @ kᵀ`` product and whose output walks forward to a ``probs @ v``
  product::

      s = q @ k.transpose(-2, -1)          # QK_PRODUCTS: matmul / bmm / einsum / baddbmm
      s = s / math.sqrt(d)                 # SCORE_STEPS: or q * d**-0.25 and k * d**-0.25, or alpha=
      s = cap * tanh(s / cap)              #   logit soft-capping (Gemma 2), before the mask
      s = s.masked_fill(mask, -inf)        #   or s + bias, torch.where(mask, s, finfo.min)
      s = cat([s, sinks.reshape(1, -1, 1, 1).expand(B, -1, S, -1)], -1)  # sinks (GPT-OSS)
      s = s - s.max(-1, keepdim=True).values                          # (a no-op to softmax)
      p = softmax(s.float(), -1).type_as(q)  # NORMALISERS, then PROB_STEPS:
      p = p[..., :-1]                      #   the sink column dropped
      p = dropout(p, 0.1, training=False)
      o = p @ v                            # PV_PRODUCTS <- AttentionSite stored in o.meta["ringfx"]

Every spelling of every step is a rule of ``spellings.py``; this file only walks: back
from the normaliser through ``SCORE_STEPS`` to a ``QK_PRODUCTS`` op, forward through
``PROB_STEPS`` to a ``PV_PRODUCTS`` op, then decodes the two products and looks through a
GQA head repeat (``KV_EXPANSIONS``), so the ring op receives the un-repeated K/V heads.
Walking covers the spellings and their combinations without one subgraph pattern per
combination. Every node between the two products must have exactly one user, so a
match whose probabilities or scores escape is recorded as a site with decision ``skip``
(never rewritten).

With the heads folded into the batch (BLOOM): ``alibi.baddbmm(q3, k3ᵀ)`` on ``(B*H, S, D)``,
the scores viewed as ``(B, H, S, S)`` for the mask and softmax, the probabilities viewed back
as ``(B*H, S, S)`` for ``bmm`` with ``(B*H, S, D)`` values; the baddbmm bias is a mask term
marked ``heads_folded`` and the ring op's output is folded back (``out_fold_heads``).

A normaliser that is not over the key axis, or whose input is no ``q @ kᵀ`` product, is
not attention and is not recorded.

``normalise.normalise_pass`` runs first: in-place ops on the score path become
functional, and a value the model computes and drops (``saved = s.clone()`` kept only for
optional intermediates), which would count as a second use of the scores, is erased.
"""

from __future__ import annotations

import logging
import math
from typing import Optional

import torch
import torch.fx as fx

from .node_facts import dtype_of, arg, normalize_dim, op_name, scalar, shape_of, source_line
from .sites import META_KEY, AttentionSite, MaskTerm, Operand, PassReport, SiteRecord
from .spellings import (KV_EXPANSIONS, MASKED_FILL_LIMIT, NORMALISERS, NOT_ATTENTION, ONCE_FEATURES,  # noqa: F401
                        PROB_STEPS, PV_PRODUCTS, QK_PRODUCTS, SCORE_STEPS, ProbWalk, ScoreWalk,
                        absorb_scale, dtype_only_use, first_rule, qk_ops, symbolic_scalar)

log = logging.getLogger("ringfx.passes")


def find_attention_pass(gm: fx.GraphModule, *, options=None) -> tuple[fx.GraphModule, PassReport]:
    """Record an ``AttentionSite`` in ``node.meta["ringfx"]`` for every attention."""
    report = PassReport("find_attention")
    for node in list(gm.graph.nodes):
        site = match_sdpa(node) if op_name(node) == "sdpa" else match_normaliser_chain(node)
        if site is None:
            continue
        site.output.meta[META_KEY] = site
        report.sites.append(SiteRecord.of(site))
    report.skipped = sum(s.decision != "rewritten" for s in report.sites)
    log.info("find_attention: %d attention sites (%d cannot be rewritten)",
             len(report.sites), report.skipped)
    return gm, report


def sites_of(gm: fx.GraphModule) -> list[AttentionSite]:
    """The sites recorded by find_attention_pass, in graph order."""
    return [n.meta[META_KEY] for n in gm.graph.nodes if isinstance(n.meta.get(META_KEY), AttentionSite)]


# --------------------------------------------------------------------------- SDPA

def match_sdpa(node: fx.Node) -> Optional[AttentionSite]:
    site = AttentionSite(output=node, pattern=node.meta.get("ringfx_pattern", "sdpa"),
                         source_line=source_line(node), anchor=node)
    site.chain = [node]
    q, k, v = (arg(node, i, n) for i, n in enumerate(("query", "key", "value")))
    mask = arg(node, 3, "attn_mask")
    dropout_p = arg(node, 4, "dropout_p", 0.0)
    site.causal = bool(arg(node, 5, "is_causal", False))
    site.scale = arg(node, 6, "scale", None)
    if not all(isinstance(x, fx.Node) for x in (q, k, v)):
        return site.skip("q, k or v is not a tensor of this graph")
    if isinstance(dropout_p, fx.Node) or (dropout_p or 0.0) > 0.0:  # SDPA drops out even in eval
        return site.skip("dropout active (dropout_p > 0): the ring op runs without dropout")
    if symbolic_scalar(site.scale):
        site.scale, site.scale_nodes = 1.0, [(site.scale, 1)]
    elif site.scale is not None and scalar(site.scale) is None:
        return site.skip("scale is not a number")
    nd = len(shape_of(q) or ())
    if nd not in (3, 4) or len(shape_of(k) or ()) != nd or len(shape_of(v) or ()) != nd:
        return site.skip(f"q/k/v have {nd} dims; expected (B, H, S, D) or (B*H, S, D)")
    site.q, site.k, site.v = Operand(q, None, nd == 3), Operand(k, None, nd == 3), Operand(v, None, nd == 3)
    site.out_squeeze0 = nd == 3
    if isinstance(mask, fx.Node):
        site.terms.append(MaskTerm(mask, "keep" if dtype_of(mask) == torch.bool else "additive"))
    elif mask is not None:
        return site.skip("attn_mask is not a tensor of this graph")
    return _finish(site)


# ------------------------------------------------------------- normaliser chain

def match_normaliser_chain(node: fx.Node) -> Optional[AttentionSite]:
    """The attention around ``node`` when it is a normaliser (``NORMALISERS``), else None."""
    rule, norm = first_rule(NORMALISERS, node)
    if rule is None:
        return None
    found = _walk_scores(norm.scores, norm.reader)
    pv, chain_fwd, fwd_features, escape = _walk_probs(norm.out, found is not None and found[2].sinks is not None)
    if pv is None and found is not None:
        pv = _product_downstream(norm.out)
        if pv is not None:  # softmax(q @ kᵀ) reaches "@ v" through an op we cannot prove
            site = AttentionSite(output=pv, pattern=f"{op_name(found[0])}/{rule.name}/?/{op_name(pv)}",
                                 source_line=source_line(norm.out), anchor=norm.out)
            return site.skip(escape or "the ops between softmax and the product with v are not a recognised "
                                       "cast / dropout spelling")
    if pv is None:
        return None  # the probabilities never reach "@ v": not attention
    if found is None:
        scores = _square_product_upstream(norm.scores)
        if scores is None:
            return None  # softmax over something that is not q @ kᵀ: not attention
        # softmax(f(q @ kᵀ)) @ v with an f we cannot prove: attention we must not ignore
        site = AttentionSite(output=pv, pattern=f"{op_name(scores)}/?/{rule.name}/{op_name(pv)}",
                             source_line=source_line(norm.out), anchor=norm.out)
        return site.skip(f"the ops between {scores.name} ({op_name(scores)}) and {rule.name} are not a "
                         "recognised scale / mask spelling")
    scores, chain_back, walk = found
    site = AttentionSite(output=pv, pattern="", source_line=source_line(norm.out),
                         anchor=norm.out, softcap=walk.softcap, sinks=walk.sinks)
    site.chain = chain_back + list(norm.nodes) + chain_fwd
    site.terms, site.scale = walk.terms[::-1], 1.0
    absorb_scale(site, walk.scale)
    features = walk.features[::-1] + [rule.name]
    if norm.upcast and "upcast" not in features:
        features.insert(len(features) - 1, "upcast")  # softmax(..., dtype=torch.float32)
    site.pattern = _spelling(op_name(scores), features + fwd_features, op_name(pv))
    rank = len(shape_of(norm.scores))
    if normalize_dim(norm.dim, rank) != rank - 1:
        return site.skip(f"{rule.name} over dim {norm.dim}, not the key axis (last dim)")
    if walk.problem:
        return site.skip(walk.problem)
    if escape:
        return site.skip(escape)
    if walk.sinks is not None and "drop-sink" not in fwd_features:
        return site.skip("the sink column joined to the scores is not dropped from the probabilities before "
                         "the product with v")
    problem = _decode_products(site, scores, pv, walk.split)
    if problem:
        return site.skip(problem)
    return _finish(site)


def _square_product_upstream(x: fx.Node, depth: int = 6) -> Optional[fx.Node]:
    """A q @ kᵀ-like product (last two dims square, as the softmax input's) a few ops above."""
    target = shape_of(x)
    frontier, seen = [x], set()
    for _ in range(depth):
        nxt = []
        for n in frontier:
            if n in seen or not isinstance(n, fx.Node):
                continue
            seen.add(n)
            s = shape_of(n)
            if op_name(n) in qk_ops() and s and target and len(s) >= 2 and \
                    tuple(s[-2:]) == tuple(target[-2:]) and str(s[-1]) == str(s[-2]):
                return n
            nxt.extend(n.all_input_nodes)
        frontier = nxt
    return None


def _probs_operand(node: fx.Node) -> Optional[fx.Node]:
    """The probabilities operand when ``node`` is a ``PV_PRODUCTS`` product, else None."""
    name = op_name(node)
    for rule in PV_PRODUCTS:
        operands = list(rule.carries(node)) if name in rule.ops else []
        if operands:
            return operands[0]
    return None


def _product_downstream(probs: fx.Node, depth: int = 4) -> Optional[fx.Node]:
    """A ``PV_PRODUCTS`` product a few ops below the normaliser that takes the
    probabilities on its left (the ``@ v`` of an attention with an unrecognised op in between)."""
    frontier, reached = [probs], {probs}
    for _ in range(depth):
        nxt = []
        for n in frontier:
            for u in n.users:
                if u in reached:
                    continue
                if _probs_operand(u) in reached:
                    return u
                reached.add(u)
                nxt.append(u)
        frontier = nxt
    return None


def _describe_users(node: fx.Node) -> str:
    names = ", ".join("returned as a graph output" if u.op == "output" else f"{u.name} ({op_name(u)})"
                      for u in node.users)
    return names or "nothing"


def _walk_scores(x: fx.Node, consumer: fx.Node) -> Optional[tuple[fx.Node, list, ScoreWalk]]:
    """Walk from the normaliser's input back to the scores product through ``SCORE_STEPS``:
    (scores, chain, walk), or None if not attention. ``consumer``: the node reading x."""
    walk, chain = ScoreWalk(), []
    while True:
        if not isinstance(x, fx.Node):
            return None
        if op_name(x) in qk_ops():
            break
        rule, nxt = first_rule(SCORE_STEPS, x, walk)
        if rule is None or nxt is NOT_ATTENTION:
            return None
        if _other_uses(x, consumer, walk.also_reads):
            walk.refuse(f"the scores are also used by {_describe_users(x)}")
        chain.append(x)
        x, consumer = nxt, x
    if _other_uses(x, consumer):  # x: the scores product
        walk.refuse(f"the scores are also used by {_describe_users(x)}")
    if walk.split is not None and len(walk.terms) > walk.terms_at_split:
        walk.refuse("a mask is applied to the (B*H, S, S) scores before they are viewed as (B, H, S, S)")
    if walk.softcap and len(walk.terms) > walk.terms_at_softcap:
        # tanh would turn a -inf mask into -cap: the ring op masks after soft-capping
        walk.refuse("a mask is applied before the soft-capping tanh")
    return x, [x] + chain[::-1], walk


def _other_uses(x: fx.Node, consumer: fx.Node, also_reads=()) -> bool:
    """x is read by something other than ``consumer`` (a dtype-only ``type_as`` and the
    nodes of ``also_reads`` aside)."""
    return any(u is not consumer and u not in also_reads and not dtype_only_use(u, x) for u in x.users)


def _next_prob_step(user: fx.Node, probs: fx.Node, walk: ProbWalk):
    """``(rule, None)`` when ``user`` is the product of ``probs`` with v (``PV_PRODUCTS``),
    ``(rule, ProbStep)`` when it carries them on (``PROB_STEPS``), else None."""
    if _probs_operand(user) is probs:
        return None, None
    rule, step = first_rule(PROB_STEPS, user, probs, walk)
    return None if rule is None else (rule, step)


def _walk_probs(probs: fx.Node, sink_column: bool = False):
    """Walk from the normaliser forward to ``probs @ v``: (pv, chain, features, escape).

    pv is None when the probabilities never reach the left side of a product (not
    attention); ``escape`` names a use that stops the rewrite (another user, dropout).
    ``sink_column``: the softmax ran over one more column (the sinks), which one
    ``p[..., :-1]`` on the way drops (feature ``drop-sink``)."""
    chain, walk, escape = [], ProbWalk(sink_column=sink_column), None
    y = probs
    while True:
        steps = [(u, found) for u in y.users for found in [_next_prob_step(u, y, walk)] if found is not None]
        if len(steps) != 1:
            return None, chain, walk.features, escape
        user, (_, step) = steps[0]
        others = [u for u in y.users if u is not user]
        if others and escape is None:
            escape = "attention probabilities escape: also " + ", ".join(
                "returned as a graph output" if u.op == "output" else f"used by {u.name} ({op_name(u)})"
                for u in others)
        if step is None:
            return user, chain + [user], walk.features, escape
        if step.feature in ONCE_FEATURES and step.feature in walk.features:
            return None, chain, walk.features, escape
        if step.feature:
            walk.features.append(step.feature)
        escape = escape or step.escape or None
        chain.append(user)
        y = user


# ---------------------------------------------------------------- products

def _decode_products(site: AttentionSite, scores: fx.Node, pv: fx.Node, split: Optional[fx.Node] = None) -> str:
    """Fill q/k/v operands (with layout fixes), scale and output layout through the
    ``QK_PRODUCTS`` rule of ``scores`` and the ``PV_PRODUCTS`` rule of ``pv``. Returns a
    problem string, or "" on success. ``split``: the view of ``(B*H, S, S)`` scores as
    ``(B, H, S, S)`` the walk went through (q and k are then read in 4-D)."""
    _, (problem, nd) = first_rule(QK_PRODUCTS, scores, site, split)
    if problem:
        return problem
    _, problem = first_rule(PV_PRODUCTS, pv, site, nd, split)
    return problem


def _unrepeated_kv(node: fx.Node) -> Optional[tuple[fx.Node, str]]:
    """Look through a head repeat (``KV_EXPANSIONS``): (the un-repeated tensor, the rule's name)."""
    rule, x = first_rule(KV_EXPANSIONS, node)
    return None if rule is None else (x, rule.name)


def _finish(site: AttentionSite) -> AttentionSite:
    """Shared checks once q, k, v are known: dtypes, heads, GQA look-through, scale."""
    if site.k.permute is None and site.v.permute is None and not site.k.unsqueeze0:
        rk, rv = _unrepeated_kv(site.k.node), _unrepeated_kv(site.v.node)
        if rk and rv and shape_of(rk[0]) == shape_of(rv[0]):
            site.k, site.v = Operand(rk[0]), Operand(rv[0])
            site.gqa = rk[1]
    qs, ks, vs = (shape_of(o.node) for o in (site.q, site.k, site.v))
    if qs is None or ks is None or vs is None:
        return site.skip("q/k/v shapes are unknown (run shape propagation first)")
    dts = {dtype_of(o.node) for o in (site.q, site.k, site.v)}
    if len(dts) != 1:
        return site.skip(f"q, k, v have different dtypes {sorted(map(str, dts))}")
    canon = [_canonical_shape(o, s) for o, s in ((site.q, qs), (site.k, ks), (site.v, vs))]
    (b, hq, sq, d), (bk, hk, sk, dk), (bv, hv, sv, dv) = canon
    if not (_same(b, bk) and _same(b, bv) and _same(hk, hv) and _same(sk, sv) and _same(d, dk)):
        return site.skip(f"q/k/v shapes {canon} do not form one attention")
    if not isinstance(hq, int) or not isinstance(hk, int) or hq % hk != 0:
        return site.skip(f"{hq} query heads are not a (static) multiple of {hk} key/value heads")
    if hk != hq and site.gqa == "none":
        site.gqa = "broadcast"
    if site.gqa != "none":
        site.pattern += f"+gqa({site.gqa})"
    if not _same(sq, sk):
        return site.skip(f"query length {sq} differs from key length {sk} (cross-attention or a KV cache): "
                         "a ring shards one sequence")
    if site.scale is None and not isinstance(d, int):
        return site.skip("head dim is symbolic and SDPA's default scale depends on it")
    if site.scale is None:
        site.scale = 1.0 / math.sqrt(d)
    site.scale = float(site.scale)
    return site


def _same(a, b) -> bool:
    """Sizes known equal: equal ints, or the same symbolic expression (no guard added)."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return str(a) == str(b)


def _canonical_shape(o: Operand, shape: tuple) -> tuple:
    shape = tuple(shape)
    if o.permute is not None:
        shape = tuple(shape[i] for i in o.permute)
    if o.unsqueeze0:
        shape = (1,) + shape
    return shape


def _spelling(qk: str, features: list[str], pv: str) -> str:
    """A readable name of the spelling, e.g. ``matmul/scale(scores)/where/softmax/matmul``."""
    return "/".join([qk] + features + [pv])
