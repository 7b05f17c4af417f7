"""Classify the masks of each attention site by provenance (analysis only).

For every ``MaskTerm`` of every site recorded by ``find_attention_pass``::

    keep = causal[:, :, :S, :S]             # built from sizes / buffers  -> causal, window, none
    s = s + (1.0 - pad[:, None, None, :]) * -1e4   # per key, from an input -> key_padding (gathered bias)
    s = s.masked_fill(pad[:, None, None, :] == 0, -inf)   # per key, bool   -> key_padding
    keep = seg[:, None, :, None] == seg[:, None, None, :]  # two views of one input -> segment_ids
    s = s + user_mask                       # anything else from an input   -> dense (attn_bias)

A mask built only from sizes, parameters and buffers is evaluated at the traced length
n and, with every literal n replaced, at larger lengths (and at lengths past any other
integer constant in its subgraph, so that a sliding window wider than n is seen); it
must come out the same causal / window / chunked (Llama 4: ``kv_idx // C == q_idx // C``)
/ all-attend pattern at every size that evaluates. A float one that is, per head,
``slope_h * (j - i)`` where it is finite (ALiBi, folded into SDPA's mask) is passed to the
ring op as its slopes, which computes the bias per block from global positions. A float
bias proven a function of ``j - i`` per head (T5's bucketed bias, learned or built from
sizes: ``relative_bias.py``) is ``relative``: the op takes it as a table over the distances.
A mask written in place after it was made (``keep[..., -2:] = False``) is not what its own
subgraph computes: ``unsupported``.
A per-key mask is recognised by shape (its query axis has size 1): it is O(S), so it is
passed as key padding or gathered along the ring. A dense mask is passed block-wise as
``attn_bias`` — on a real ring only if its key columns already span the whole sequence.
Whatever is not proven is marked ``unsupported`` and its site is left alone.

Sums and conjunctions of masks (``a + b``, ``a & b``) are split into their parts first.
"""

from __future__ import annotations

import logging
import dataclasses
from typing import Any, Optional

import torch
import torch.fx as fx

from .find_attention import MASKED_FILL_LIMIT, sites_of
from .node_facts import (OUTER_KEY, dtype_of, is_model_state, op_name, placeholder_source, real_value, scalar,
                         shape_of, value_of)
from .options import PassOptions
from .relative_bias import relative_bias_of
from .sites import AttentionSite, Decision, MaskKind, MaskTerm, PassReport, SiteRecord

log = logging.getLogger("ringfx.passes")

_RANDOM_OPS = frozenset({"rand", "randn", "randint", "rand_like", "randn_like", "bernoulli", "dropout",
                         "normal", "multinomial", "uniform_"})
_VIEW_OPS = frozenset({"view", "reshape", "unsqueeze", "expand", "getitem", "contiguous", "to", "long", "int"})


def classify_masks_pass(gm: fx.GraphModule, *, options: Optional[PassOptions] = None
                        ) -> tuple[fx.GraphModule, PassReport]:
    """Set ``kind`` on every mask term and the descriptor fields of every site."""
    options = options or PassOptions()
    report = PassReport("classify_masks")
    placeholder_values = _placeholder_values(gm, options)
    cache: dict = {}  # one evaluation per distinct size-built mask (layers repeat them)
    for site in sites_of(gm):
        if site.decision is Decision.REWRITE:
            classify_site(gm, site, options, placeholder_values, cache)
        report.sites.append(SiteRecord.of(site))
    report.skipped = sum(s.decision is not Decision.REWRITE for s in report.sites)
    log.info("classify_masks: %d sites, masks %s", len(report.sites),
             sorted({s.mask_kind for s in report.sites}) or "-")
    return gm, report


def classify_site(gm, site: AttentionSite, options: PassOptions, values: dict, cache=None) -> None:
    sq = _canonical_len(site)
    # a term with the heads folded into the batch is viewed whole as (B, H, ...) by the rewrite
    site.terms = [t for term in site.terms for t in (_split(term) if term.heads_folded is None else [term])]
    terms = []
    for term in site.terms:
        if isinstance(_region_input(term.node).meta.get(OUTER_KEY), fx.Node):
            terms += _classify_outer(term, sq, options, cache)
        else:
            classify_term(gm, term, sq, values, options, cache)
            terms.append(term)
    site.terms = terms
    kinds = [t.kind for t in site.terms]
    bad = [t for t in site.terms if t.kind == "unsupported"]
    if bad:
        site.mask = MaskKind(unsupported=True)
        site.skip(f"mask not proven safe on shards: {bad[0].detail}")
        return
    for attr, what in (("window", "sliding windows"), ("chunk", "attention chunk sizes")):
        sizes = {getattr(t, attr) for t in site.terms if getattr(t, attr)}
        if len(sizes) > 1:
            site.skip(f"several {what} {sorted(sizes)} on one attention")
            return
        if sizes:
            setattr(site, attr, sizes.pop())
    alibis = [t for t in site.terms if t.kind == "alibi"]
    if len(alibis) > 1:
        site.skip("more than one ALiBi bias on one attention")
        return
    if alibis:
        heads = _canonical_heads(site)
        slopes = alibis[0].slopes
        folded = alibis[0].heads_folded
        if folded is not None and slopes.numel() == folded[0] * folded[1]:
            # a (B*H, 1, S) bias (BLOOM's baddbmm): one slope per (batch row, head)
            per_row = slopes.reshape(folded)
            if not bool((per_row == per_row[:1]).all()):
                site.skip(f"ALiBi bias {alibis[0].node.name} differs across the batch")
                return
            slopes = per_row[0]
        if slopes.numel() not in (1, heads):
            site.skip(f"ALiBi bias {alibis[0].node.name} has {slopes.numel()} slopes for {heads} query heads")
            return
        site.alibi = slopes.expand(heads).clone()
    for t in site.terms:
        if t.kind == "relative" and t.relative.heads not in (1, _canonical_heads(site)):
            site.skip(f"relative bias {t.node.name} has {t.relative.heads} heads for {_canonical_heads(site)} "
                      "query heads")
            return
    if any(t.kind == "causal" or (t.kind in ("window", "chunk", "alibi") and t.causal) for t in site.terms):
        site.causal = True
    if sum(k == "segment_ids" for k in kinds) > 1:
        site.skip("more than one segment-id mask")
        return
    # with full-length inputs the sharding pass hands the ring op every key column
    if "dense" in kinds and options.ring_size > 1 and not options.loopback and options.inputs != "full":
        dense = next(t for t in site.terms if t.kind == "dense")
        cols = (shape_of(dense.node) or (None,))[-1]
        site.skip(f"dense mask {dense.node.name} holds {cols} key columns, this rank's only: on a ring "
                  f"of {options.ring_size} it must span all keys (pass key padding / segment ids instead)")
        return
    others = tuple(sorted({k for k in kinds if k not in ("none", "causal", "window", "chunk")}))
    site.mask = MaskKind(causal=site.causal, window=site.window, others=others, chunk=site.chunk)


def _region_input(node: fx.Node) -> fx.Node:
    """The placeholder that ``node`` passes on unchanged (``mask[:, :, :, :S]`` of a mask of
    length S, ``.contiguous()``), or ``node``."""
    while op_name(node) in ("getitem", "contiguous") and isinstance(node.args[0], fx.Node) and \
            shape_of(node) is not None and shape_of(node) == shape_of(node.args[0]):
        node = node.args[0]
    return node


def _classify_outer(term: MaskTerm, n: int, options: PassOptions, cache) -> list[MaskTerm]:
    """A mask that a checkpointed region receives as an input: classified where the calling
    graph builds it. Parts that the ring op needs as tensors (key padding, segment ids,
    dense) must be that very input; a part computed outside the region is not available
    inside it."""
    outer = _region_input(term.node).meta[OUTER_KEY]
    owner = outer.graph.owning_module
    parts = _split(MaskTerm(outer, term.form))
    values = _placeholder_values(owner, dataclasses.replace(options, example_inputs=None))
    if isinstance(outer.meta.get(OUTER_KEY), fx.Node):  # nested regions: one level further out
        classified = [t for p in parts for t in _classify_outer(p, n, options, cache)]
    else:
        for p in parts:
            classify_term(owner, p, n, values, options, cache)
        classified = parts
    for p in classified:
        if p.kind == "relative":  # its table would be built inside the region, from nodes outside it
            p.kind, p.detail = "unsupported", (f"relative bias {p.node.name} is computed outside the checkpointed "
                                               "region that holds the attention")
    direct = not isinstance(outer.meta.get(OUTER_KEY), fx.Node)
    if direct or all(p.kind not in ("key_padding", "dense", "segment_ids") or p.node is outer for p in classified):
        # parts made in the calling graph stay nodes of it: the rewrite passes them into the region
        for p in classified:
            if p.node is outer:
                p.node = term.node
        return classified
    # a part the ring op needs as a tensor exists only outside the region: take the mask whole
    whole = MaskTerm(term.node, term.form)
    if isinstance(outer.meta.get(OUTER_KEY), fx.Node):
        inner = _classify_outer(MaskTerm(outer, term.form), n, options, cache)
        _copy_kind(whole, inner[0])
        if len(inner) != 1:
            whole.kind = "unsupported"
    else:
        probe = MaskTerm(outer, term.form)
        classify_term(owner, probe, n, values, options, cache)
        _copy_kind(whole, probe)
    if whole.kind == "segment_ids":
        whole.kind, whole.detail = "unsupported", (f"segment ids of mask {outer.name} are computed outside the "
                                                   "checkpointed region that holds the attention")
    return [whole]


def _canonical_heads(site: AttentionSite) -> int:
    """The query heads of the ring op's canonical (B, H, S, D) q (B*H for 3-D spellings)."""
    s = shape_of(site.q.node)
    if site.q.permute is not None:
        s = tuple(s[i] for i in site.q.permute)
    return _hint(s[0] if site.q.unsqueeze0 else s[1])


def _copy_kind(dst: MaskTerm, src: MaskTerm) -> None:
    dst.kind, dst.window, dst.causal, dst.chunk, dst.slopes, dst.detail = (
        src.kind, src.window, src.causal, src.chunk, src.slopes, src.detail)


def _canonical_len(site: AttentionSite) -> int:
    """The traced sequence length (the example's value when shapes are symbolic)."""
    s = shape_of(site.q.node)
    if site.q.permute is not None:
        s = tuple(s[i] for i in site.q.permute)
    return _hint(s[-2])


def _split(term: MaskTerm) -> list[MaskTerm]:
    """Normalise a mask into independent terms::

        a + b (additive), a & b (keep), a | b (drop)  -> the terms of a and of b
        where(keep, 0, -inf) / masked_fill(zeros, drop, -inf) (additive) -> keep / drop
        ~keep (keep) -> drop, ~drop (drop) -> keep
        m.expand(...) -> m (the scores broadcast m the same way)

    so that e.g. ``where(causal & pad[:, None, None, :], 0, min)`` is seen as causal plus
    key padding instead of one dense mask."""
    node, name = term.node, op_name(term.node)
    args = node.args
    pairs = {"additive": "add", "keep": "logical_and", "drop": "logical_or"}
    if name == pairs.get(term.form) and len(args) >= 2 and \
            all(isinstance(a, fx.Node) for a in args[:2]) and node.kwargs.get("alpha", 1) == 1:
        return [t for a in args[:2] for t in _split(MaskTerm(a, term.form))]
    if term.form == "additive" and name == "where" and len(args) == 3 and isinstance(args[0], fx.Node):
        zero = lambda x: scalar(x) == 0.0 or (op_name(x) in ("zeros", "zeros_like") and shape_of(x) == ())
        if zero(args[1]) and _masked(args[2]):
            return _split(MaskTerm(args[0], "keep"))
        if _masked(args[1]) and zero(args[2]):
            return _split(MaskTerm(args[0], "drop"))
        if dtype_of(args[0]) == torch.bool and isinstance(args[1], fx.Node) and _masked(args[2]) \
                and (dtype_of(args[1]) or torch.bool).is_floating_point:
            # where(keep, bias, min) (transformers' SDPA mask of a T5 position bias): the bias plus a keep mask
            return _split(MaskTerm(args[1], "additive")) + _split(MaskTerm(args[0], "keep"))
    if term.form == "additive" and name in ("masked_fill", "masked_fill_") and len(args) >= 3 \
            and _masked(args[2]) and op_name(args[0]) in ("zeros", "zeros_like", "new_zeros") \
            and isinstance(args[1], fx.Node) and len(args[0].users) == 1:
        return _split(MaskTerm(args[1], "drop"))
    if term.form == "additive" and name == "masked_fill" and len(args) >= 3 and _masked(args[2]) \
            and all(isinstance(a, fx.Node) for a in args[:2]) and dtype_of(args[1]) == torch.bool:
        # bias.masked_fill(drop, -inf) (ALiBi's causal triu): the bias plus a drop mask
        return _split(MaskTerm(args[0], "additive")) + _split(MaskTerm(args[1], "drop"))
    if term.form in ("keep", "drop") and name == "logical_not" and isinstance(args[0], fx.Node):
        return _split(MaskTerm(args[0], "drop" if term.form == "keep" else "keep"))
    if name in ("contiguous", "clone") and args and isinstance(args[0], fx.Node):
        return _split(MaskTerm(args[0], term.form))  # same values
    if name in ("expand", "expand_as") and isinstance(args[0], fx.Node):
        # an expand repeats values the scores would broadcast anyway (transformers 5 expands
        # its (B, 1, 1, S) padding & (1, 1, S, 1) query terms to (B, 1, S, S))
        src, out = shape_of(args[0]), shape_of(node)
        if src is not None and out is not None and len(src) <= len(out):
            return _split(MaskTerm(args[0], term.form))
    return [term]


def _masked(x) -> bool:
    v = scalar(x)
    return v is not None and v <= MASKED_FILL_LIMIT


# --------------------------------------------------------------- one term

def classify_term(gm, term: MaskTerm, n: int, values: dict, options: PassOptions, cache=None) -> None:
    shape = shape_of(term.node)
    if shape is None:
        term.kind, term.detail = "unsupported", f"mask {term.node.name} has no recorded shape"
        return
    shape = (1,) * max(0, 2 - len(shape)) + tuple(_hint(shape))
    if dtype_of(term.node) != torch.bool and term.form not in ("additive", "subtracted"):
        term.kind, term.detail = "unsupported", f"mask {term.node.name} is not boolean"
        return
    ancestors = _ancestors(term.node)
    if _random(ancestors):
        term.kind, term.detail = "unsupported", f"mask {term.node.name} depends on a random op"
        return
    written = _written_in_place(ancestors, term.node)
    if written is not None:
        # its values are not those of its own subgraph (``keep[1, :, -2:] = False`` after ``ones``)
        learned = " is computed from parameters (a learned bias) and" if _learned(ancestors) else ""
        term.kind, term.detail = "unsupported", (f"mask {term.node.name}{learned} is written in place by "
                                                 f"'{op_name(written)}' at {written.name}; build it out of place")
        return
    if _static(ancestors):
        _classify_static(gm, term, n, ancestors, values, options, cache)
        if term.kind == "unsupported" and "built from sizes" in term.detail and _relative(term, n) is None:
            return
        if term.kind == "unsupported" and options.inputs == "full" and "built from sizes" in term.detail:
            # with full-length inputs the model builds it over the whole sequence (an ALiBi
            # bias, say): the sharding pass hands the ring op its rows for this rank's queries
            term.kind, term.detail = "dense", f"{term.detail}; passed whole as attn_bias (full-length inputs)"
        return
    if shape[-2] == 1 and shape[-1] == 1:
        if term.form in ("additive", "subtracted"):
            term.kind, term.detail = "none", "adds a constant per query row (softmax ignores it)"
        else:
            term.kind, term.detail = "unsupported", f"mask {term.node.name} masks whole query rows"
        return
    if shape[-2] == 1 and shape[-1] == n:
        if term.form in ("additive", "subtracted") and _learned(ancestors):
            term.kind, term.detail = "unsupported", f"mask {term.node.name} is computed from parameters (a learned bias)"
            return
        term.kind = "key_padding"
        term.detail = "additive: gathered along the ring as a per-key bias" if term.form != "keep" else ""
        return
    if shape[-2] == n and shape[-1] == 1:
        term.kind, term.detail = ("none", "constant per query row") if term.form in ("additive", "subtracted") else \
            ("unsupported", f"mask {term.node.name} masks whole query rows")
        return
    seg = _segment_ids(term)
    if seg is not None:
        term.kind, term.segment_node = "segment_ids", seg
        return
    if term.form in ("additive", "subtracted") and _learned(ancestors):
        why = _relative(term, n)
        if why is None:
            return
        term.kind, term.detail = "unsupported", (f"mask {term.node.name} is computed from parameters (a learned "
                                                 f"bias) and not proven a function of j - i ({why})")
        return
    term.kind = "dense"


def _relative(term: MaskTerm, n: int) -> Optional[str]:
    """Classify a float additive term as ``relative`` when it is proven a function of the
    distance ``j - i`` per head (``relative_bias.py``); else return why it is not."""
    if term.form not in ("additive", "subtracted") or not (dtype_of(term.node) or torch.bool).is_floating_point:
        return "not a float additive bias"
    proof = relative_bias_of(term.node, n)
    if isinstance(proof, str):
        return proof
    term.kind, term.relative = "relative", proof
    term.detail = f"a function of j - i ({proof.heads} head(s)): passed as a table over the distances"
    return None


_SIZE_QUERIES = frozenset({"size", "sym_size", "dim", "numel", "sym_numel"})


def _is_size_query(node: fx.Node) -> bool:
    """``x.size(1)``, ``x.shape`` ...: depends on a tensor's shape, not its data."""
    name = op_name(node)
    if name in _SIZE_QUERIES:
        return True
    return name == "getattr" and len(node.args) == 2 and node.args[1] == "shape"


def _ancestors(node: fx.Node) -> list[fx.Node]:
    seen, stack = {}, [node]
    while stack:
        x = stack.pop()
        if x in seen:
            continue
        seen[x] = None
        if not _is_size_query(x):
            stack.extend(x.all_input_nodes)
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    return sorted(seen, key=order.__getitem__)


def _learned(nodes) -> bool:
    """Depends on a parameter: the ring op treats attn_bias as a constant (no gradient)."""
    return any(n.op == "placeholder" and _is_parameter(n) for n in nodes)


def _written_in_place(nodes, mask: fx.Node) -> Optional[fx.Node]:
    """An op outside ``nodes`` (the subgraph of ``mask``) that writes into one of them
    (``setitem``, ``x.fill_()``, ``x += y`` whose result is not read back) before it is read
    there (or, for ``mask`` itself, by the attention): the values read are then not those the
    subgraph computes."""
    inside = set(nodes)
    order = {n: i for i, n in enumerate(nodes[0].graph.nodes)} if nodes else {}
    for node in nodes:
        for user in node.users:
            if user in inside or not user.args or user.args[0] is not node:
                continue
            name = op_name(user) or ""
            writes = name in ("setitem", "iadd", "isub", "imul", "itruediv", "iand", "ior") or (
                user.op == "call_method" and name.endswith("_") and not name.startswith("_"))
            # it matters to the readers of ``node`` after it (a write after the last read does not)
            if writes and any((r in inside or node is mask) and order[r] > order[user] for r in node.users):
                return user
    return None


def _random(nodes) -> bool:
    return any(op_name(n) in _RANDOM_OPS for n in nodes)


def _is_size_input(node: fx.Node) -> bool:
    v = real_value(node)
    ex = node.meta.get("example_value")
    return isinstance(v, (int, torch.SymInt)) or isinstance(ex, (int, torch.SymInt))


def _static(nodes) -> bool:
    """Built only from sizes and buffers (no per-call input data, no parameters: a
    parameter's value today says nothing about its value after a step)."""
    return all((is_model_state(n) and not _is_parameter(n)) or _is_size_input(n)
               for n in nodes if n.op == "placeholder")


def _is_parameter(node: fx.Node) -> bool:
    """A parameter, by dynamo's record of the placeholder's source (see ``is_model_state``)."""
    src = placeholder_source(node)
    return src is not None and "._parameters[" in src


def _segment_ids(term: MaskTerm) -> Optional[fx.Node]:
    """``seg[:, None, :, None] == seg[:, None, None, :]`` (keep) or ``!=`` (drop)."""
    name = op_name(term.node)
    if (term.form, name) not in (("keep", "eq"), ("drop", "ne")) or len(term.node.args) < 2:
        return None
    a, b = term.node.args[:2]
    if not isinstance(a, fx.Node) or not isinstance(b, fx.Node):
        return None
    sa, sb = shape_of(a), shape_of(b)
    if not sa or not sb or len(sa) < 2 or len(sb) < 2:
        return None
    base_a, base_b = _view_base(a), _view_base(b)
    if base_a is None or base_a is not base_b:
        return None
    bs = shape_of(base_a)
    if not bs or len(bs) != 2 or dtype_of(base_a) in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        return None
    s = bs[1]
    if {(sa[-2], sa[-1]), (sb[-2], sb[-1])} != {(s, 1), (1, s)}:
        return None
    return base_a


def _view_base(node: fx.Node) -> Optional[fx.Node]:
    while op_name(node) in _VIEW_OPS and isinstance(node.args[0], fx.Node):
        if op_name(node) == "getitem" and not all(i is None or i == slice(None) or i is Ellipsis
                                                   for i in (node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],))):
            return None
        node = node.args[0]
    return node


# ------------------------------------------------------ static evaluation

def _hint(v):
    """A concrete value for a size: the example's hint for a SymInt."""
    if isinstance(v, torch.SymInt):
        hint = getattr(v.node, "hint", None)
        if hint is None:
            from torch.fx.experimental import symbolic_shapes

            hint = symbolic_shapes.guarding_hint_or_throw(v)
        return int(hint)
    if isinstance(v, (torch.Size, tuple, list)) and not isinstance(v, torch.Tensor):
        return tuple(_hint(x) for x in v)
    return v


def _placeholder_values(gm: fx.GraphModule, options: PassOptions) -> dict:
    values = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for i, node in enumerate(placeholders):
        v = real_value(node)
        if v is None and options.example_inputs is not None and i < len(options.example_inputs):
            v = options.example_inputs[i]
        values[node] = _hint(v)
    return values


# Ops whose integer arguments are sizes (shapes, lengths, slice bounds): only these take
# the substituted length when a mask is re-evaluated at another length. A constant in a
# comparison (``i - j < 4096``) or an offset (``triu(diagonal=1)``) keeps its value, so a
# window equal to or wider than the traced length still shows up as a window.
_SIZE_ARG_OPS = frozenset({"full", "ones", "zeros", "empty", "arange", "new_full", "new_ones", "new_zeros",
                           "new_empty", "view", "reshape", "expand", "getitem", "narrow", "tril_indices",
                           "triu_indices", "ones_like", "zeros_like", "full_like", "empty_like"})
_EVAL_SIZES = (5, 11, 23)  # small lengths every size-built mask is also checked at
_MAX_EVAL = 4096  # longest length worth materialising for a check


def _int_constants(nodes) -> set[int]:
    """Integer constants outside size arguments (candidate window widths)."""
    found = set()

    def visit(x):
        if isinstance(x, bool):
            return
        if isinstance(x, int):
            found.add(abs(x))
        elif isinstance(x, (tuple, list)):
            for y in x:
                visit(y)
        elif isinstance(x, slice):
            visit((x.start, x.stop, x.step))
        elif isinstance(x, dict):
            visit(tuple(x.values()))

    for n in nodes:
        if op_name(n) not in _SIZE_ARG_OPS:
            visit(n.args)
            visit(n.kwargs)
    return found


def _evaluate(gm, nodes: list[fx.Node], out: fx.Node, values: dict, n: int, m: int) -> Optional[torch.Tensor]:
    """Run the mask's subgraph with the length n set to m: in size inputs, size queries and
    the size arguments of shape-making ops (``_SIZE_ARG_OPS``)."""

    def subst(x):
        if isinstance(x, bool):
            return x
        if isinstance(x, int):
            return m if x == n else x
        if isinstance(x, slice):
            return slice(subst(x.start), subst(x.stop), subst(x.step))
        if isinstance(x, (tuple, list)):
            return type(x)(subst(y) for y in x)
        if isinstance(x, dict):
            return {k: subst(v) for k, v in x.items()}
        if isinstance(x, torch.Size):
            return torch.Size(subst(tuple(x)))
        return x

    env: dict[fx.Node, Any] = {}
    try:
        for node in nodes:
            load = lambda a: fx.node.map_arg(a, lambda x: env[x])
            if _is_size_query(node):
                v = value_of(node)
                if v is None:
                    return None
                env[node] = subst(_hint(v))
            elif node.op == "placeholder":
                v = values.get(node)
                if v is None:
                    return None
                env[node] = subst(int(v)) if isinstance(v, (int, torch.SymInt)) else v
            elif node.op == "get_attr":
                obj = gm
                for part in node.target.split("."):
                    obj = getattr(obj, part)
                env[node] = obj
            else:
                args, kwargs = load(node.args), load(node.kwargs)
                if op_name(node) in _SIZE_ARG_OPS:
                    args, kwargs = subst(args), subst(kwargs)
                if node.op == "call_function":
                    env[node] = node.target(*args, **kwargs)
                elif node.op == "call_method":
                    env[node] = getattr(args[0], node.target)(*args[1:], **kwargs)
                elif node.op == "call_module":
                    env[node] = gm.get_submodule(node.target)(*args, **kwargs)
        with torch.no_grad():
            result = env[out]
    except (RuntimeError, IndexError, ValueError) as e:  # a size that the subgraph cannot take (past a buffer's end)
        log.debug("evaluating %s at length %d failed at %s: %s", out.name, m, node.format_node(), e)
        return None
    return result.detach() if isinstance(result, torch.Tensor) else None


def _keep_matrix(value: torch.Tensor, form: str, m: int) -> tuple[Optional[torch.Tensor], str]:
    """Reduce an evaluated mask to one (m, m) bool matrix, True = attend."""
    v = value
    while v.dim() < 2:
        v = v.unsqueeze(0)
    if v.shape[-1] not in (1, m) or v.shape[-2] not in (1, m):
        return None, "size"
    v = v.expand(*v.shape[:-2], m, m).reshape(-1, m, m)
    if not bool((v == v[:1]).all()):
        return None, "the mask differs across batch or heads"
    v = v[0]
    if form == "subtracted":
        v, form = -v, "additive"
    if form == "additive":
        if not bool(((v == 0) | (v <= MASKED_FILL_LIMIT)).all()):
            return None, "it holds values other than 0 and -inf (a bias built from positions)"
        return v == 0, ""
    return (v if form == "keep" else ~v), ""


def _alibi_of(value: torch.Tensor, form: str, m: int) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """ALiBi folded into a float mask: (slopes (H,), keep (m, m)) when the evaluated mask,
    the same across the batch, is ``slopes[h] * (j - i)`` plus a constant per query row
    (softmax ignores it: MPT's ``slopes[h] * (j - (S - 1))``) wherever it is not masked
    (-inf), with one masked pattern for every head; else None. The slope is read off row 1
    (``v[h, 1, 1] - v[h, 1, 0]``: exact for the direct spelling) or, failing that, off the
    widest span of the last row; every entry must then match to the mask dtype's rounding
    of its own magnitude (the model's own rounding of the bias)."""
    if form not in ("additive", "subtracted") or not value.dtype.is_floating_point or m < 2 or value.dim() > 4:
        return None
    v = -value if form == "subtracted" else value
    while v.dim() < 4:
        v = v.unsqueeze(0)
    if v.shape[-1] not in (1, m) or v.shape[-2] not in (1, m):
        return None
    v = v.expand(*v.shape[:-2], m, m)
    if not bool((v == v[:1]).all()):
        return None  # differs across the batch
    v = v[0]  # (H, m, m)
    keep = v > MASKED_FILL_LIMIT
    if not bool((keep == keep[:1]).all()):
        return None
    keep = keep[0]
    if not bool(keep.diagonal().all()):
        return None  # every query sees itself under every pattern ALiBi is combined with
    i = torch.arange(m, device=v.device)
    dist = (i[None, :] - i[:, None]).to(v.dtype)
    row = v.diagonal(dim1=-2, dim2=-1)[..., None]  # the constant of each query row
    candidates = []
    if bool(keep[1, 0]):
        candidates.append(v[:, 1, 1] - v[:, 1, 0])
    elif bool(keep[0, 1]):
        candidates.append(v[:, 0, 1] - v[:, 0, 0])
    far = int(keep[m - 1].nonzero()[0])  # the last row's first key seen
    if far < m - 1:
        candidates.append((v[:, m - 1, m - 1] - v[:, m - 1, far]) / (m - 1 - far))
    eps = torch.finfo(v.dtype).eps
    for slopes in candidates:
        err = (v - row - slopes[:, None, None] * dist).abs()
        if bool((err <= 8 * eps * (v.abs() + row.abs()))[:, keep].all()):
            return slopes.clone(), keep
    return None


def _pattern_of(keep: torch.Tensor) -> Optional[tuple[str, int]]:
    m = keep.shape[0]
    i = torch.arange(m, device=keep.device).unsqueeze(1)  # the mask's device: a CUDA buffer's mask is on CUDA
    j = torch.arange(m, device=keep.device).unsqueeze(0)
    if bool(keep.all()):
        return "none", 0
    if torch.equal(keep, j <= i):
        return "causal", 0
    w = int(keep[-1].sum())
    if 0 < w < m:
        if torch.equal(keep, (j <= i) & (j > i - w)):
            return "window", w
        if torch.equal(keep, j > i - w):
            return "window_noncausal", w
    c = int(keep[:, 0].sum())  # the first chunk's queries all see key 0
    if 0 < c < m:
        same = (i // c) == (j // c)
        if torch.equal(keep, same & (j <= i)):
            return "chunk", c
        if torch.equal(keep, same):
            return "chunk_noncausal", c
    return None


def _structure_key(nodes, values, n: int, form: str):
    """Two mask subgraphs with this key compute the same mask (one per layer is common)."""
    index = {node: i for i, node in enumerate(nodes)}

    def norm(a):
        return fx.node.map_arg(a, lambda x: ("node", index[x]))

    parts = [n, form]
    for node in nodes:
        if node.op == "placeholder":
            v = values.get(node)
            parts.append(("ph", id(v) if isinstance(v, torch.Tensor) else v))
        elif node.op == "get_attr" or _is_size_query(node):
            parts.append((node.op, str(node.target), str(_hint(value_of(node))) if _is_size_query(node) else ""))
        else:
            parts.append((node.op, node.target, repr(norm(node.args)), repr(norm(node.kwargs))))
    return tuple(parts)


def _classify_static(gm, term: MaskTerm, n: int, nodes, values, options: PassOptions, cache=None) -> None:
    key = None
    if cache is not None:
        try:
            key = _structure_key(nodes, values, n, term.form)
            hash(key)
        except TypeError:
            key = None
        if key is not None and key in cache:
            _copy_kind(term, cache[key])
            return
    _classify_static_uncached(gm, term, n, nodes, values, options)
    if key is not None:
        cache[key] = dataclasses.replace(term)


def _classify_static_uncached(gm, term: MaskTerm, n: int, nodes, values, options: PassOptions) -> None:
    constants = _int_constants(nodes)
    too_wide = sorted(c for c in constants if c > _MAX_EVAL)
    if too_wide:
        term.kind = "unsupported"
        term.detail = (f"mask {term.node.name} holds the constant {too_wide[0]}, which may be a window wider "
                       f"than ringfx checks by evaluation ({_MAX_EVAL}); build it from sizes only or pass "
                       f"the window to ringfx.ring_attention")
        return
    sizes = ([n] if n <= _MAX_EVAL else []) + [m for m in _EVAL_SIZES if m != n]
    sizes += sorted({c + 7 for c in constants if c + 7 > _EVAL_SIZES[0] and c + 7 not in sizes})
    seen: list[tuple[int, tuple[str, int]]] = []
    slopes_seen = []  # ALiBi: the slopes read at each length
    for m in sizes:
        value = _evaluate(gm, nodes, term.node, values, n, m)
        if value is None:
            continue
        keep, why = _keep_matrix(value, term.form, m)
        if keep is None and why != "size":
            alibi = _alibi_of(value, term.form, m)
            if alibi is not None:
                slopes, keep = alibi
                slopes_seen.append(slopes)
        if keep is None:
            if why == "size":
                continue
            term.kind, term.detail = "unsupported", f"mask {term.node.name} is built from sizes but {why}"
            return
        pattern = _pattern_of(keep)
        if pattern is None:
            term.kind = "unsupported"
            term.detail = (f"mask {term.node.name} is built from sizes/buffers but is not causal, "
                           f"a sliding window, chunked or all-attend (checked at length {m})")
            return
        seen.append((m, pattern))
    if not seen or (n <= _MAX_EVAL and seen[0][0] != n):
        term.kind, term.detail = "unsupported", f"mask {term.node.name} could not be evaluated"
        return
    if slopes_seen and (len(slopes_seen) != len(seen) or
                        not all(torch.equal(x, slopes_seen[0]) for x in slopes_seen)):
        term.kind, term.detail = "unsupported", f"mask {term.node.name} changes its ALiBi slopes with length"
        return
    kinds = {p[0] for _, p in seen}
    families = {f for f in ("window", "chunk") if any(k.startswith(f) for k in kinds)}
    widths = {p[1] for _, p in seen if p[0].startswith(("window", "chunk"))}
    if len(families) > 1 or len(widths) > 1 or len(kinds - {"causal", "none"}) > 1:
        term.kind, term.detail = "unsupported", f"mask {term.node.name} changes pattern with length: {seen}"
        return
    checked = f"checked at lengths {[m for m, _ in seen]}"
    if families:
        family, w = families.pop(), widths.pop()
        causal_form = family in kinds
        # smaller lengths may show the window / chunk as causal (or all-attend) when w >= m
        consistent = all(p == ((family if causal_form else family + "_noncausal"), w) or
                         (m <= w and p[0] == ("causal" if causal_form else "none")) for m, p in seen)
        if not consistent:
            term.kind, term.detail = "unsupported", f"mask {term.node.name} changes pattern with length: {seen}"
            return
        term.kind, term.causal = family, causal_form
        term.window, term.chunk = (w, 0) if family == "window" else (0, w)
    else:
        if len(kinds) != 1:
            term.kind, term.detail = "unsupported", f"mask {term.node.name} changes pattern with length: {seen}"
            return
        term.kind = kinds.pop()
        term.causal = term.kind == "causal" and bool(slopes_seen)
    term.detail = checked
    if slopes_seen:
        term.kind, term.slopes = "alibi", slopes_seen[0]
        term.detail = f"ALiBi slopes {[round(x, 6) for x in term.slopes.tolist()]}; {checked}"
