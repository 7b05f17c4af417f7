"""The spellings of attention that ``find_attention`` recognises: one table per step of
``softmax(f(q @ kᵀ)) @ v``, one small rule per spelling, each naming where it comes from.

    QK_PRODUCTS    s = q @ kᵀ           matmul / bmm, baddbmm (BLOOM), einsum
    SCORE_STEPS    s = f(s)             casts, head split, scale, row max, soft-cap, sinks, masks
    NORMALISERS    p = softmax(s)       softmax
    PROB_STEPS     p = g(p)             casts, head merge, sink column dropped, dropout
    PV_PRODUCTS    o = p @ v            matmul / bmm, einsum
    KV_EXPANSIONS  k = repeat(k)        repeat_interleave, repeat_kv (GQA)

The walker (``find_attention.py``) only loops over these tables: from a normaliser back
through ``SCORE_STEPS`` to a ``QK_PRODUCTS`` op, and forward through ``PROB_STEPS`` to a
``PV_PRODUCTS`` op. A rule is tried when the node's ``op_name`` is in its ``ops``, in table
order; what its ``match`` receives and returns is the table's (see each table). Adding a
spelling is one ``Rule`` here and one example in ``patterns.PATTERNS`` that names it
(``tests/test_recognition_table.py`` fails for a rule that no example exercises).

Before matching, ``normalise.py`` makes in-place arithmetic on the scores functional
(``scores /= math.sqrt(d)``) and erases dead code, so the rules see functional ops and real uses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Optional

import torch
import torch.fx as fx

from .node_facts import CASTS, SHAPE_ONLY, arg, normalize_dim, op_name, scalar, shape_of, value_of
from .sites import AttentionSite, MaskTerm, Operand

# A fill value at or below this counts as "masked out": exp(-1e4) is 0 in float32 and
# float64 once subtracted from the row maximum. (Exact unless a whole row is masked.)
MASKED_FILL_LIMIT = -1.0e4

# What a SCORE_STEPS rule returns when the node is its spelling but cannot be attention
# (``masked_fill`` with a fill value that does not mask): the walk stops, nothing is found.
NOT_ATTENTION = object()


@dataclass(frozen=True)
class Rule:
    """One spelling of one step. ``match``'s signature is its table's; ``carries`` (node ->
    inputs) says which inputs carry the attention value through the node: for SCORE_STEPS
    the ones that may hold the scores (``reaches_scores``), for PV_PRODUCTS the
    probabilities operand."""

    name: str
    ops: frozenset
    match: Callable
    origin: str  # where this spelling is written so: a model, a library, a paper
    carries: Optional[Callable[[fx.Node], list]] = None


def first_rule(table: list[Rule], node: fx.Node, *args):
    """``(rule, result)`` of the first rule of ``table`` whose ops hold the node's name and
    whose match returns something other than None; ``(None, None)`` when none does."""
    name = op_name(node)
    for rule in table:
        if name in rule.ops:
            found = rule.match(node, *args)
            if found is not None:
                return rule, found
    return None, None


# ---------------------------------------------------------------- scalar facts

def symbolic_scalar(x) -> bool:
    """A node holding a Python number at run time (``v.size(-1) ** 0.5`` with dynamic shapes)."""
    v = value_of(x)
    return isinstance(x, fx.Node) and not isinstance(v, bool) and \
        isinstance(v, (int, float, torch.SymInt, torch.SymFloat))


def scalar_factor(node: fx.Node):
    """``t * c``, ``c * t``, ``t / c`` with a scalar c -> (t, factor); the factor is a
    float, or ``(node, +1 | -1)`` for a symbolic scalar multiplied or divided by."""
    name = op_name(node)
    if name not in ("mul", "div") or len(node.args) < 2:
        return None
    a, b = node.args[0], node.args[1]
    if name == "mul":
        for t, c in ((a, b), (b, a)):
            if isinstance(t, fx.Node) and value_of(t) is not None and not symbolic_scalar(t):
                if scalar(c) is not None:
                    return t, scalar(c)
                if symbolic_scalar(c):
                    return t, (c, 1)
    elif isinstance(a, fx.Node) and not node.kwargs.get("rounding_mode") and not symbolic_scalar(a):
        if scalar(b) not in (None, 0.0):
            return a, 1.0 / scalar(b)
        if symbolic_scalar(b):
            return a, (b, -1)
    return None


def strip_scale(node: fx.Node) -> tuple[fx.Node, list]:
    """``q * c1 / c2`` -> (q, [c1, 1 / c2])."""
    factors = []
    while scalar_factor(node):
        node, f = scalar_factor(node)
        factors.append(f)
    return node, factors


def absorb_scale(site: AttentionSite, factors) -> None:
    for f in factors:
        if isinstance(f, tuple):
            site.scale_nodes.append(f)
        else:
            site.scale *= f


def fill_value(x) -> Optional[float]:
    """A masked-fill value: a Python number, or a ``torch.full([], v)`` scalar tensor."""
    if scalar(x) is not None:
        return scalar(x)
    if op_name(x) == "full" and shape_of(x) == () and scalar(arg(x, 1, "fill_value")) is not None:
        return scalar(arg(x, 1, "fill_value"))
    if op_name(x) == "tensor" and x.args and scalar(x.args[0]) is not None:
        return scalar(x.args[0])
    return None


def is_masked_value(x) -> bool:
    v = fill_value(x)
    return v is not None and v <= MASKED_FILL_LIMIT


def dtype_only_use(user: fx.Node, x: fx.Node) -> bool:
    """``t.type_as(x)``: reads only x's dtype (T5: ``softmax(s.float()).type_as(s)``)."""
    return op_name(user) == "type_as" and len(user.args) >= 2 and user.args[1] is x and user.args[0] is not x


# ------------------------------------------------------------------ SCORE_STEPS

@dataclass
class ScoreWalk:
    """What the walk back from the normaliser has found so far (SCORE_STEPS rules read and
    extend it). Walking backwards, a step seen earlier is applied later in the model."""

    terms: list = field(default_factory=list)  # MaskTerm, last applied first
    features: list = field(default_factory=list)  # spelling names, last applied first
    scale: list = field(default_factory=list)  # factors: floats or (node, ±1)
    problem: str = ""  # the first reason the site cannot be rewritten
    scale_seen: bool = False  # a scale applied after what comes next
    split: Optional[fx.Node] = None  # the (B*H, S, S) -> (B, H, S, S) view walked through
    terms_at_split: int = 0
    softcap: float = 0.0
    terms_at_softcap: int = 0
    sinks: Optional[fx.Node] = None
    also_reads: set = field(default_factory=set)  # may read a score without escaping (a row max)

    def refuse(self, problem: str) -> None:
        self.problem = self.problem or problem

    def scaled(self, factor) -> None:
        self.scale.append(factor)
        self.scale_seen = True
        if "scale(scores)" not in self.features:
            self.features.append("scale(scores)")

    def masked(self, term: MaskTerm, feature: str) -> None:
        self.terms.append(term)
        self.features.append(feature)


def reaches_scores(node, depth: int = 0) -> bool:
    """Whether ``node`` leads back to a q @ kᵀ product through SCORE_STEPS spellings
    (each rule's ``carries``: the inputs that may hold the scores)."""
    if not isinstance(node, fx.Node) or depth > 16:
        return False
    name = op_name(node)
    if any(name in rule.ops for rule in QK_PRODUCTS):
        return True
    for rule in SCORE_STEPS:
        if name in rule.ops and rule.carries is not None:
            inputs = rule.carries(node)
            if inputs is not None:
                return any(reaches_scores(a, depth + 1) for a in inputs)
    return False


def _first_input(node: fx.Node) -> list:
    return node.args[:1]


def _cast_or_copy(x: fx.Node, walk: ScoreWalk):
    # softmax(s.float()) (T5, LLaMA's fp32 softmax), s.contiguous(), s.clone()
    if op_name(x) in CASTS and "upcast" not in walk.features:
        walk.features.append("upcast")
    return x.args[0]


def heads_split(node: fx.Node) -> bool:
    """``s.view(B, H, S, S)`` of ``(B*H, S, S)`` scores (GPT-NeoX before transformers 4.40:
    baddbmm on heads folded into the batch, the mask and ``@ v`` in 4-D)."""
    if op_name(node) not in ("view", "reshape") or not node.args or not isinstance(node.args[0], fx.Node):
        return False
    a, x = shape_of(node.args[0]), shape_of(node)
    return bool(a) and bool(x) and len(a) == 3 and len(x) == 4 and tuple(a[1:]) == tuple(x[2:]) \
        and all(isinstance(d, int) for d in (a[0], x[0], x[1])) and a[0] == x[0] * x[1]


def _heads_split(x: fx.Node, walk: ScoreWalk):
    if walk.split is not None or not heads_split(x):
        return None
    walk.split, walk.terms_at_split = x, len(walk.terms)
    walk.features.append("view")
    return x.args[0]


def _scale(x: fx.Node, walk: ScoreWalk):
    found = scalar_factor(x)
    if found is None:
        return None
    walk.scaled(found[1])
    return found[0]


def row_max_nodes(node) -> list:
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


def row_max_of(node) -> Optional[fx.Node]:
    """``x`` when ``node`` is the maximum of each of x's rows (``row_max_nodes``), else None."""
    nodes = row_max_nodes(node)
    return nodes[-1].args[0] if nodes else None


def _row_max(x: fx.Node, walk: ScoreWalk):
    # s - s.max(-1, keepdim=True): a constant per row, nothing to softmax, unless a tanh or
    # the sink column comes after it (walking backwards: was already seen)
    if len(x.args) < 2 or not isinstance(x.args[0], fx.Node) or row_max_of(x.args[1]) is not x.args[0]:
        return None
    if walk.softcap or walk.sinks is not None:
        return NOT_ATTENTION
    walk.also_reads.update(row_max_nodes(x.args[1]))
    walk.features.append("rowmax")
    return x.args[0]


def _softcap(x: fx.Node, walk: ScoreWalk):
    # cap * tanh(s / cap): the factors seen so far (applied after the tanh) are the cap;
    # a sink column joined after it stays uncapped, as the ring op computes it
    if not x.args or not isinstance(x.args[0], fx.Node):
        return None
    if walk.softcap:
        return NOT_ATTENTION
    cap = 1.0
    for f in walk.scale:
        if isinstance(f, tuple):
            walk.refuse("the soft-capping factor is not a constant number")
            break
        cap *= f
    if cap <= 0:
        return NOT_ATTENTION
    walk.softcap, walk.terms_at_softcap = cap, len(walk.terms)
    walk.features.append("softcap")
    return x.args[0]


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
    if not isinstance(scores, fx.Node) or not reaches_scores(scores):
        return None
    sinks = _per_head_logits(column)
    return None if sinks is None else (scores, sinks)


def _sinks(x: fx.Node, walk: ScoreWalk):
    if walk.sinks is not None or walk.softcap:
        return None
    joined = _sink_column(x)
    if joined is None:
        return NOT_ATTENTION
    if walk.scale or walk.terms:
        walk.refuse("the scores are scaled or masked after the sink column is joined")
    walk.sinks = joined[1]
    walk.features.append("sinks")
    return joined[0]


def _additive(x: fx.Node, walk: ScoreWalk):
    if len(x.args) < 2 or not isinstance(x.args[0], fx.Node) or not isinstance(x.args[1], fx.Node):
        return None
    if x.kwargs.get("alpha", 1) != 1:
        return NOT_ATTENTION
    a, b = x.args[0], x.args[1]
    if reaches_scores(a):
        nxt, term = a, b
    elif reaches_scores(b):
        nxt, term = b, a
    else:
        return NOT_ATTENTION
    if walk.scale_seen:
        walk.refuse("the scores are scaled after an additive mask was added")
    walk.masked(MaskTerm(term, "additive"), "add")
    return nxt


def _subtracted(x: fx.Node, walk: ScoreWalk):
    if len(x.args) < 2 or not isinstance(x.args[0], fx.Node) or not isinstance(x.args[1], fx.Node) \
            or not reaches_scores(x.args[0]) or x.kwargs.get("alpha", 1) != 1:
        return None
    if walk.scale_seen:
        walk.refuse("the scores are scaled after an additive mask was added")
    walk.masked(MaskTerm(x.args[1], "subtracted"), "sub")
    return x.args[0]


def _masked_fill(x: fx.Node, walk: ScoreWalk):
    if not is_masked_value(arg(x, 2, "value")):
        return NOT_ATTENTION
    walk.masked(MaskTerm(x.args[1], "drop"), "masked_fill")
    return x.args[0]


def _where(x: fx.Node, walk: ScoreWalk):
    if len(x.args) != 3:
        return None
    cond, a, b = x.args
    if isinstance(a, fx.Node) and reaches_scores(a) and is_masked_value(b):
        walk.masked(MaskTerm(cond, "keep"), "where")
        return a
    if isinstance(b, fx.Node) and reaches_scores(b) and is_masked_value(a):
        walk.masked(MaskTerm(cond, "drop"), "where")
        return b
    return NOT_ATTENTION


# match(x, walk: ScoreWalk) -> the node the scores come from (walking back), None (not this
# spelling: try the next rule) or NOT_ATTENTION.
SCORE_STEPS: list[Rule] = [
    Rule("scores-cast", CASTS | SHAPE_ONLY, _cast_or_copy,
         "softmax(scores.float(), -1) (T5, LLaMA's float32 softmax), .contiguous()", _first_input),
    Rule("heads-split", frozenset({"view", "reshape"}), _heads_split,
         "GPT-NeoX < transformers 4.40: (B*H, S, S) scores viewed as (B, H, S, S)",
         lambda x: x.args[:1] if heads_split(x) else None),
    Rule("scale", frozenset({"mul", "div"}), _scale,
         "scores / math.sqrt(d) (Annotated Transformer), scores * d ** -0.5",
         lambda x: x.args[:1] if scalar_factor(x) else None),
    Rule("row-max", frozenset({"sub"}), _row_max,
         "s - s.max(-1, keepdim=True).values (GPT-OSS eager, before softmax)", _first_input),
    Rule("softcap", frozenset({"tanh"}), _softcap, "cap * tanh(s / cap) (Gemma 2 logit soft-capping)",
         _first_input),
    Rule("sinks", frozenset({"cat"}), _sinks,
         "cat([s, sinks.reshape(1, -1, 1, 1).expand(B, -1, S, -1)], -1) (GPT-OSS attention sinks)"),
    Rule("additive-mask", frozenset({"add"}), _additive,
         "scores + attention_mask (HF extended mask, ALiBi, T5 position bias)", lambda x: x.args[:2]),
    Rule("subtracted-mask", frozenset({"sub"}), _subtracted,
         "scores - penalty: a mask or bias written as a positive penalty", _first_input),
    Rule("masked-fill", frozenset({"masked_fill"}), _masked_fill,
         "scores.masked_fill(mask == 0, -inf) (nanoGPT, Mistral reference)", _first_input),
    Rule("where", frozenset({"where"}), _where, "torch.where(causal, scores, finfo.min) (GPT-NeoX, GPT-J)",
         lambda x: [x.args[1], x.args[2]] if len(x.args) == 3 else None),
]


# ------------------------------------------------------------------ NORMALISERS

class Normalised(NamedTuple):
    """A normaliser over the scores: ``scores`` its input, read by ``reader`` (the node the
    score walk starts under), ``nodes`` what it is made of (the last one the probabilities),
    ``dim`` the axis it normalises, ``upcast`` whether it computes in another dtype."""

    scores: fx.Node
    reader: fx.Node
    nodes: tuple
    dim: int
    upcast: bool = False

    @property
    def out(self) -> fx.Node:
        return self.nodes[-1]


def _softmax(node: fx.Node) -> Optional[Normalised]:
    x = node.args[0] if node.args else node.kwargs.get("input")
    xs = shape_of(x)
    dim = arg(node, 1, "dim", None)
    if not isinstance(x, fx.Node) or not xs or len(xs) < 3 or not isinstance(dim, int):
        return None
    return Normalised(x, node, (node,), dim, arg(node, 2, "dtype", None) is not None)


# match(node) -> Normalised, or None (not this spelling).
NORMALISERS: list[Rule] = [
    Rule("softmax", frozenset({"softmax"}), _softmax, "torch.softmax / F.softmax / Tensor.softmax, dtype= optional"),
]


# ------------------------------------------------------------------- PROB_STEPS

class ProbStep(NamedTuple):
    """A step from the probabilities towards ``@ v``: the spelling ``feature`` it adds
    (or None), and ``escape``: why the site cannot be rewritten ("" when it can)."""

    feature: Optional[str] = None
    escape: str = ""


@dataclass
class ProbWalk:
    """What the walk forward from the normaliser has found so far (PROB_STEPS rules read it)."""

    features: list = field(default_factory=list)
    sink_column: bool = False  # the normaliser ran over one more column (the sinks)


def heads_merge(node: fx.Node) -> bool:
    """``p.view(B*H, S, S)`` of ``(B, H, S, S)`` probabilities (BLOOM: the heads folded into the
    batch again for ``bmm`` with ``(B*H, S, D)`` values)."""
    if op_name(node) not in ("view", "reshape") or not node.args or not isinstance(node.args[0], fx.Node):
        return False
    a, x = shape_of(node.args[0]), shape_of(node)
    return bool(a) and bool(x) and len(a) == 4 and len(x) == 3 and tuple(a[2:]) == tuple(x[1:]) \
        and all(isinstance(d, int) for d in (a[0], a[1], x[0])) and x[0] == a[0] * a[1]


def drops_last_column(node: fx.Node) -> bool:
    """``p[..., :-1]`` (or ``p[:, :, :, :-1]``): the probabilities without the sink column."""
    if op_name(node) != "getitem" or len(node.args) < 2 or not isinstance(node.args[1], tuple):
        return False
    index, shape = node.args[1], shape_of(node.args[0])
    last = slice(None, -1, None)
    return index == (Ellipsis, last) or (shape is not None and index == (slice(None),) * (len(shape) - 1) + (last,))


def _reads_first(user: fx.Node, probs: fx.Node) -> bool:
    return bool(user.args) and user.args[0] is probs


def _prob_cast(user: fx.Node, probs: fx.Node, walk: ProbWalk):
    # softmax(..., dtype=torch.float32).to(q.dtype) (LLaMA), .type_as(scores) (T5)
    return ProbStep() if _reads_first(user, probs) else None


def _prob_heads_merge(user: fx.Node, probs: fx.Node, walk: ProbWalk):
    return ProbStep("merge-heads") if heads_merge(user) and _reads_first(user, probs) else None


def _drop_sink(user: fx.Node, probs: fx.Node, walk: ProbWalk):
    if walk.sink_column and "drop-sink" not in walk.features and drops_last_column(user) \
            and _reads_first(user, probs):
        return ProbStep("drop-sink")
    return None


def _dropout(user: fx.Node, probs: fx.Node, walk: ProbWalk):
    if not _reads_first(user, probs):
        return None
    p, training = arg(user, 1, "p", 0.5), arg(user, 2, "training", True)
    if training is False or p == 0:
        return ProbStep("dropout")
    if isinstance(p, fx.Node) or isinstance(training, fx.Node):
        return ProbStep("dropout", "dropout with a non-constant p or training flag")
    if p > 0 and training:
        return ProbStep("dropout", "dropout active in training (p > 0): the ring op has no dropout")
    return ProbStep("dropout")


# match(user, probs, walk: ProbWalk) -> ProbStep when ``user`` carries the probabilities on
# towards ``@ v``, else None. A feature of ONCE_FEATURES seen twice ends the walk (not attention).
PROB_STEPS: list[Rule] = [
    Rule("probs-cast", CASTS | SHAPE_ONLY, _prob_cast, "softmax(s, dtype=torch.float32).to(q.dtype) (LLaMA)"),
    Rule("heads-merge", frozenset({"view", "reshape"}), _prob_heads_merge,
         "BLOOM: (B, H, S, S) probabilities viewed as (B*H, S, S) for bmm with v"),
    Rule("drop-sink", frozenset({"getitem"}), _drop_sink, "p[..., :-1] (GPT-OSS: the sink column dropped)"),
    Rule("dropout", frozenset({"dropout"}), _dropout, "F.dropout(p, attention_dropout, training) (HF eager)"),
]
ONCE_FEATURES = frozenset({"merge-heads"})


# ------------------------------------------------------------------ QK_PRODUCTS

def einsum_operands(node: fx.Node) -> tuple[str, list]:
    eq = node.args[0] if node.args else node.kwargs.get("equation")
    ops = list(node.args[1:])
    if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
        ops = list(ops[0])
    return (eq.replace(" ", "") if isinstance(eq, str) else ""), ops


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


def unflatten_heads(node: fx.Node, b, h) -> Optional[fx.Node]:
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


def _mark_qk_scale(site: AttentionSite, factors: list) -> None:
    if factors:
        site.pattern = site.pattern.replace("/", "/scale(q,k)/", 1)
    absorb_scale(site, factors)


def _q_times_kt(site: AttentionSite, a, bt, split: Optional[fx.Node]) -> tuple[str, int]:
    """q and k from the operands of ``a @ bt`` (bt = kᵀ, or k when it is not transposed)."""
    if not isinstance(a, fx.Node) or not isinstance(bt, fx.Node):
        return "scores operands are not tensors", 0
    q, fq = strip_scale(a)
    kt, fk = strip_scale(bt)
    swapped = op_name(kt) in ("transpose", "permute") and _swaps_last_two(kt)
    if swapped:
        k, fk2 = strip_scale(kt.args[0])
    else:
        k, fk2 = kt, []
        if len(shape_of(kt) or ()) < 3:
            return "scores operand has fewer than 3 dims", 0
    if split is not None:
        b, h = shape_of(split)[:2]
        q4, k4 = unflatten_heads(q, b, h), unflatten_heads(k, b, h)
        if q4 is None or k4 is None:
            return "the scores are viewed as (B, H, S, S) but q and k are not (B, H, S, D) tensors with the " \
                   "heads folded into the batch", 0
        q, k = q4, k4
    nd = len(shape_of(q) or ())
    k_op = Operand(k) if swapped else Operand(k, permute=tuple(range(nd - 2)) + (nd - 1, nd - 2))
    _mark_qk_scale(site, fq + fk + fk2)
    if nd not in (3, 4):
        return f"scores are {nd}-D; expected (B, H, S, S) or (B*H, S, S)", nd
    site.q, site.k = Operand(q, None, nd == 3), k_op
    site.k.unsqueeze0 = nd == 3
    return "", nd


def _matmul_qk(scores: fx.Node, site: AttentionSite, split: Optional[fx.Node]):
    return _q_times_kt(site, scores.args[0], scores.args[1], split)


def _baddbmm_qk(scores: fx.Node, site: AttentionSite, split: Optional[fx.Node]):
    # torch.baddbmm(bias, a, b) or bias.baddbmm(batch1=a, batch2=b) (BLOOM)
    bias = scores.args[0]
    a = scores.args[1] if len(scores.args) > 1 else scores.kwargs.get("batch1")
    bt = scores.args[2] if len(scores.args) > 2 else scores.kwargs.get("batch2")
    beta, alpha = scores.kwargs.get("beta", 1), scores.kwargs.get("alpha", 1)
    if scalar(alpha) is None or scalar(beta) is None:
        return "baddbmm with non-constant alpha/beta", 0
    site.scale *= alpha
    if beta == 1 and not _is_zeros(bias):
        term = MaskTerm(bias, "additive")
        if split is not None:  # BLOOM's ALiBi (B*H, 1, S): viewed as (B, H, 1, S) by the rewrite
            bshape = shape_of(bias)
            if not bshape or len(bshape) != 3 or bshape[0] != shape_of(scores)[0]:
                return ("a baddbmm bias is added to the (B*H, S, S) scores before they are viewed as "
                        "(B, H, S, S), and it is not (B*H, S or 1, S)"), 0
            term.heads_folded = tuple(shape_of(split)[:2])
        site.terms.insert(0, term)
    elif beta not in (0, 1):
        return f"baddbmm with beta={beta} scales the bias", 0
    return _q_times_kt(site, a, bt, split)


def _einsum_qk(scores: fx.Node, site: AttentionSite, split: Optional[fx.Node]):
    if split is not None:
        return "einsum scores viewed as (B, H, S, S): not a recognised spelling", 0
    eq, ops = einsum_operands(scores)
    if "..." in eq or "->" not in eq or len(ops) != 2:
        return f"einsum {eq!r} is not a two-operand explicit equation", 0
    (x, y), z = eq.split("->")[0].split(","), eq.split("->")[1]
    contracted = [c for c in x if c in y and c not in z]
    if len(z) not in (3, 4) or len(contracted) != 1 or z[-2] not in x or z[-2] in y or z[-1] not in y or z[-1] in x:
        return f"einsum {eq!r} is not q·kᵀ with the query and key axes last", 0
    batch, d = z[:-2], contracted[0]
    if any(c not in x or c not in y for c in batch) or len(x) != len(z) or len(y) != len(z):
        return f"einsum {eq!r} has batch axes missing from an operand", 0
    q, fq = strip_scale(ops[0])
    k, fk = strip_scale(ops[1])
    _mark_qk_scale(site, fq + fk)
    perm_q = tuple(x.index(c) for c in batch + z[-2] + d)
    perm_k = tuple(y.index(c) for c in batch + z[-1] + d)
    ident = tuple(range(len(z)))
    site.q = Operand(q, None if perm_q == ident else perm_q, len(z) == 3)
    site.k = Operand(k, None if perm_k == ident else perm_k, len(z) == 3)
    return "", len(z)


# match(scores, site, split) -> (problem, nd): fills site.q and site.k (their layouts), the
# scale factors on q and k and a mask term the product adds; problem "" on success, nd the
# scores' rank. ``split``: the (B*H, S, S) -> (B, H, S, S) view the score walk went through.
QK_PRODUCTS: list[Rule] = [
    Rule("matmul-qk", frozenset({"matmul", "bmm"}), _matmul_qk,
         "q @ k.transpose(-2, -1) (Annotated Transformer, HF eager); torch.bmm on (B*H, S, D) (fairseq)"),
    Rule("baddbmm-qk", frozenset({"baddbmm"}), _baddbmm_qk,
         "alibi.baddbmm(q, kᵀ, beta=1, alpha=1/sqrt(d)) (BLOOM); zeros + beta=0 (GPT-NeoX)"),
    Rule("einsum-qk", frozenset({"einsum"}), _einsum_qk, "torch.einsum('bhqd,bhkd->bhqk', q, k) (x-transformers)"),
]


# ------------------------------------------------------------------ PV_PRODUCTS

def _matmul_pv(pv: fx.Node, site: AttentionSite, nd: int, split: Optional[fx.Node]) -> str:
    v = pv.args[1]
    merged = heads_merge(pv.args[0]) if isinstance(pv.args[0], fx.Node) else False
    if merged != (split is not None and nd == 4 and len(shape_of(v) or ()) == 3):
        return "the probabilities' heads are folded into the batch, but not as the scores' were"
    if merged:  # BLOOM: (B*H, S, S) probabilities @ (B*H, S, D) values
        b, h = shape_of(split)[:2]
        v = unflatten_heads(v, b, h)
        if v is None:
            return "v is not a (B, H, S, D) tensor with the heads folded into the batch"
        site.v, site.out_fold_heads = Operand(v), True
        return ""
    if len(shape_of(v) or ()) != nd:
        return "v has a different rank from q"
    site.v = Operand(v, None, nd == 3)
    site.out_squeeze0 = nd == 3
    return ""


def _einsum_pv(pv: fx.Node, site: AttentionSite, nd: int, split: Optional[fx.Node]) -> str:
    """``einsum(eq2, probs, v)`` where probs are ``(batch..., q, k)`` with ``nd`` dims (as
    ``q @ kᵀ`` or the scores einsum produced them): fill v and the output layout."""
    eq2, ops2 = einsum_operands(pv)
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


def _matmul_probs(node: fx.Node) -> list:
    return node.args[:1] if len(node.args) >= 2 and node.args[1] is not node.args[0] else []


# match(pv, site, nd, split) -> problem ("" on success): fills site.v and the output layout;
# carries(pv) -> [the probabilities operand] (empty when the node is not this product).
PV_PRODUCTS: list[Rule] = [
    Rule("matmul-pv", frozenset({"matmul", "bmm"}), _matmul_pv, "probs @ v (HF eager); torch.bmm (fairseq, BLOOM)",
         _matmul_probs),
    Rule("einsum-pv", frozenset({"einsum"}), _einsum_pv, "torch.einsum('bhqk,bhkd->bhqd', p, v) (x-transformers)",
         lambda node: einsum_operands(node)[1][:1]),
]


# ---------------------------------------------------------------- KV_EXPANSIONS

def _repeat_interleave(node: fx.Node) -> Optional[fx.Node]:
    x, dim = node.args[0], arg(node, 2, "dim")
    xs, ns = shape_of(x), shape_of(node)
    if isinstance(x, fx.Node) and xs and ns and len(xs) == 4 and isinstance(dim, int) \
            and normalize_dim(dim, 4) == 1 and isinstance(arg(node, 1, "repeats"), int):
        return x
    return None


def _repeat_kv(node: fx.Node) -> Optional[fx.Node]:
    if not isinstance(node.args[0], fx.Node):
        return None
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
        return x
    return None


# match(node) -> the (B, Hkv, S, D) tensor that ``node`` repeats along the heads, or None.
# The rule's name is the site's ``gqa``.
KV_EXPANSIONS: list[Rule] = [
    Rule("repeat_interleave", frozenset({"repeat_interleave"}), _repeat_interleave,
         "k.repeat_interleave(n, dim=1) (Mistral reference, many ports)"),
    Rule("repeat_kv", frozenset({"reshape", "view"}), _repeat_kv,
         "x[:, :, None].expand(B, Hkv, n, S, D).reshape(B, Hkv * n, S, D) (HF LLaMA repeat_kv)"),
]

TABLES: dict[str, list[Rule]] = {"QK_PRODUCTS": QK_PRODUCTS, "SCORE_STEPS": SCORE_STEPS, "NORMALISERS": NORMALISERS,
                                 "PROB_STEPS": PROB_STEPS, "PV_PRODUCTS": PV_PRODUCTS, "KV_EXPANSIONS": KV_EXPANSIONS}


def qk_ops() -> frozenset:
    """The op names of every QK_PRODUCTS rule."""
    return frozenset().union(*(rule.ops for rule in QK_PRODUCTS))


def rule_named(name: str) -> Rule:
    """The rule of that name, in whichever table (names are unique across the tables)."""
    found = [rule for table in TABLES.values() for rule in table if rule.name == name]
    if len(found) != 1:
        raise KeyError(f"{len(found)} rules named {name!r}")
    return found[0]
