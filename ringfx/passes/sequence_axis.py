"""Guard: attention must contract over per-token features, not over the sequence.

Ring attention shards the sequence, which is the scores' row and column axis; the axis
that ``q @ kᵀ`` contracts over (the head dim) must hold per-token features. "Channel
attention" contracts over the sequence itself, and is wrong on a sharded sequence (each
rank would sum over its own tokens only)::

    x: (B, S, C)                       # a user input, sharded along S
    q = x.transpose(1, 2)              # (B, C, S): the head dim is the sequence
    s = q @ q.transpose(-2, -1)        # contracts over S   -> left alone, reported

The pass follows the head-dim axis of q and k back (``follow_axis``, through the op table the
sharding walk uses too: ``node_facts.POINTWISE`` and ``RESHAPES``, plus layout ops, linears,
norms, embeddings, ``cat`` and indexing).
When it ends on an axis of a user input other than the last one, the site is left
alone. Where it cannot follow (an op it does not know), it assumes nothing and leaves
the decision as it was: a guard against a known wrong rewrite, not a proof — the full
sequence-axis analysis is DESIGN.md §4.4. Runs only for rings of more than one rank.
"""

from __future__ import annotations

import logging
import math
from typing import Optional

import torch.fx as fx

from .find_attention import sites_of
from .node_facts import CASTS, POINTWISE, RESHAPES, SHAPE_ONLY, is_model_state, normalize_dim, op_name, shape_of
from .options import PassOptions
from .sites import Decision, PassReport, SiteRecord

log = logging.getLogger("ringfx.passes")



def check_sequence_axis_pass(gm: fx.GraphModule, *, options: Optional[PassOptions] = None
                             ) -> tuple[fx.GraphModule, PassReport]:
    options = options or PassOptions()
    report = PassReport("check_sequence_axis")
    for site in sites_of(gm):
        if site.decision is Decision.REWRITE and options.ring_size > 1:
            for name, operand in (("q", site.q), ("k", site.k)):
                origin = _head_dim_origin(operand)
                if origin is not None:
                    node, axis = origin
                    site.skip(f"{name}·kᵀ contracts over axis {axis} of the input '{node.name}' "
                              f"{tuple(shape_of(node))}, not over per-token features: attention over a "
                              "non-sequence axis (e.g. channel attention) is wrong on a sharded sequence")
                    break
        report.sites.append(SiteRecord.of(site))
    report.skipped = sum(r.decision is not Decision.REWRITE for r in report.sites)
    log.info("check_sequence_axis: %d site(s) attend over a non-sequence axis", report.skipped)
    return gm, report


def _head_dim_origin(operand) -> Optional[tuple[fx.Node, int]]:
    """(user input, axis) the operand's head dim comes from, if it is a non-last axis of
    a user input; None if it is per-token features or cannot be followed."""
    if operand is None or not isinstance(operand.node, fx.Node):
        return None
    shape = shape_of(operand.node)
    if shape is None:
        return None
    axis = operand.permute[-1] if operand.permute is not None else len(shape) - 1
    return follow_axis(operand.node, normalize_dim(axis, len(shape)))


def follow_axis(node, axis: int, *, keep_last: bool = False, memo: Optional[dict] = None
                ) -> Optional[tuple[fx.Node, int]]:
    """The (user input, axis) that ``axis`` of ``node`` comes from, through layout,
    elementwise and per-token ops; None where it cannot be followed or ends in model
    state (or, unless ``keep_last``, in an input's last axis: per-token features).
    Through a flatten and back (GPT-2's ``x.view(-1, E)``, ``addmm``, ``view(B, S, 3E)``)
    the axis is followed as a factor of the merged one (its length and the product of the
    sizes inside it) until it is a whole axis again.
    ``memo`` (node, axis) -> answer may be shared by calls on one unchanged graph: without
    it a residual stream, where every add offers two ways back, is searched in time
    exponential in its depth (32 layers: minutes)."""
    global _MEMO
    outer = _MEMO
    _MEMO = memo if memo is not None else {}
    try:
        shape = shape_of(node) if isinstance(node, fx.Node) else None
        if shape is None or not isinstance(shape[axis], int):
            return None
        return _follow(node, axis, 0, keep_last, (shape[axis], 1))
    finally:
        _MEMO = outer


_MEMO: Optional[dict] = None


def _follow(node, axis: int, depth: int, keep_last: bool = False, factor: Optional[tuple] = None
            ) -> Optional[tuple[fx.Node, int]]:
    """``factor``: (length, inner) of the followed part of ``axis`` (the whole axis: its
    size and 1; None: the whole axis, whatever its size)."""
    shape = shape_of(node) if isinstance(node, fx.Node) else None
    if factor is None or shape is None or not isinstance(shape[axis], int):
        factor = None if shape is None or not isinstance(shape[axis], int) else (shape[axis], 1)
    key = (node, axis, keep_last, factor)
    if key not in _MEMO:
        _MEMO[key] = _follow_op(node, axis, depth, keep_last, factor)
    return _MEMO[key]


def _follow_op(node, axis: int, depth: int, keep_last: bool = False, factor: Optional[tuple] = None
               ) -> Optional[tuple[fx.Node, int]]:
    if not isinstance(node, fx.Node) or depth > 64 or factor is None:
        return None
    shape = shape_of(node)
    if shape is None:
        return None
    whole = factor == (shape[axis], 1)
    if node.op == "placeholder":
        if not whole or is_model_state(node) or (axis == len(shape) - 1 and not keep_last):
            return None
        return node, axis
    if node.op != "call_function" and node.op != "call_method":
        return None
    name = op_name(node)
    src = node.args[0] if node.args else None
    src_shape = shape_of(src) if isinstance(src, fx.Node) else None

    def up(x, a):  # the same factor, on axis ``a`` of ``x``
        return _follow(x, a, depth + 1, keep_last, factor)

    if name in CASTS or name in SHAPE_ONLY or name in ("type_as",):
        return up(src, axis)
    if name == "transpose" and src_shape is not None:
        d0, d1 = (normalize_dim(d, len(src_shape)) for d in node.args[1:3])
        return up(src, d1 if axis == d0 else d0 if axis == d1 else axis)
    if name == "permute" and src_shape is not None:
        dims = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) else node.args[1:]
        return up(src, normalize_dim(dims[axis], len(src_shape)))
    if name == "unsqueeze" and src_shape is not None:
        d = normalize_dim(node.args[1], len(shape))
        return None if axis == d else up(src, axis - (axis > d))
    if name in RESHAPES and src_shape is not None:
        mapped = _view_factor(src_shape, shape, axis, factor)
        return None if mapped is None else _follow(src, mapped[0], depth + 1, keep_last, mapped[1])
    if name == "linear":
        return None if axis == len(shape) - 1 else up(src, axis)
    if name == "addmm" and len(node.args) >= 3:  # addmm(bias, x, w): x's rows, w's columns
        return up(node.args[1], 0) if axis == 0 else None
    if name in ("matmul", "bmm"):
        other = node.args[1]
        if axis == len(shape) - 1:
            other_shape = shape_of(other)
            return None if other_shape is None else up(other, len(other_shape) - 1)
        return up(src, axis - (len(shape) - len(src_shape))) if src_shape else None
    if name in POINTWISE:
        # follow an operand that carries this axis (aligned from the right, not broadcast);
        # the first one that can be followed to an input
        for a in node.args:
            a_shape = shape_of(a) if isinstance(a, fx.Node) else None
            k = axis - (len(shape) - len(a_shape)) if a_shape is not None else -1
            if a_shape is not None and k >= 0 and a_shape[k] == shape[axis] and a_shape[k] != 1:
                found = up(a, k)
                if found is not None:
                    return found
        return None
    if name in ("layer_norm", "rms_norm") and axis < len(shape) - 1:
        return up(src, axis)  # normalises each token's features
    if name == "cat":
        return _follow_cat(node, shape, axis, depth, keep_last) if whole else None
    if name == "embedding" and axis < len(shape) - 1:
        return up(node.args[0], axis)  # F.embedding(ids, weight): rows of the ids
    if name == "getitem" and src_shape is not None and len(src_shape) == len(shape):
        # slicing keeps the axes (a sliced axis: the source's whole axis)
        return _follow(src, axis, depth + 1, keep_last, None) if whole else up(src, axis) \
            if src_shape[axis] == shape[axis] else None
    if (name == "getitem" and src_shape is not None and len(src_shape) == len(shape) + 1
            and isinstance(node.args[1], int) and not any(isinstance(d, tuple) for d in src_shape)):
        return up(src, axis + 1)  # x[i]: one entry of the first axis (q, k, v = x)
    if name == "getitem" and op_name(src) in ("unbind", "chunk", "split") and isinstance(src.args[0], fx.Node):
        whole_node = src.args[0]  # one part of a tensor cut along ``dim``
        whole_shape = shape_of(whole_node)
        dim = src.kwargs.get("dim", src.args[1 if op_name(src) == "unbind" else 2] if len(src.args) >
                             (1 if op_name(src) == "unbind" else 2) else 0)
        if whole_shape is None or not isinstance(dim, int):
            return None
        dim = normalize_dim(dim, len(whole_shape))
        if op_name(src) == "unbind":
            return up(whole_node, axis + (axis >= dim))
        return None if axis == dim else up(whole_node, axis)
    return None


def _follow_cat(node, shape, axis: int, depth: int, keep_last: bool) -> Optional[tuple[fx.Node, int]]:
    """Through ``cat``: along another axis, any part carries it; along the joined axis only
    the one part that holds all of it but a few entries (a cache's empty past, a class token)."""
    parts = node.args[0] if node.args and isinstance(node.args[0], (tuple, list)) else ()
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
    if not isinstance(dim, int):
        return None
    dim = normalize_dim(dim, len(shape))
    shapes = [shape_of(p) if isinstance(p, fx.Node) else None for p in parts]
    if None in shapes or any(len(sh) != len(shape) for sh in shapes):
        return None
    if axis != dim:
        for part in parts:
            found = _follow(part, axis, depth + 1, keep_last)
            if found is not None:
                return found
        return None
    longest = max(range(len(parts)), key=lambda i: shapes[i][dim], default=None)
    if longest is None or shape[dim] - shapes[longest][dim] > 1:
        return None
    return _follow(parts[longest], axis, depth + 1, keep_last)


def _view_factor(src_shape, out_shape, axis: int, factor: tuple) -> Optional[tuple[int, tuple]]:
    """The input axis of a reshape that the ``factor`` (length, inner) of output ``axis``
    lies within, with its factor there; None when it spans several input axes (or shapes
    are symbolic)."""
    if not all(isinstance(d, int) for d in (*src_shape, *out_shape)):
        return None
    length, inner = factor
    if length == 1:
        return None
    stride = math.prod(out_shape[axis + 1:]) * inner  # elements between consecutive entries of the factor
    for i in range(len(src_shape)):
        src_stride = math.prod(src_shape[i + 1:])
        if src_stride <= stride and stride * length <= src_stride * src_shape[i] and stride % src_stride == 0:
            return i, (length, stride // src_stride)
    return None
