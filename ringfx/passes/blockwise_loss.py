"""Blockwise loss: the output projection and its cross-entropy fused into one op that
loops over chunks of tokens, so the ``(tokens, vocab)`` logits never exist whole
(``ringfx/blockwise.py``; ``transform(..., blockwise_loss=True | <chunk tokens>)``).

    before:                                        after:
    logits = linear(h, W, b)                       h2 = h.reshape(-1, H)
    x = logits.float().view(-1, V)                 fused = ringfx.linear_cross_entropy(h2, W, b, labels,
    loss = cross_entropy(x, labels,                        -100, "mean", 0.0, chunk, torch.float32)
               ignore_index=-100)                  loss = fused[0]
    return (loss, logits)                          return (loss, None)

Matched: ``linear(h, W[, b])`` followed by dtype casts (``float``, ``to(dtype)``), views
that keep the vocabulary as the last axis (``view``/``reshape``/``flatten``, ``contiguous``,
slices of the token axes such as ``logits[..., :-1, :]``), then ``cross_entropy`` or
``nll_loss(log_softmax(x, -1))`` on ``(N, V)`` with reduction ``mean`` or ``sum``, no class
weights. The same slices and views are applied to ``h`` (vocabulary size replaced by the
hidden size), so its rows line up with the targets.

The logits as a graph output (transformers' causal LMs return them beside the loss): the
output becomes ``None`` — computing them whole would take the memory the option exists to
save. Any other use of the logits (an accuracy metric in the graph, say) leaves the loss as
it was, reported with the reason.
"""

from __future__ import annotations

import dataclasses
import logging
import operator
from typing import Any, Optional

import torch
import torch.fx as fx

from ..blockwise import REDUCTIONS, accumulation_dtype
from .node_facts import VALUE_KEY, arg, dtype_of, op_name, shape_of, source_line
from .options import PassOptions
from .sites import PassReport

log = logging.getLogger("ringfx.passes")

__all__ = ["BlockwiseLossReport", "LossSite", "blockwise_loss_pass"]

_LOSSES = ("cross_entropy", "nll_loss")
_VIEWS = frozenset({"view", "reshape", "flatten"})
_KEEP = frozenset({"contiguous", "clone"})
_DTYPE_CASTS = {"float": torch.float32, "double": torch.float64, "half": torch.float16, "bfloat16": torch.bfloat16}


@dataclasses.dataclass
class BlockwiseLossReport(PassReport):
    """What the blockwise-loss pass did to one graph: one line per loss, fused or not."""

    fused: list[str] = dataclasses.field(default_factory=list)
    left_alone: list[str] = dataclasses.field(default_factory=list)
    dropped_outputs: int = 0  # graph outputs (the logits) now returned as None

    def summary(self) -> list[str]:
        return [f"blockwise loss: {x}" for x in self.fused] + [f"blockwise loss left alone: {x}"
                                                               for x in self.left_alone]


@dataclasses.dataclass
class LossSite:
    """A ``linear -> casts/views -> cross_entropy`` chain the pass can fuse."""

    loss: fx.Node                    # the cross_entropy / nll_loss node
    linear: fx.Node
    chain: list                      # linear .. the loss's input, in order (log_softmax included)
    hidden: fx.Node
    weight: fx.Node
    bias: Optional[fx.Node]
    target: fx.Node
    ignore_index: int
    reduction: str
    label_smoothing: float
    loss_dtype: torch.dtype          # what the cross-entropy receives
    outputs: list = dataclasses.field(default_factory=list)  # chain nodes that are also graph outputs


class _Skip(Exception):
    """The chain is not one the op computes: left alone with this reason."""


def blockwise_loss_pass(gm: fx.GraphModule, *, options: Optional[PassOptions] = None
                        ) -> tuple[fx.GraphModule, BlockwiseLossReport]:
    options = options or PassOptions()
    report = BlockwiseLossReport("blockwise_loss")
    if not options.blockwise_loss:
        log.info("blockwise_loss: off (transform(..., blockwise_loss=True) fuses the loss)")
        return gm, report
    output = next(n for n in gm.graph.nodes if n.op == "output")
    for node in [n for n in gm.graph.nodes if op_name(n) in _LOSSES]:
        try:
            site = match_loss(node, output)
        except _Skip as why:
            report.left_alone.append(f"{source_line(node)}: {why}")
            report.skipped += 1
            continue
        if site is None:
            continue
        _fuse(gm.graph, site, output, options.blockwise_loss)
        dropped = f"; the logits output is returned as None ({len(site.outputs)} output(s))" if site.outputs else ""
        report.fused.append(f"{source_line(node)}: {op_name(node)}(reduction={site.reduction!r}) of linear "
                            f"({_size(site.weight, 0)} classes) in chunks of {options.blockwise_loss} tokens"
                            + dropped)
        report.dropped_outputs += len(site.outputs)
        report.rewritten += 1
    if report.rewritten:
        gm.graph.lint()
        gm.recompile()
    log.info("blockwise_loss: fused %d loss(es), left %d alone", report.rewritten, report.skipped)
    return gm, report


def _size(node: fx.Node, dim: int) -> Any:
    shape = shape_of(node)
    return "?" if shape is None else shape[dim]


# -- analysis ---------------------------------------------------------------------------------


def match_loss(loss: fx.Node, output: fx.Node) -> Optional[LossSite]:
    """The fusable chain ending at ``loss``; None when the loss is not fed by a linear (not
    a language-model head: nothing to say); ``_Skip`` with the reason when it is, but the
    chain cannot be fused."""
    name = op_name(loss)
    x, target = arg(loss, 0, "input"), arg(loss, 1, "target")
    if not isinstance(x, fx.Node) or not isinstance(target, fx.Node):
        return None
    chain = []
    if name == "nll_loss":
        if op_name(x) != "log_softmax":
            return None
        chain.append(x)
        dim = arg(x, 1, "dim")
        ndim = len(shape_of(x) or ())
        if dim is None or dim not in (-1, ndim - 1) or arg(x, 2, "_stacklevel", 3) not in (3, None) or \
                arg(x, 3, "dtype") is not None:
            raise _Skip("log_softmax is not over the last axis (or has a dtype argument)")
        x = x.args[0]
    node = x
    while op_name(node) != "linear":
        if not isinstance(node, fx.Node) or not _vocab_preserving(node):
            return None
        chain.append(node)
        node = node.args[0]
    linear = node
    chain.append(linear)
    chain.reverse()
    hidden, weight, bias = arg(linear, 0, "input"), arg(linear, 1, "weight"), arg(linear, 2, "bias")
    # from here on the loss is a linear's: reasons are worth reporting
    shape = shape_of(chain[-1])
    if shape is None or len(shape) != 2:
        raise _Skip(f"{name} input of shape {shape}: only (tokens, classes) inputs are fused")
    if arg(loss, 2, "weight") is not None:
        raise _Skip("class weights")
    if arg(loss, 3, "size_average") is not None or arg(loss, 5, "reduce") is not None:
        raise _Skip("size_average= / reduce= (deprecated arguments)")
    reduction = arg(loss, 6, "reduction", "mean")
    if reduction not in REDUCTIONS:
        raise _Skip(f"reduction={reduction!r}: per-token losses are (tokens,), fuse only 'mean' or 'sum'")
    ignore_index = arg(loss, 4, "ignore_index", -100)
    smoothing = arg(loss, 7, "label_smoothing", 0.0) if name == "cross_entropy" else 0.0
    if not isinstance(ignore_index, int) or not isinstance(smoothing, (int, float)):
        raise _Skip("ignore_index / label_smoothing computed in the graph")
    loss_dtype = dtype_of(chain[-1])
    if loss_dtype is None or not loss_dtype.is_floating_point or shape_of(hidden) is None:
        raise _Skip("no recorded dtype/shape of the logits")
    outputs = []
    for i, n in enumerate(chain):
        later = chain[i + 1] if i + 1 < len(chain) else loss
        others = [u for u in n.users if u is not later]
        if any(u is not output for u in others):
            raise _Skip(f"the logits ({n.name}) have another use besides the loss: "
                        + ", ".join(u.format_node() for u in others if u is not output)[:200])
        if output in others:
            outputs.append(n)
    return LossSite(loss, linear, chain, hidden, weight, bias if isinstance(bias, fx.Node) else None, target,
                    ignore_index, reduction, float(smoothing), loss_dtype, outputs)


def _vocab_preserving(node: fx.Node) -> bool:
    """A cast, a copy, or a view/slice that keeps the class axis last and whole."""
    name = op_name(node)
    if node.op not in ("call_method", "call_function") or not node.args or not isinstance(node.args[0], fx.Node):
        return False
    if name in _KEEP or name in _DTYPE_CASTS:
        return len(node.args) == 1 and not set(node.kwargs) - {"memory_format"}
    if name == "to":
        return _cast_dtype(node) is not None
    before, after = shape_of(node.args[0]), shape_of(node)
    if before is None or after is None or not before or not after or before[-1] != after[-1]:
        return False
    if name in _VIEWS:
        if name == "flatten":
            end = arg(node, 2, "end_dim", -1)
            return end not in (-1, len(before) - 1)
        sizes = _view_sizes(node)
        return sizes is not None and sizes and sizes[-1] == before[-1]
    if name == "getitem":
        return _leading_slice(node.args[1], len(before))
    return False


def _cast_dtype(node: fx.Node) -> Optional[torch.dtype]:
    """``x.to(dtype)`` / ``x.to(dtype=...)`` (a device that stays the same is allowed)."""
    dtypes = [a for a in list(node.args[1:]) + list(node.kwargs.values()) if isinstance(a, torch.dtype)]
    rest = [a for a in list(node.args[1:]) + [v for k, v in node.kwargs.items() if k != "copy"]
            if not isinstance(a, (torch.dtype, torch.device, str))]
    return dtypes[0] if len(dtypes) == 1 and not rest else None


def _view_sizes(node: fx.Node) -> Optional[list]:
    sizes = list(node.args[1:])
    if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
        sizes = list(sizes[0])
    if not sizes and "shape" in node.kwargs:
        sizes = list(node.kwargs["shape"])
    return sizes if all(isinstance(s, int) for s in sizes) else None


def _leading_slice(index: Any, ndim: int) -> bool:
    """``x[...]`` that indexes only axes before the last with slices / ints."""
    items = list(index) if isinstance(index, tuple) else [index]
    if any(not (i is Ellipsis or isinstance(i, int) or (isinstance(i, slice) and all(
            isinstance(b, (int, type(None))) for b in (i.start, i.stop, i.step)))) for i in items):
        return False
    if Ellipsis in items:
        after = items[items.index(Ellipsis) + 1:]
        return not after or after[-1] == slice(None)
    return len(items) < ndim or items[-1] == slice(None)


# -- rewrite ----------------------------------------------------------------------------------


def _fuse(graph: fx.Graph, site: LossSite, output: fx.Node, chunk: int) -> None:
    hidden_size = shape_of(site.hidden)[-1]
    vocab = shape_of(site.linear)[-1]
    trace = site.loss.meta.get("stack_trace")
    with graph.inserting_before(site.loss):
        h = site.hidden
        for node in site.chain[1:]:  # the logits' slices and views, replayed on the hidden states
            name = op_name(node)
            if name == "getitem":
                h = graph.call_function(operator.getitem, (h, node.args[1]))
            elif name in _VIEWS:
                if name == "flatten":
                    h = graph.call_method("flatten", (h,) + tuple(node.args[1:]), dict(node.kwargs))
                else:
                    sizes = _view_sizes(node)
                    h = graph.call_method("reshape", (h, *sizes[:-1], hidden_size))
            else:
                continue  # casts and copies: the op casts the logits it computes
            h.meta[VALUE_KEY] = _meta_like(node, last=hidden_size, dtype=dtype_of(site.hidden))
            h.meta["stack_trace"] = node.meta.get("stack_trace")
        fused = graph.call_function(torch.ops.ringfx.linear_cross_entropy.default, (
            h, site.weight, site.bias, site.target, site.ignore_index, site.reduction, site.label_smoothing,
            int(chunk), site.loss_dtype))
        acc = accumulation_dtype(site.loss_dtype)
        fused.meta[VALUE_KEY] = (torch.empty((), dtype=acc, device="meta"),
                                 torch.empty((), dtype=torch.int64, device="meta"))
        loss = graph.call_function(operator.getitem, (fused, 0))
        loss.meta[VALUE_KEY] = fused.meta[VALUE_KEY][0]
        if acc != site.loss_dtype:  # a bf16 loss is computed in float32 and returned as bf16
            loss = graph.call_method("to", (loss, site.loss_dtype))
            loss.meta[VALUE_KEY] = torch.empty((), dtype=site.loss_dtype, device="meta")
    for n in (fused, loss):
        n.meta["stack_trace"] = trace
    site.loss.replace_all_uses_with(loss)
    for n in site.outputs:
        output.args = _replace_in(output.args, n)
    graph.erase_node(site.loss)
    for n in reversed(site.chain):
        graph.erase_node(n)
    log.debug("blockwise_loss: fused %s (vocabulary %s)", site.loss.name, vocab)


def _meta_like(node: fx.Node, *, last: int, dtype) -> Optional[torch.Tensor]:
    shape = shape_of(node)
    if shape is None:
        return None
    return torch.empty((*shape[:-1], last), dtype=dtype, device="meta")


def _replace_in(value: Any, node: fx.Node) -> Any:
    """``value`` (the output's nested args) with every occurrence of ``node`` replaced by None."""
    if value is node:
        return None
    if isinstance(value, tuple):
        return tuple(_replace_in(v, node) for v in value)
    if isinstance(value, list):
        return [_replace_in(v, node) for v in value]
    if isinstance(value, dict):
        return {k: _replace_in(v, node) for k, v in value.items()}
    return value
