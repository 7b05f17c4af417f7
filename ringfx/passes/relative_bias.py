"""A bias that is a function of the distance ``j - i`` only (T5's bucketed relative-position
bias, learned): the proof (analysis) and the O(S) table the ring op takes (transformation).

The model builds an (S, S) bias from the distances of two aranges and a chain of ops applied
to each distance on its own::

    d = arange(S)[None, :] - arange(S)[:, None]           # the distance node: j - i
    b = bucket(d)                                         # pointwise ops (abs, log, where, min, ...)
    bias = embedding(b, w).permute([2, 0, 1]).unsqueeze(0)   # (1, H, S, S): w learned
    s = q @ kᵀ + bias

``relative_bias_of`` proves that the bias at (h, i, j) depends on i and j only through
``j - i``: every node between the distance node and the bias is elementwise along the query
and key axes (pointwise ops, casts, ``embedding`` on the indices, permutes, unsqueezes,
whole slices, expands), and whatever else enters it (``w``, numbers, ``full_like``) is
constant along those axes and made from no per-call input. It records the chain.
``relative_table`` then runs that same chain on the distance node of one query row at
position ``R - 1`` against keys ``0 .. 2R - 2``, i.e. on the 1-D distances ``arange(1 - R,
R)``::

    d' = arange(2R - 1).view(1, 2R - 1) - (R - 1)         # (1, 2R - 1): j - i for one query row
    table = embedding(bucket(d'), w).permute([2, 0, 1]).unsqueeze(0)[0, :, 0, :]   # (H, 2R - 1)

which is the ring op's ``rel_bias``: ``table[h, j - i + R - 1]`` is the model's bias at
(h, i, j), for every R (the model's own ops, evaluated at other distances). ``w`` stays a
node of the graph, so the table's gradient (the op's) reaches it through ordinary autograd.
Anything else is not proven and stays what it was (a learned dense bias, left alone).
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Optional, Union

import torch
import torch.fx as fx
import torch.nn.functional as F

from .node_facts import VALUE_KEY, CASTS, SHAPE_ONLY, is_model_state, op_name, shape_of, value_of, whole_slice

# ops applied to each element on its own (with broadcasting); their tensor operands that do
# not come from the distances must be constant along the query and key axes
_ELEMENTWISE = frozenset({
    "add", "sub", "mul", "div", "neg", "pow", "exp", "log", "log2", "log10", "log1p", "sqrt", "rsqrt", "abs",
    "clamp", "clip", "clamp_min", "clamp_max", "where", "masked_fill", "logical_not", "logical_and", "logical_or",
    "logical_xor", "eq", "ne", "lt", "le", "gt", "ge", "reciprocal", "square", "floor", "ceil", "round", "trunc",
    "sign", "maximum", "minimum", "remainder", "fmod", "floordiv", "truediv", "floor_divide", "mod", "and_", "or_",
    "xor", "bitwise_and", "bitwise_or", "bitwise_not", "tanh", "sigmoid", "relu", "erf", "exp2", "expm1",
    "true_divide", "long", "int", "bool", "detach", "lshift", "rshift", "min", "max",
})
_IN_PLACE = {"iadd": operator.add, "isub": operator.sub, "imul": operator.mul, "itruediv": operator.truediv,
             "ifloordiv": operator.floordiv}
_IN_PLACE_METHODS = {"add_": "add", "sub_": "sub", "mul_": "mul", "div_": "div", "clamp_": "clamp",
                     "masked_fill_": "masked_fill", "abs_": "abs", "neg_": "neg"}
_CONSTANT_LIKE = frozenset({"zeros_like", "ones_like", "full_like"})
_I, _J, _C, _V = "i", "j", "c", "v"  # query axis, key axis, constant along it, varies (heads)


@dataclasses.dataclass
class RelativeBias:
    """A mask term proven to be ``f(j - i)`` per head (see the module docstring)."""

    node: fx.Node  # the bias as the scores take it: (..., H or 1, S, S)
    distances: dict  # distance node -> (sign, offset): d = sign * (j - i) + offset
    chain: list  # nodes from the distances (exclusive) to ``node`` (inclusive), in graph order
    labels: dict  # node -> per-dim labels (_I, _J, _C, _V) of the distances and the chain
    heads: int  # the size of the bias's head axis (1: one bias for every head)


def relative_bias_of(node: fx.Node, n: int) -> Union[RelativeBias, str]:
    """The proof that the additive mask ``node`` of a site with ``n`` tokens is a function of
    the distance ``j - i`` per head, or the reason it is not proven."""
    shape = shape_of(node)
    if shape is None or len(shape) < 2 or not all(isinstance(x, int) for x in shape):
        return f"mask {node.name} has no static shape (a relative bias needs a static sequence length)"
    if tuple(shape[-2:]) != (n, n):
        return f"mask {node.name} of shape {tuple(shape)} is not (..., {n}, {n})"
    ancestors = _ancestors(node)
    distances = {}
    for a in ancestors:
        d = _distance(a, n)
        if d is not None:
            distances[a] = d
    if not distances:
        return f"mask {node.name} is not made from the distances of two aranges (k_pos[None, :] - q_pos[:, None])"
    labels = {d: (_C,) * (len(shape_of(d)) - 2) + (_I, _J) for d in distances}
    derived = set(distances)
    chain = []
    for a in ancestors:  # graph order
        if a in derived or not any(x in derived for x in a.all_input_nodes):
            continue
        derived.add(a)
        chain.append(a)
        why = _label(a, labels, derived)
        if why:
            return f"mask {node.name}: {why}"
    if node not in derived:
        return f"mask {node.name} does not depend on the distances it is made from"
    for a in ancestors:
        if a not in derived and not _position_free(a):
            return f"mask {node.name} depends on per-call input {a.name} besides the distances j - i"
    out = labels[node]
    if out[-2:] != (_I, _J) or any(x != _C for x in out[:-3]) or (len(out) > 2 and out[-3] not in (_C, _V)):
        return f"mask {node.name} varies along other axes than the heads (axes {out})"
    heads = shape[-3] if len(shape) > 2 else 1  # (size H and constant along it: expanded; the same)
    return RelativeBias(node, distances, chain, labels, heads)


def relative_table(graph: fx.Graph, rb: RelativeBias, total: int, heads: int) -> fx.Node:
    """Insert (at the graph's insertion point) the ring op's table ``(heads, 2 * total - 1)``:
    ``rb``'s chain run on the distances ``arange(1 - total, total)``."""
    width = 2 * total - 1
    env: dict = {}
    for d, (sign, offset) in rb.distances.items():
        value = value_of(d)
        rank = len(shape_of(d))
        # column t holds distance t - (total - 1); the model's node holds sign * (j - i) + offset
        # the device of the model's own distances at run time: a recorded value may be a meta
        # tensor (the values passes record for the nodes they insert)
        device = _call(graph, getattr, (d, "device"))
        cols = _call(graph, torch.arange, (width,), {"dtype": value.dtype, "device": device})
        if sign < 0:
            cols = _call(graph, operator.neg, (cols,))
        start = offset - sign * (total - 1)
        if start:
            cols = _call(graph, operator.add, (cols, start))
        env[d] = _call(graph, torch.reshape, (cols, (1,) * (rank - 1) + (width,)))
    for node in rb.chain:
        env[node] = _copy(graph, node, env, rb.labels)
    out = env[rb.node]
    rank = len(shape_of(rb.node))
    index = (0,) * (rank - 3) + ((slice(None),) if rank > 2 else (None,)) + (0, slice(None))
    table = _call(graph, operator.getitem, (out, index))  # (heads or 1, width)
    if rb.heads != heads:
        table = _call(graph, torch.Tensor.expand, (table, heads, width))
    return table


# ---------------------------------------------------------------------------------- the proof

def _ancestors(node: fx.Node) -> list:
    seen, todo = set(), [node]
    while todo:
        x = todo.pop()
        if x not in seen:
            seen.add(x)
            todo.extend(x.all_input_nodes)
    order = {x: i for i, x in enumerate(node.graph.nodes)}
    return sorted(seen, key=order.__getitem__)


def _distance(node: fx.Node, n: int) -> Optional[tuple[int, int]]:
    """``(sign, offset)`` when ``node`` is ``k_pos - q_pos`` of (n, n) (leading dims 1) with
    the positions of two ``arange``s along the key (last) and query (second to last) axes:
    ``sign * (j - i) + offset``."""
    if op_name(node) != "sub" or len(node.args) != 2 or node.kwargs.get("alpha", 1) != 1:
        return None
    shape = shape_of(node)
    if shape is None or len(shape) < 2 or tuple(shape[-2:]) != (n, n) or any(x != 1 for x in shape[:-2]):
        return None
    a, b = (_positions(x, n) for x in node.args)
    if a is None or b is None:
        return None
    (sa, oa, axa), (sb, ob, axb) = a, b
    if sa != sb:
        return None
    if (axa, axb) == (-1, -2):  # (s j + oa) - (s i + ob)
        return sa, oa - ob
    if (axa, axb) == (-2, -1):  # (s i + oa) - (s j + ob)
        return -sa, oa - ob
    return None


def _positions(node, n: int) -> Optional[tuple[int, int, int]]:
    """``(sign, offset, axis)`` when ``node`` holds ``sign * arange(n) + offset`` along its
    axis ``axis`` (counted from the end), every other axis of size 1."""
    if not isinstance(node, fx.Node):
        return None
    name = op_name(node)
    if name == "arange":
        start, end, step = _arange_args(node)
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in (start, end, step)) or step != 1 \
                or end - start != n:
            return None
        return 1, start, -1
    shape = shape_of(node)
    if shape is None or sorted(x for x in shape if x != 1) != ([n] if n != 1 else []):
        return None
    args = node.args
    if name in ("getitem", "unsqueeze", "view", "reshape", "contiguous") or (
            name in CASTS and not _float_cast(node)) or name in ("long", "int"):
        inner = _positions(args[0], n) if args else None
        if inner is None or (name == "getitem" and not _plain_index(args[1])):
            return None
        axis = next(k for k in range(len(shape)) if shape[k] == n) - len(shape) if n != 1 else -1
        return inner[0], inner[1], axis
    if name in ("add", "sub") and len(args) == 2 and node.kwargs.get("alpha", 1) == 1:
        x, c = args
        if isinstance(x, fx.Node) and _int(c):
            inner = _positions(x, n)
            return None if inner is None else (inner[0], inner[1] + (c if name == "add" else -c), inner[2])
        if isinstance(c, fx.Node) and _int(x):
            inner = _positions(c, n)
            if inner is None:
                return None
            return (inner[0], inner[1] + x, inner[2]) if name == "add" else (-inner[0], x - inner[1], inner[2])
    return None


def _arange_args(node: fx.Node):
    args, kw = list(node.args), node.kwargs
    if "end" in kw:
        return (args[0] if args else kw.get("start", 0)), kw["end"], kw.get("step", 1)
    if len(args) == 1:
        return 0, args[0], kw.get("step", 1)
    if len(args) >= 2:
        return args[0], args[1], args[2] if len(args) > 2 else kw.get("step", 1)
    return None, None, None


def _int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _float_cast(node: fx.Node) -> bool:
    dtype = getattr(value_of(node), "dtype", None)
    return dtype is None or dtype.is_floating_point or dtype.is_complex


def _plain_index(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return all(it is None or it is Ellipsis or (isinstance(it, slice) and it == slice(None)) for it in items)


def _label(node: fx.Node, labels: dict, derived: set) -> Optional[str]:
    """Set ``labels[node]`` from its operands', or say why ``node`` is not elementwise along
    the query and key axes."""
    name = op_name(node)
    shape = shape_of(node)
    if shape is None:
        return f"{node.name} has no recorded shape"
    args = node.args
    inputs = [a for a in node.all_input_nodes if a in derived]
    if name in _IN_PLACE or name in _IN_PLACE_METHODS:
        target = args[0]
        if target not in derived or len(target.users) != 1:
            return f"in-place {name} at {node.name} writes into a tensor read elsewhere"
        name = _IN_PLACE_METHODS.get(name, "add")
    if name in _CONSTANT_LIKE:
        labels[node] = (_C,) * len(shape)
        return None
    if name in _ELEMENTWISE or name in CASTS or name in SHAPE_ONLY:
        if name in ("min", "max") and (len(args) != 2 or not isinstance(args[1], fx.Node) or node.kwargs):
            return f"{name} at {node.name} reduces over an axis"
        merged = [_C] * len(shape)
        operands = []
        fx.node.map_arg((args, node.kwargs), operands.append)
        for a in operands:
            lab = labels[a] if a in derived else _constant_labels(a)
            if lab is None:
                return f"{a.name} (an operand of {node.name}) has no recorded shape"
            for k in range(1, len(lab) + 1):
                if k > len(merged):
                    return f"{node.name} broadcasts to fewer axes than its operand {a.name}"
                merged[-k] = _merge(merged[-k], lab[-k])
                if merged[-k] is None:
                    return f"{node.name} combines the query or key axis with values that vary along it"
        labels[node] = tuple(merged)
        return None
    src = labels.get(args[0]) if args and isinstance(args[0], fx.Node) else None
    if name == "embedding":
        idx, weight = _embedding_operands(node)
        if idx not in derived or weight is None or weight in derived or _embedding_renorms(node):
            return f"embedding at {node.name} is not a lookup of the distances in a constant table"
        wshape = shape_of(weight)
        labels[node] = labels[idx] + ((_V if wshape[-1] != 1 else _C),)
        return None
    if src is None or len(inputs) != 1 or inputs[0] is not args[0]:
        return f"{name} at {node.name} is not elementwise along the query and key axes"
    if name == "permute":
        dims = args[1] if len(args) == 2 and isinstance(args[1], (tuple, list)) else args[1:]
        labels[node] = tuple(src[d] for d in dims)
    elif name == "transpose":
        a, b = (d % len(src) for d in args[1:3])
        lab = list(src)
        lab[a], lab[b] = lab[b], lab[a]
        labels[node] = tuple(lab)
    elif name == "unsqueeze":
        d = args[1] % (len(src) + 1)
        labels[node] = src[:d] + (_C,) + src[d:]
    elif name == "squeeze" and len(args) == 2 and isinstance(args[1], int):
        d = args[1] % len(src)
        if src[d] in (_I, _J):
            return f"squeeze at {node.name} drops the query or key axis"
        labels[node] = src[:d] + src[d + 1:] if shape_of(args[0])[d] == 1 else src
    elif name == "getitem":
        lab = _index_labels(src, args[1], shape_of(args[0]))
        if lab is None:
            return f"index at {node.name} selects part of the query or key axis"
        labels[node] = lab
    elif name == "expand":
        sizes = args[1] if len(args) == 2 and isinstance(args[1], (tuple, list)) else args[1:]
        in_shape = shape_of(args[0])
        lead = len(sizes) - len(src)
        lab = [_C] * lead
        for k, s in enumerate(src):
            lab.append(s if in_shape[k] != 1 else _C)
        labels[node] = tuple(lab)
    else:
        return f"{name} at {node.name} is not elementwise along the query and key axes"
    return None


def _merge(a, b):
    if a == b or b == _C:
        return a
    if a == _C:
        return b
    if {a, b} == {_V, _V}:
        return _V
    return None  # i with j, or a query/key axis with values that vary along it


def _constant_labels(node: fx.Node):
    shape = shape_of(node)
    if shape is None:
        return () if isinstance(value_of(node), (int, float, bool)) else None
    return tuple(_C if x == 1 else _V for x in shape)


def _embedding_operands(node: fx.Node):
    if node.target is F.embedding:
        idx = node.args[0] if node.args else node.kwargs.get("input")
        weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
    else:  # torch.embedding / aten.embedding: (weight, indices)
        weight = node.args[0] if node.args else node.kwargs.get("weight")
        idx = node.args[1] if len(node.args) > 1 else node.kwargs.get("indices")
    return idx, weight if isinstance(weight, fx.Node) else None


def _embedding_renorms(node: fx.Node) -> bool:
    """F.embedding's max_norm renormalises the weight in place."""
    if node.target is not F.embedding:
        return False
    max_norm = node.args[3] if len(node.args) > 3 else node.kwargs.get("max_norm")
    return max_norm is not None


def _index_labels(src: tuple, index, in_shape) -> Optional[tuple]:
    items = index if isinstance(index, tuple) else (index,)
    out, k = [], 0
    for pos, it in enumerate(items):
        if it is None:
            out.append(_C)
        elif it is Ellipsis:
            rest = sum(1 for x in items[pos + 1:] if x is not None)
            skip = len(src) - k - rest
            out.extend(src[k:k + skip])
            k += skip
        elif isinstance(it, slice):
            if src[k] in (_I, _J) and not whole_slice(it, in_shape[k]):
                return None
            out.append(src[k])
            k += 1
        elif _int(it) and src[k] not in (_I, _J):
            k += 1
        else:
            return None
    return tuple(out) + src[k:]


def _position_free(node: fx.Node) -> bool:
    """Made from parameters, buffers, sizes and constants only (no per-call input)."""
    if node.op == "placeholder":
        value = value_of(node)
        return is_model_state(node) or isinstance(value, (int, torch.SymInt))
    return True  # an op: its own inputs are checked as ancestors of the bias


# ----------------------------------------------------------------------------- the table

def _call(graph: fx.Graph, target, args, kwargs=None) -> fx.Node:
    node = graph.call_function(target, tuple(args), kwargs or {})
    node.meta[VALUE_KEY] = _meta(node)
    return node


def _meta(node: fx.Node):
    """The node's value on the meta device (shapes and dtypes for the passes after this one)."""
    def fake(x):
        if isinstance(x, fx.Node):
            v = value_of(x)
            if isinstance(v, torch.Tensor):
                return torch.empty(v.shape, dtype=v.dtype, device="meta")
            return v
        return torch.device("meta") if isinstance(x, torch.device) else x
    args, kwargs = fx.node.map_aggregate((node.args, node.kwargs), fake)
    if "device" in kwargs:
        kwargs = {**kwargs, "device": "meta"}
    target = node.target
    if isinstance(target, str):  # a method
        return getattr(args[0], target)(*args[1:], **kwargs)
    return target(*args, **kwargs)


def _copy(graph: fx.Graph, node: fx.Node, env: dict, labels: dict) -> fx.Node:
    """``node`` on the copies of its chain operands: sizes of the query and key axes become
    free (``-1`` / whole slices), in-place ops functional."""
    args = fx.node.map_arg(node.args, lambda a: env.get(a, a))
    kwargs = fx.node.map_arg(node.kwargs, lambda a: env.get(a, a))
    name = op_name(node)
    target, op = node.target, node.op
    if name in _IN_PLACE:
        target, op = _IN_PLACE[name], "call_function"
    elif op == "call_method" and target in _IN_PLACE_METHODS:
        target = _IN_PLACE_METHODS[target]
    if name == "expand":
        sizes = list(args[1] if len(args) == 2 and isinstance(args[1], (tuple, list)) else args[1:])
        lab = labels[node]
        sizes = [-1 if lab[k] in (_I, _J) else s for k, s in enumerate(sizes)]
        args = (args[0], *sizes)
    elif name == "getitem":
        args = (args[0], _free_index(args[1], labels[node.args[0]]))
    new = graph.create_node(op, target, tuple(args), dict(kwargs))
    new.meta[VALUE_KEY] = _meta(new)
    labels[new] = labels[node]
    return new


def _free_index(index, src: tuple):
    items = index if isinstance(index, tuple) else (index,)
    out, k = [], 0
    for pos, it in enumerate(items):
        if it is None:
            out.append(it)
        elif it is Ellipsis:
            rest = sum(1 for x in items[pos + 1:] if x is not None)
            k += len(src) - k - rest
            out.append(it)
        else:
            out.append(slice(None) if isinstance(it, slice) and src[k] in (_I, _J) else it)
            k += 1
    return tuple(out) if isinstance(index, tuple) else out[0]
