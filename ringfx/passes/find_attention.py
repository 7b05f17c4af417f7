"""Find attention in a captured graph (analysis only; the graph is not changed).

Two anchors:

* every ``F.scaled_dot_product_attention`` call, and
* every softmax over the last axis whose input walks back to a ``q @ kᵀ`` product and
  whose output walks forward to a ``probs @ v`` product::

      s = q @ k.transpose(-2, -1)          # matmul / bmm / einsum / baddbmm
      s = s / math.sqrt(d)                 # or q * d**-0.25 and k * d**-0.25, or alpha=
      s = cap * tanh(s / cap)              # logit soft-capping (Gemma 2), before the mask
      s = s.masked_fill(mask, -inf)        # or s + bias, torch.where(mask, s, finfo.min)
      s = cat([s, sinks.reshape(1, -1, 1, 1).expand(B, -1, S, -1)], -1)  # sinks (GPT-OSS)
      s = s - s.max(-1, keepdim=True).values                          # (a no-op to softmax)
      p = softmax(s.float(), -1).type_as(q)
      p = p[..., :-1]                      # the sink column dropped
      p = dropout(p, 0.1, training=False)
      o = p @ v                            # <- AttentionSite stored in o.meta["ringfx"]

With the heads folded into the batch (BLOOM): ``alibi.baddbmm(q3, k3ᵀ)`` on ``(B*H, S, D)``,
the scores viewed as ``(B, H, S, S)`` for the mask and softmax, the probabilities viewed back
as ``(B*H, S, S)`` for ``bmm`` with ``(B*H, S, D)`` values; the baddbmm bias is a mask term
marked ``heads_folded`` and the ring op's output is folded back (``out_fold_heads``).

Walking back from softmax and forward to ``@ v`` covers the spellings of
``patterns.PATTERNS`` and their combinations without one subgraph pattern per
combination. Every node between the two products must have exactly one user, so a
match whose probabilities or scores escape is recorded as a site with decision ``skip``
(never rewritten). GQA spelled as ``repeat_interleave`` or ``repeat_kv`` (expand +
reshape) is looked through, so the ring op receives the un-repeated K/V heads.

A softmax that is not over the key axis, or whose input is no ``q @ kᵀ`` product, is
not attention and is not recorded.

``remove_dead_code_pass`` runs first: a value the model computes and drops (``saved =
s.clone()`` kept only for optional intermediates) still hangs off the scores in the
captured graph and would count as a second use.
"""

from __future__ import annotations

import logging
import math
from typing import Optional

import torch
import torch.fx as fx

from .node_facts import (CASTS, SHAPE_ONLY, arg, dtype_of, normalize_dim, op_name, scalar,
                         shape_of, source_line, value_of)
from .sites import META_KEY, AttentionSite, MaskTerm, Operand, PassReport, SiteRecord

log = logging.getLogger("ringfx.passes")

SCORE_OPS = ("matmul", "bmm", "einsum", "baddbmm")
# A fill value at or below this counts as "masked out": exp(-1e4) is 0 in float32 and
# float64 once subtracted from the row maximum. (Exact unless a whole row is masked.)
MASKED_FILL_LIMIT = -1.0e4


# Ops that only compute a value (no mutation, no randomness, no communication): when
# nothing reads their value they can go. Anything else stays even when unused.
_DEAD_IF_UNUSED = CASTS | SHAPE_ONLY | frozenset({
    "matmul", "bmm", "einsum", "baddbmm", "softmax", "log_softmax", "div", "mul", "add", "sub", "neg",
    "transpose", "permute", "reshape", "view", "unsqueeze", "squeeze", "expand", "expand_as", "getitem",
    "detach", "where", "masked_fill", "logical_not", "logical_and", "logical_or", "eq", "ne", "lt", "le",
    "gt", "ge", "exp", "log", "sqrt", "rsqrt", "pow", "size", "sym_size", "dim", "numel", "repeat_interleave",
    "flatten", "unflatten", "chunk", "split", "unbind", "select", "narrow", "sum", "mean", "amax", "max",
    "arange", "full", "zeros", "ones", "zeros_like", "ones_like", "full_like", "tril", "triu", "linear",
})


def remove_dead_code_pass(gm: fx.GraphModule, *, options=None) -> tuple[fx.GraphModule, PassReport]:
    """Erase pure ops whose value nothing reads, so that they do not count as uses::

        s = q @ k.transpose(-2, -1) / 8.0          s = q @ k.transpose(-2, -1) / 8.0
        saved = s.clone()             # unused  ->  (gone)
        p = s.softmax(-1)                          p = s.softmax(-1)

    Only ops of ``_DEAD_IF_UNUSED`` (pure by construction) are erased; in-place ops,
    random ops, collectives and calls of unknown effect stay."""
    report = PassReport("remove_dead_code")
    erased = 0
    for node in reversed(list(gm.graph.nodes)):
        if node.op in ("call_function", "call_method") and not node.users and op_name(node) in _DEAD_IF_UNUSED \
                and not node.is_impure():
            gm.graph.erase_node(node)
            erased += 1
    if erased:
        gm.graph.lint()
        gm.recompile()
    log.info("remove_dead_code: erased %d unused node(s)", erased)
    return gm, report


def find_attention_pass(gm: fx.GraphModule, *, options=None) -> tuple[fx.GraphModule, PassReport]:
    """Record an ``AttentionSite`` in ``node.meta["ringfx"]`` for every attention."""
    report = PassReport("find_attention")
    for node in list(gm.graph.nodes):
        name = op_name(node)
        if name == "sdpa":
            site = match_sdpa(node)
        elif name == "softmax":
            site = match_softmax_chain(node)
        else:
            continue
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
    if _symbolic_scalar(site.scale):
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


# ------------------------------------------------------------------ softmax chain

def match_softmax_chain(softmax: fx.Node) -> Optional[AttentionSite]:
    x = softmax.args[0] if softmax.args else softmax.kwargs.get("input")
    xs = shape_of(x)
    if not isinstance(x, fx.Node) or not xs or len(xs) < 3:
        return None
    dim = arg(softmax, 1, "dim", None)
    if not isinstance(dim, int):
        return None
    walk = _walk_scores(x, softmax)
    sinks = walk[7][1] if walk is not None else None
    pv, chain_fwd, fwd_features, escape = _walk_probs(softmax, sink_column=sinks is not None)
    if pv is None and walk is not None:
        pv = _product_downstream(softmax)
        if pv is not None:  # softmax(q @ kᵀ) reaches "@ v" through an op we cannot prove
            site = AttentionSite(output=pv, pattern=f"{op_name(walk[0])}/softmax/?/{op_name(pv)}",
                                 source_line=source_line(softmax), anchor=softmax)
            return site.skip(escape or "the ops between softmax and the product with v are not a recognised "
                                       "cast / dropout spelling")
    if pv is None:
        return None  # the probabilities never reach "@ v": not attention
    if walk is None:
        scores = _square_product_upstream(x)
        if scores is None:
            return None  # softmax over something that is not q @ kᵀ: not attention
        # softmax(f(q @ kᵀ)) @ v with an f we cannot prove: attention we must not ignore
        site = AttentionSite(output=pv, pattern=f"{op_name(scores)}/?/softmax/{op_name(pv)}",
                             source_line=source_line(softmax), anchor=softmax)
        return site.skip(f"the ops between {scores.name} ({op_name(scores)}) and softmax are not a "
                         "recognised scale / mask spelling")
    scores, chain_back, terms, scale, features, problem, split, (softcap, sinks) = walk
    site = AttentionSite(output=pv, pattern="", source_line=source_line(softmax),
                         anchor=softmax, softcap=softcap, sinks=sinks)
    site.chain = chain_back + [softmax] + chain_fwd
    site.terms, site.scale = terms, 1.0
    _absorb_scale(site, scale)
    if arg(softmax, 2, "dtype", None) is not None and "upcast" not in features:
        features.insert(len(features) - 1, "upcast")  # softmax(..., dtype=torch.float32)
    features = features + fwd_features
    site.pattern = _spelling(op_name(scores), features, op_name(pv))
    if normalize_dim(dim, len(xs)) != len(xs) - 1:
        return site.skip(f"softmax over dim {dim}, not the key axis (last dim)")
    if problem:
        return site.skip(problem)
    if escape:
        return site.skip(escape)
    if sinks is not None and "drop-sink" not in fwd_features:
        return site.skip("the sink column joined to the scores is not dropped from the probabilities before "
                         "the product with v")
    problem = _decode_products(site, scores, pv, split)
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
            if op_name(n) in SCORE_OPS and s and target and len(s) >= 2 and \
                    tuple(s[-2:]) == tuple(target[-2:]) and str(s[-1]) == str(s[-2]):
                return n
            nxt.extend(n.all_input_nodes)
        frontier = nxt
    return None


def _product_downstream(softmax: fx.Node, depth: int = 4) -> Optional[fx.Node]:
    """A matmul / bmm / einsum a few ops below softmax that takes the probabilities on
    its left (the ``@ v`` of an attention with an unrecognised op in between)."""
    frontier, reached = [softmax], {softmax}
    for _ in range(depth):
        nxt = []
        for n in frontier:
            for u in n.users:
                if u in reached:
                    continue
                first = _einsum_operands(u)[1][:1] if op_name(u) == "einsum" else u.args[:1]
                if op_name(u) in ("matmul", "bmm", "einsum") and first and first[0] in reached:
                    return u
                reached.add(u)
                nxt.append(u)
        frontier = nxt
    return None


def _describe_users(node: fx.Node) -> str:
    names = ", ".join("returned as a graph output" if u.op == "output" else f"{u.name} ({op_name(u)})"
                      for u in node.users)
    return names or "nothing"


def _fill_value(x) -> Optional[float]:
    """A masked-fill value: a Python number, or a ``torch.full([], v)`` scalar tensor."""
    if scalar(x) is not None:
        return scalar(x)
    if op_name(x) == "full" and shape_of(x) == () and scalar(arg(x, 1, "fill_value")) is not None:
        return scalar(arg(x, 1, "fill_value"))
    if op_name(x) == "tensor" and x.args and scalar(x.args[0]) is not None:
        return scalar(x.args[0])
    return None


def _is_masked_value(x) -> bool:
    v = _fill_value(x)
    return v is not None and v <= MASKED_FILL_LIMIT


def _symbolic_scalar(x) -> bool:
    """A node holding a Python number at run time (``v.size(-1) ** 0.5`` with dynamic shapes)."""
    v = value_of(x)
    return isinstance(x, fx.Node) and not isinstance(v, bool) and \
        isinstance(v, (int, float, torch.SymInt, torch.SymFloat))


# In-place arithmetic, read as its functional form where nothing else reads the tensor it
# overwrites (``scores /= math.sqrt(d)`` (Falcon), ``scores += position_bias`` (T5)).
_INPLACE = {"iadd": "add", "isub": "sub", "imul": "mul", "itruediv": "div",
            "add_": "add", "sub_": "sub", "mul_": "mul", "div_": "div"}


def _fname(node) -> Optional[str]:
    """``op_name``, with an in-place op named as its functional form when the tensor it
    overwrites has no other reader (so the value before the update is never read)."""
    name = op_name(node)
    if name in _INPLACE and node.args and isinstance(node.args[0], fx.Node) \
            and [u for u in node.args[0].users if not _dtype_only_use(u, node.args[0])] == [node]:
        return _INPLACE[name]
    return name


def _dtype_only_use(user: fx.Node, x: fx.Node) -> bool:
    """``t.type_as(x)``: reads only x's dtype (T5: ``softmax(s.float()).type_as(s)``)."""
    return op_name(user) == "type_as" and len(user.args) >= 2 and user.args[1] is x and user.args[0] is not x


def _before(a: fx.Node, b: fx.Node, limit: int = 10000) -> bool:
    """Node ``a`` comes before node ``b`` in the graph."""
    n = a.next
    for _ in range(limit):
        if n is b:
            return True
        if n.op == "root":
            return False
        n = n.next
    return False


def _inplace_scalings(x: fx.Node, consumer: fx.Node) -> Optional[list]:
    """The users of ``x`` other than ``consumer`` when every one of them only scales x in
    place before ``consumer`` reads it (``scores.div_(math.sqrt(d))``, result unused) or
    reads its dtype: ``[(node, factor)]`` for the scalings; None when another use escapes."""
    found = []
    for u in x.users:
        if u is consumer or _dtype_only_use(u, x):
            continue
        if op_name(u) in _INPLACE and u.args and u.args[0] is x and not u.users \
                and _INPLACE[op_name(u)] in ("mul", "div") and _before(u, consumer):
            f = _scalar_factor(u, inplace_ok=True)
            if f is not None:
                found.append((u, f[1]))
                continue
        return None
    return found


def _scalar_factor(node: fx.Node, inplace_ok: bool = False):
    """``t * c``, ``c * t``, ``t / c`` with a scalar c -> (t, factor); the factor is a
    float, or ``(node, +1 | -1)`` for a symbolic scalar multiplied or divided by."""
    name = _INPLACE.get(op_name(node), op_name(node)) if inplace_ok else _fname(node)
    if name not in ("mul", "div") or len(node.args) < 2:
        return None
    a, b = node.args[0], node.args[1]
    if name == "mul":
        for t, c in ((a, b), (b, a)):
            if isinstance(t, fx.Node) and value_of(t) is not None and not _symbolic_scalar(t):
                if scalar(c) is not None:
                    return t, scalar(c)
                if _symbolic_scalar(c):
                    return t, (c, 1)
    elif isinstance(a, fx.Node) and not node.kwargs.get("rounding_mode") and not _symbolic_scalar(a):
        if scalar(b) not in (None, 0.0):
            return a, 1.0 / scalar(b)
        if _symbolic_scalar(b):
            return a, (b, -1)
    return None


def _absorb_scale(site: AttentionSite, factors) -> None:
    for f in factors:
        if isinstance(f, tuple):
            site.scale_nodes.append(f)
        else:
            site.scale *= f


def _reaches_scores(node, depth: int = 0) -> bool:
    """Whether ``node`` leads back to a q @ kᵀ product through score-chain ops only."""
    if not isinstance(node, fx.Node) or depth > 16:
        return False
    name = _fname(node)
    if name in SCORE_OPS:
        return True
    if name in CASTS or name in SHAPE_ONLY or name == "tanh" or _scalar_factor(node):
        return _reaches_scores(node.args[0], depth + 1)
    if name == "add":
        return any(_reaches_scores(a, depth + 1) for a in node.args[:2])
    if name == "sub":
        return _reaches_scores(node.args[0], depth + 1)
    if name == "masked_fill":
        return _reaches_scores(node.args[0], depth + 1)
    if name == "where" and len(node.args) == 3:
        return _reaches_scores(node.args[1], depth + 1) or _reaches_scores(node.args[2], depth + 1)
    if _heads_split(node):
        return _reaches_scores(node.args[0], depth + 1)
    return False


def _heads_split(node: fx.Node) -> bool:
    """``s.view(B, H, S, S)`` of ``(B*H, S, S)`` scores (GPT-NeoX before transformers 4.40:
    baddbmm on heads folded into the batch, the mask and ``@ v`` in 4-D)."""
    if op_name(node) not in ("view", "reshape") or not node.args or not isinstance(node.args[0], fx.Node):
        return False
    a, x = shape_of(node.args[0]), shape_of(node)
    return bool(a) and bool(x) and len(a) == 3 and len(x) == 4 and tuple(a[1:]) == tuple(x[2:]) \
        and all(isinstance(d, int) for d in (a[0], x[0], x[1])) and a[0] == x[0] * x[1]


def _heads_merge(node: fx.Node) -> bool:
    """``p.view(B*H, S, S)`` of ``(B, H, S, S)`` probabilities (BLOOM: the heads folded into the
    batch again for ``bmm`` with ``(B*H, S, D)`` values)."""
    if op_name(node) not in ("view", "reshape") or not node.args or not isinstance(node.args[0], fx.Node):
        return False
    a, x = shape_of(node.args[0]), shape_of(node)
    return bool(a) and bool(x) and len(a) == 4 and len(x) == 3 and tuple(a[2:]) == tuple(x[1:]) \
        and all(isinstance(d, int) for d in (a[0], a[1], x[0])) and x[0] == a[0] * a[1]


def _walk_scores(x: fx.Node, consumer: Optional[fx.Node] = None):
    """Walk from the softmax input back to the scores product.

    Returns (scores, chain, terms, scale, features, problem, split, (softcap, sinks)) or
    None if not attention; ``split`` is the ``(B*H, S, S) -> (B, H, S, S)`` view the walk
    went through, or None; ``softcap`` is 0.0 or the cap of ``cap * tanh(s / cap)``,
    ``sinks`` None or the ``(H,)`` logits joined to the scores as one more column."""
    chain, terms, features = [], [], []
    scale, problem = [], ""
    scale_seen = False  # walking backwards: a scale seen before an add is applied after it
    split, terms_at_split = None, 0
    softcap, terms_at_softcap, sinks = 0.0, 0, None
    also_reads: set = set()  # nodes that may read a score without being an escape (a row max)
    while True:
        if not isinstance(x, fx.Node):
            return None
        # in-place scalings of x that its consumer sees (``scores.div_(c)``, result unused)
        inplace = _inplace_scalings(x, consumer) if consumer is not None else None
        if inplace:
            for node, factor in inplace:
                scale.append(factor)
                chain.append(node)
            scale_seen = True
            if "scale(scores)" not in features:
                features.append("scale(scores)")
        name = _fname(x)
        if name in SCORE_OPS:
            break
        nxt = None
        if name in CASTS or name in SHAPE_ONLY:
            if name in CASTS and "upcast" not in features:
                features.append("upcast")
            nxt = x.args[0]
        elif split is None and _heads_split(x):
            split, terms_at_split = x, len(terms)
            features.append("view")
            nxt = x.args[0]
        elif _scalar_factor(x):
            nxt, factor = _scalar_factor(x)
            scale_seen = True
            scale.append(factor)
            if "scale(scores)" not in features:
                features.append("scale(scores)")
        elif name == "sub" and len(x.args) >= 2 and isinstance(x.args[0], fx.Node) \
                and _row_max_of(x.args[1]) is x.args[0]:
            # s - s.max(-1, keepdim=True): a constant per row, nothing to softmax, unless a
            # tanh or the sink column comes after it (walking backwards: was already seen)
            if softcap or sinks is not None:
                return None
            also_reads.update(_row_max_nodes(x.args[1]))
            features.append("rowmax")
            nxt = x.args[0]
        elif name == "tanh" and x.args and isinstance(x.args[0], fx.Node):
            # cap * tanh(s / cap): the factors seen so far (applied after the tanh) are the cap;
            # a sink column joined after it stays uncapped, as the ring op computes it
            if softcap:
                return None
            cap = 1.0
            for f in scale:
                if isinstance(f, tuple):
                    problem = problem or "the soft-capping factor is not a constant number"
                    break
                cap *= f
            if cap <= 0:
                return None
            softcap, terms_at_softcap = cap, len(terms)
            features.append("softcap")
            nxt = x.args[0]
        elif name == "cat" and sinks is None and not softcap:
            joined = _sink_column(x)
            if joined is None:
                return None
            if scale or terms:
                problem = problem or "the scores are scaled or masked after the sink column is joined"
            nxt, sinks = joined
            features.append("sinks")
        elif name == "add" and len(x.args) >= 2 and isinstance(x.args[0], fx.Node) and isinstance(x.args[1], fx.Node):
            if x.kwargs.get("alpha", 1) != 1:
                return None
            a, b = x.args[0], x.args[1]
            if _reaches_scores(a):
                nxt, term = a, b
            elif _reaches_scores(b):
                nxt, term = b, a
            else:
                return None
            terms.append(MaskTerm(term, "additive"))
            if scale_seen:
                problem = problem or "the scores are scaled after an additive mask was added"
            features.append("add")
        elif name == "sub" and len(x.args) >= 2 and isinstance(x.args[0], fx.Node) \
                and isinstance(x.args[1], fx.Node) and _reaches_scores(x.args[0]) and x.kwargs.get("alpha", 1) == 1:
            terms.append(MaskTerm(x.args[1], "subtracted"))
            if scale_seen:
                problem = problem or "the scores are scaled after an additive mask was added"
            features.append("sub")
            nxt = x.args[0]
        elif name == "masked_fill":
            if not _is_masked_value(arg(x, 2, "value")):
                return None
            terms.append(MaskTerm(x.args[1], "drop"))
            features.append("masked_fill")
            nxt = x.args[0]
        elif name == "where" and len(x.args) == 3:
            cond, a, b = x.args
            if isinstance(a, fx.Node) and _reaches_scores(a) and _is_masked_value(b):
                terms.append(MaskTerm(cond, "keep"))
                nxt = a
            elif isinstance(b, fx.Node) and _reaches_scores(b) and _is_masked_value(a):
                terms.append(MaskTerm(cond, "drop"))
                nxt = b
            else:
                return None
            features.append("where")
        else:
            return None
        if inplace is None and consumer is not None and _other_uses(x, consumer, also_reads):
            problem = problem or f"the scores are also used by {_describe_users(x)}"
        chain.append(x)
        x, consumer = nxt, x
    if inplace is None and (consumer is None or _other_uses(x, consumer)):  # x: the scores product
        problem = problem or f"the scores are also used by {_describe_users(x)}"
    if split is not None and len(terms) > terms_at_split:
        problem = problem or ("a mask is applied to the (B*H, S, S) scores before they are viewed as "
                              "(B, H, S, S)")
    if softcap and len(terms) > terms_at_softcap:
        # tanh would turn a -inf mask into -cap: the ring op masks after soft-capping
        problem = problem or "a mask is applied before the soft-capping tanh"
    return (x, [x] + chain[::-1], terms[::-1], scale, features[::-1] + ["softmax"], problem, split,
            (softcap, sinks))


def _other_uses(x: fx.Node, consumer: fx.Node, also_reads=()) -> bool:
    """x is read by something other than ``consumer`` (a dtype-only ``type_as`` and the
    nodes of ``also_reads`` aside)."""
    return any(u is not consumer and u not in also_reads and not _dtype_only_use(u, x) for u in x.users)


def _row_max_nodes(node) -> list:
    """The nodes of ``x.max(-1, keepdim=True)[0]`` / ``.values`` / ``x.amax(-1, keepdim=True)``
    (optionally detached), last first; [] when ``node`` is no such row maximum."""
    nodes = []
    while op_name(node) == "detach" and isinstance(node.args[0], fx.Node):
        nodes.append(node)
        node = node.args[0]
    if op_name(node) == "getitem" and node.args[1] == 0 and op_name(node.args[0]) == "max":
        nodes.append(node)
        node = node.args[0]
    elif op_name(node) != "amax":
        return []
    x = node.args[0] if node.args else None
    shape = shape_of(x) if isinstance(x, fx.Node) else None
    dim = arg(node, 1, "dim")
    dim = dim[0] if isinstance(dim, (list, tuple)) and len(dim) == 1 else dim
    if not shape or not isinstance(dim, int) or normalize_dim(dim, len(shape)) != len(shape) - 1 \
            or arg(node, 2, "keepdim", False) is not True:
        return []
    return nodes + [node]


def _row_max_of(node) -> Optional[fx.Node]:
    """``x`` when ``node`` is the maximum of each of x's rows (``_row_max_nodes``), else None."""
    nodes = _row_max_nodes(node)
    return nodes[-1].args[0] if nodes else None


def _sink_column(cat: fx.Node) -> Optional[tuple[fx.Node, fx.Node]]:
    """``cat([s, column], -1)`` where the column broadcasts one logit per head over the
    rows (GPT-OSS: ``sinks.reshape(1, -1, 1, 1).expand(B, -1, S, -1)``): (s, sinks), sinks
    the ``(H,)`` tensor; None for any other cat."""
    tensors = cat.args[0] if cat.args else cat.kwargs.get("tensors")
    dim = arg(cat, 1, "dim", 0)
    shape = shape_of(cat)
    if not isinstance(tensors, (list, tuple)) or len(tensors) != 2 or not shape or len(shape) != 4 \
            or not isinstance(dim, int) or normalize_dim(dim, 4) != 3:
        return None
    scores, column = tensors
    if not isinstance(scores, fx.Node) or not _reaches_scores(scores):
        return None
    sinks = _per_head_logits(column)
    return None if sinks is None else (scores, sinks)


def _per_head_logits(column) -> Optional[fx.Node]:
    """The ``(H,)`` tensor that ``column`` ``(B, H, Sq, 1)`` repeats over batch and rows, seen
    through singleton reshapes / views / unsqueezes / casts and one expand; or None."""
    cs = shape_of(column) if isinstance(column, fx.Node) else None
    if not cs or len(cs) != 4 or cs[3] != 1 or not isinstance(cs[1], int):
        return None
    h = cs[1]
    x, expanded = column, False
    for _ in range(8):
        if tuple(shape_of(x) or ()) == (h,):
            return x
        name = op_name(x)
        if name == "expand" and not expanded:
            expanded = True
        elif not (name in CASTS or name in ("reshape", "view", "unsqueeze")):
            return None
        src = x.args[0] if x.args else None
        ss = shape_of(src) if isinstance(src, fx.Node) else None
        if not ss or len(ss) > 4 or [d for d in ss if d != 1] not in ([h], [] if h == 1 else [h]):
            return None
        if name == "expand":  # it broadcasts size-1 axes only: the head axis must already be axis 1
            padded = (1,) * (4 - len(ss)) + tuple(ss)
            if padded[1] != h:
                return None
        x = src
    return None


def _drops_last_column(node: fx.Node) -> bool:
    """``p[..., :-1]`` (or ``p[:, :, :, :-1]``): the probabilities without the sink column."""
    if op_name(node) != "getitem" or len(node.args) < 2 or not isinstance(node.args[1], tuple):
        return False
    index, shape = node.args[1], shape_of(node.args[0])
    last = slice(None, -1, None)
    return index == (Ellipsis, last) or (shape is not None and index == (slice(None),) * (len(shape) - 1) + (last,))


def _walk_probs(softmax: fx.Node, sink_column: bool = False):
    """Walk from softmax forward to ``probs @ v``: (pv, chain, features, escape).

    pv is None when the probabilities never reach the left side of a product (not
    attention); ``escape`` names a use that stops the rewrite (another user, dropout).
    ``sink_column``: the softmax ran over one more column (the sinks), which one
    ``p[..., :-1]`` on the way drops (feature ``drop-sink``)."""
    chain, features, escape = [], [], None
    y = softmax
    while True:
        steps = [u for u in y.users if _continues(u, y)]
        if sink_column and "drop-sink" not in features:
            steps += [u for u in y.users if _drops_last_column(u) and u.args[0] is y]
        if len(steps) != 1:
            return None, chain, features, escape
        user = steps[0]
        others = [u for u in y.users if u is not user]
        if others and escape is None:
            escape = "attention probabilities escape: also " + ", ".join(
                "returned as a graph output" if u.op == "output" else f"used by {u.name} ({op_name(u)})"
                for u in others)
        name = op_name(user)
        if name in ("matmul", "bmm", "einsum"):
            return user, chain + [user], features, escape
        if _heads_merge(user):
            if "merge-heads" in features:
                return None, chain, features, escape
            features.append("merge-heads")
        if _drops_last_column(user):
            features.append("drop-sink")
        if name == "dropout":
            p, training = arg(user, 1, "p", 0.5), arg(user, 2, "training", True)
            features.append("dropout")
            if training is False or p == 0:
                pass
            elif isinstance(p, fx.Node) or isinstance(training, fx.Node):
                escape = escape or "dropout with a non-constant p or training flag"
            elif p > 0 and training:
                escape = escape or "dropout active in training (p > 0): the ring op has no dropout"
        chain.append(user)
        y = user


def _continues(user: fx.Node, y: fx.Node) -> bool:
    """``user`` carries the probabilities ``y`` on towards ``@ v``."""
    name = op_name(user)
    if name in CASTS or name in SHAPE_ONLY or name == "dropout" or _heads_merge(user):
        return bool(user.args) and user.args[0] is y
    if name in ("matmul", "bmm"):
        return len(user.args) >= 2 and user.args[0] is y and user.args[1] is not y
    if name == "einsum":
        return _einsum_operands(user)[1][:1] == [y]
    return False


# ---------------------------------------------------------------- products

def _einsum_operands(node: fx.Node) -> tuple[str, list]:
    eq = node.args[0] if node.args else node.kwargs.get("equation")
    ops = list(node.args[1:])
    if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
        ops = list(ops[0])
    return (eq.replace(" ", "") if isinstance(eq, str) else ""), ops


def _strip_scale(node: fx.Node) -> tuple[fx.Node, list]:
    factors = []
    while _scalar_factor(node):
        node, f = _scalar_factor(node)
        factors.append(f)
    return node, factors


def _swaps_last_two(node: fx.Node) -> bool:
    shape = shape_of(node.args[0]) if node.args else None
    if shape is None:
        return False
    nd = len(shape)
    if op_name(node) == "transpose":
        d0, d1 = arg(node, 1, "dim0"), arg(node, 2, "dim1")
        return isinstance(d0, int) and isinstance(d1, int) and \
            {normalize_dim(d0, nd), normalize_dim(d1, nd)} == {nd - 2, nd - 1}
    if op_name(node) == "permute":
        dims = node.args[1:] if len(node.args) > 2 else (node.args[1] if len(node.args) > 1 else node.kwargs.get("dims"))
        dims = [normalize_dim(d, nd) for d in dims]
        return dims == list(range(nd - 2)) + [nd - 1, nd - 2]
    return False


def _unflatten_heads(node: fx.Node, b, h) -> Optional[fx.Node]:
    """The ``(B, H, S, D)`` tensor that ``node`` (``(B*H, S, D)``) is a reshape / view of."""
    while op_name(node) == "contiguous" and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    if op_name(node) not in ("view", "reshape") or not isinstance(node.args[0], fx.Node):
        return None
    src = node.args[0]
    ss, ns = shape_of(src), shape_of(node)
    if ss and ns and len(ss) == 4 and len(ns) == 3 and tuple(ss[:2]) == (b, h) and tuple(ss[2:]) == tuple(ns[1:]):
        return src
    return None


def _is_zeros(node) -> bool:
    """A tensor of zeros made from sizes (``torch.zeros(...)``, ``torch.full(..., 0)``)."""
    name = op_name(node)
    if name in ("zeros", "zeros_like", "new_zeros"):
        return True
    return name == "full" and scalar(arg(node, 1, "fill_value")) == 0


def _decode_products(site: AttentionSite, scores: fx.Node, pv: fx.Node, split: Optional[fx.Node] = None) -> str:
    """Fill q/k/v operands (with layout fixes), scale and output layout. Returns a
    problem string, or "" on success. ``split``: the view of ``(B*H, S, S)`` scores as
    ``(B, H, S, S)`` the walk went through (q and k are then read in 4-D)."""
    sname = op_name(scores)
    if sname in ("matmul", "bmm", "baddbmm"):
        if sname == "baddbmm":
            # torch.baddbmm(bias, a, b) or bias.baddbmm(batch1=a, batch2=b) (BLOOM)
            bias = scores.args[0]
            a = scores.args[1] if len(scores.args) > 1 else scores.kwargs.get("batch1")
            bt = scores.args[2] if len(scores.args) > 2 else scores.kwargs.get("batch2")
            beta, alpha = scores.kwargs.get("beta", 1), scores.kwargs.get("alpha", 1)
            if scalar(alpha) is None or scalar(beta) is None:
                return "baddbmm with non-constant alpha/beta"
            site.scale *= alpha
            if beta == 1 and not _is_zeros(bias):
                term = MaskTerm(bias, "additive")
                if split is not None:  # BLOOM's ALiBi (B*H, 1, S): viewed as (B, H, 1, S) by the rewrite
                    bshape = shape_of(bias)
                    if not bshape or len(bshape) != 3 or bshape[0] != shape_of(scores)[0]:
                        return ("a baddbmm bias is added to the (B*H, S, S) scores before they are viewed as "
                                "(B, H, S, S), and it is not (B*H, S or 1, S)")
                    term.heads_folded = tuple(shape_of(split)[:2])
                site.terms.insert(0, term)
            elif beta not in (0, 1):
                return f"baddbmm with beta={beta} scales the bias"
        else:
            a, bt = scores.args[0], scores.args[1]
        if not isinstance(a, fx.Node) or not isinstance(bt, fx.Node):
            return "scores operands are not tensors"
        q, fq = _strip_scale(a)
        kt, fk = _strip_scale(bt)
        swapped = op_name(kt) in ("transpose", "permute") and _swaps_last_two(kt)
        if swapped:
            k, fk2 = _strip_scale(kt.args[0])
        else:
            k, fk2 = kt, []
            if len(shape_of(kt) or ()) < 3:
                return "scores operand has fewer than 3 dims"
        if split is not None:
            b, h = shape_of(split)[:2]
            q4, k4 = _unflatten_heads(q, b, h), _unflatten_heads(k, b, h)
            if q4 is None or k4 is None:
                return "the scores are viewed as (B, H, S, S) but q and k are not (B, H, S, D) tensors with the " \
                       "heads folded into the batch"
            q, k = q4, k4
        nd = len(shape_of(q) or ())
        k_op = Operand(k) if swapped else Operand(k, permute=tuple(range(nd - 2)) + (nd - 1, nd - 2))
        if fq or fk or fk2:
            site.pattern = site.pattern.replace("/", "/scale(q,k)/", 1)
        _absorb_scale(site, fq + fk + fk2)
        if nd not in (3, 4):
            return f"scores are {nd}-D; expected (B, H, S, S) or (B*H, S, S)"
        site.q, site.k = Operand(q, None, nd == 3), k_op
        site.k.unsqueeze0 = nd == 3
        if op_name(pv) == "einsum":
            eq2, ops2 = _einsum_operands(pv)
            return _decode_pv_einsum(site, eq2, ops2, nd)
        v = pv.args[1]
        merged = _heads_merge(pv.args[0]) if isinstance(pv.args[0], fx.Node) else False
        if merged != (split is not None and nd == 4 and len(shape_of(v) or ()) == 3):
            return "the probabilities' heads are folded into the batch, but not as the scores' were"
        if merged:  # BLOOM: (B*H, S, S) probabilities @ (B*H, S, D) values
            b, h = shape_of(split)[:2]
            v = _unflatten_heads(v, b, h)
            if v is None:
                return "v is not a (B, H, S, D) tensor with the heads folded into the batch"
            site.v, site.out_fold_heads = Operand(v), True
            return ""
        if len(shape_of(v) or ()) != nd:
            return "v has a different rank from q"
        site.v = Operand(v, None, nd == 3)
        site.out_squeeze0 = nd == 3
        return ""
    # einsum
    if split is not None:
        return "einsum scores viewed as (B, H, S, S): not a recognised spelling"
    eq, ops = _einsum_operands(scores)
    if "..." in eq or "->" not in eq or len(ops) != 2:
        return f"einsum {eq!r} is not a two-operand explicit equation"
    (x, y), z = eq.split("->")[0].split(","), eq.split("->")[1]
    contracted = [c for c in x if c in y and c not in z]
    if len(z) not in (3, 4) or len(contracted) != 1 or z[-2] not in x or z[-2] in y or z[-1] not in y or z[-1] in x:
        return f"einsum {eq!r} is not q·kᵀ with the query and key axes last"
    batch, d = z[:-2], contracted[0]
    if any(c not in x or c not in y for c in batch) or len(x) != len(z) or len(y) != len(z):
        return f"einsum {eq!r} has batch axes missing from an operand"
    q, fq = _strip_scale(ops[0])
    k, fk = _strip_scale(ops[1])
    _absorb_scale(site, fq + fk)
    if fq or fk:
        site.pattern = site.pattern.replace("/", "/scale(q,k)/", 1)
    perm_q = tuple(x.index(c) for c in batch + z[-2] + d)
    perm_k = tuple(y.index(c) for c in batch + z[-1] + d)
    ident = tuple(range(len(z)))
    site.q = Operand(q, None if perm_q == ident else perm_q, len(z) == 3)
    site.k = Operand(k, None if perm_k == ident else perm_k, len(z) == 3)
    if op_name(pv) != "einsum":
        v = pv.args[1]
        site.v = Operand(v, None, len(z) == 3)
        site.out_squeeze0 = len(z) == 3
        return ""
    eq2, ops2 = _einsum_operands(pv)
    return _decode_pv_einsum(site, eq2, ops2, len(z))


def _decode_pv_einsum(site: AttentionSite, eq2: str, ops2: list, nd: int) -> str:
    """``einsum(eq2, probs, v)`` where probs are ``(batch..., q, k)`` with ``nd`` dims (as
    ``q @ kᵀ`` or the scores einsum produced them): fill v and the output layout."""
    if "..." in eq2 or "->" not in eq2 or len(ops2) != 2:
        return f"einsum {eq2!r} is not a two-operand explicit equation"
    (p, vl), o = eq2.split("->")[0].split(","), eq2.split("->")[1]
    if len(p) != nd or p[-1] in o or p[-1] not in vl:
        return f"einsum {eq2!r} does not contract probabilities over the key axis"
    extra = [c for c in vl if c not in p]
    if len(extra) != 1 or len(vl) != len(p) or any(c not in vl or c not in o for c in p[:-2]) \
            or p[-2] not in o or len(o) != len(p):
        return f"einsum {eq2!r} is not probs·v"
    e = extra[0]
    ident = tuple(range(nd))
    perm_v = tuple(vl.index(c) for c in p[:-2] + p[-1] + e)
    canon = p[:-2] + p[-2] + e
    perm_o = tuple(canon.index(c) for c in o)
    site.v = Operand(ops2[1], None if perm_v == ident else perm_v, nd == 3)
    site.out_permute = None if perm_o == ident else perm_o
    site.out_squeeze0 = nd == 3
    return ""


# ------------------------------------------------------------------------- GQA

def _unrepeated_kv(node: fx.Node) -> Optional[tuple[fx.Node, str]]:
    """Look through a head repeat: ``repeat_interleave(x, n, dim=1)`` or ``repeat_kv``
    (``x[:, :, None].expand(B, Hkv, n, S, D).reshape(B, Hkv * n, S, D)``)."""
    name = op_name(node)
    if name == "repeat_interleave":
        x, dim = node.args[0], arg(node, 2, "dim")
        xs, ns = shape_of(x), shape_of(node)
        if isinstance(x, fx.Node) and xs and ns and len(xs) == 4 and isinstance(dim, int) \
                and normalize_dim(dim, 4) == 1 and isinstance(arg(node, 1, "repeats"), int):
            return x, "repeat_interleave"
        return None
    if name in ("reshape", "view") and isinstance(node.args[0], fx.Node):
        e = node.args[0]
        es, ns = shape_of(e), shape_of(node)
        if op_name(e) != "expand" or not es or len(es) != 5 or not ns or len(ns) != 4:
            return None
        u = e.args[0]
        us = shape_of(u)
        if not us or len(us) != 5 or us[2] != 1:
            return None
        if op_name(u) == "unsqueeze" and normalize_dim(arg(u, 1, "dim"), 5) == 2:
            x = u.args[0]
        elif op_name(u) == "getitem" and isinstance(u.args[1], tuple) and len(u.args[1]) >= 3 \
                and u.args[1][2] is None and all(s == slice(None) for s in u.args[1][:2]) \
                and all(s in (slice(None), Ellipsis) for s in u.args[1][3:]):
            x = u.args[0]
        else:
            return None
        xs = shape_of(x)
        if xs and len(xs) == 4 and tuple(ns) == (xs[0], xs[1] * es[2], xs[2], xs[3]):
            return x, "repeat_kv"
    return None


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
