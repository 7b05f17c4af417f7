"""Shard the whole graph along the sequence: full-length inputs in, full-length outputs out.

After the attention rewrite every ring op expects this rank's tokens; everything else in
the graph was captured on full-length tensors. This pass makes the rest of the graph run
on shards where that is exact, and keeps it on the full sequence where it is not::

    # captured (full length S)                 # after the pass (this rank's L = S_pad / P tokens)
    ids: (B, S)                                ids_l = shard_sequence(ids, 1, S, ring, layout)
    h = embedding(ids, w)                      h = embedding(ids_l, w)             # per token: as is
    pos = arange(S)                            pos = arange(S)                     # replicated: exact
    cos = rope(pos)                            cos_l = shard_sequence(cos, 0, ...) # sliced where it meets a shard
    o, _ = ring_attention(q, k, v, ...)        o, _ = ring_attention(q, k, v, kpm_l, ...)
    y = o.view(B, S, H * D)                    y = o.view(B, L, H * D)             # the sequence's size is local
    loss = cross_entropy(y2, labels)           loss = global_cross_entropy(...)    # local sum + all-reduce
    first = y[:, 0]                            first = select_token(y, 1, 0, ...)  # from the rank holding token 0
    out = cumsum(y, 1)                         out = cumsum(gather_sequence(y, 1, S, ...), 1)  # fallback, reported
    return out                                 return out (full length)

Every value is either *replicated* (the same full tensor on every rank, as the model
computed it) or *sharded* (a ``Sharded`` placement: this rank's tokens along one axis).
Values start replicated; the graph inputs that carry the attention's sequence are sharded
where they enter (``shard_sequence`` is a slice: exact), a replicated value is sliced where
it meets a sharded one, and an op with no rule for a sharded operand gets its operands
all-gathered first (``gather_sequence``) and runs on the full sequence. So every op sees
either its original full-length operands or operands it is exact on: the pass is exact by
construction, and its op rules decide only how much stays sharded. Fallbacks are reported.

Sequences whose length S is not a multiple of the ring's unit are padded to one inside
(``shard_sequence`` pads); the pad tokens are masked as keys in every ring op, masked out
of every reduction and trimmed when gathered.

Runs only when ``options.inputs == "full"`` on graphs that hold a ring op.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import re
from typing import Any, Optional

import torch
import torch.fx as fx

from .._compat import assert_on_device
from ..errors import UnsupportedError
from ..runtime import collectives, token_moves
from ..runtime.layout import chunks_per_rank
from . import ring_glue
from .node_facts import (VALUE_KEY, CASTS, POINTWISE, RESHAPES, SHAPE_ONLY, arange_length, called_subgraph,
                         hop_subgraphs, index_axis, is_model_state, normalize_dim, op_name, placeholder_source,
                         shape_of, source_line, source_location, value_of)
from .options import PassOptions
from .rewrite_attention import ring_attention_nodes, ring_attention_target
from .sequence_axis import follow_axis
from .sites import PassReport

log = logging.getLogger("ringfx.passes")


# ``node.meta[SEQUENCE_KEY]`` after the pass: the node's ``Sharded`` placement (a tuple of them,
# or None, for a tuple value); absent where the value is replicated.
SEQUENCE_KEY = "ringfx_sequence"


@dataclasses.dataclass(frozen=True)
class Sharded:
    """This rank holds its tokens of a sequence of ``length`` along ``axis``; that axis
    spans ``outer * length * inner`` values globally (``outer == inner == 1``: it is the
    sequence itself; a flattened ``(B, S)`` has ``outer = B``)."""

    axis: int
    length: int
    outer: int = 1
    inner: int = 1

    def at(self, axis: int) -> "Sharded":
        return dataclasses.replace(self, axis=axis)

    @property
    def span(self) -> int:
        return self.outer * self.length * self.inner


@dataclasses.dataclass
class ShardingReport(PassReport):
    """What the sharding pass did to one graph (lines with the user's source line)."""

    sharded_inputs: list[str] = dataclasses.field(default_factory=list)
    distributed: list[str] = dataclasses.field(default_factory=list)
    fallbacks: list[str] = dataclasses.field(default_factory=list)
    costly_fallbacks: list[str] = dataclasses.field(default_factory=list)  # of floating-point values

    def summary(self) -> list[str]:
        lines = [f"sharded input: {x}" for x in self.sharded_inputs]
        lines += [f"distributed: {x}" for x in self.distributed]
        lines += [f"all-gather fallback: {x}" for x in self.fallbacks]
        return lines


_SUMS = frozenset({"sum", "mean", "nansum"})
_OTHER_REDUCTIONS = frozenset({"amax", "amin", "max", "min", "prod", "std", "var", "logsumexp", "norm", "all",
                               "any", "argmax", "argmin", "nanmean", "count_nonzero", "median", "var_mean",
                               "std_mean", "aminmax", "linalg_vector_norm"})
_LAST_BY_DEFAULT = frozenset({"softmax", "log_softmax"})
_NORMS = frozenset({"norm", "linalg_vector_norm"})
_MOMENTS = frozenset({"var", "std", "var_mean", "std_mean"})
_CLASS_LOSSES = frozenset({"cross_entropy", "nll_loss"})
_ELEMENT_LOSSES = frozenset({"mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss", "binary_cross_entropy",
                             "binary_cross_entropy_with_logits", "soft_margin_loss"})
_METADATA = frozenset({"dim", "ndimension", "is_floating_point", "is_contiguous", "element_size", "get_device",
                       "is_complex", "requires_grad_", "_assert_tensor_metadata"})


class _Fallback(Exception):
    """The op has no exact rule for its sharded operands: all-gather them first."""


def shard_sequence_pass(gm: fx.GraphModule, *, options: Optional[PassOptions] = None
                        ) -> tuple[fx.GraphModule, ShardingReport]:
    options = options or PassOptions()
    report = ShardingReport("shard_sequence")
    ring_ops = _all_ring_ops(gm) if options.inputs == "full" and options.ring_size > 1 else []
    if not ring_ops:
        log.info("shard_sequence: nothing to shard (%s)", "no ring op in the graph" if options.inputs == "full"
                 and options.ring_size > 1 else f"inputs={options.inputs!r}, ring of {options.ring_size}")
        return gm, report
    _Sharder(gm, options, report).run(ring_ops)
    if report.costly_fallbacks:
        report.notes.append(
            f"{len(report.costly_fallbacks)} op(s) have no sharded form and run on the whole sequence, their "
            f"operands all-gathered first (exact, but not sharded): {'; '.join(report.costly_fallbacks)}")
    gm.graph.lint()
    gm.recompile()
    log.info("shard_sequence: %d input(s) sharded, %d distributed op(s), %d all-gather fallback(s)",
             len(report.sharded_inputs), len(report.distributed), len(report.fallbacks))
    return gm, report


@dataclasses.dataclass
class SequenceAnalysis:
    """What the sharding pass's walk finds in a graph fed with the caller's shards
    (``inputs="sharded"``), where nothing is rewritten: each op that combines tokens across
    the sequence (``mixing``) and each ``arange`` over the sequence's (local) length whose
    values meet the sequence (``local_positions``: positions of the shard, not the tokens'
    global ones), each with its user source line and location."""

    mixing: list = dataclasses.field(default_factory=list)  # (what, location)
    local_positions: list = dataclasses.field(default_factory=list)  # (arange node, what, location)


def sequence_analysis(gm: fx.GraphModule, options: PassOptions) -> SequenceAnalysis:
    """The sharding pass's analysis of ``gm`` (one engine for sharding and for the guards),
    run on a copy: ``gm`` is not changed. Cached on ``gm`` for the guards that read it in a row."""
    key = (id(gm.graph), len(gm.graph.nodes), options.ring_size, options.group_name)
    cached = getattr(gm, "meta", {}).get("ringfx_sequence_analysis")
    if cached is not None and cached[0] == key:
        return cached[1]
    result = SequenceAnalysis()
    copied = copy.deepcopy(gm)
    copied.graph.eliminate_dead_code()  # mask code the rewrite left dead says nothing about the model
    ring_ops = _all_ring_ops(copied)
    if ring_ops:
        sharder = _Analysis(copied, dataclasses.replace(options, inputs="full", gather_outputs=False,
                                                        fallbacks="gather"), ShardingReport("sequence_analysis"))
        sharder.mixing, sharder.positions = result.mixing, result.local_positions
        try:
            sharder.run(ring_ops)
        except UnsupportedError as e:
            result.mixing.append((f"an op ringfx cannot follow along the sequence ({e})", None))
    if hasattr(gm, "meta"):
        gm.meta["ringfx_sequence_analysis"] = (key, result)
    return result


def mixing_ops(gm: fx.GraphModule, options: PassOptions) -> list[tuple[str, Optional[tuple[str, int]]]]:
    """The ops of ``gm`` that combine tokens across the sequence (``sequence_analysis``)."""
    return sequence_analysis(gm, options).mixing


def _all_ring_ops(gm: fx.GraphModule) -> list[fx.Node]:
    """The ring ops of ``gm`` and of the subgraphs its higher-order ops call (checkpointing)."""
    return ring_attention_nodes(gm) + [n for _, _, sub in hop_subgraphs(gm) for n in ring_attention_nodes(sub)]


class _Sharder:
    def __init__(self, gm: fx.GraphModule, options: PassOptions, report: ShardingReport):
        self.gm, self.graph, self.options, self.report = gm, gm.graph, options, report
        self.group, self.layout = options.group_name, options.layout
        self.placed: dict[fx.Node, Any] = {}  # node -> Sharded, or a tuple of (Sharded | None) for tuple values
        self.shapes: dict[fx.Node, Any] = {}  # global shapes of nodes without a recorded value
        self._shards: dict = {}
        self._gathers: dict = {}
        self.mixing: list = []  # (what, user source location) of each distributed form and fallback
        self.proven: dict = {}  # user input -> the axis an attention's sequence was traced back to
        self._seeds: dict = {}  # the shard of each user input -> its line in the report

    # ---- shapes ------------------------------------------------------------------------------------
    def shape(self, node) -> Optional[tuple]:
        if not isinstance(node, fx.Node):
            return None
        if node in self.shapes:
            return self.shapes[node]
        found = shape_of(node)
        if found is None:
            found = self._derived_shape(node)
        self.shapes[node] = found
        return found

    def _derived_shape(self, node: fx.Node):
        """Global shapes of the nodes the attention rewrite inserted (they carry no value)."""
        name = op_name(node)
        if node.op == "call_function" and node.target == ring_attention_target():
            q, v = self.shape(node.args[0]), self.shape(node.args[2])
            # (out, lse): out has v's head dim (MLA: it may differ from q's)
            return None if q is None or v is None else (q[:-1] + v[-1:], q[:-1])
        if node.target is ring_glue.combine_biases:
            shapes = [self.shape(b) for b in node.args[1:]]
            return None if None in shapes else tuple(torch.broadcast_shapes(*shapes))
        src = self.shape(node.args[0]) if node.args else None
        if src is None:
            return None
        if name == "getitem" and isinstance(src, tuple) and src and isinstance(src[0], tuple):
            return src[node.args[1]]
        if name == "permute":
            dims = node.args[1:] if not isinstance(node.args[1], (tuple, list)) else node.args[1]
            return tuple(src[d] for d in dims)
        if name == "unsqueeze":
            d = normalize_dim(node.args[1], len(src) + 1)
            return src[:d] + (1,) + src[d:]
        if name == "squeeze" and len(node.args) > 1:
            d = normalize_dim(node.args[1], len(src))
            return src[:d] + src[d + 1:] if src[d] == 1 else src
        if node.target is ring_glue.key_padding_from_mask:
            q = self.shape(node.args[2])
            return None if q is None else (q[0], src[-1])
        if node.target is ring_glue.bias_from_mask:
            _, _, ndim, unsqueeze0 = node.args
            shape = (1,) * max(0, ndim - len(src)) + tuple(src)
            return (1,) + shape if unsqueeze0 else shape
        if node.target is ring_glue.gather_key_columns:
            return src
        return None

    def local_size(self, s: Sharded) -> int:
        return s.outer * collectives.local_length(self.group, self.layout, s.length) * s.inner

    # ---- inserted moves ---------------------------------------------------------------------------
    def shard(self, node: fx.Node, s: Sharded, before: fx.Node, fill=0) -> fx.Node:
        """``node`` (replicated, full length) sliced to this rank's tokens."""
        key = (node, s, fill)
        if key not in self._shards:
            with self.graph.inserting_before(before):
                new = self.graph.call_function(collectives.shard_sequence, (
                    node, s.axis, s.length, self.group, self.layout, fill, s.outer, s.inner))
            new.meta[VALUE_KEY] = value_of(node)
            self.shapes[new] = self.shape(node)
            self.placed[new] = s
            self._shards[key] = new
        return self._shards[key]

    def gather(self, node: fx.Node, before: fx.Node) -> fx.Node:
        """``node`` (sharded) all-gathered to the full sequence in global order."""
        s = self.placed[node]
        if not isinstance(s, Sharded):
            raise _Fallback()
        if node not in self._gathers:
            with self.graph.inserting_before(before):
                x = node
                if s.outer != 1 or s.inner != 1:
                    x = self.graph.call_method("unflatten", (x, s.axis, (s.outer, -1, s.inner)))
                    new = self.graph.call_function(collectives.gather_sequence,
                                                   (x, s.axis + 1, s.length, self.group, self.layout))
                    new = self.graph.call_method("flatten", (new, s.axis, s.axis + 2))
                else:
                    new = self.graph.call_function(collectives.gather_sequence,
                                                   (x, s.axis, s.length, self.group, self.layout))
            new.meta[VALUE_KEY] = value_of(node)
            self.shapes[new] = self.shape(node)
            self._gathers[node] = new
        return self._gathers[node]

    def localize(self, arg, s: Sharded, user: fx.Node, fill=0):
        """``arg`` as this rank's tokens at ``s`` (a replicated value is sliced; a value
        sharded elsewhere is gathered and sliced again)."""
        if not isinstance(arg, fx.Node):
            return arg
        have = self.placed.get(arg)
        if have == s:
            return arg
        if have is not None:
            arg = self.gather(arg, user)
        return self.shard(arg, s, user, fill)

    # ---- the walk ---------------------------------------------------------------------------------
    def run(self, ring_ops: list[fx.Node]) -> None:
        lengths = [shape[-2] for shape in map(self.shape, (op.args[0] for op in ring_ops)) if shape is not None]
        if not all(isinstance(n, int) for n in lengths):  # symbolic sizes (SymInt) do not hash either
            raise UnsupportedError("sharding the whole model needs static sequence lengths: use "
                                   "transform(dynamic=False) (the default), or inputs='sharded' and shard the "
                                   "inputs yourself")
        self.lengths = set(lengths)
        self.proven = self._proven_axes()
        self._walk()

    def _proven_axes(self) -> dict:
        """Each user input that an attention's q, k or v sequence axis comes from, with that
        axis, followed backwards through the graph (and out of checkpointed bodies into
        their callers): axes, not sizes, so a batch or feature size equal to S is never taken
        for the sequence. Inputs not reached this way are found by size (``_sequence_axis``)."""
        callers = {}  # a body's placeholder -> the operand its caller passes

        def bodies(gm):
            for node in gm.graph.nodes:
                called = called_subgraph(gm, node)
                if called is not None:
                    _, body, operands = called
                    placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
                    callers.update(zip(placeholders, operands))
                    yield body
                    yield from bodies(body)

        proven: dict = {}
        memo: dict = {}  # shared: each layer's search stops where the layer before it ended
        for gm in [self.gm, *bodies(self.gm)]:
            for op in ring_attention_nodes(gm):
                for operand in op.args[:3]:
                    shape = self.shape(operand)
                    found = None if shape is None else follow_axis(operand, len(shape) - 2, keep_last=True, memo=memo)
                    while found is not None and found[0] in callers:
                        outer = callers[found[0]]
                        found = (follow_axis(outer, found[1], keep_last=True, memo=memo) if isinstance(outer, fx.Node)
                                 else None)
                    if found is not None and found[0].graph is self.graph and not is_model_state(found[0]):
                        proven.setdefault(found[0], found[1])
        return proven

    def run_body(self, operands: list) -> tuple:
        """A subgraph called by a higher-order op (a checkpointed region): its placeholders
        hold what the caller passes (``operands``: a placement or None each); its outputs
        stay as they are and their placements are returned."""
        placeholders = [n for n in self.graph.nodes if n.op == "placeholder"]
        for ph, s in zip(placeholders, operands):
            if s is not None:
                self.placed[ph] = s
        self._walk(body=True)
        (out,) = [n for n in self.graph.nodes if n.op == "output"]
        results = out.args[0] if isinstance(out.args[0], (tuple, list)) else (out.args[0],)
        return tuple(self.placed.get(r) if isinstance(r, fx.Node) else None for r in results)

    def _walk(self, body: bool = False) -> None:
        self.feeds = self._feeding_attention()
        for node in list(self.graph.nodes):
            if node.op == "placeholder" and not body:
                self._seed(node)
            elif node.op == "output" and not body:
                self._output(node)
            elif node.op in ("call_function", "call_method"):
                self._visit(node)
                if not node._erased:
                    self._born(node)
        self._erase_dead_moves()
        # an input sharded by its size alone whose every use gathered it back is not sharded
        self.report.sharded_inputs[:0] = [line for shard, line in self._seeds.items() if not shard._erased]
        for node, placement in self.placed.items():  # readable after the pass: which axis holds the sequence
            if not node._erased:
                node.meta[SEQUENCE_KEY] = placement
        self.gm.recompile()

    def _feeding_attention(self) -> set:
        """Nodes whose values reach a ring op's q, k or v here (or a region that holds one)."""
        target = ring_attention_target()
        todo = []
        for n in self.graph.nodes:
            if n.op == "call_function" and n.target == target:
                todo.extend(a for a in n.args[:3] if isinstance(a, fx.Node))
            called = called_subgraph(self.gm, n)
            if called is not None and _all_ring_ops(called[1]):
                todo.extend(a for a in called[2] if isinstance(a, fx.Node))
        seen = set()
        while todo:
            n = todo.pop()
            if n not in seen:
                seen.add(n)
                todo.extend(n.all_input_nodes)
        return seen

    def _hop(self, node: fx.Node, called) -> None:
        """Run the sharding inside a called subgraph with the operands' placements."""
        _, body, operands = called
        sub = type(self)(body, self.options, self.report)
        sub.lengths = self.lengths
        sub.mixing = self.mixing
        outputs = sub.run_body([self.placed.get(a) if isinstance(a, fx.Node) else None for a in operands])
        body.graph.lint()
        if any(o is not None for o in outputs):
            self.placed[node] = outputs
        else:
            self.placed.pop(node, None)

    def _erase_dead_moves(self) -> None:
        """Drop the moves (and bypassed mask helpers) that ended up with no user."""
        ours = (collectives.shard_sequence, collectives.gather_sequence, ring_glue.gather_key_columns)
        for node in list(self.graph.nodes):  # gather(shard(x)) is x: drop the round trip
            src = node.args[0] if node.op == "call_function" and node.target is collectives.gather_sequence else None
            if (isinstance(src, fx.Node) and src.target is collectives.shard_sequence
                    and tuple(src.args[1:5]) == tuple(node.args[1:5]) and tuple(src.args[6:8]) == (1, 1)):
                node.replace_all_uses_with(src.args[0])
                self.graph.erase_node(node)
        for node in reversed(list(self.graph.nodes)):
            if node.op == "call_function" and node.target in ours and not node.users:
                self.graph.erase_node(node)

    def _seed(self, node: fx.Node) -> None:
        """Shard a user input where it enters: one named by ``sequence_inputs``, or else any
        input with an axis of an attention's sequence length."""
        shape = self.shape(node)
        if shape is None or is_model_state(node) or not isinstance(value_of(node), torch.Tensor):
            return
        named = dict(self.options.sequence_inputs)
        if named:
            source = placeholder_source(node) or node.name
            dims = [d for n, d in named.items() if source.endswith(f"['{n}']")]
            if not dims:
                return
            axis = normalize_dim(dims[0], len(shape))
            if not 0 <= axis < len(shape) or shape[axis] not in self.lengths:
                raise ValueError(f"sequence_inputs: dim {dims[0]} of {source} {tuple(shape)} is not an attention's "
                                 f"sequence (lengths {sorted(self.lengths)})")
        elif node in self.proven:
            axis = self.proven[node]
        else:
            axis = self._sequence_axis(shape)
            if axis is None:
                return
        how = " (traced back from an attention)" if node in self.proven and not named else ""
        self._seeds[self._shard_in_place(node, axis)] = (
            f"{placeholder_source(node) or node.name} {tuple(shape)} along dim {axis}{how}")

    def _sequence_axis(self, shape) -> Optional[int]:
        """The axis of ``shape`` that holds an attention's sequence, for an input no attention
        was traced back to (labels, masks): when two axes could, the one the traced inputs
        use (sequence-first models: dim 0), else dim 1 over dim 0 (batch first)."""
        axes = [a for a, n in enumerate(shape) if isinstance(n, int) and n in self.lengths]
        if not axes:
            return None
        traced = set(self.proven.values())
        if len(axes) > 1 and len(traced) == 1 and traced <= set(axes):
            return traced.pop()
        return axes[1] if len(axes) > 1 and axes[0] == 0 else axes[0]

    def _shard_in_place(self, node: fx.Node, axis: int) -> fx.Node:
        """Every later user of ``node`` reads this rank's tokens of it instead."""
        shape = self.shape(node)
        s = Sharded(axis, shape[axis])
        users = list(node.users)
        fill = False if value_of(node).dtype == torch.bool else 0
        with self.graph.inserting_after(node):
            new = self.graph.call_function(collectives.shard_sequence,
                                           (node, axis, s.length, self.group, self.layout, fill, 1, 1))
        new.meta[VALUE_KEY] = value_of(node)
        new.meta["stack_trace"] = node.meta.get("stack_trace")
        self.shapes[new] = shape
        self.placed[new] = s
        self._shards[(node, s, fill)] = new
        for u in users:
            u.replace_input_with(node, new)
        return new

    def _born(self, node: fx.Node) -> None:
        """A replicated activation with the sequence in it that flows into attention (a
        vision transformer's patches after the class token is prepended, a conv front-end's
        frames, RoPE tables): shard it where the model makes it, not at the attention."""
        value = value_of(node)
        if (node not in self.feeds or node in self.placed or not isinstance(value, torch.Tensor)
                or not value.dtype.is_floating_point or getattr(node.target, "__module__", None) == ring_glue.__name__
                or node.target in (collectives.shard_sequence, collectives.gather_sequence)):
            return
        shape = self.shape(node)
        axes = [] if shape is None else [a for a, n in enumerate(shape) if isinstance(n, int) and n in self.lengths]
        # only an unambiguous token axis, and not the last one (features; a conv's (B, C, S)
        # output is sharded after its transpose): a hidden size equal to S must not be sharded;
        # nor a value made from parameters alone (an in-projection's bias as long as S)
        if len(axes) == 1 and (axes[0] != len(shape) - 1 or len(shape) == 1) and not self._from_state(node):
            axis = axes[0]
            self._shard_in_place(node, axis)
            self.report.sharded_inputs.append(f"'{op_name(node)}' at {source_line(node)} {tuple(shape)} along "
                                              f"dim {axis} (made inside the model)")

    def _from_state(self, node: fx.Node) -> bool:
        """Whether ``node`` is computed from the model's parameters and buffers alone (no user
        input, no tensor made from sizes such as ``arange``): its sizes are the model's, not
        the sequence's."""
        memo = self.__dict__.setdefault("_state_memo", {})
        todo = [node]
        while todo:
            n = todo[-1]
            if n in memo:
                todo.pop()
                continue
            if n.op == "placeholder" or n.op == "get_attr":
                memo[n] = n.op == "get_attr" or is_model_state(n)
                todo.pop()
                continue
            inputs = n.all_input_nodes
            if not inputs:
                memo[n] = False  # a factory (arange, ones, full): its sizes may be the sequence's
                todo.pop()
                continue
            missing = [a for a in inputs if a not in memo]
            if missing:
                todo.extend(missing)
                continue
            memo[n] = all(memo[a] for a in inputs)
            todo.pop()
        return memo[node]

    def _output(self, node: fx.Node) -> None:
        def full(a):
            if isinstance(a, fx.Node) and isinstance(self.placed.get(a), Sharded):
                if not self.options.gather_outputs:
                    return a
                return self.gather(a, node)
            return a

        node.args = fx.node.map_arg(node.args, full)

    def _visit(self, node: fx.Node) -> None:
        called = called_subgraph(self.gm, node)
        if called is not None:
            return self._hop(node, called)
        sharded_inputs = [a for a in node.all_input_nodes if a in self.placed]
        is_ring = node.target == ring_attention_target()
        if not sharded_inputs and not is_ring and node.target is not ring_glue.gather_key_columns:
            return
        writes = _writes_into(node)
        try:
            if is_ring:
                self._ring_op(node)
            elif writes is not None and writes not in self.placed:
                raise _Fallback()  # writing into a replicated tensor: it takes whole values
            elif writes is not None and op_name(node) == "setitem":
                self._setitem(node)
            else:
                self._rule(node)
                if writes is not None and self.placed.get(node, self.placed[writes]) != self.placed[writes]:
                    raise _Fallback()
        except _Fallback:
            if writes is not None and writes in self.placed:
                # gathering would write into a copy: the sharded tensor would silently keep its old values
                raise UnsupportedError(
                    f"in-place '{op_name(node)}' at {source_line(node)} writes into a tensor sharded along the "
                    "sequence in a way ringfx cannot follow; write it out of place (x = x.op(...)) or pass "
                    "inputs='sharded'") from None
            self._fallback(node)

    def _setitem(self, node: fx.Node) -> None:
        """``x[index] = value`` into a sharded ``x``: exact when the index keeps every token and
        the value is a number (a write into some tokens only is refused)."""
        x, index, value = node.args
        if isinstance(value, fx.Node) or isinstance(index, fx.Node) or any(
                isinstance(i, fx.Node) for i in (index if isinstance(index, tuple) else (index,))):
            raise _Fallback()
        if not isinstance(_through_index(self.placed[x], index, self.shape(x)), Sharded):
            raise _Fallback()

    def _fallback(self, node: fx.Node) -> None:
        floating = []

        def full(a):
            if isinstance(a, fx.Node) and a in self.placed:
                if not isinstance(self.placed[a], Sharded):
                    raise UnsupportedError(f"'{op_name(node)}' at {source_line(node)} takes a tuple of tensors "
                                           "sharded along the sequence that ringfx cannot gather; pass "
                                           "inputs='sharded' or unpack the tuple before this op")
                floating.append(not self._cheap(a))
                return self.gather(a, node)
            return a

        node.args = fx.node.map_arg(node.args, full)
        node.kwargs = fx.node.map_arg(node.kwargs, full)
        self.placed.pop(node, None)
        name = op_name(node) or str(node.target)
        line = f"'{name}' at {source_line(node)}"
        self.report.fallbacks.append(line)
        if any(floating):  # gathers of ids and masks (mask building) are listed, not noted
            self.mixing.append((f"'{name}' (no sharded form) at {source_line(node)}", source_location(node)))
        if any(floating):  # ids and masks are O(S) to gather; activations are what sharding is for
            if self.options.fallbacks == "error":
                raise UnsupportedError(f"{line} has no sharded form: on a ring of {self.options.ring_size} its "
                                       "activations would be all-gathered (exact, but not sharded); pass "
                                       "fallbacks='gather' to allow it, or change the op")
            self.report.costly_fallbacks.append(line)

    def _cheap(self, node: fx.Node) -> bool:
        """O(S) to gather: ids, masks, labels, a per-key bias (one value per token and batch row)."""
        dtype = getattr(value_of(node), "dtype", None)
        if dtype is not None and not (dtype.is_floating_point or dtype.is_complex):
            return True
        shape, s = self.shape(node), self.placed[node]
        return shape is not None and all(n == 1 for d, n in enumerate(shape) if d not in (0, s.axis))

    def _distributed(self, node: fx.Node, what: str) -> None:
        self.report.distributed.append(f"{what} at {source_line(node)}")
        self.mixing.append((f"{re.sub(r' [(][^()]*[)]$', '', what)} at {source_line(node)}", source_location(node)))

    # ---- rules --------------------------------------------------------------------------------------
    def _rule(self, node: fx.Node) -> None:
        name = op_name(node) or str(getattr(node.target, "__name__", node.target))
        out = self.shape(node)
        if getattr(node.target, "__module__", None) == ring_glue.__name__:
            return self._glue(node)
        if node.target is _fused_loss_target():
            return self._fused_loss(node)
        if name in ("size", "numel") or (name == "getattr" and node.args[1] == "shape"):
            return self._constant_size(node)
        if name in _METADATA or (name == "getattr" and node.args[1] in ("dtype", "device", "ndim", "is_cuda")):
            return
        if name == "getitem" and isinstance(value_of(node.args[0]), (tuple, list)) or (
                name == "getitem" and isinstance(self.placed.get(node.args[0]), tuple)):
            parts = self.placed.get(node.args[0])
            if isinstance(parts, tuple) and isinstance(node.args[1], int):
                part = parts[node.args[1]]
                if part is not None:
                    self.placed[node] = part
                return
            raise _Fallback()
        if name in POINTWISE or name in CASTS or name in SHAPE_ONLY:
            return self._pointwise(node, out)
        if name == "getattr" and node.args[1] in ("real", "imag") and isinstance(self.placed.get(node.args[0]),
                                                                                Sharded):
            return self._keep_axis(node, node.args[0], self.placed[node.args[0]].axis)
        if name in ("view_as_complex", "view_as_real"):
            return self._complex_view(node, name)
        if name in ("linear",):
            return self._linear(node)
        if name in ("layer_norm", "rms_norm"):
            return self._norm(node)
        if name == "embedding":
            return self._embedding(node)
        if name in ("matmul", "bmm", "mm"):
            return self._matmul(node)
        if name == "addmm":
            return self._addmm(node)
        if name == "einsum":
            return self._einsum(node)
        if name in ("transpose", "swapaxes", "t", "permute", "movedim", "unsqueeze", "squeeze"):
            return self._axes(node, name)
        if name in RESHAPES or name in ("view_as", "reshape_as"):
            return self._view(node, name)
        if name == "expand":
            return self._expand(node)
        if name in _SUMS or name in _OTHER_REDUCTIONS:
            return self._reduction(node, name)
        if name in ("softmax", "log_softmax", "cumsum", "cumprod", "logcumsumexp", "cummax", "cummin"):
            return self._along(node, name)
        if name in _CLASS_LOSSES:
            return self._class_loss(node, name)
        if name in _ELEMENT_LOSSES:
            return self._element_loss(node, name)
        if name == "getitem":
            return self._index(node)
        if name in ("cat", "concat", "stack"):
            return self._cat(node, name)
        if name in ("split", "chunk", "unbind", "split_with_sizes"):
            return self._split(node, name)
        if name == "repeat":
            return self._repeat(node)
        if name in ("topk", "sort", "argsort"):
            return self._order_along_other_axis(node, name)
        if name in ("scatter", "scatter_", "scatter_add", "scatter_add_", "gather", "take_along_dim"):
            return self._index_along_other_axis(node)
        if name == "narrow":
            return self._narrow(node)
        if name == "pad":
            return self._pad(node)
        if name == "roll":
            return self._roll(node)
        if name == "conv1d":
            return self._conv1d(node)
        raise _Fallback()

    def _require(self, node: fx.Node, s: Sharded, rank_of: dict) -> None:
        """Bring each tensor operand to ``s`` aligned to the output's axis (``rank_of``:
        operand -> its number of dims); broadcast operands stay as they are."""
        out_nd = len(self.shape(node))

        def bring(a):
            if not isinstance(a, fx.Node) or a not in rank_of:
                return a
            nd = rank_of[a]
            axis = s.axis - (out_nd - nd)
            shape = self.shape(a)
            if axis < 0 or shape is None or shape[axis] == 1:
                if a in self.placed:
                    raise _Fallback()  # sharded, but not along the output's sequence axis
                return a
            if shape[axis] != s.span:
                raise _Fallback()
            want = s.at(axis)
            fill = False if getattr(value_of(a), "dtype", None) == torch.bool else 0
            return self.localize(a, want, node, fill)

        node.args = fx.node.map_arg(node.args, bring)
        node.kwargs = fx.node.map_arg(node.kwargs, bring)

    def _operands(self, node: fx.Node) -> dict:
        shapes = {}
        for a in node.all_input_nodes:
            shape = self.shape(a)
            if shape is not None and not isinstance(shape[0] if shape else None, tuple):
                shapes[a] = len(shape)
        return shapes

    def _pointwise(self, node: fx.Node, out) -> None:
        if out is None:
            raise _Fallback()
        ranks = self._operands(node)
        wanted = set()
        for a in node.all_input_nodes:
            s = self.placed.get(a)
            if isinstance(s, Sharded) and a in ranks:
                wanted.add(s.at(s.axis + len(out) - ranks[a]))
            elif a in self.placed:
                raise _Fallback()
        if len(wanted) != 1:
            raise _Fallback()
        s = wanted.pop()
        if out[s.axis] != s.span:
            raise _Fallback()
        self._require(node, s, ranks)
        self.placed[node] = s

    def _keep_axis(self, node: fx.Node, src: fx.Node, axis: int) -> None:
        """``node`` holds ``src``'s tokens at ``axis``; other operands must be replicated."""
        s = self.placed.get(src)
        if not isinstance(s, Sharded) or any(a in self.placed for a in node.all_input_nodes if a is not src):
            raise _Fallback()
        self.placed[node] = s.at(axis)

    def _order_along_other_axis(self, node: fx.Node, name: str) -> None:
        """``topk`` / ``sort`` / ``argsort`` along a dim that is not the sequence (a router's
        top experts per token): per token; (values, indices) keep the tokens' placement."""
        x = node.args[0]
        s, shape = self.placed.get(x), self.shape(x)
        position = 2 if name == "topk" else 1
        dim = node.kwargs.get("dim", node.args[position] if len(node.args) > position else -1)
        if not isinstance(s, Sharded) or shape is None or not isinstance(dim, int) or \
                normalize_dim(dim, len(shape)) == s.axis or any(a in self.placed for a in node.all_input_nodes
                                                               if a is not x):
            raise _Fallback()
        self.placed[node] = s if name == "argsort" else (s, s)

    def _index_along_other_axis(self, node: fx.Node) -> None:
        """``scatter`` / ``gather`` along a dim that is not the sequence, every tensor operand
        holding the same tokens along the same axis (MoE routing: per-token expert scores
        scattered into a (tokens, experts) table): per token."""
        x, dim = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        s, shape = self.placed.get(x), self.shape(x)
        if not isinstance(s, Sharded) or shape is None or not isinstance(dim, int) or \
                normalize_dim(dim, len(shape)) == s.axis:
            raise _Fallback()
        for a in node.all_input_nodes:
            a_shape = self.shape(a)
            if a_shape is None or len(a_shape) != len(shape) or a_shape[s.axis] != s.span:
                raise _Fallback()
            if self.placed.get(a) != s:
                if a in self.placed:
                    raise _Fallback()
                node.replace_input_with(a, self.localize(a, s, node))
        self.placed[node] = s

    def _complex_view(self, node: fx.Node, name: str) -> None:
        """``view_as_complex`` drops the last axis (the pair), ``view_as_real`` adds one:
        the sequence keeps its axis unless it is that pair (complex RoPE: Llama 4)."""
        x = node.args[0]
        s, shape = self.placed.get(x), self.shape(x)
        if not isinstance(s, Sharded) or shape is None or (name == "view_as_complex" and s.axis == len(shape) - 1):
            raise _Fallback()
        self._keep_axis(node, x, s.axis)

    def _linear(self, node: fx.Node) -> None:
        x = node.args[0]
        s = self.placed.get(x)
        nd = len(self.shape(x))
        if not isinstance(s, Sharded) or s.axis == nd - 1:
            raise _Fallback()
        self._keep_axis(node, x, s.axis)

    def _norm(self, node: fx.Node) -> None:
        x = node.args[0]
        s = self.placed.get(x)
        nd = len(self.shape(x))
        normalized = node.args[1] if len(node.args) > 1 else node.kwargs.get("normalized_shape")
        n_last = len(normalized) if isinstance(normalized, (tuple, list)) else 1
        if not isinstance(s, Sharded) or s.axis >= nd - n_last:
            raise _Fallback()
        self._keep_axis(node, x, s.axis)

    def _embedding(self, node: fx.Node) -> None:
        ids = node.args[0]
        if not isinstance(self.placed.get(ids), Sharded):
            raise _Fallback()
        self._keep_axis(node, ids, self.placed[ids].axis)

    def _matmul(self, node: fx.Node) -> None:
        a, b = node.args[0], node.args[1]
        sa, sb = self.shape(a), self.shape(b)
        out = self.shape(node)
        if sa is None or sb is None or out is None or len(sa) < 2 or len(sb) < 2:
            raise _Fallback()
        wanted = set()
        for operand, shape, contracted, kept in ((a, sa, len(sa) - 1, len(out) - 2), (b, sb, len(sb) - 2,
                                                                                     len(out) - 1)):
            s = self.placed.get(operand)
            if s is None:
                continue
            if not isinstance(s, Sharded) or s.axis == contracted:
                raise _Fallback()
            is_matrix_axis = s.axis == len(shape) - 2 or s.axis == len(shape) - 1
            wanted.add(s.at(kept if is_matrix_axis else s.axis + len(out) - len(shape)))
        if len(wanted) != 1:
            raise _Fallback()
        s = wanted.pop()
        if s.axis >= len(out) - 2:
            # a matrix axis: the other operand must not carry it
            for operand in (a, b):
                if operand in self.placed and self.placed[operand].axis < len(self.shape(operand)) - 2:
                    raise _Fallback()
            self.placed[node] = s
            return
        self._require(node, s, {x: len(self.shape(x)) for x in (a, b) if isinstance(x, fx.Node)})
        self.placed[node] = s

    def _addmm(self, node: fx.Node) -> None:
        """``addmm(bias, x, w)`` (GPT-2's Conv1D): the rows of ``x`` are tokens."""
        bias, x, w = node.args[:3]
        s = self.placed.get(x)
        if not isinstance(s, Sharded) or s.axis != 0 or bias in self.placed or w in self.placed:
            raise _Fallback()
        bshape = self.shape(bias)
        if bshape is not None and len(bshape) == 2 and bshape[0] != 1:
            raise _Fallback()
        self.placed[node] = s

    def _einsum(self, node: fx.Node) -> None:
        equation = node.args[0]
        operands = list(node.args[1]) if isinstance(node.args[1], (tuple, list)) else list(node.args[1:])
        if not isinstance(equation, str) or "->" not in equation or "." in equation:
            raise _Fallback()
        inputs, output = equation.replace(" ", "").split("->")
        specs = inputs.split(",")
        letters = set()
        for spec, x in zip(specs, operands):
            s = self.placed.get(x)
            if isinstance(s, Sharded):
                letters.add((spec[s.axis], s.length, s.outer, s.inner))
            elif x in self.placed:
                raise _Fallback()
        if len(letters) != 1:
            raise _Fallback()
        letter, length, outer, inner = letters.pop()
        if letter not in output:
            raise _Fallback()
        s = Sharded(output.index(letter), length, outer, inner)
        new_ops = []
        for spec, x in zip(specs, operands):
            if letter in spec and isinstance(x, fx.Node):
                x = self.localize(x, s.at(spec.index(letter)), node)
            new_ops.append(x)
        node.args = (equation, *new_ops) if not isinstance(node.args[1], (tuple, list)) else (equation, new_ops)
        self.placed[node] = s

    def _axes(self, node: fx.Node, name: str) -> None:
        x = node.args[0]
        s = self.placed.get(x)
        shape, out = self.shape(x), self.shape(node)
        if not isinstance(s, Sharded) or shape is None or out is None:
            raise _Fallback()
        nd = len(shape)
        if name in ("transpose", "swapaxes"):
            d0, d1 = (normalize_dim(d, nd) for d in node.args[1:3])
            axis = d1 if s.axis == d0 else d0 if s.axis == d1 else s.axis
        elif name == "t":
            axis = nd - 1 - s.axis
        elif name == "permute":
            dims = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) else node.args[1:]
            axis = [normalize_dim(d, nd) for d in dims].index(s.axis)
        elif name == "unsqueeze":
            d = normalize_dim(node.args[1] if len(node.args) > 1 else node.kwargs["dim"], nd + 1)
            axis = s.axis + (d <= s.axis)
        elif name == "squeeze":
            dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            if dims is None:
                dims = [d for d in range(nd) if shape[d] == 1]
            dims = [normalize_dim(d, nd) for d in (dims if isinstance(dims, (tuple, list)) else (dims,))]
            dims = [d for d in dims if shape[d] == 1]
            if s.axis in dims:
                raise _Fallback()
            axis = s.axis - sum(d < s.axis for d in dims)
        else:  # movedim
            src, dst = node.args[1], node.args[2]
            if not isinstance(src, int) or not isinstance(dst, int):
                raise _Fallback()
            order = list(range(nd))
            order.insert(normalize_dim(dst, nd), order.pop(normalize_dim(src, nd)))
            axis = order.index(s.axis)
        if out[axis] != s.span:
            raise _Fallback()
        self._keep_axis(node, x, axis)

    def _view(self, node: fx.Node, name: str) -> None:
        x = node.args[0]
        s = self.placed.get(x)
        shape, out = self.shape(x), self.shape(node)
        if not isinstance(s, Sharded) or shape is None or out is None or any(a in self.placed for a in
                                                                             node.all_input_nodes if a is not x):
            raise _Fallback()
        if not all(isinstance(d, int) for d in (*shape, *out)):
            raise _Fallback()
        new = _through_view(s, shape, out)
        if new is None:
            raise _Fallback()
        local = self.local_size(new)
        if name in ("view", "reshape"):
            sizes = list(node.args[1]) if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) \
                else list(node.args[1:])
            if "shape" in node.kwargs or "size" in node.kwargs:
                raise _Fallback()
            if len(sizes) != len(out):
                raise _Fallback()
            if sizes[new.axis] != -1:
                sizes[new.axis] = local
            node.args = (x, tuple(sizes)) if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) \
                else (x, *sizes)
        elif name == "unflatten":
            dim = normalize_dim(node.args[1], len(shape))
            sizes = list(node.args[2])
            if dim <= new.axis < dim + len(sizes) and sizes[new.axis - dim] != -1:
                sizes[new.axis - dim] = local  # else the sequence is outside the unflattened dim
            node.args = (x, node.args[1], tuple(sizes))
        elif name in ("view_as", "reshape_as"):
            raise _Fallback()
        self.placed[node] = new

    def _expand(self, node: fx.Node) -> None:
        x = node.args[0]
        s = self.placed.get(x)
        shape, out = self.shape(x), self.shape(node)
        if not isinstance(s, Sharded) or shape is None or out is None:
            raise _Fallback()
        sizes = list(node.args[1]) if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) \
            else list(node.args[1:])
        axis = s.axis + len(out) - len(shape)
        if sizes[axis] != -1:
            sizes[axis] = self.local_size(s)
        node.args = (x, tuple(sizes)) if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) else \
            (x, *sizes)
        self.placed[node] = s.at(axis)

    def _repeat(self, node: fx.Node) -> None:
        x = node.args[0]
        s = self.placed.get(x)
        shape, out = self.shape(x), self.shape(node)
        if not isinstance(s, Sharded) or shape is None or out is None:
            raise _Fallback()
        reps = list(node.args[1]) if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) \
            else list(node.args[1:])
        axis = s.axis + len(out) - len(shape)
        if reps[axis] != 1:
            raise _Fallback()
        self._keep_axis(node, x, axis)

    def _reduction(self, node: fx.Node, name: str) -> None:
        x = node.args[0]
        s = self.placed.get(x)
        shape = self.shape(x)
        if not isinstance(s, Sharded) or shape is None:
            raise _Fallback()
        if name in _NORMS:
            return self._norm_reduction(node, name, x, s, shape)
        if name in _MOMENTS and len(node.args) > 2:
            raise _Fallback()  # torch.var(x, dim, unbiased, keepdim): spell it with keywords
        nd = len(shape)
        dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        if dims is None and node.kwargs.get("axis") is not None:
            dims = node.kwargs["axis"]
        if isinstance(dims, (tuple, list)) and len(dims) == 0:
            dims = None
        if dims is not None and not all(isinstance(d, int) for d in (dims if isinstance(dims, (tuple, list))
                                                                     else (dims,))):
            raise _Fallback()
        reduced = set(range(nd)) if dims is None else {normalize_dim(d, nd) for d in (
            dims if isinstance(dims, (tuple, list)) else (dims,))}
        keepdim = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
        if s.axis not in reduced:
            if name in ("max", "min", "var_mean", "std_mean", "aminmax") and dims is not None:
                raise _Fallback()  # tuple results
            self._keep_axis(node, x, s.axis if keepdim else s.axis - sum(d < s.axis for d in reduced))
            return
        if name in ("amax", "amin") and s.outer == s.inner == 1 and isinstance(keepdim, bool) and \
                not set(node.kwargs) - {"dim", "keepdim"}:
            with self.graph.inserting_before(node):
                extreme = self.graph.call_function(_extreme_over_sequence, (
                    x, name, tuple(sorted(reduced)), keepdim, s.axis, s.length, self.group, self.layout))
            extreme.meta[VALUE_KEY] = value_of(node)
            extreme.meta["stack_trace"] = node.meta.get("stack_trace")
            node.replace_all_uses_with(extreme)
            self.graph.erase_node(node)
            self._distributed(extreme, f"'{name}' over the sequence (local {name} + all-gather of P values)")
            return
        count = math.prod(shape[d] for d in reduced)
        if not isinstance(keepdim, bool):
            raise _Fallback()
        dims_t = tuple(sorted(reduced))
        if name in _MOMENTS and not set(node.kwargs) - {"dim", "keepdim", "correction", "unbiased"}:
            unbiased = node.kwargs.get("unbiased", True)
            correction = node.kwargs.get("correction", 1 if unbiased else 0)
            if isinstance(correction, (int, float)) and not isinstance(correction, bool):
                return self._replace(node, _moments_over_sequence, (
                    x, name, dims_t, keepdim, s.axis, s.length, self.group, self.layout, count, correction),
                    f"'{name}' over the sequence (global mean, then the sum of squared deviations, all-reduced)")
        if name == "logsumexp" and s.outer == s.inner == 1 and dims is not None and \
                not set(node.kwargs) - {"dim", "keepdim"}:
            return self._replace(node, _logsumexp_over_sequence, (
                x, dims_t, keepdim, s.axis, s.length, self.group, self.layout),
                "'logsumexp' over the sequence (the ring's max, then a local sum of exps all-reduced)")
        if name in ("max", "min", "argmax", "argmin") and s.outer == s.inner == 1 and dims is not None and \
                reduced == {s.axis} and not set(node.kwargs) - {"dim", "keepdim"}:
            return self._replace(node, _extreme_index_over_sequence, (
                x, name, keepdim, s.axis, s.length, self.group, self.layout),
                f"'{name}' along the sequence (each rank's, all-gathered; ties to the first position)")
        if name not in _SUMS or node.args[2:3] and not isinstance(keepdim, bool) or \
                set(node.kwargs) - {"dim", "keepdim", "dtype", "axis"}:
            raise _Fallback()
        with self.graph.inserting_before(node):
            total = self.graph.call_function(_sum_over_sequence, (
                x, None if dims is None else tuple(sorted(reduced)), bool(keepdim), s.axis, s.length,
                self.group, self.layout, node.kwargs.get("dtype"), count if name == "mean" else None))
        total.meta[VALUE_KEY] = value_of(node)
        total.meta["stack_trace"] = node.meta.get("stack_trace")
        node.replace_all_uses_with(total)
        self.graph.erase_node(node)
        self._distributed(total, f"'{name}' over the sequence (local sum + all-reduce)")

    def _replace(self, node: fx.Node, fn, args: tuple, what: str) -> fx.Node:
        """``node`` replaced by ``fn(*args)`` (a replicated result), reported as a distributed form."""
        with self.graph.inserting_before(node):
            new = self.graph.call_function(fn, args)
        new.meta[VALUE_KEY] = value_of(node)
        new.meta["stack_trace"] = node.meta.get("stack_trace")
        node.replace_all_uses_with(new)
        self.graph.erase_node(node)
        self._distributed(new, what)
        return new

    def _norm_reduction(self, node: fx.Node, name: str, x: fx.Node, s: Sharded, shape) -> None:
        """``x.norm(p, dim, keepdim)`` / ``linalg.vector_norm(x, ord, dim, keepdim)``: the 2-norm
        over the sequence is the root of a distributed sum of squares."""
        order = ("x", "ord" if name == "linalg_vector_norm" else "p", "dim", "keepdim")
        a = dict(zip(order, node.args))
        a.update(node.kwargs)
        if set(a) - set(order) or isinstance(a.get("dim"), fx.Node):
            raise _Fallback()
        p = a.get(order[1], 2 if name == "linalg_vector_norm" else "fro")
        dims, keepdim, nd = a.get("dim"), a.get("keepdim", False), len(shape)
        dims = None if dims is None or dims == [] or dims == () else dims
        reduced = set(range(nd)) if dims is None else {normalize_dim(d, nd) for d in (
            dims if isinstance(dims, (tuple, list)) else (dims,))}
        if not isinstance(keepdim, bool):
            raise _Fallback()
        if s.axis not in reduced:
            return self._keep_axis(node, x, s.axis if keepdim else s.axis - sum(d < s.axis for d in reduced))
        if p not in (2, 2.0, "fro") or (name == "norm" and p == "fro" and dims is not None and len(reduced) > 2):
            raise _Fallback()
        self._replace(node, _two_norm_over_sequence, (
            x, tuple(sorted(reduced)), keepdim, s.axis, s.length, self.group, self.layout),
            f"'{name}' (2-norm) over the sequence (local sum of squares + all-reduce)")

    def _along(self, node: fx.Node, name: str) -> None:
        x = node.args[0]
        s = self.placed.get(x)
        shape = self.shape(x)
        if not isinstance(s, Sharded) or shape is None:
            raise _Fallback()
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        if dim is None and name in _LAST_BY_DEFAULT:
            dim = len(shape) - 1
        if not isinstance(dim, int):
            raise _Fallback()
        if normalize_dim(dim, len(shape)) != s.axis:
            return self._keep_axis(node, x, s.axis)
        if name not in ("cumsum", "cumprod") or s.outer != 1 or s.inner != 1 or set(node.kwargs) - {"dim", "dtype"} or \
                len(node.args) > 2 or any(a in self.placed for a in node.all_input_nodes if a is not x):
            raise _Fallback()
        with self.graph.inserting_before(node):
            scan = self.graph.call_function(_cumsum_over_sequence, (
                x, s.axis, s.length, self.group, self.layout, node.kwargs.get("dtype"), name))
        scan.meta[VALUE_KEY] = value_of(node)
        scan.meta["stack_trace"] = node.meta.get("stack_trace")
        node.replace_all_uses_with(scan)
        self.graph.erase_node(node)
        self.placed[scan] = s
        self._distributed(scan, f"'{name}' along the sequence (local scan + the ring's prefix)")

    def _class_loss(self, node: fx.Node, name: str) -> None:
        """cross_entropy / nll_loss: rows are tokens; a mean is over the ring's valid targets."""
        x, target = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("target")
        s, shape = self.placed.get(x), self.shape(x)
        if not isinstance(s, Sharded) or shape is None or len(node.args) > 2 or not isinstance(target, fx.Node):
            raise _Fallback()
        if node.kwargs.get("weight") is not None or set(node.kwargs) - {"target", "ignore_index", "reduction",
                                                                         "label_smoothing"}:
            raise _Fallback()
        if len(shape) == 1 or s.axis == 1:
            raise _Fallback()  # the class axis
        target_axis = s.axis if s.axis == 0 else s.axis - 1
        tshape = self.shape(target)
        if tshape is None or tshape[target_axis] != s.span:
            raise _Fallback()
        ignore = node.kwargs.get("ignore_index", -100)
        target = self.localize(target, s.at(target_axis), node, fill=ignore)
        reduction = node.kwargs.get("reduction", "mean")
        if reduction == "none":
            node.args = (x, target)
            self.placed[node] = s.at(target_axis)
            return
        with self.graph.inserting_before(node):
            total = self.graph.call_function(_class_loss_over_sequence, (
                name, x, target, target_axis, s.length, s.outer, s.inner, self.group, self.layout, ignore,
                reduction, node.kwargs.get("label_smoothing", 0.0)))
        total.meta[VALUE_KEY] = value_of(node)
        total.meta["stack_trace"] = node.meta.get("stack_trace")
        node.replace_all_uses_with(total)
        self.graph.erase_node(node)
        self._distributed(total, f"'{name}' (reduction={reduction!r}) over the sequence (the ring's sum)")

    def _fused_loss(self, node: fx.Node) -> None:
        """The blockwise loss (``ringfx::linear_cross_entropy``, from ``blockwise_loss=``): each
        rank's chunked sum over its own tokens, then the ring's sum (and count, for a mean)."""
        hidden, weight, bias, target, ignore, reduction, smoothing, chunk, loss_dtype = node.args
        s, shape, tshape = self.placed.get(hidden), self.shape(hidden), self.shape(target)
        if not isinstance(s, Sharded) or shape is None or tshape is None or s.axis == len(shape) - 1 or \
                weight in self.placed or bias in self.placed or node.kwargs:
            raise _Fallback()
        if tuple(tshape) == tuple(shape[:-1]):
            want = s
        elif len(tshape) == 1 and tshape[0] == math.prod(shape[:-1]):  # flattened labels, rows in order
            want = Sharded(0, s.length, math.prod(shape[:s.axis]) * s.outer,
                           math.prod(shape[s.axis + 1:-1]) * s.inner)
        else:
            raise _Fallback()
        target = self.localize(target, want, node, fill=ignore)
        with self.graph.inserting_before(node):
            fused = self.graph.call_function(_fused_loss_over_sequence, (
                hidden, weight, bias, target, ignore, reduction, smoothing, chunk, loss_dtype, want.axis,
                want.length, want.outer, want.inner, self.group, self.layout))
        fused.meta[VALUE_KEY] = value_of(node)
        fused.meta["stack_trace"] = node.meta.get("stack_trace")
        node.replace_all_uses_with(fused)
        self.graph.erase_node(node)
        self._distributed(fused, f"blockwise loss (reduction={reduction!r}) over the sequence ({chunk} tokens "
                                 "per chunk, the ring's sum)")

    def _element_loss(self, node: fx.Node, name: str) -> None:
        x, target = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("target")
        out = self.shape(x)
        if not isinstance(self.placed.get(x), Sharded) or out is None or len(node.args) > 2:
            raise _Fallback()
        if set(node.kwargs) - {"target", "reduction"} or self.shape(target) != out:
            raise _Fallback()
        s = self.placed[x]
        reduction = node.kwargs.get("reduction", "mean")
        target = self.localize(target, s, node)
        node.args, node.kwargs = (x, target), {"reduction": "none"}
        self.placed[node] = s
        if reduction == "none":
            return
        with self.graph.inserting_after(node):
            total = self.graph.call_function(_sum_over_sequence, (
                node, None, False, s.axis, s.length, self.group, self.layout, None,
                math.prod(out) if reduction == "mean" else None))
        total.meta[VALUE_KEY] = value_of(node)
        total.meta["stack_trace"] = node.meta.get("stack_trace")
        node.replace_all_uses_with(total, delete_user_cb=lambda u: u is not total)
        self._distributed(total, f"'{name}' (reduction={reduction!r}) over the sequence (the ring's sum)")

    def _index(self, node: fx.Node) -> None:
        x, index = node.args[0], node.args[1]
        s, shape = self.placed.get(x), self.shape(x)
        if not isinstance(s, Sharded) or shape is None:
            raise _Fallback()
        if any(isinstance(i, fx.Node) for i in (index if isinstance(index, tuple) else (index,))):
            return self._pick_per_row(node, x, s, index, shape)
        result = _through_index(s, index, shape)
        if isinstance(result, Sharded):
            self.placed[node] = result
            return
        if result == "slice" and s.outer == 1 and s.inner == 1:
            return self._slice(node, x, s, index, shape)
        if result == "select" and s.outer == 1 and s.inner == 1:
            items = index if isinstance(index, tuple) else (index,)
            # only x[..., i, ...] with whole slices elsewhere
            token = [i for i in items if isinstance(i, int)]
            if len(token) == 1 and all(i is Ellipsis or (isinstance(i, slice) and i == slice(None))
                                       for i in items if not isinstance(i, int)):
                with self.graph.inserting_before(node):
                    picked = self.graph.call_function(collectives.select_token, (
                        x, s.axis, token[0], s.length, self.group, self.layout))
                picked.meta[VALUE_KEY] = value_of(node)
                picked.meta["stack_trace"] = node.meta.get("stack_trace")
                node.replace_all_uses_with(picked)
                self.graph.erase_node(node)
                self._distributed(picked, "token select along the sequence (from the rank that holds it)")
                return
        raise _Fallback()

    def _pick_per_row(self, node: fx.Node, x: fx.Node, s: Sharded, index, shape) -> None:
        """``x[rows, tokens]`` with one token per row (a sequence classifier's last
        non-padding token: ``logits[arange(B), last]``): each rank contributes the rows whose
        token it holds, the ring sums them."""
        items = index if isinstance(index, tuple) else (index,)
        if s.axis != 1 or s.outer != 1 or s.inner != 1 or len(items) < 2:
            raise _Fallback()
        rows, tokens = items[0], items[1]
        if not all(isinstance(t, fx.Node) and t not in self.placed and self.shape(t) is not None
                   and len(self.shape(t)) == 1 for t in (rows, tokens)) or self.shape(rows) != self.shape(tokens):
            raise _Fallback()
        if any(not (i is Ellipsis or (isinstance(i, slice) and i == slice(None))) for i in items[2:]):
            raise _Fallback()
        self._replace(node, _pick_per_row, (x, rows, tokens, s.length, self.group, self.layout),
                      "token select per row along the sequence (from the ranks that hold them)")

    # ---- tokens that cross shard boundaries (runtime.token_moves) -----------------------------------
    def _moved(self, x: fx.Node, s: Sharded, spec: str, length: int, fill, before: fx.Node) -> fx.Node:
        """``x``'s tokens moved by ``spec``: a sequence of ``length`` tokens along the same axis."""
        with self.graph.inserting_before(before):
            new = self.graph.call_function(token_moves.take_tokens, (
                x, s.axis, s.length, spec, fill, self.group, self.layout))
        shape = list(self.shape(x))
        shape[s.axis] = length
        self.shapes[new] = tuple(shape)
        new.meta[VALUE_KEY] = torch.empty(shape, dtype=getattr(value_of(x), "dtype", None), device="meta")
        new.meta["stack_trace"] = before.meta.get("stack_trace")
        self.placed[new] = Sharded(s.axis, length)
        return new

    def _shifted(self, x: fx.Node, s: Sharded, length: int, offset: int, before: fx.Node, wrap=False,
                 fill=0) -> fx.Node:
        """The sharded sequence ``y[t] = x[t + offset]`` (mod S if ``wrap``) of ``length`` tokens."""
        if length <= 0:
            raise _Fallback()
        return self._moved(x, s, token_moves.shift_spec(length, offset, wrap), length, fill, before)

    def _slice(self, node: fx.Node, x: fx.Node, s: Sharded, index, shape) -> None:
        """``x[..., a:b, ...]`` along the sequence: the tokens of ``[a, b)`` re-sharded as a
        sequence of their own (a shift: each rank gets the few boundary tokens it lacks)."""
        items = list(index) if isinstance(index, tuple) else [index]
        k = _item_on_axis(s.axis, items, len(shape))
        if k is None or not isinstance(items[k], slice) or items[k].step not in (None, 1) or not all(
                isinstance(v, (int, type(None))) for v in (items[k].start, items[k].stop)):
            raise _Fallback()
        start, stop, _ = items[k].indices(s.length)
        moved = self._shifted(x, s, stop - start, start, node)
        items[k] = slice(None)
        new_index = tuple(items) if isinstance(index, tuple) else items[0]
        node.args = (moved, new_index)
        result = _through_index(self.placed[moved], new_index, self.shapes[moved])
        if not isinstance(result, Sharded):
            raise _Fallback()
        self.placed[node] = result
        self._distributed(node, f"slice [{start}:{stop}] along the sequence (boundary tokens from the neighbours)")

    def _narrow(self, node: fx.Node) -> None:
        x, dim, start, length = (list(node.args) + [node.kwargs.get(k) for k in ("dim", "start", "length")])[:4]
        s, shape = self.placed.get(x), self.shape(x)
        if not isinstance(s, Sharded) or shape is None or not all(isinstance(v, int) for v in (dim, start, length)):
            raise _Fallback()
        if normalize_dim(dim, len(shape)) != s.axis:
            return self._keep_axis(node, x, s.axis)
        if s.outer != 1 or s.inner != 1:
            raise _Fallback()
        start = start % s.length if start < 0 else start
        moved = self._shifted(x, s, length, start, node)
        node.replace_all_uses_with(moved)
        self.graph.erase_node(node)
        self._distributed(moved, f"narrow [{start}:{start + length}] along the sequence (boundary tokens from the "
                                 "neighbours)")

    def _pad(self, node: fx.Node) -> None:
        """``F.pad(x, (.., left, right, ..), value=v)`` on the sequence axis: a shift by
        ``left`` into a sequence of ``S + left + right`` tokens, the new ones ``v``."""
        x = node.args[0]
        pad = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad")
        mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
        value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value", None)
        s, shape = self.placed.get(x), self.shape(x)
        if not isinstance(s, Sharded) or shape is None or not isinstance(pad, (tuple, list)) or not all(
                isinstance(p, int) for p in pad) or mode != "constant" or isinstance(value, fx.Node):
            raise _Fallback()
        nd = len(shape)
        pair = nd - 1 - s.axis  # F.pad lists (left, right) pairs from the last dim backwards
        if 2 * pair + 1 >= len(pad) or (pad[2 * pair], pad[2 * pair + 1]) == (0, 0):
            return self._keep_axis(node, x, s.axis)
        if s.outer != 1 or s.inner != 1:
            raise _Fallback()
        left, right = pad[2 * pair], pad[2 * pair + 1]
        moved = self._shifted(x, s, s.length + left + right, -left, node, fill=0 if value is None else value)
        rest = list(pad)
        rest[2 * pair:2 * pair + 2] = [0, 0]
        self._distributed(moved, f"pad by ({left}, {right}) tokens along the sequence (boundary tokens from the "
                                 "neighbours)")
        if not any(rest):
            node.replace_all_uses_with(moved)
            self.graph.erase_node(node)
            return
        node.args = (moved, tuple(rest), *node.args[2:])
        self.placed[node] = self.placed[moved]

    def _roll(self, node: fx.Node) -> None:
        """``torch.roll`` along the sequence: a shift that wraps around."""
        x = node.args[0]
        shifts = node.args[1] if len(node.args) > 1 else node.kwargs.get("shifts")
        dims = node.args[2] if len(node.args) > 2 else node.kwargs.get("dims")
        s, shape = self.placed.get(x), self.shape(x)
        if not isinstance(s, Sharded) or shape is None or dims is None:
            raise _Fallback()  # dims=None rolls the flattened tensor
        shifts = list(shifts) if isinstance(shifts, (tuple, list)) else [shifts]
        dims = [normalize_dim(d, len(shape)) for d in (dims if isinstance(dims, (tuple, list)) else [dims])]
        if len(shifts) != len(dims) or not all(isinstance(k, int) for k in shifts):
            raise _Fallback()
        if s.axis not in dims:
            return self._keep_axis(node, x, s.axis)
        if s.outer != 1 or s.inner != 1 or dims.count(s.axis) != 1:
            raise _Fallback()
        k = shifts[dims.index(s.axis)]
        moved = self._shifted(x, s, s.length, -k, node, wrap=True)
        self._distributed(moved, f"roll by {k} along the sequence (boundary tokens from the neighbours)")
        rest = [(k2, d) for k2, d in zip(shifts, dims) if d != s.axis]
        if not rest:
            node.replace_all_uses_with(moved)
            self.graph.erase_node(node)
            return
        node.args = (moved, tuple(k2 for k2, _ in rest), tuple(d for _, d in rest))
        node.kwargs = {}
        self.placed[node] = self.placed[moved]

    def _conv1d(self, node: fx.Node) -> None:
        """A convolution over the tokens (``(B, C, S)``, the sequence last, stride 1): each
        rank convolves its tokens plus the ``dilation * (k - 1)`` beyond them (a halo)."""
        names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
        defaults = (None, None, None, 1, 0, 1, 1)
        a = [node.args[i] if i < len(node.args) else node.kwargs.get(n, d) for i, (n, d) in
             enumerate(zip(names, defaults))]
        x, w, b, stride, padding, dilation, groups = a
        s, shape, wshape = self.placed.get(x), self.shape(x), self.shape(w)
        one = lambda v: v[0] if isinstance(v, (tuple, list)) and len(v) == 1 else v  # noqa: E731
        stride, padding, dilation = one(stride), one(padding), one(dilation)
        if not isinstance(s, Sharded) or shape is None or wshape is None or s.axis != len(shape) - 1 or \
                s.outer != 1 or s.inner != 1 or w in self.placed or b in self.placed or stride != 1 or \
                not isinstance(dilation, int) or not isinstance(groups, int):
            raise _Fallback()
        span = dilation * (wshape[-1] - 1)
        if padding == "valid":
            padding = 0
        if padding == "same":
            left, right = span // 2, span - span // 2
        elif isinstance(padding, int):
            left = right = padding
        else:
            raise _Fallback()
        out_length = s.length + left + right - span
        if out_length <= 0:
            raise _Fallback()
        with self.graph.inserting_before(node):
            conv = self.graph.call_function(token_moves.conv1d_over_sequence, (
                x, w, b, left, right, dilation, groups, s.length, out_length, self.group, self.layout))
        conv.meta[VALUE_KEY] = value_of(node)
        conv.meta["stack_trace"] = node.meta.get("stack_trace")
        node.replace_all_uses_with(conv)
        self.graph.erase_node(node)
        self.placed[conv] = Sharded(s.axis, out_length)
        self._distributed(conv, f"conv1d over the sequence (kernel {wshape[-1]}, a halo of {span} tokens)")

    def _cat(self, node: fx.Node, name: str) -> None:
        tensors = node.args[0]
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        out = self.shape(node)
        if not isinstance(tensors, (tuple, list)) or not isinstance(dim, int) or out is None:
            raise _Fallback()
        nd = len(out) - (name == "stack")
        dim = normalize_dim(dim, len(out))
        wanted = set()
        if name != "stack":  # an empty KV cache: cat([empty, x]) is x
            live = [t for t in tensors if not (isinstance(t, fx.Node) and self.shape(t) is not None
                                               and 0 in self.shape(t))]
            if len(live) == 1 and isinstance(self.placed.get(live[0]), Sharded):
                self.placed[node] = self.placed[live[0]]
                return
        for t in tensors:
            s = self.placed.get(t)
            if isinstance(s, Sharded):
                axis = s.axis + (name == "stack" and dim <= s.axis)
                if name != "stack" and s.axis == dim:
                    raise _Fallback()
                wanted.add(s.at(axis))
            elif t in self.placed:
                raise _Fallback()
        if len(wanted) != 1:
            raise _Fallback()
        s = wanted.pop()
        in_axis = s.axis - (name == "stack" and dim <= s.axis)
        new = []
        for t in tensors:
            shape = self.shape(t)
            if isinstance(t, fx.Node) and t not in self.placed:
                if shape is None or len(shape) != nd or shape[in_axis] != s.span:
                    raise _Fallback()
                t = self.localize(t, s.at(in_axis), node)
            new.append(t)
        node.args = (type(tensors)(new), *node.args[1:])
        self.placed[node] = s

    def _split(self, node: fx.Node, name: str) -> None:
        x = node.args[0]
        s, shape = self.placed.get(x), self.shape(x)
        if not isinstance(s, Sharded) or shape is None:
            raise _Fallback()
        dim = node.kwargs.get("dim", node.args[1 if name == "unbind" else 2] if len(node.args) > (
            1 if name == "unbind" else 2) else 0)
        if not isinstance(dim, int):
            raise _Fallback()
        dim = normalize_dim(dim, len(shape))
        if dim == s.axis:
            raise _Fallback()
        count = len(value_of(node)) if isinstance(value_of(node), (tuple, list)) else None
        if count is None:
            raise _Fallback()
        axis = s.axis - (name == "unbind" and dim < s.axis)
        self.placed[node] = tuple(s.at(axis) for _ in range(count))

    def _constant_size(self, node: fx.Node) -> None:
        """A size query on a sharded tensor: the model asked for the full length."""
        value = value_of(node)
        if isinstance(value, int) or (isinstance(value, (tuple, list, torch.Size)) and
                                      all(isinstance(v, int) for v in value)):
            node.replace_all_uses_with(value if isinstance(value, int) else tuple(value))
            self.graph.erase_node(node)
            return
        raise _Fallback()

    def _glue(self, node: fx.Node) -> None:
        """The attention rewrite's mask helpers read whole masks (the key axis in full)."""
        if node.target is ring_glue.key_padding_from_mask:
            mask = node.args[0]
            s = self.placed.get(mask)
            shape = self.shape(mask)
            if isinstance(s, Sharded) and shape is not None and s.axis == len(shape) - 1:
                self.placed[node] = s.at(1)
                return
            if mask not in self.placed:
                return
        if node.target is ring_glue.bias_from_mask:
            mask, out = node.args[0], self.shape(node)
            s, shape = self.placed.get(mask), self.shape(mask)
            if isinstance(s, Sharded) and shape is not None and out is not None:
                self.placed[node] = s.at(s.axis + len(out) - len(shape))
                return
        if node.target is ring_glue.gather_key_columns:
            # with full-length inputs the key columns are whole already (or gathered here, trimmed)
            bias = node.args[0]
            if bias in self.placed:
                bias = self.gather(bias, node)
            node.replace_all_uses_with(bias)
            self.graph.erase_node(node)
            return
        raise _Fallback()

    def _ring_op(self, node: fx.Node) -> None:
        q, k, v, kpm, seg, bias = node.args[:6]
        q_shape = self.shape(q)
        length = q_shape[2]
        s = Sharded(2, length)
        world = int(self.options.ring_size)
        padded = collectives.padded_length(length, world, self.layout) != length
        args = list(node.args)
        for i, t in enumerate((q, k, v)):
            args[i] = self.localize(t, s, node)
        if kpm is not None:
            args[3] = self.localize(kpm, Sharded(1, length), node, fill=False)
        elif padded:
            with self.graph.inserting_before(node):
                args[3] = self.graph.call_function(collectives.valid_key_mask, (
                    args[0], length, self.group, self.layout))
        if seg is not None:
            args[4] = self.localize(seg, Sharded(1, length), node, fill=-1)
        if bias is not None:
            if bias.target is ring_glue.gather_key_columns:
                bias = bias.args[0]
            bshape = self.shape(bias)
            if bshape is None or len(bshape) != 4:
                raise UnsupportedError(f"the attention mask at {source_line(node)} is not a 4-D tensor of known "
                                       "shape, so ringfx cannot shard it; build it as (B, H, S, S) or pass "
                                       "inputs='sharded'")
            rows = Sharded(2, length)
            if bias in self.placed and not (self.placed[bias] == rows and bshape[-1] == length):
                bias = self.gather(bias, node)  # key columns are needed whole: O(S) for a per-key bias
            if bshape[-2] != 1 and bias not in self.placed:
                bias = self.shard(bias, rows, node)
            if bshape[-1] != 1 and padded:
                with self.graph.inserting_before(node):
                    bias = self.graph.call_function(collectives.pad_sequence, (
                        bias, 3, length, self.group, self.layout, 0))
            args[5] = bias
        node.args = tuple(args)
        self.placed[node] = (s, s)


class _Analysis(_Sharder):
    """The sharding walk for the guards (``sequence_analysis``), on a copy: symbolic sizes (a
    graph captured with dynamic shapes) are read at their example values, size queries are
    left as they are, and every value the model made that would be sliced to the rank's
    tokens is traced back to the ``arange`` over the sequence length it came from."""

    positions: list

    def shape(self, node) -> Optional[tuple]:
        return _hinted(super().shape(node))

    def _constant_size(self, node: fx.Node) -> None:
        return None

    def shard(self, node: fx.Node, s: Sharded, before: fx.Node, fill=0) -> fx.Node:
        self._trace_positions(node, s.length)
        return super().shard(node, s, before, fill)

    def _shard_in_place(self, node: fx.Node, axis: int) -> fx.Node:
        self._trace_positions(node, self.shape(node)[axis])
        return super()._shard_in_place(node, axis)

    def _trace_positions(self, node: fx.Node, length: int) -> None:
        seen, todo = set(), [node]
        while todo:
            n = todo.pop()
            if n in seen or n.op == "placeholder":
                continue
            seen.add(n)
            end = arange_length(n)
            if end is not None and _hinted(end) == length:
                if all(n is not p[0] for p in self.positions):
                    self.positions.append((n, f"torch.arange({end}) at {source_line(n)}", source_location(n)))
                continue
            if getattr(n.target, "__module__", None) == ring_glue.__name__:
                continue  # the rewrite reads only the key padding of a mask (its causal part is the op's)
            if op_name(n) == "getitem" and isinstance(n.args[0], fx.Node) and \
                    n.args[0].target is collectives.gather_sequence:
                todo.append(n.args[0])  # an index into the rank's own tokens: local positions are right there
                continue
            todo.extend(n.all_input_nodes)


def _hinted(shape):
    if isinstance(shape, tuple):
        return tuple(_hinted(d) for d in shape)
    if isinstance(shape, torch.SymInt):
        hint = getattr(shape.node, "hint", None)
        return int(hint) if hint is not None else shape
    return shape


def _through_view(s: Sharded, in_shape, out_shape) -> Optional[Sharded]:
    """The sequence's place after a reshape: the same span of the row-major index in one
    output axis, or None when the reshape splits it."""
    start = math.prod(in_shape[: s.axis]) * s.outer  # units: the sequence occupies [start, start * length)
    stop = start * s.length
    for j in range(len(out_shape)):
        lo, hi = math.prod(out_shape[:j]), math.prod(out_shape[: j + 1])
        if lo <= start and stop <= hi and start % lo == 0 and hi % stop == 0:
            if out_shape[j] == 1:
                continue
            return Sharded(j, s.length, start // lo, hi // stop)
    return None


def _through_index(s: Sharded, index, in_shape):
    """Where the sequence is after ``x[index]`` (basic indexing): a ``Sharded``, "select"
    (an int index into the sequence), "slice" (part of it) or "unknown"."""
    kind, value = index_axis(s.axis, index, in_shape)
    if kind == "axis":
        return s.at(value)
    return kind if kind in ("select", "slice") else "unknown"

def _pick_per_row(x, rows, tokens, length, group_name, layout):
    """``x[rows, tokens]`` of the full sequence (axis 1 sharded; ``rows`` and ``tokens`` of
    shape (N,)): the ranks' rows holding each token, summed over the ring."""
    assert_on_device(((tokens < length) & (tokens >= -length)).all(),
                     f"a token index is out of bounds for a sequence of {length} tokens")
    positions = collectives.token_positions(group_name, layout, length, x.device)
    hit = positions[None, :] == (tokens % length)[:, None]  # (N, S_local)
    picked = x[rows]  # (N, S_local, ...)
    hit = hit.view(*hit.shape, *(1,) * (picked.dim() - 2))
    return collectives.all_reduce_sum(torch.where(hit, picked, torch.zeros((), dtype=picked.dtype,
                                                                           device=picked.device)).sum(1), group_name)


def _item_on_axis(axis: int, items: list, nd: int) -> Optional[int]:
    """Which item of a basic index (ints, slices, None, Ellipsis) applies to ``axis``."""
    axis_in = 0
    for k, it in enumerate(items):
        if it is Ellipsis:
            skip = nd - axis_in - sum(1 for x in items[k + 1:] if x is not None and x is not Ellipsis)
            if axis_in <= axis < axis_in + skip:
                return None
            axis_in += skip
        elif it is None:
            continue
        else:
            if axis_in == axis:
                return k
            axis_in += 1
    return None


def _sum_over_sequence(x, dims, keepdim, axis, length, group_name, layout, dtype, count):
    """``x.sum(dims)`` (or the mean over ``count`` values) over the whole ring: the local
    sum of this rank's tokens (pad tokens masked out) all-reduced."""
    x = collectives.mask_padding(x, axis, length, group_name, layout)
    kwargs = {} if dtype is None else {"dtype": dtype}
    local = x.sum(**kwargs) if dims is None else x.sum(dims, keepdim=keepdim, **kwargs)
    total = collectives.all_reduce_sum(local, group_name)
    return total if count is None else total / count


_INPLACE_OPERATORS = frozenset({"iadd", "isub", "imul", "itruediv", "ifloordiv", "imod", "ipow", "iand", "ior",
                                "ixor", "setitem"})


def _writes_into(node: fx.Node) -> Optional[fx.Node]:
    """The tensor an in-place op writes into (``x.add_(y)``, ``x += y``, ``x[i] = v``), else None."""
    name = getattr(node.target, "__name__", str(node.target)) if node.op == "call_function" else str(node.target)
    inplace = name in _INPLACE_OPERATORS or (node.op == "call_method" and name.endswith("_")
                                             and not name.startswith("_"))
    first = node.args[0] if node.args else None
    return first if inplace and isinstance(first, fx.Node) else None


def _extreme_over_sequence(x, name, dims, keepdim, axis, length, group_name, layout):
    """``amax`` / ``amin`` over ``dims`` (which hold the sequence ``axis``) of the whole ring:
    each rank's extreme, all-gathered (P values), and the extreme of those."""
    x = collectives.mask_padding(x, axis, length, group_name, layout, fill=_extreme_fill(x.dtype, low=name == "amax"))
    reduce = torch.amax if name == "amax" else torch.amin
    local = reduce(x, dim=dims, keepdim=True)
    world = collectives.ring_world(group_name)
    if not collectives.is_loopback(group_name) and world > 1:
        local = reduce(collectives.gather_sequence(local, axis, world, group_name, "contiguous"), dim=axis,
                       keepdim=True)
    return local if keepdim else local.squeeze(dims)


def _extreme_fill(dtype: torch.dtype, low: bool):
    """What a pad token holds so that it never wins a max (``low``) or a min."""
    if dtype == torch.bool:
        return not low
    if dtype.is_floating_point:
        return float("-inf") if low else float("inf")
    info = torch.iinfo(dtype)
    return info.min if low else info.max


def _cumsum_over_sequence(x, axis, length, group_name, layout, dtype, name="cumsum"):
    """``x.cumsum(axis)`` (or ``cumprod``) over the whole ring: a scan within each of the
    rank's chunks combined with the scan of every chunk before it, from the chunks' totals
    all-gathered in global order (a chunk is one token of a sequence of ``P * chunks`` in
    the same layout). The ring's pad tokens come last in global order: no real token's
    prefix holds one."""
    if dtype is not None:
        x = x.to(dtype)
    if collectives.is_loopback(group_name):  # every rank's tokens are here: scan them in global order
        full = collectives.gather_sequence(x, axis, length, group_name, layout)
        return collectives.shard_sequence(getattr(full, name)(axis), axis, length, group_name, layout)
    chunks = chunks_per_rank(layout)
    world = collectives.ring_world(group_name)
    split = x.unflatten(axis, (chunks, -1))
    scans = getattr(split, name)(axis + 1)
    totals = scans.select(axis + 1, -1)
    everyone = collectives.gather_sequence(totals, axis, world * chunks, group_name, layout)
    # the exclusive scan of the chunk totals (no division: a product may hold zeros)
    neutral = torch.zeros_like if name == "cumsum" else torch.ones_like
    shifted = torch.cat([neutral(everyone.narrow(axis, 0, 1)), everyone.narrow(axis, 0, everyone.shape[axis] - 1)],
                        axis)
    before = getattr(shifted, name)(axis)
    mine = collectives.shard_sequence(before, axis, world * chunks, group_name, layout).unsqueeze(axis + 1)
    return (scans + mine if name == "cumsum" else scans * mine).flatten(axis, axis + 1)


def _moments_over_sequence(x, name, dims, keepdim, axis, length, group_name, layout, count, correction):
    """``var`` / ``std`` (and ``var_mean`` / ``std_mean``) over ``dims``, which hold the
    sequence: the global mean first, then the sum of squared deviations from it (two
    passes, as torch computes them: no cancellation of large sums)."""
    mean = _sum_over_sequence(x, dims, True, axis, length, group_name, layout, None, count)
    squares = _sum_over_sequence((x - mean).square(), dims, keepdim, axis, length, group_name, layout, None, None)
    var = squares / (count - correction) if count - correction > 0 else squares * float("nan")
    spread = var.sqrt() if name.startswith("std") else var
    if name.endswith("_mean"):
        return spread, mean if keepdim else mean.squeeze(dims)
    return spread


def _logsumexp_over_sequence(x, dims, keepdim, axis, length, group_name, layout):
    """``logsumexp`` over ``dims`` (holding the sequence): shifted by the ring's maximum (a
    constant for the gradient: the result does not depend on it)."""
    top = _extreme_over_sequence(x.detach(), "amax", dims, True, axis, length, group_name, layout)
    top = torch.where(top.isfinite(), top, torch.zeros_like(top))
    x = collectives.mask_padding(x, axis, length, group_name, layout, fill=float("-inf"))
    out = _sum_over_sequence((x - top).exp(), dims, True, axis, length, group_name, layout, None, None).log() + top
    return out if keepdim else out.squeeze(dims)


def _two_norm_over_sequence(x, dims, keepdim, axis, length, group_name, layout):
    return _sum_over_sequence(x.abs().square(), dims, keepdim, axis, length, group_name, layout, None, None).sqrt()


def _extreme_index_over_sequence(x, name, keepdim, axis, length, group_name, layout):
    """``x.max(axis)`` / ``min`` (values, global indices) or ``argmax`` / ``argmin`` along the
    sequence: each rank's extreme and its global position, all-gathered (P values); ties
    go to the first position, as torch's; the value's gradient reaches the one token chosen."""
    largest = name in ("max", "argmax")
    if collectives.is_loopback(group_name):  # local order is not global order: take the whole sequence
        full = collectives.gather_sequence(x, axis, length, group_name, layout)
        if name in ("argmax", "argmin"):
            return getattr(full, name)(axis, keepdim=keepdim)
        return tuple(getattr(full, name)(axis, keepdim=keepdim))
    world = collectives.ring_world(group_name)
    x = collectives.mask_padding(x, axis, length, group_name, layout, fill=_extreme_fill(x.dtype, low=largest))
    values, local = (torch.max if largest else torch.min)(x, axis, keepdim=True)
    where = collectives.token_positions(group_name, layout, length, x.device)[local]
    all_values = collectives.gather_sequence(values, axis, world, group_name, "contiguous")
    all_where = collectives.gather_sequence(where, axis, world, group_name, "contiguous")
    best = all_values.detach().amax(axis, keepdim=True) if largest else all_values.detach().amin(axis, keepdim=True)
    tied = (all_values.detach() == best) | (all_values.detach().isnan() & best.isnan())
    first = torch.where(tied, all_where, torch.iinfo(torch.int64).max).amin(axis, keepdim=True)
    rank = (all_where == first).to(torch.int8).argmax(axis, keepdim=True)
    index = all_where.gather(axis, rank)
    value = all_values.gather(axis, rank)
    if not keepdim:
        index, value = index.squeeze(axis), value.squeeze(axis)
    return index if name in ("argmax", "argmin") else (value, index)


def _ignoring_padding(target, axis, length, outer, inner, group_name, layout, ignore_index):
    """Class targets with the ring's pad tokens set to ``ignore_index``."""
    if outer != 1 or inner != 1:
        split = target.unflatten(axis, (outer, -1, inner))
        target = collectives.mask_padding(split, axis + 1, length, group_name, layout, fill=ignore_index)
        return target.flatten(axis, axis + 2)
    return collectives.mask_padding(target, axis, length, group_name, layout, fill=ignore_index)


def _fused_loss_target():
    ops = getattr(torch.ops, "ringfx", None)
    return getattr(getattr(ops, "linear_cross_entropy", None), "default", None)


def _fused_loss_over_sequence(hidden, weight, bias, target, ignore_index, reduction, label_smoothing, chunk,
                              loss_dtype, axis, length, outer, inner, group_name, layout):
    """The blockwise loss over the ring: (loss, count of valid targets), as the op returns them."""
    target = _ignoring_padding(target, axis, length, outer, inner, group_name, layout, ignore_index)
    local, count = torch.ops.ringfx.linear_cross_entropy(hidden, weight, bias, target, ignore_index, "sum",
                                                         label_smoothing, chunk, loss_dtype)
    total = collectives.all_reduce_sum(local, group_name)
    count = collectives.all_reduce_sum(count, group_name)
    return (total / count if reduction == "mean" else total), count


def _class_loss_over_sequence(name, x, target, axis, length, outer, inner, group_name, layout, ignore_index,
                              reduction, label_smoothing):
    """cross_entropy / nll_loss summed (or averaged over valid targets) over the ring."""
    import torch.nn.functional as F

    target = _ignoring_padding(target, axis, length, outer, inner, group_name, layout, ignore_index)
    kwargs = {"ignore_index": ignore_index, "reduction": "sum"}
    if name == "cross_entropy":
        kwargs["label_smoothing"] = label_smoothing
        local = F.cross_entropy(x, target, **kwargs)
    else:
        local = F.nll_loss(x, target, **kwargs)
    total = collectives.all_reduce_sum(local, group_name)
    if reduction == "sum":
        return total
    count = collectives.all_reduce_sum((target != ignore_index).sum().to(total.dtype), group_name)
    return total / count


__all__ = ["SEQUENCE_KEY", "SequenceAnalysis", "Sharded", "ShardingReport", "mixing_ops", "sequence_analysis", "shard_sequence_pass"]
