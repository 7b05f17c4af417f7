"""Guard: ops that mix tokens across the sequence see only this rank's shard on a ring.

The ring op makes attention exact on a sharded sequence; everything else in the graph
runs on the shard as it is. That is right for per-token ops (linear, norms over the
features, pointwise, embeddings) and wrong, silently, for ops that combine tokens::

    h = ring_attention(q, k, v)                 # exact over the whole sequence
    pooled = h.mean(dim=1)                      # mean of this rank's tokens only  -> noted
    logits[:, :-1]                              # drops each shard's last token    -> noted
    x.cumsum(1), F.conv1d over the tokens       # stop at the shard's edge         -> noted

The pass runs after the rewrite on rings of more than one rank. It finds the sequence
axis of the user inputs that feed each ring op's queries (following q's axis -2 back
through layout and per-token ops, like the sequence-axis guard), also takes user inputs
of the same length at the same axis (position ids, masks, labels), and carries that axis
forward through the graph. Where an op reduces, scans, slices, concatenates, convolves
or contracts over it, a note names the op and its source line; an op it does not know is
noted once as one it cannot follow. Notes become ``ringfx.RingfxWarning``: a loss
averaged over the local tokens may be what the caller wants (then averaged over the
ring), so nothing is refused. It changes nothing; DESIGN.md §4.4 gives such ops
distributed forms.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Optional

import torch.fx as fx

from . import ring_glue
from .node_facts import (CASTS, SHAPE_ONLY, arange_length, called_subgraph, index_axis, is_model_state,
                         live_nodes, normalize_dim, op_name, outer_input, shape_of, source_line, source_location)
from .options import PassOptions
from .rewrite_attention import ring_attention_nodes
from .sequence_axis import follow_axis
from .sites import Note, PassReport

log = logging.getLogger("ringfx.passes")

# keep every axis, elementwise with broadcasting from the right (besides CASTS and SHAPE_ONLY)
_POINTWISE = frozenset({
    "add", "sub", "mul", "div", "neg", "pow", "exp", "log", "sqrt", "rsqrt", "sin", "cos", "tanh", "sigmoid",
    "silu", "gelu", "relu", "softplus", "abs", "clamp", "clip", "where", "masked_fill", "dropout", "detach",
    "logical_not",
    "logical_and", "logical_or", "eq", "ne", "lt", "le", "gt", "ge", "reciprocal", "square", "erf", "floor",
    "ceil", "round", "sign", "maximum", "minimum", "expand_as", "long", "int", "bool", "add_", "sub_", "mul_",
    "div_", "remainder", "fmod", "exp2", "log1p", "expm1", "leaky_relu", "mish", "hardswish", "hardsigmoid",
    "elu", "selu", "zeros_like", "ones_like", "full_like", "rand_like", "randn_like", "empty_like",
    "nan_to_num", "lerp", "addcmul",
})
_REDUCTIONS = frozenset({"sum", "mean", "amax", "amin", "max", "min", "prod", "std", "var", "logsumexp", "norm",
                         "all", "any", "argmax", "argmin", "nansum", "nanmean", "count_nonzero", "median"})
_SCANS = frozenset({"softmax", "log_softmax", "cumsum", "cumprod", "cummax", "cummin", "logcumsumexp", "sort",
                    "argsort", "topk", "flip", "roll", "diff"})
_LOSSES = frozenset({"cross_entropy", "nll_loss", "mse_loss", "l1_loss", "binary_cross_entropy",
                     "binary_cross_entropy_with_logits", "kl_div", "smooth_l1_loss", "huber_loss"})
_CONVS = frozenset({"conv1d", "conv2d", "conv3d", "conv_transpose1d", "avg_pool1d", "max_pool1d", "interpolate"})


@dataclasses.dataclass(frozen=True)
class _Seq:
    """Where the sequence lies in a tensor: within ``axis``, whose size is
    ``outer * S * inner`` (``outer == inner == 1``: the axis is the sequence)."""

    axis: int
    outer: int = 1
    inner: int = 1


def check_sequence_mixing_pass(gm: fx.GraphModule, *, options: Optional[PassOptions] = None
                               ) -> tuple[fx.GraphModule, PassReport]:
    options = options or PassOptions()
    report = PassReport("check_sequence_mixing")
    # ring ops inside checkpointed regions set the sequence's length for this graph too
    ring_ops = ring_attention_nodes(gm, nested=True) if options.ring_size > 1 else []
    seeds = _seeds(gm, ring_ops)
    if seeds:
        _propagate(gm, seeds, set(ring_ops), report, options.ring_size)
    log.info("check_sequence_mixing: %d op(s) mix tokens across the sequence", len(report.notes))
    return gm, report


def _seeds(gm: fx.GraphModule, ring_ops: list) -> dict:
    """User inputs that carry the sequence: those q's axis -2 comes from, and inputs of the
    same length at the same axis."""
    seeds: dict[fx.Node, _Seq] = {}
    lengths = set()
    for op in ring_ops:
        q_shape = shape_of(op.args[0])
        if q_shape is None:
            continue
        origin = follow_axis(op.args[0], len(q_shape) - 2, keep_last=True)
        if origin is not None:
            node, axis = origin
            if node.graph is not gm.graph:  # q of a ring op inside a checkpointed region
                node = outer_input(node)
            seeds[node] = _Seq(axis)
            lengths.add((axis, str(q_shape[-2])))  # str: symbolic lengths do not hash
    queries = {str(shape_of(op.args[0])[-2]) for op in ring_ops if shape_of(op.args[0]) is not None}
    for node in gm.graph.nodes:
        shape = shape_of(node) if node.op == "placeholder" and not is_model_state(node) else None
        if shape is None or node in seeds:
            continue
        for axis, length in lengths:
            if axis < len(shape) and str(shape[axis]) == length:
                seeds[node] = _Seq(axis)
                break
        else:
            if not lengths:  # q could not be followed back: an input with one axis of the queries' length
                axes = [a for a in range(len(shape)) if str(shape[a]) in queries]
                if len(axes) == 1:
                    seeds[node] = _Seq(axes[0])
    return seeds


def _propagate(gm: fx.GraphModule, seeds: dict, ring_ops: set, report: PassReport, ring_size: int) -> None:
    seq: dict[fx.Node, _Seq] = dict(seeds)
    unknown_noted: set = set()

    def note(node, what):
        report.notes.append(Note(f"{what} at {source_line(node)}: on a ring of {ring_size} ranks it sees only "
                                 "this rank's tokens of the sequence", source_location(node)))

    shapes: dict = {}  # of the nodes the rewrite inserted without a recorded value

    def shape(n):
        return shapes.get(n) or shape_of(n)

    live = live_nodes(gm.graph)  # mask code the rewrite left dead says nothing about the model
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method") or node not in live:
            continue
        if node in ring_ops or (op_name(node) == "getitem" and node.args[0] in ring_ops):
            # the op's (out, lse) hold the queries' tokens at axis -2 of q, whatever came in
            q_shape = shape_of((node if node in ring_ops else node.args[0]).args[0])
            if q_shape is not None:
                seq[node] = _Seq(len(q_shape) - 2)
                if node not in ring_ops:
                    shapes[node] = tuple(q_shape) if node.args[1] == 0 else tuple(q_shape[:-1])
            continue
        if getattr(node.target, "__module__", None) == ring_glue.__name__:
            continue  # the rewrite's own mask helpers: they feed the ring op
        carried = [(a, seq[a]) for a in node.all_input_nodes if a in seq]
        if not carried:
            continue
        name = op_name(node) or str(node.target)
        try:
            result = _rule(node, name, carried, shape)
        except (TypeError, ValueError, IndexError, ZeroDivisionError):
            result = "unknown"
        if isinstance(result, _Seq):
            seq[node] = result
        elif isinstance(result, str) and result == "unknown":
            if name not in unknown_noted:
                unknown_noted.add(name)
                report.notes.append(Note(f"'{name}' at {source_line(node)} takes a tensor that carries the sequence "
                                         "and ringfx cannot tell whether it mixes tokens; on a ring it sees only "
                                         "this rank's tokens", source_location(node)))
        elif isinstance(result, str):
            note(node, result)
            src_shape, out_shape = shape(carried[0][0]), shape(node)
            if src_shape is not None and out_shape is not None and len(src_shape) == len(out_shape):
                seq[node] = carried[0][1]  # still one row per token (a shift, a scan): follow on
        # None: the result no longer carries the sequence (e.g. a shape query)


def _rule(node: fx.Node, name: str, carried, shape_of=shape_of):
    """The sequence's place in ``node``'s result (for an op returning several tensors,
    in each of them); None if it carries none; a string saying how the op mixes tokens;
    or "unknown"."""
    src, s = carried[0]
    in_shape, out_shape = shape_of(src), shape_of(node)
    if name in ("size", "dim", "numel", "stride", "shape", "new_zeros", "new_ones", "new_empty", "new_full"):
        return None
    if in_shape is None:  # one part of a tensor cut in several (unbind / split / chunk)
        return s if name == "getitem" and isinstance(node.args[1], int) else "unknown"
    nd_in = len(in_shape)
    # ops that combine tokens: decided from the inputs alone
    if name in _REDUCTIONS or name in _SCANS:
        dims = _dims(node, nd_in)
        if dims is None and (name in _REDUCTIONS or name in ("flip", "roll")) or dims is not None and s.axis in dims:
            return f"'{name}' over the sequence axis"
    if name in _LOSSES:
        reduction = node.kwargs.get("reduction", "mean")
        if reduction != "none":
            return f"'{name}' (reduction={reduction!r}) over tokens"
        return dataclasses.replace(s, axis=s.axis) if out_shape is not None and s.axis < len(out_shape) and \
            str(out_shape[s.axis]) == str(in_shape[s.axis]) else "unknown"
    if name in _CONVS or name.startswith(("conv", "avg_pool", "max_pool")):
        return f"'{name}' over the tokens (its window crosses the shard's edges)"
    if called_subgraph(node.graph.owning_module, node) is not None:
        return s  # a checkpointed region: its body is checked on its own; its outputs keep the tokens
    if name in ("sdpa", "scaled_dot_product_attention"):
        return "an attention that was not rewritten"
    if name == "einsum":
        return _through_einsum(node, carried)
    if name in ("matmul", "bmm", "mm"):
        a = node.args[0]
        if src is a:
            if s.axis == nd_in - 1:
                return "a matmul contracting the sequence axis"
        elif s.axis == nd_in - 2 or nd_in == 1:
            return "a matmul contracting the sequence axis"
    if name == "addmm":  # addmm(bias, x, w): x's rows are tokens
        if src is not node.args[1] or s.axis != 0:
            return "a matmul contracting the sequence axis" if src is node.args[1] else "unknown"
    if name in ("cat", "concat"):
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        others = [t for t in node.args[0] if t is not src]
        if all(_empty(shape_of(t)) for t in others):
            return s if out_shape is not None and len(out_shape) == nd_in else "unknown"  # e.g. an empty KV cache
        if isinstance(dim, int) and normalize_dim(dim, nd_in) == s.axis:
            return "'cat' along the sequence axis"
    if name == "pad":  # F.pad(x, (left, right, ...)) pads the last len // 2 axes
        widths = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad", ())
        if s.axis >= nd_in - len(widths) // 2:
            return "'pad' along the sequence axis"
    elif name in ("unbind", "split", "chunk", "repeat_interleave", "tensor_split", "narrow", "index_select",
                  "gather", "take_along_dim", "select"):
        dim = _dim_arg(node, name)
        if dim is None or normalize_dim(dim, nd_in) == s.axis:
            return f"'{name}' along the sequence axis"
        if out_shape is None:  # parts of the tensor: each keeps the sequence where it was
            return dataclasses.replace(s, axis=s.axis - (name == "unbind" and normalize_dim(dim, nd_in) < s.axis))
    if name == "getitem":
        return _through_index(s, node.args[1], in_shape)
    if out_shape is None:
        return "unknown"
    nd_out = len(out_shape)

    def same_axis(axis):
        ok = 0 <= axis < nd_out and str(out_shape[axis]) == str(in_shape[s.axis])
        return dataclasses.replace(s, axis=axis) if ok else "unknown"

    # ops that keep every token where it was
    if name in _POINTWISE or name in CASTS or name in SHAPE_ONLY or name in ("expand", "repeat_interleave",
                                                                              "narrow", "index_select", "gather",
                                                                              "select", "pad"):
        return same_axis(s.axis + (nd_out - nd_in))
    if name in _REDUCTIONS:
        dims = _dims(node, nd_in)
        keep = node.kwargs.get("keepdim", len(node.args) > 2 and node.args[2] is True)
        return same_axis(s.axis - (0 if keep else sum(d < s.axis for d in dims)))
    if name in _SCANS or name in ("cat", "concat"):
        return same_axis(s.axis)
    if name == "stack":
        dim = normalize_dim(node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0), nd_in + 1)
        return same_axis(s.axis + (dim <= s.axis))
    if name in ("linear", "layer_norm", "rms_norm", "addmm", "matmul", "bmm", "mm"):
        if name in ("layer_norm", "rms_norm"):
            normalized = node.args[1] if len(node.args) > 1 else node.kwargs.get("normalized_shape")
            n_last = len(normalized) if isinstance(normalized, (tuple, list)) else 1
            if s.axis >= nd_in - n_last:
                return f"'{name}' over the sequence axis"
        if name in ("matmul", "bmm", "mm") and src is not node.args[0]:
            return same_axis(nd_out - 1)  # the other operand's last axis (a tokens x tokens product)
        return same_axis(s.axis + (nd_out - nd_in))
    if name == "embedding":  # F.embedding(ids, weight): the ids are the tokens
        return same_axis(s.axis) if src is node.args[0] else "unknown"
    if name in ("transpose", "swapaxes"):
        d0, d1 = (normalize_dim(d, nd_in) for d in node.args[1:3])
        return same_axis(d1 if s.axis == d0 else d0 if s.axis == d1 else s.axis)
    if name == "t":
        return same_axis(nd_in - 1 - s.axis)
    if name == "permute":
        dims = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) else node.args[1:]
        return same_axis([normalize_dim(d, nd_in) for d in dims].index(s.axis))
    if name in ("unsqueeze", "squeeze", "view", "reshape", "flatten", "unflatten", "view_as", "reshape_as"):
        return _through_view(s, in_shape, out_shape)
    return "unknown"


def _dim_arg(node: fx.Node, name: str):
    index = {"unbind": 1, "select": 1, "narrow": 1, "index_select": 1, "gather": 1, "take_along_dim": 2,
             "split": 2, "chunk": 2, "tensor_split": 2, "repeat_interleave": 2}.get(name)
    dim = node.kwargs.get("dim", node.args[index] if index is not None and len(node.args) > index else None)
    if dim is None and name in ("unbind", "split", "chunk", "tensor_split"):
        dim = 0
    if dim is None and name == "repeat_interleave":
        return None
    return dim if isinstance(dim, int) else None


_LAST_BY_DEFAULT = frozenset({"sort", "argsort", "topk", "diff", "softmax", "log_softmax"})


def _dims(node: fx.Node, nd: int) -> Optional[set]:
    """The dims a reduction/scan works over (None: all)."""
    name = op_name(node)
    position = 2 if name == "topk" else 1
    dim = node.kwargs.get("dim", node.kwargs.get("dims", node.args[position] if len(node.args) > position else None))
    if dim is None and name in _LAST_BY_DEFAULT:
        return {nd - 1}
    if dim is None:
        return None
    dims = dim if isinstance(dim, (tuple, list)) else (dim,)
    if not all(isinstance(d, int) for d in dims):
        raise TypeError("symbolic dim")
    return {normalize_dim(d, nd) for d in dims}


def _through_view(s: _Seq, in_shape, out_shape):
    """Carry the sequence through a reshape: the same span of the row-major index, in
    whichever output axis holds it (or "unknown" if it is split over several)."""
    if not all(isinstance(d, int) for d in (*in_shape, *out_shape)):
        return None  # symbolic sizes: the guard stops following here (it proves nothing, it notes nothing)
    length = in_shape[s.axis] // (s.outer * s.inner)
    start = math.prod(in_shape[: s.axis]) * s.outer  # units: the sequence occupies [start, start * length)
    stop = start * length
    for j in range(len(out_shape)):
        lo, hi = math.prod(out_shape[:j]), math.prod(out_shape[: j + 1])
        if lo <= start and stop <= hi and start % lo == 0 and hi % stop == 0:
            return _Seq(j, start // lo, hi // stop)
    return "a reshape that splits the sequence axis"


def _through_index(s: _Seq, index, in_shape):
    kind, value = index_axis(s.axis, index, in_shape)
    if kind == "axis":
        return dataclasses.replace(s, axis=value)
    if kind == "select":
        return "an index into the sequence axis (e.g. the last token)"
    if kind == "slice":
        return "a slice along the sequence axis (e.g. a label shift)"
    if kind == "tensor" and _arange_of(value, in_shape[s.axis]):
        return None  # x[(batch_idx, arange(S))]: each token picks itself (transformers' mask functions)
    return "unknown"

def _arange_of(node: fx.Node, size) -> bool:
    """``node`` is ``arange(size)`` (plus 0, viewed or unsqueezed): an identity index."""
    while op_name(node) in ("getitem", "unsqueeze", "view", "reshape", "add", "to"):
        if op_name(node) == "add" and not (len(node.args) == 2 and node.args[1] == 0):
            return False
        node = node.args[0]
        if not isinstance(node, fx.Node):
            return False
    return str(arange_length(node)) == str(size)


def _empty(shape) -> bool:
    return shape is not None and any(isinstance(d, int) and d == 0 for d in shape)


def _through_einsum(node: fx.Node, carried):
    equation = node.args[0]
    operands = node.args[1:] if not isinstance(node.args[1], (tuple, list)) else node.args[1]
    if not isinstance(equation, str) or "->" not in equation or "." in equation:
        return "unknown"
    inputs, output = equation.replace(" ", "").split("->")
    carried = dict(carried)
    for spec, operand in zip(inputs.split(","), operands):
        if operand in carried:
            letter = spec[carried[operand].axis]
            if letter not in output:
                return "an einsum summing over the sequence axis"
            return dataclasses.replace(carried[operand], axis=output.index(letter))
    return "unknown"
