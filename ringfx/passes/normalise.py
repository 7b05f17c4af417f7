"""Normalise a captured graph before attention is matched, so that the spellings of
``spellings.py`` only ever see functional ops and every use of a value is a real one.

``normalise_pass`` (the pipeline's first pass) does two things:

* **in-place arithmetic on the score path becomes functional** when that cannot change
  any value the graph computes::

      s = q @ k.transpose(-2, -1)             s = q @ k.transpose(-2, -1)
      s /= math.sqrt(d)          # itruediv   s2 = s / math.sqrt(d)    # truediv
      s.masked_fill_(...)                 ->  (a fill in place stays: not arithmetic)
      p = s.softmax(-1)                       p = s2.softmax(-1)        # later readers read s2

  (Falcon: ``scores /= math.sqrt(d)``; ``scores.div_(c)``; T5: ``scores += position_bias``);
* **dead code goes**: pure ops whose value nothing reads, which would otherwise count as a
  second use of the scores (``saved = s.clone()`` kept only for optional intermediates).
"""

from __future__ import annotations

import logging
import operator

import torch.fx as fx

from .node_facts import CASTS, SHAPE_ONLY, dtype_of, op_name
from .sites import PassReport
from .spellings import dtype_only_use, reaches_scores

log = logging.getLogger("ringfx.passes")

# In-place arithmetic and its functional form (``x += y`` is ``operator.iadd``; ``x.add_(y)``
# a method call).
_FUNCTIONAL = {operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
               operator.itruediv: operator.truediv}
_FUNCTIONAL_METHODS = {"add_": "add", "sub_": "sub", "mul_": "mul", "div_": "div"}

# Ops whose result is a tensor of its own (never a view of, or the same tensor as, an input).
_FRESH = frozenset({"matmul", "bmm", "baddbmm", "einsum", "add", "sub", "mul", "div", "neg", "tanh", "exp",
                    "masked_fill", "where", "softmax", "cat", "clone"})
# Ops whose result may be a view of its input (or the input itself): the write may go through.
_VIEWS = CASTS | frozenset({"contiguous", "view", "reshape", "transpose", "permute", "getitem", "unsqueeze",
                            "squeeze", "expand", "flatten", "unflatten", "detach"})
# What may read x before the write without keeping a view of it.
_READS_ONLY = _FRESH | frozenset({"size", "sym_size", "dim", "numel", "amax", "max", "sum", "mean"})

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


def normalise_pass(gm: fx.GraphModule, *, options=None) -> tuple[fx.GraphModule, PassReport]:
    """Make in-place arithmetic on the score path functional, then erase pure ops whose
    value nothing reads, so that they do not count as uses::

        s = q @ k.transpose(-2, -1) / 8.0          s = q @ k.transpose(-2, -1) / 8.0
        saved = s.clone()             # unused  ->  (gone)
        p = s.softmax(-1)                          p = s.softmax(-1)

    Only ops of ``_DEAD_IF_UNUSED`` (pure by construction) are erased; in-place ops,
    random ops, collectives and calls of unknown effect stay."""
    report = PassReport("remove_dead_code")
    made_functional = _make_functional(gm.graph)
    erased = 0
    for node in reversed(list(gm.graph.nodes)):
        if node.op in ("call_function", "call_method") and not node.users and op_name(node) in _DEAD_IF_UNUSED \
                and not node.is_impure():
            gm.graph.erase_node(node)
            erased += 1
    if erased or made_functional:
        gm.graph.lint()
        gm.recompile()
    log.info("remove_dead_code: erased %d unused node(s), made %d in-place op(s) on the scores functional",
             erased, made_functional)
    return gm, report


def _functional_target(node: fx.Node):
    if node.op == "call_function":
        return _FUNCTIONAL.get(node.target)
    if node.op == "call_method":
        return _FUNCTIONAL_METHODS.get(node.target)
    return None


def _make_functional(graph: fx.Graph) -> int:
    """``x op= y`` -> ``x2 = x op y``, the readers of x after it reading x2, where x is on the
    score path and nothing else can see the write (``_write_is_private``)."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    count = 0
    for node in list(graph.nodes):
        target = _functional_target(node)
        if target is None or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        x = node.args[0]
        if not reaches_scores(x) or not _write_is_private(x, node, order) or not _keeps_dtype(node):
            continue
        for reader in [u for u in x.users if u is not node and order[u] > order[node]]:
            reader.replace_input_with(x, node)
        node.target = target
        count += 1
    return count


def _write_is_private(x: fx.Node, node: fx.Node, order: dict) -> bool:
    """Writing into ``x`` in place (at ``node``) is seen by no value but x's own readers after
    it: x's storage is its own (a fresh result, or a view of one that nothing else reads),
    and what read x before the write kept no view of it."""
    for reader in x.users:
        if order[reader] < order[node] and op_name(reader) not in _READS_ONLY and not dtype_only_use(reader, x):
            return False
    for _ in range(16):
        if op_name(x) in _FRESH:
            return True
        if op_name(x) not in _VIEWS or not x.args or not isinstance(x.args[0], fx.Node):
            return False
        src = x.args[0]
        if [u for u in src.users if not dtype_only_use(u, src)] != [x]:
            return False
        x = src
    return False


def _keeps_dtype(node: fx.Node) -> bool:
    """The functional op computes in the dtype the in-place one writes (its operand is a
    number or a tensor of x's dtype: no promotion)."""
    other = node.args[1] if len(node.args) > 1 else None
    other_dtype = dtype_of(other) if isinstance(other, fx.Node) else None
    return other_dtype is None or other_dtype == dtype_of(node.args[0])
