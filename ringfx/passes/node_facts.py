"""Small read-only questions about FX nodes, shared by the attention passes.

The passes see graphs from several tracers: dynamo (torch-level calls, values in
``meta["example_value"]``), ``torch.fx.symbolic_trace`` after shape propagation
(``meta["tensor_meta"]``) and export / make_fx (``meta["val"]``). Everything here smooths
those differences over: ``op_name`` maps ``operator.matmul``, ``torch.matmul`` and
``Tensor.matmul`` all to ``"matmul"``, ``shape_of`` reads whichever meta is present.
"""

from __future__ import annotations

import os

import operator
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F

from .._compat import SDPA_BINDING, HigherOrderOperator, OpOverload, dynamo_input_example, dynamo_input_source

# Every spelling of an op that the matcher cares about, by canonical name.
_FUNCTIONS: dict[Any, str] = {
    operator.matmul: "matmul", torch.matmul: "matmul", torch.bmm: "bmm",
    torch.einsum: "einsum", torch.functional.einsum: "einsum", torch.baddbmm: "baddbmm",
    torch.softmax: "softmax", F.softmax: "softmax", torch.special.softmax: "softmax",
    F.dropout: "dropout", torch.dropout: "dropout",
    operator.truediv: "div", torch.div: "div", torch.true_divide: "div",
    operator.mul: "mul", torch.mul: "mul", operator.add: "add", torch.add: "add",
    operator.sub: "sub", torch.sub: "sub", operator.neg: "neg",
    operator.invert: "logical_not", torch.logical_not: "logical_not",
    operator.and_: "logical_and", torch.logical_and: "logical_and",
    operator.eq: "eq", torch.eq: "eq", operator.ne: "ne", torch.ne: "ne",
    torch.where: "where", torch.masked_fill: "masked_fill",
    torch.transpose: "transpose", torch.permute: "permute", torch.swapaxes: "transpose",
    torch.repeat_interleave: "repeat_interleave", torch.reshape: "reshape",
    torch.unsqueeze: "unsqueeze", operator.getitem: "getitem", torch.full: "full",
    SDPA_BINDING: "sdpa",
    F.scaled_dot_product_attention: "sdpa",
}
_ATEN = {
    "mm": "matmul", "bmm": "bmm", "_softmax": "softmax", "_safe_softmax": "softmax",
    "scaled_dot_product_attention": "sdpa",
}
_METHOD_ALIASES = {
    "__matmul__": "matmul", "__truediv__": "div", "__mul__": "mul", "__add__": "add",
    "__getitem__": "getitem", "swapaxes": "transpose", "swapdims": "transpose",
    "__and__": "logical_and", "__invert__": "logical_not", "__eq__": "eq", "__ne__": "ne",
}
# Pure dtype conversions: softmax upcast to float32 and the cast back.
CASTS = frozenset({"float", "to", "type_as", "half", "bfloat16", "double", "type"})
# Ops that move no data across the sequence and keep values: the walk steps over them.
SHAPE_ONLY = frozenset({"contiguous", "clone"})
# The sequence analyses' one op table (the sharding walk forwards, ``sequence_axis.follow_axis``
# backwards): ops applied to each element on its own, with broadcasting, so every axis of the
# output is the same axis of each operand that has it (aligned from the right).
POINTWISE = frozenset({
    "add", "sub", "mul", "div", "neg", "pow", "exp", "log", "sqrt", "rsqrt", "sin", "cos", "tanh", "sigmoid",
    "silu", "gelu", "relu", "softplus", "abs", "clamp", "clip", "where", "masked_fill", "dropout", "detach",
    "logical_not", "logical_and", "logical_or", "logical_xor", "eq", "ne", "lt", "le", "gt", "ge", "reciprocal",
    "square", "erf", "floor", "ceil", "round", "sign", "maximum", "minimum", "expand_as", "long", "int", "bool",
    "remainder", "fmod", "exp2", "log1p", "expm1", "leaky_relu", "mish", "hardswish", "hardsigmoid", "elu",
    "selu", "zeros_like", "ones_like", "full_like", "empty_like", "nan_to_num", "lerp", "addcmul", "addcdiv",
    "floordiv", "truediv", "floor_divide", "mod", "pos", "invert", "and_", "or_", "xor", "bitwise_and",
    "bitwise_or", "bitwise_not", "isnan", "isinf", "isfinite", "tril_", "sigmoid_", "gelu_", "relu_", "tanh_",
    "masked_fill_", "add_", "sub_", "mul_", "div_", "clamp_", "clamp_min", "clamp_max", "logsigmoid",
    "softsign", "relu6", "hardtanh", "silu_", "celu", "glu_", "alpha_dropout", "feature_alpha_dropout",
    "dropout1d", "dropout2d", "threshold", "cos_", "sin_", "float_power", "true_divide", "mul_", "abs_",
    "log_sigmoid", "erfinv", "sinh", "cosh", "asin", "acos", "atan", "atan2", "_set_grad_enabled",
    "scaled_dot_product_attention_math_helper", "fill_", "zero_", "copy_", "type_as", "clone", "contiguous",
    "iadd", "isub", "imul", "itruediv", "polar", "conj", "angle",
})
# Reshapes: an output axis lies within one input axis or merges several.
RESHAPES = frozenset({"view", "reshape", "flatten", "unflatten"})


def op_name(node: Any) -> Optional[str]:
    """The canonical name of what a node computes, or None for placeholders and outputs."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_method":
        return _METHOD_ALIASES.get(node.target, node.target)
    if node.op != "call_function":
        return None
    name = _FUNCTIONS.get(node.target)
    if name is not None:
        return name
    if isinstance(node.target, OpOverload):
        base = node.target.overloadpacket.__name__
        return _ATEN.get(base, base)
    return getattr(node.target, "__name__", None)


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Argument ``index`` (positional) or ``name`` (keyword) of a call node."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


# Where passes record the value (a meta tensor) of the nodes they insert; not "val" or
# "example_value", which later compilers may read as fake tensors of their own mode.
VALUE_KEY = "ringfx_value"


def value_of(node: Any) -> Any:
    """The example value recorded on a node by its tracer (a fake or real tensor, a
    ``TensorMetadata``, a SymInt...), or None."""
    if not isinstance(node, fx.Node):
        return None
    for key in (VALUE_KEY, "val", "example_value", "tensor_meta"):
        if key in node.meta:
            return node.meta[key]
    return None


def shape_of(node: Any) -> Optional[tuple]:
    v = value_of(node)
    shape = getattr(v, "shape", None)
    return None if shape is None else tuple(shape)


def dtype_of(node: Any) -> Optional[torch.dtype]:
    return getattr(value_of(node), "dtype", None)


def scalar(x: Any) -> Optional[float]:
    """A Python number argument (not a tensor, not a node), as float; else None."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x)


_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep


def _user_frames(node) -> list[tuple[str, int, str]]:
    """``(path, line, code)`` of the frames in a node's stack trace, innermost last, without
    torch's own (``F.pad`` is the user's line that called it, not torch/nn/functional.py)."""
    trace = (node.meta.get("stack_trace") or "") if isinstance(node, fx.Node) else ""
    lines = [l.strip() for l in trace.strip().splitlines() if l.strip()]
    frames = []
    for i, line in enumerate(lines):
        if line.startswith("File ") and '"' in line and "line " in line:
            try:
                path, lineno = line.split('"')[1], int(line.split("line ")[1].split(",")[0])
            except (IndexError, ValueError):
                continue
            code = lines[i + 1] if i + 1 < len(lines) and not lines[i + 1].startswith("File ") else ""
            frames.append((path, lineno, code))
    outside = [f for f in frames if not f[0].startswith(_TORCH_DIR)]
    return outside or frames


def source_line(node: fx.Node) -> str:
    """The user's source line of a node, ``file:line  code``, from its stack trace."""
    frames = _user_frames(node)
    if not frames:
        return f"<no stack trace: {node.format_node()}>"
    path, lineno, code = frames[-1]
    return f"{path.rsplit('/', 1)[-1]}:{lineno}  {code}".strip()


# On a placeholder of a subgraph called by a higher-order op (checkpointing): the node of
# the calling graph that it receives (set by the pipeline before the passes run on it).
OUTER_KEY = "ringfx_outer"


def outer_input(node: fx.Node) -> fx.Node:
    """For a placeholder of a called subgraph, the value it receives in the outermost graph
    (through nested calls); otherwise the node itself."""
    while node.op == "placeholder" and isinstance(node.meta.get(OUTER_KEY), fx.Node):
        node = node.meta[OUTER_KEY]
    return node


def source_location(node: fx.Node) -> Optional[tuple[str, int]]:
    """``(file path, line)`` of the user's code that made ``node`` (its stack trace's
    innermost frame outside torch), or None."""
    frames = _user_frames(node)
    return (frames[-1][0], frames[-1][1]) if frames else None


def placeholder_source(node: fx.Node) -> Optional[str]:
    """Dynamo's name for where a graph input came from (``L['x']``,
    ``L['self']._buffers['bias']``), or None for other tracers."""
    return dynamo_input_source(outer_input(node))


def is_model_state(node: fx.Node) -> bool:
    """True for graph inputs that are parameters or buffers, not per-call user data.

    Decided by dynamo's record of where a placeholder came from, never by its name (a user
    argument may be called anything). A placeholder without that record (a graph from
    another tracer) counts as user data: its masks are then classified by shape and never
    evaluated at other lengths as a size-built mask."""
    node = outer_input(node)
    if node.op == "get_attr":
        return True
    if node.op != "placeholder":
        return False
    src = placeholder_source(node)
    return src is not None and ("._buffers[" in src or "._parameters[" in src or src.startswith("G["))


def real_value(node: fx.Node) -> Any:
    """The concrete value behind a dynamo placeholder (a parameter, buffer or the example
    input of this compilation), or None (callers treat it as unknown)."""
    return dynamo_input_example(outer_input(node))


def normalize_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def live_nodes(graph: fx.Graph) -> set:
    """Nodes the output (or an op with side effects) depends on."""
    live, todo = set(), [n for n in graph.nodes if n.op == "output" or (n.op == "call_function" and n.is_impure())]
    while todo:
        n = todo.pop()
        if n in live:
            continue
        live.add(n)
        todo.extend(n.all_input_nodes)
    return live


def arange_length(node: fx.Node):
    """``n`` of ``arange(n)`` / ``arange(0, n)`` / ``arange(0, n, 1)``, else None."""
    if op_name(node) != "arange":
        return None
    args = list(node.args)
    start, step = 0, 1
    if "end" in node.kwargs:
        end = node.kwargs["end"]
        start = args[0] if args else node.kwargs.get("start", 0)
    elif len(args) == 1:
        end = args[0]
    elif len(args) >= 2:
        start, end = args[0], args[1]
        step = args[2] if len(args) > 2 else node.kwargs.get("step", 1)
    else:
        return None
    step = node.kwargs.get("step", step)
    if isinstance(start, fx.Node) or isinstance(step, fx.Node) or start != 0 or step != 1:
        return None
    if isinstance(end, fx.Node):  # a symbolic length: compare its value
        end = end.meta.get("val", end.meta.get("example_value"))
    return end if isinstance(end, (int, torch.SymInt)) else None


# Higher-order ops that call their first argument (a subgraph module) with the remaining
# arguments, as a function call: activation checkpointing and dynamo's plain ``wrap``.
_CALLING_HOPS = frozenset({"tag_activation_checkpoint", "wrap_activation_checkpoint", "wrap"})


def _hop_name(node: fx.Node) -> Optional[str]:
    if node.op == "call_function" and isinstance(node.target, HigherOrderOperator):
        return node.target.name()
    return None


def called_subgraph(gm: fx.GraphModule, node: fx.Node) -> Optional[tuple[str, fx.GraphModule, list]]:
    """``(attribute name, subgraph, operands)`` when ``node`` calls a subgraph of ``gm`` with
    ``operands`` as its placeholders, in order (``tag_activation_checkpoint(wrap_body_0,
    x, w)``); else None."""
    if _hop_name(node) not in _CALLING_HOPS or not node.args:
        return None
    body = node.args[0]
    if not isinstance(body, fx.Node) or body.op != "get_attr":
        return None
    sub = getattr(gm, body.target, None)
    if not isinstance(sub, fx.GraphModule):
        return None
    return body.target, sub, list(node.args[1:])


def hop_subgraphs(gm: fx.GraphModule):
    """Every subgraph module a higher-order op of ``gm`` takes, nested ones included, as
    ``(owner GraphModule, attribute name, subgraph GraphModule)``; an owner before the
    subgraphs it holds, each subgraph once."""
    seen = set()

    def walk(owner):
        for node in owner.graph.nodes:
            if _hop_name(node) is None:
                continue
            for a in _flat_nodes((node.args, node.kwargs)):
                if a.op != "get_attr":
                    continue
                sub = getattr(owner, a.target, None)
                if isinstance(sub, fx.GraphModule) and id(sub) not in seen:
                    seen.add(id(sub))
                    yield owner, a.target, sub
                    yield from walk(sub)

    yield from walk(gm)


def _flat_nodes(x) -> list:
    found = []
    fx.node.map_arg(x, found.append)
    return found


def whole_slice(it: slice, size) -> bool:
    """``it`` selects every element of an axis of ``size`` (``x[:]``, ``x[0:]``, ``x[:size]``)."""
    start_ok = it.start in (None, 0)
    stop_ok = it.stop is None or (isinstance(it.stop, int) and isinstance(size, int) and it.stop >= size)
    return start_ok and stop_ok and it.step in (None, 1)


def index_axis(axis: int, index, in_shape) -> tuple:
    """What ``x[index]`` (as dynamo records it) does to axis ``axis`` of ``x``:
    ``("axis", j)`` it becomes axis j of the result; ``("select", None)`` an int picks one
    element of it; ``("slice", None)`` a slice keeps part of it; ``("tensor", node)`` a tensor
    indexes it; ``("advanced", None)`` a tensor indexes another axis (advanced indexing moves
    axes); ``("unknown", None)``."""
    items = index if isinstance(index, tuple) else (index,)
    axis_in, axis_out, result, advanced = 0, 0, None, False
    for k, it in enumerate(items):
        if it is Ellipsis:
            rest = sum(1 for x in items[k + 1:] if x is not None)
            skip = len(in_shape) - axis_in - rest
            if axis_in <= axis < axis_in + skip:
                result = axis_out + (axis - axis_in)
            axis_in, axis_out = axis_in + skip, axis_out + skip
        elif it is None:
            axis_out += 1
        elif isinstance(it, slice):
            if axis_in == axis:
                if not whole_slice(it, in_shape[axis_in]):
                    return "slice", None
                result = axis_out
            axis_in, axis_out = axis_in + 1, axis_out + 1
        elif isinstance(it, int) and not isinstance(it, bool):
            if axis_in == axis:
                return "select", None
            axis_in += 1
        elif isinstance(it, fx.Node):
            if axis_in == axis:
                return "tensor", it
            axis_in += 1
            advanced = True
        else:
            return "unknown", None
    if advanced:
        return "advanced", None
    if result is None and axis >= axis_in:
        result = axis_out + (axis - axis_in)
    return ("axis", result) if result is not None else ("unknown", None)

