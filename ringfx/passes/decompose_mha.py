"""Open up ``nn.MultiheadAttention`` so the attention finder can see its attention.

Dynamo keeps ``F.multi_head_attention_forward`` as one opaque call. This pass replaces
each such call with its projections and one SDPA (``torch``'s own semantics: a bool
``attn_mask`` / ``key_padding_mask`` marks positions *not* to attend)::

    # before
    out = F.multi_head_attention_forward(x, x, x, 16, 4, w_in, b_in, None, None, False,
                                         0.0, w_out, b_out, training=False, attn_mask=m)
    # after
    q = F.linear(x, w_in[:16], b_in[:16]).view(L, B, 4, 4).permute(1, 2, 0, 3)   # k, v alike
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=m)
    out = (F.linear(o.permute(2, 0, 1, 3).reshape(L * B, 16), w_out, b_out).view(L, B, 16), None)

A call whose attention weights are used, or that uses ``bias_k`` / ``bias_v`` /
``add_zero_attn`` / ``static_k``, or has symbolic shapes, is left as it was and recorded as
an ``AttentionSite`` with decision ``skip`` and the reason.
"""

from __future__ import annotations

import functools
import logging
from typing import Optional

import torch
import torch.fx as fx
import torch.nn.functional as F

from .node_facts import VALUE_KEY, arg, op_name, shape_of, source_line, value_of
from .options import PassOptions
from .sites import META_KEY, AttentionSite, PassReport, SiteRecord

log = logging.getLogger("ringfx.passes")

_ARGS = ("query", "key", "value", "embed_dim_to_check", "num_heads", "in_proj_weight", "in_proj_bias",
         "bias_k", "bias_v", "add_zero_attn", "dropout_p", "out_proj_weight", "out_proj_bias", "training",
         "key_padding_mask", "need_weights", "attn_mask", "use_separate_proj_weight", "q_proj_weight",
         "k_proj_weight", "v_proj_weight", "static_k", "static_v", "average_attn_weights", "is_causal")
_DEFAULTS = {"training": True, "key_padding_mask": None, "need_weights": True, "attn_mask": None,
             "use_separate_proj_weight": False, "q_proj_weight": None, "k_proj_weight": None,
             "v_proj_weight": None, "static_k": None, "static_v": None, "average_attn_weights": True,
             "is_causal": False}
_TENSORS = ("query", "key", "value", "in_proj_weight", "in_proj_bias", "out_proj_weight", "out_proj_bias",
            "key_padding_mask", "attn_mask", "q_proj_weight", "k_proj_weight", "v_proj_weight")


# Fused fast paths of torch.nn (eval mode under no_grad) that hide an attention.
_FUSED = {"_transformer_encoder_layer_fwd": "nn.TransformerEncoderLayer's fast path",
          "_native_multi_head_attention": "nn.MultiheadAttention's fast path"}


def decompose_mha_pass(gm: fx.GraphModule, *, options: Optional[PassOptions] = None
                       ) -> tuple[fx.GraphModule, PassReport]:
    report = PassReport("decompose_mha")
    changed = False
    for node in list(gm.graph.nodes):
        if op_name(node) in _FUSED:
            # eval + no_grad fast paths: one native op holds the attention; ringfx cannot open it yet
            site = AttentionSite(output=node, pattern=op_name(node), source_line=source_line(node), anchor=node)
            node.meta[META_KEY] = site.skip(f"{_FUSED[op_name(node)]} runs its attention inside one fused op "
                                            "that ringfx cannot rewrite; call the model with gradients enabled or "
                                            "torch.backends.mha.set_fastpath_enabled(False) before capturing")
            report.sites.append(SiteRecord.of(site))
            report.skipped += 1
            continue
        if op_name(node) != "multi_head_attention_forward":
            continue
        a = {name: arg(node, i, name, _DEFAULTS.get(name)) for i, name in enumerate(_ARGS)}
        problem = _unsupported(node, a)
        if problem:
            site = AttentionSite(output=node, pattern="nn.MultiheadAttention", source_line=source_line(node),
                                 anchor=node).skip(problem)
            node.meta[META_KEY] = site
            report.sites.append(SiteRecord.of(site))
            report.skipped += 1
            continue
        _inline(gm, node, a)
        report.rewritten += 1
        changed = True
    if changed:
        gm.graph.lint()
        gm.recompile()
    log.info("decompose_mha: opened %d nn.MultiheadAttention calls, left %d", report.rewritten, report.skipped)
    return gm, report


def _unsupported(node: fx.Node, a: dict) -> str:
    weights_used = [u for u in node.users if not (op_name(u) == "getitem" and u.args[1] == 0)]
    if any(u.users or u.op == "output" for u in weights_used) or any(u.op == "output" for u in node.users):
        return "attention weights are used (need_weights=True and the weights are read)"
    for name in ("bias_k", "bias_v", "static_k", "static_v"):
        if a[name] is not None:
            return f"{name} is set"
    if a["add_zero_attn"]:
        return "add_zero_attn=True"
    for name in ("query", "key", "value"):
        shape = shape_of(a[name])
        if shape is None or len(shape) != 3 or not all(isinstance(d, int) for d in shape):
            return f"{name} has unknown, symbolic or unbatched shape {shape}"
    if any(isinstance(a[n], fx.Node) and value_of(a[n]) is None for n in _TENSORS):
        return "an input has no recorded example value"
    return ""


def mha_as_sdpa(query, key, value, in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias,
                key_padding_mask, attn_mask, q_proj_weight, k_proj_weight, v_proj_weight,
                *, L, S, B, E, H, dropout_p, separate, mask_bool, mask_dim, kpm_bool, dtype):
    """``F.multi_head_attention_forward`` (weights not needed) written with SDPA."""
    d = E // H
    if separate:
        wq, wk, wv = q_proj_weight, k_proj_weight, v_proj_weight
    else:
        wq, wk, wv = in_proj_weight[:E], in_proj_weight[E:2 * E], in_proj_weight[2 * E:]
    bq = bk = bv = None
    if in_proj_bias is not None:
        bq, bk, bv = in_proj_bias[:E], in_proj_bias[E:2 * E], in_proj_bias[2 * E:]
    q = F.linear(query, wq, bq).view(L, B, H, d).permute(1, 2, 0, 3)
    k = F.linear(key, wk, bk).view(S, B, H, d).permute(1, 2, 0, 3)
    v = F.linear(value, wv, bv).view(S, B, H, d).permute(1, 2, 0, 3)
    mask = None
    if attn_mask is not None:
        m = attn_mask.view(1, 1, L, S) if mask_dim == 2 else attn_mask.view(B, H, L, S)
        mask = torch.logical_not(m) if mask_bool else m
    if key_padding_mask is not None:
        kp = key_padding_mask.view(B, 1, 1, S)
        kp = torch.logical_not(kp) if kpm_bool else kp
        if mask is None:
            mask = kp
        elif mask_bool and kpm_bool:
            mask = torch.logical_and(mask, kp)
        else:
            if mask_bool:
                # new_zeros: on the inputs' device (a bare torch.zeros would make a CPU tensor on CUDA)
                mask = query.new_zeros((1, 1, L, S), dtype=dtype).masked_fill(torch.logical_not(mask), float("-inf"))
            if kpm_bool:
                kp = query.new_zeros((B, 1, 1, S), dtype=dtype).masked_fill(torch.logical_not(kp), float("-inf"))
            mask = mask + kp
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    o = o.permute(2, 0, 1, 3).reshape(L * B, E)
    return F.linear(o, out_proj_weight, out_proj_bias).view(L, B, E)


def _inline(gm: fx.GraphModule, node: fx.Node, a: dict) -> None:
    L, B, E = shape_of(a["query"])
    S = shape_of(a["key"])[0]
    dropout_p = float(a["dropout_p"]) if a["training"] else 0.0
    am, kpm = value_of(a["attn_mask"]), value_of(a["key_padding_mask"])
    fn = functools.partial(mha_as_sdpa, L=L, S=S, B=B, E=E, H=int(a["num_heads"]), dropout_p=dropout_p,
                           separate=bool(a["use_separate_proj_weight"]),
                           mask_bool=am is not None and am.dtype == torch.bool,
                           mask_dim=am.dim() if am is not None else 0,
                           kpm_bool=kpm is not None and kpm.dtype == torch.bool, dtype=value_of(a["query"]).dtype)
    present = [n for n in _TENSORS if isinstance(a[n], fx.Node)]

    def traced(*tensors):
        kw = dict.fromkeys(_TENSORS)
        kw.update(zip(present, tensors))
        return fn(**kw)

    sub = _trace(traced, len(present), {n: value_of(a[n]) for n in present}, present)
    graph = gm.graph
    placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
    values = {p: a[name] for p, name in zip(placeholders, present)}
    with graph.inserting_before(node):
        out = graph.graph_copy(sub.graph, values)
    stack = node.meta.get("stack_trace")
    for new in values.values():
        if isinstance(new, fx.Node) and new.op != "placeholder" and new not in a.values():
            new.meta.setdefault("stack_trace", stack)
            if op_name(new) == "sdpa":
                new.meta["ringfx_pattern"] = "nn.MultiheadAttention"
    for user in list(node.users):
        if op_name(user) == "getitem" and user.args[1] == 0:
            user.replace_all_uses_with(out)
        graph.erase_node(user)
    graph.erase_node(node)


def _trace(fn, n_inputs: int, examples: dict, names: list) -> fx.GraphModule:
    """Trace ``fn`` symbolically, then record each node's shape and dtype (as a meta
    tensor in ``meta[VALUE_KEY]``) so that later passes can read them."""
    sub = _symbolic(fn, n_inputs)
    env = {}
    placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
    for p, name in zip(placeholders, names):
        v = examples[name]
        env[p] = torch.empty(tuple(v.shape), dtype=v.dtype, device="meta")
    for n in sub.graph.nodes:
        if n.op in ("call_function", "call_method"):
            args = fx.node.map_arg(n.args, lambda x: env[x])
            kwargs = fx.node.map_arg(n.kwargs, lambda x: env[x])
            env[n] = n.target(*args, **kwargs) if n.op == "call_function" else \
                getattr(args[0], n.target)(*args[1:], **kwargs)
            n.meta[VALUE_KEY] = env[n]
    return sub


def _symbolic(fn, n_inputs: int) -> fx.GraphModule:
    """``fx.symbolic_trace`` for a function of ``n_inputs`` positional tensors."""
    graph = fx.Graph()
    tracer = fx.Tracer()
    tracer.graph = graph
    tracer.root = torch.nn.Module()
    tracer.tensor_attrs = {}
    proxies = [tracer.create_proxy("placeholder", f"t{i}", (), {}) for i in range(n_inputs)]
    out = fn(*proxies)
    graph.output(tracer.create_arg(out))
    return fx.GraphModule(tracer.root, graph)
