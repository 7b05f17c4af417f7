"""Lower ``flex_attention`` calls to attention spellings the other passes know.

Dynamo captures ``flex_attention(q, k, v, score_mod=..., block_mask=...)`` (transformers'
``attn_implementation="flex_attention"``) as one higher-order op holding two subgraphs:
the ``score_mod`` and the BlockMask's ``mask_mod``, both written for one element
``(b, h, q_idx, kv_idx)``. The op is opaque to the attention finder. This pass writes it
out as ordinary graph nodes: the mask_mod applied to broadcast index tensors gives the
dense boolean mask (the way ``torch.nn.attention.flex_attention.create_mask`` evaluates
it, with broadcasting in place of vmap), then::

    # before
    out = flex_attention(q, k, v, score_mod_0, (S, S, kv_num_blocks, ..., mask_fn_0), 0.35,
                         {...}, (), (pad,))[0]
    # after (identity score_mod)
    b = arange(B).view(B, 1, 1, 1); q_idx = arange(S).view(1, 1, S, 1)
    kv_idx = arange(S).view(1, 1, 1, S)
    mask = (kv_idx <= q_idx) & pad[b, kv_idx]                 # mask_fn_0, inlined
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.35, enable_gqa=...)
    # after (soft-capping score_mod: cap * tanh(score / cap)), Gemma 2's eager spelling
    w = tanh(matmul(q, k_rep.transpose(2, 3)) * 0.35 / cap) * cap
    out = matmul(softmax(where(mask, w, min), -1, dtype=float32).to(q.dtype), v_rep)
    # after (score + bias(b, h, q_idx, kv_idx), with either of the above as the score)
    bias = (0.25 * (h + 1) * (kv_idx - q_idx)).to(q.dtype)           # the score_mod's bias, inlined
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=where(mask, bias, -inf), ...)

The mask is then classified like any other (causal, window, chunk, key padding, segment
ids from the aranges and the mask_mod's buffers; an added bias as ALiBi, a relative bias
proven a function of ``j - i``, or refused) and the attention rewritten into the ring op;
with full-length inputs every rank evaluates it on global positions. The BlockMask's block
tensors are no longer read (they are only a sparse summary of the same mask_mod). A row
that the mask empties comes out 0, as under flex.

Why lower rather than call ``flex_attention`` per block: the ring op's block kernels and
its mask descriptors (causal / window / key padding / segment ids, skipping empty blocks)
already cover what transformers' mask_mods express, and a mask proven that way costs O(S)
per rank; a per-block flex kernel would still need the same proof that the mod reads
global positions only through its index arguments.

Left alone and reported (``Decision.LEAVE``: the backend refuses it on a ring of P > 1,
or warns with ``strict=False``): a score_mod other than the identity or a soft-cap, each
plus a bias that does not read the score (a per-head temperature, say), a used log-sum-exp,
a BlockMask whose lengths are not the query / key lengths, a mod that holds its own
constants (``get_attr``) or returns no boolean, a symbolic scale, and a BlockMask with no
mask_mod (``BlockMask.from_kv_blocks``) unless it is flex's one all-covering block (no
block_mask passed): its mask is the pattern of its blocks.

The block tensors of a BlockMask *with* a mask_mod are taken for what ``create_block_mask``
makes of that mod (flex's own contract: blocks it skips are all masked by the mod); a
BlockMask whose blocks skip keys that its mod lets through (``from_kv_blocks`` with a
sparser pattern than its mod) computes something else under flex than here.
"""

from __future__ import annotations

import functools
import logging
import operator
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F

from .decompose_mha import _trace
from .node_facts import VALUE_KEY, op_name, real_value, scalar, shape_of, source_line, value_of
from .options import PassOptions
from .sites import META_KEY, AttentionSite, PassReport, SiteRecord

log = logging.getLogger("ringfx.passes")

PATTERN = "flex_attention"


def flex_attention_op():
    """torch's flex_attention higher-order op, or None on a torch without it."""
    return getattr(torch.ops.higher_order, "flex_attention", None)


@dataclass
class FlexCall:
    """The parts of one captured ``flex_attention`` call."""

    node: fx.Node
    q: fx.Node
    k: fx.Node
    v: fx.Node
    score_mod: Optional[fx.GraphModule]
    mask_mod: Optional[fx.GraphModule]
    block_mask: tuple
    scale: Any
    score_buffers: tuple
    mask_buffers: tuple


def lower_flex_attention_pass(gm: fx.GraphModule, *, options: Optional[PassOptions] = None
                              ) -> tuple[fx.GraphModule, PassReport]:
    """Replace every ``flex_attention`` call whose mods are understood by SDPA (or Gemma 2's
    eager soft-capped attention) with the mask_mod's dense mask; record the others as
    sites left alone."""
    report = PassReport("lower_flex_attention")
    hop = flex_attention_op()
    changed = False
    for node in list(gm.graph.nodes):
        if hop is None or node.op != "call_function" or node.target is not hop:
            continue
        call = _parse(gm, node)
        problem = _unsupported(call)
        kind = None
        if not problem:
            kind = _score_mod_kind(call.score_mod)
            if kind is None:
                problem = (f"flex_attention with a score_mod ringfx does not know: {_describe(call.score_mod)} "
                           "(lowered: the identity, a soft-cap cap * tanh(score / cap), and a bias of "
                           "(b, h, q_idx, kv_idx) added to either)")
        if problem:
            site = AttentionSite(output=node, pattern=PATTERN, source_line=source_line(node), anchor=node)
            node.meta[META_KEY] = site.skip(problem)
            report.sites.append(SiteRecord.of(site))
            report.skipped += 1
            continue
        _lower(gm, call, *kind)
        report.rewritten += 1
        changed = True
    if changed:
        _drop_unread_mods(gm)
        gm.graph.lint()
        gm.recompile()
    log.info("lower_flex_attention: lowered %d flex_attention call(s), left %d", report.rewritten, report.skipped)
    return gm, report


# ------------------------------------------------------------------ reading the call

def _module(gm: fx.GraphModule, x) -> Optional[fx.GraphModule]:
    if isinstance(x, fx.Node) and x.op == "get_attr":
        sub = getattr(gm, x.target, None)
        return sub if isinstance(sub, fx.GraphModule) else None
    return None


def _parse(gm: fx.GraphModule, node: fx.Node) -> FlexCall:
    names = ("query", "key", "value", "score_mod", "block_mask", "scale", "kernel_options",
             "score_mod_other_buffers", "mask_mod_other_buffers")
    a = dict(zip(names, node.args))
    a.update(node.kwargs)
    block_mask = tuple(a.get("block_mask") or ())
    return FlexCall(node, a["query"], a["key"], a["value"], _module(gm, a.get("score_mod")),
                    _module(gm, block_mask[-1]) if block_mask else None, block_mask, a.get("scale"),
                    tuple(a.get("score_mod_other_buffers") or ()), tuple(a.get("mask_mod_other_buffers") or ()))


def _unsupported(call: FlexCall) -> str:
    """Why ``call`` cannot be lowered, or ''."""
    node = call.node
    for user in node.users:
        if not (op_name(user) == "getitem" and isinstance(user.args[1], int)):
            return f"its result is read whole by {user.name}"
        if user.args[1] != 0 and user.users:
            return "its log-sum-exp (return_lse / return_aux) is used"
    shapes = [shape_of(x) for x in (call.q, call.k, call.v)]
    if any(s is None or len(s) != 4 or not all(isinstance(d, int) for d in s) for s in shapes):
        return f"q/k/v shapes {shapes} are not static (B, H, S, D)"
    (b, hq, sq, _), (_, hk, sk, _) = shapes[0], shapes[1]
    if hk == 0 or hq % hk:
        return f"{hq} query heads are not a multiple of {hk} key/value heads"
    if call.score_mod is None or (call.block_mask and call.mask_mod is None):
        return "its score_mod or mask_mod is not a subgraph of this graph"
    if len(call.block_mask) < 5:
        return "its BlockMask is not in the form this torch captures it in"
    one_block = _one_block(call, sq, sk)
    if not one_block and (call.block_mask[0], call.block_mask[1]) != (sq, sk):
        return (f"its BlockMask is for lengths {tuple(call.block_mask[:2])}, not the query / key lengths "
                f"({sq}, {sk})")
    if scalar(call.scale) is None:
        return f"its scale {call.scale!r} is not a number"
    for mod, what in ((call.score_mod, "score_mod"), (call.mask_mod, "mask_mod")):
        held = [n.target for n in mod.graph.nodes if n.op in ("get_attr", "call_module")]
        if held:
            return f"its {what} holds {held} of its own"
    if _is_noop(call.mask_mod) and not one_block:
        # BlockMask.from_kv_blocks without a mask_mod: the mask is the block pattern itself
        return "its BlockMask has no mask_mod: its mask is the pattern of its blocks, which ringfx does not read"
    if not _is_noop(call.mask_mod):
        out = _returned(call.mask_mod)
        if getattr(value_of(out), "dtype", torch.bool) != torch.bool:
            return "its mask_mod does not return a boolean"
    return ""


def _returned(mod: fx.GraphModule):
    return next(n for n in mod.graph.nodes if n.op == "output").args[0]


def _placeholders(mod: fx.GraphModule) -> list[fx.Node]:
    return [n for n in mod.graph.nodes if n.op == "placeholder"]


def _is_noop(mod: fx.GraphModule) -> bool:
    """torch's ``noop_mask``: ``b.new_ones((), dtype=torch.bool)`` (attend everywhere)."""
    out = _returned(mod)
    return op_name(out) == "new_ones" and out.args[0] in _placeholders(mod)


def _one_block(call: FlexCall, sq: int, sk: int) -> bool:
    """Whether the BlockMask is one block over all of q and k that every batch row and head
    computes (``_create_empty_block_mask``: what flex uses when no block_mask is passed;
    its lengths are a placeholder (1, 1)). Then its blocks hide nothing from the mask_mod."""
    bm = call.block_mask
    block_q, block_kv = bm[-3], bm[-2]
    if not (isinstance(block_q, int) and isinstance(block_kv, int) and block_q >= sq and block_kv >= sk):
        return False
    counts = [_known_value(x) for x in (bm[2], bm[4]) if x is not None]
    if not counts or any(c is None for c in counts):
        return False
    return bool((sum(c.to(torch.int64) for c in counts) >= 1).all())


# Factories a block tensor made in the graph may come from (constant arguments only).
_FACTORIES = {torch.ones, torch.zeros, torch.full}


def _known_value(x) -> Optional[torch.Tensor]:
    """The value of a block tensor: the example behind a placeholder, or a factory call of
    this graph with constant arguments; None when neither."""
    if not isinstance(x, fx.Node):
        return None
    if x.op == "placeholder":
        v = real_value(x)
        return v if isinstance(v, torch.Tensor) else None
    if x.op == "call_function" and x.target in _FACTORIES and not x.all_input_nodes:
        return x.target(*x.args, **{k: v for k, v in x.kwargs.items() if k != "device"})
    return None


# ------------------------------------------------------------------ the score_mod

def _score_mod_kind(mod: fx.GraphModule) -> Optional[tuple[float, Optional[fx.Node]]]:
    """``(cap, bias)`` when the score_mod is ``f(score) + bias`` or ``f(score)``: ``cap`` is 0.0
    where f is the identity, the cap of ``cap * tanh(score / cap)``; ``bias`` (a node of the
    mod, or None) does not read the score. None for any other score_mod."""
    score = _placeholders(mod)[0]
    out, bias = _returned(mod), None
    if op_name(out) == "add" and len(out.args) == 2 and not out.kwargs:
        reads = [isinstance(a, fx.Node) and _reads(a, score) for a in out.args]
        if reads.count(True) == 1 and isinstance(out.args[reads.index(False)], fx.Node):
            out, bias = out.args[reads.index(True)], out.args[reads.index(False)]
    if out is score:
        return 0.0, bias
    if op_name(out) != "mul" or len(out.args) != 2:
        return None
    outer, inner = (out.args if op_name(out.args[1]) == "tanh" else out.args[::-1])
    cap = scalar(outer)
    if cap is None or cap <= 0 or op_name(inner) != "tanh" or not isinstance(inner.args[0], fx.Node):
        return None
    x = inner.args[0]
    if op_name(x) == "div" and x.args[0] is score and scalar(x.args[1]) == cap:
        return cap, bias
    if op_name(x) == "mul" and score in x.args:
        factor = scalar(x.args[1] if x.args[0] is score else x.args[0])
        if factor is not None and abs(factor * cap - 1.0) < 1e-12:
            return cap, bias
    return None


def _reads(node: fx.Node, target: fx.Node) -> bool:
    todo, seen = [node], set()
    while todo:
        n = todo.pop()
        if n is target:
            return True
        if n not in seen:
            seen.add(n)
            todo.extend(n.all_input_nodes)
    return False


def _describe(mod: fx.GraphModule) -> str:
    """The score_mod's body in one line (``add(mul(0.1, sub(q_idx, kv_idx)), score)``)."""
    names = dict(zip(_placeholders(mod), ("score", "b", "h", "q_idx", "kv_idx")))

    def show(x, depth=0):
        if isinstance(x, fx.Node):
            if x in names:
                return names[x]
            if x.op == "placeholder":
                return x.name
            if depth > 4:
                return "..."
            return f"{op_name(x)}({', '.join(show(a, depth + 1) for a in x.args)})"
        return repr(x)

    return show(_returned(mod))


# ------------------------------------------------------------------ writing it out

def flex_as_sdpa(q, k, v, mask=None, bias=None, *, scale, gqa):
    """flex_attention with the identity score_mod (plus a bias): SDPA with the mask_mod's
    dense mask (and the bias where it lets keys through)."""
    if bias is not None:
        mask = bias if mask is None else torch.where(mask, bias, float("-inf"))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


def flex_as_softcapped(q, k, v, mask=None, bias=None, *, scale, cap, repeats, min_value, accumulate):
    """flex_attention with a soft-capping score_mod, spelled as transformers' Gemma 2 eager
    attention (``modeling_gemma2.eager_attention_forward``, its ``repeat_kv`` as
    ``repeat_interleave``; the mask applied after the cap, as flex applies it). The softmax
    runs in ``accumulate``: float32, or float64 for float64 inputs (as flex computes them)."""
    if repeats > 1:
        k = k.repeat_interleave(repeats, dim=1)
        v = v.repeat_interleave(repeats, dim=1)
    w = torch.matmul(q, k.transpose(2, 3)) * scale
    w = w / cap
    w = torch.tanh(w)
    w = w * cap
    if bias is not None:
        w = w + bias
    if mask is not None:
        w = torch.where(mask, w, min_value)
    p = F.softmax(w, dim=-1, dtype=accumulate).to(q.dtype)
    return torch.matmul(p, v)


def _lower(gm: fx.GraphModule, call: FlexCall, softcap: float, bias: Optional[fx.Node]) -> None:
    graph = gm.graph
    node = call.node
    (b, hq, sq, _), (_, hk, sk, _) = shape_of(call.q), shape_of(call.k)
    dtype = value_of(call.q).dtype
    stack = node.meta.get("stack_trace")
    sizes = (b, hq, sq, sk)
    with graph.inserting_before(node):
        named = {"q": call.q, "k": call.k, "v": call.v}
        if not _is_noop(call.mask_mod):
            mod = call.mask_mod
            named["mask"] = _inline_mod(graph, mod, _returned(mod), _placeholders(mod)[:4], call.mask_buffers,
                                        sizes, value_of(call.q).device, stack)
        if bias is not None:
            mod = call.score_mod
            term = _inline_mod(graph, mod, bias, _placeholders(mod)[1:5], call.score_buffers, sizes,
                               value_of(call.q).device, stack)
            named["bias"] = graph.call_method("to", (term, dtype))  # flex adds it in the scores' dtype
            _record_values([named["bias"]], stack, value_of(call.q).device)
        if softcap:
            fn = functools.partial(flex_as_softcapped, scale=float(call.scale), cap=float(softcap),
                                   repeats=hq // hk, min_value=torch.finfo(dtype).min,
                                   accumulate=torch.promote_types(dtype, torch.float32))
        else:
            fn = functools.partial(flex_as_sdpa, scale=float(call.scale), gqa=hq != hk)
        names, tensors = list(named), list(named.values())
        sub = _trace(lambda *t: fn(**dict(zip(names, t))), len(tensors), {n: _meta(t) for n, t in named.items()},
                     names)
        values = dict(zip(_placeholders(sub), tensors))
        out = graph.graph_copy(sub.graph, values)
    for new in values.values():
        if new.op in ("call_function", "call_method") and new not in tensors:
            new.meta["stack_trace"] = stack
            if op_name(new) in ("sdpa", "softmax"):  # the pattern name the reports print
                new.meta["ringfx_pattern"] = PATTERN
    for user in list(node.users):
        if user.args[1] == 0:
            user.replace_all_uses_with(out)
        graph.erase_node(user)
    graph.erase_node(node)


def _inline_mod(graph: fx.Graph, mod: fx.GraphModule, result: fx.Node, index_placeholders: list, buffers: tuple,
                sizes: tuple, device, stack) -> fx.Node:
    """``result`` of the mod applied to broadcast ``b, h, q_idx, kv_idx`` (``(B|1, H|1, Sq,
    Sk)``, made here) and its buffers: the nodes it depends on, copied in order."""
    indices, made, axis_of = [], [], {}
    for axis, (placeholder, size) in enumerate(zip(index_placeholders, sizes)):
        if not _reads(result, placeholder):
            indices.append(None)  # not read: no index tensor made
            continue
        shape = [1, 1, 1, 1]
        shape[axis] = size
        positions = graph.call_function(torch.arange, (size,), {"device": device})
        idx = graph.call_method("view", (positions, *shape))
        indices.append(idx)
        made += [positions, idx]
        axis_of[idx] = axis
    placeholders = _placeholders(mod)
    first_buffer = placeholders.index(index_placeholders[-1]) + 1
    values = dict(zip(index_placeholders, indices))
    values.update(zip(placeholders[first_buffer:], buffers))
    copied = []
    for n in mod.graph.nodes:
        if n.op in ("call_function", "call_method") and _reads(result, n):
            values[n] = graph.node_copy(n, lambda a: values[a])
            copied.append(values[n])
    out, copied = _as_views(graph, values[result], copied, axis_of, sizes, device)
    alive = set(graph.nodes)
    _record_values([n for n in made + copied if n in alive], stack, device)
    return out


def _as_views(graph: fx.Graph, out: fx.Node, copied: list, axis_of: dict, sizes: tuple, device
              ) -> tuple[fx.Node, list]:
    """Say what the inlined mod computes in the spellings the mask analysis reads:

        pad[b, kv_idx + 0]                  ->  pad[:, None, None, :]     (a view: key padding)
        doc[b, q_idx] == doc[b, kv_idx]     ->  doc[:, None, :, None] == doc[:, None, None, :]
        m.to(device)   (where m already is) ->  m

    An index tensor is a full arange along its own axis, so indexing a buffer with them
    in axis order is a view of the buffer; ``+ 0`` is transformers' offset of 0."""
    replaced = {}
    for node in copied:
        name = op_name(node)
        if name in ("add", "sub") and len(node.args) == 2 and node.args[0] in axis_of and scalar(node.args[1]) == 0:
            replaced[node] = node.args[0]
        elif name == "to" and len(node.args) == 2 and not node.kwargs and isinstance(node.args[1], torch.device) \
                and torch.device(node.args[1]) == device and _on(node.args[0], device, axis_of):
            replaced[node] = node.args[0]
        elif name == "getitem" and isinstance(node.args[1], tuple) and node.args[1] \
                and all(i in axis_of for i in node.args[1]):
            axes = [axis_of[i] for i in node.args[1]]
            buffer = node.args[0]
            if axes != sorted(set(axes)) or shape_of(buffer) != tuple(sizes[a] for a in axes):
                continue
            with graph.inserting_before(node):
                view = graph.call_function(operator.getitem, (
                    buffer, tuple(slice(None) if a in axes else None for a in range(len(sizes)))))
            view.meta["stack_trace"] = node.meta.get("stack_trace")
            replaced[node] = view
        else:
            continue
        node.replace_all_uses_with(replaced[node])
    for node in reversed(copied):
        if node in replaced and not node.users:
            graph.erase_node(node)
    for idx in [i for i in axis_of if not i.users]:  # an index read only through a view
        positions = idx.args[0]
        graph.erase_node(idx)
        graph.erase_node(positions)
    out = replaced.get(out, out)
    kept = []
    for node in copied:
        if node in replaced:
            if replaced[node] not in axis_of and replaced[node] not in copied and op_name(replaced[node]) == "getitem":
                kept.append(replaced[node])  # the new view
        else:
            kept.append(node)
    return out, kept


def _on(node, device, axis_of: dict) -> bool:
    """Whether ``node`` lives on ``device``: an index tensor (made there), a value recorded
    there, or one computed from such values."""
    if node in axis_of:
        return True
    v = value_of(node)
    if isinstance(v, torch.Tensor):
        return v.device == device
    return bool(node.all_input_nodes) and all(_on(a, device, axis_of) for a in node.all_input_nodes)


def _meta(node: fx.Node) -> torch.Tensor:
    v = value_of(node)
    return torch.empty(tuple(v.shape), dtype=v.dtype, device="meta")


def _record_values(nodes: list[fx.Node], stack, device) -> None:
    """Record each inserted node's shape, dtype and device in ``meta[VALUE_KEY]``, evaluated
    on meta tensors in graph order (the copied mod's own values were traced for one element).
    The recorded value is a one-element tensor on ``device`` expanded to the shape: the
    relative-bias table is built on the device of the distances it is made from."""
    order = {n: i for i, n in enumerate(nodes[0].graph.nodes)}
    env = {}

    def load(x):
        if x in env:
            return env[x]
        return _meta(x)

    for n in sorted(nodes, key=order.__getitem__):
        args, kwargs = fx.node.map_arg(n.args, load), fx.node.map_arg(n.kwargs, load)
        # on meta tensors a move to a device would copy out of meta: keep the placement
        args = tuple(a for a in args if not isinstance(a, torch.device))
        if "device" in kwargs:  # a factory (the index aranges): made on meta, not allocated
            kwargs = {**kwargs, "device": "meta"}
        if op_name(n) == "to" and len(args) == 1 and not kwargs:
            value = args[0]  # x.to(device): where x already is
        elif n.op == "call_function":
            value = n.target(*args, **kwargs)
        else:
            value = getattr(args[0], n.target)(*args[1:], **kwargs)
        env[n] = value
        for key in ("example_value", "val", "tensor_meta"):
            n.meta.pop(key, None)  # traced for one element of the vmap: the wrong shape here
        n.meta[VALUE_KEY] = torch.empty((), dtype=value.dtype, device=device).expand(value.shape) \
            if isinstance(value, torch.Tensor) else value
        n.meta.setdefault("stack_trace", stack)


def _drop_unread_mods(gm: fx.GraphModule) -> None:
    """Erase the ``get_attr`` nodes of mods no call reads any more, and the mods."""
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and not node.users and isinstance(getattr(gm, node.target, None), fx.GraphModule):
            target = node.target
            gm.graph.erase_node(node)
            if not any(n.op == "get_attr" and n.target == target for n in gm.graph.nodes):
                delattr(gm, target)
